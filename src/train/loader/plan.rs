//! The order of one epoch, computed from the dataset index alone (no data is
//! read), so it is deterministic in (seed, epoch) and a cursor
//! (epoch, step) names a batch exactly.
//!
//! Shuffling keeps reads mostly sequential: the row groups are permuted,
//! taken `window` at a time (what the workers hold in memory), and the
//! samples of one window are shuffled together. Each image appears once per
//! epoch, as its stored flipped or unflipped row with probability 1/2 (the
//! reference's RandomHorizontalFlip); an image with one row uses it.

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A row: global row-group id and row within that group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Loc {
    /// Row group, numbered across all shards of the cache set.
    pub rg: u32,
    /// Row within that row group.
    pub row: u32,
}

/// The stored rows of one image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SampleRows {
    /// The unflipped image's row, if stored.
    pub plain: Option<Loc>,
    /// The horizontally flipped image's row, if stored.
    pub flipped: Option<Loc>,
}

impl SampleRows {
    fn choose(&self, flip: bool) -> Loc {
        match (self.plain, self.flipped) {
            (Some(p), Some(f)) => {
                if flip {
                    f
                } else {
                    p
                }
            }
            (Some(p), None) => p,
            (None, Some(f)) => f,
            // The index builder never stores an image without rows.
            (None, None) => Loc {
                rg: u32::MAX,
                row: u32::MAX,
            },
        }
    }
}

/// Images of a dataset and where their rows live.
#[derive(Debug, Clone, Default)]
pub struct DataIndex {
    /// One entry per image, in cache order.
    pub samples: Vec<SampleRows>,
    /// Row groups over all shards (the range of [`Loc::rg`]).
    pub num_row_groups: usize,
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The RNG of one epoch: ChaCha8 (stable output across rand versions).
fn epoch_rng(seed: u64, epoch: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(splitmix64(
        splitmix64(seed) ^ epoch.wrapping_mul(0xA24B_AED4_963E_E407),
    ))
}

/// Uniform in [0, n) from a 64-bit draw (multiply-shift; bias < n / 2^64).
fn below(rng: &mut ChaCha8Rng, n: usize) -> usize {
    ((rng.next_u64() as u128 * n as u128) >> 64) as usize
}

/// Fisher-Yates with our own index draw, so the order never depends on a
/// rand-crate implementation detail.
fn shuffle<T>(v: &mut [T], rng: &mut ChaCha8Rng) {
    for i in (1..v.len()).rev() {
        let j = below(rng, i + 1);
        v.swap(i, j);
    }
}

/// The full epoch order: one row per image, every image exactly once.
pub fn epoch_order(index: &DataIndex, seed: u64, epoch: u64, window: usize) -> Vec<Loc> {
    let mut rng = epoch_rng(seed, epoch);
    let n = index.samples.len();
    let mut flip_bits = Vec::with_capacity(n.div_ceil(64));
    for _ in 0..n.div_ceil(64) {
        flip_bits.push(rng.next_u64());
    }
    let mut by_rg: Vec<Vec<Loc>> = vec![Vec::new(); index.num_row_groups];
    for (i, s) in index.samples.iter().enumerate() {
        let flip = (flip_bits[i / 64] >> (i % 64)) & 1 == 1;
        let loc = s.choose(flip);
        if let Some(bucket) = by_rg.get_mut(loc.rg as usize) {
            bucket.push(loc);
        }
    }
    let mut rgs: Vec<usize> = (0..index.num_row_groups).collect();
    shuffle(&mut rgs, &mut rng);
    let mut order = Vec::with_capacity(n);
    for win in rgs.chunks(window.max(1)) {
        let start = order.len();
        for &rg in win {
            order.extend_from_slice(&by_rg[rg]);
        }
        shuffle(&mut order[start..], &mut rng);
    }
    order
}

/// Data-parallel layout of an epoch. The epoch order is cut into global
/// batches of `batch * world_size * accum` samples, one per optimizer step
/// (the tail that does not fill one is dropped, as DistributedSampler with
/// drop_last). What an optimizer step sees therefore depends only on the
/// global batch, not on how it is split: a run resumed on another number of
/// processes (same global batch) continues exactly.
///
/// Within a global batch the samples are sorted by storage position before
/// they are split, so each rank's share comes from about `1 / world_size` of
/// the row groups in flight (reads stay local) while the union stays the
/// same random global batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sharding {
    /// Per-rank micro-batch.
    pub batch: usize,
    /// This process's rank, `0..world_size`.
    pub rank: usize,
    /// Number of data-parallel processes.
    pub world_size: usize,
    /// Micro-batches per optimizer step.
    pub accum: usize,
}

/// One sample of a plan: its position in the epoch order (with the epoch,
/// a name for it that does not depend on the layout) and where it lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Planned {
    /// Position in the epoch order.
    pub pos: usize,
    /// The row read for it.
    pub loc: Loc,
}

impl Sharding {
    /// Samples per optimizer step over all ranks (`batch * world_size * accum`).
    pub fn global_batch(&self) -> usize {
        self.batch * self.world_size * self.accum.max(1)
    }

    /// Optimizer steps per epoch.
    pub fn steps_per_epoch(&self, samples: usize) -> usize {
        samples / self.global_batch().max(1)
    }

    /// This rank's samples of optimizer step `step` of `order`, micro-batch
    /// after micro-batch (`accum * batch` of them).
    pub fn step_samples(&self, order: &[Loc], step: usize) -> Vec<Planned> {
        let g = self.global_batch();
        let start = (step * g).min(order.len());
        let end = ((step + 1) * g).min(order.len());
        let mut all: Vec<Planned> = (start..end)
            .map(|pos| Planned {
                pos,
                loc: order[pos],
            })
            .collect();
        all.sort_unstable_by_key(|p| (p.loc, p.pos));
        let share = self.batch * self.accum.max(1);
        let a = (self.rank * share).min(all.len());
        let b = ((self.rank + 1) * share).min(all.len());
        all[a..b].to_vec()
    }
}

/// A layout-independent name for a sample of an epoch (seeds its noise).
pub fn sample_id(epoch: u64, pos: usize) -> u64 {
    (epoch << 40) | pos as u64
}

/// `n` images, two rows each (plain then flipped, adjacent), `rows_per_rg`
/// rows per group: the index the loader's unit tests run on.
#[cfg(test)]
pub(super) fn paired_index(n: usize, rows_per_rg: usize) -> DataIndex {
    let loc = |r: usize| Loc {
        rg: (r / rows_per_rg) as u32,
        row: (r % rows_per_rg) as u32,
    };
    let samples = (0..n)
        .map(|i| SampleRows {
            plain: Some(loc(2 * i)),
            flipped: Some(loc(2 * i + 1)),
        })
        .collect();
    DataIndex {
        samples,
        num_row_groups: (2 * n).div_ceil(rows_per_rg),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(n: usize, rows_per_rg: usize) -> DataIndex {
        paired_index(n, rows_per_rg)
    }

    fn image_of(l: &Loc, rows_per_rg: usize) -> usize {
        (l.rg as usize * rows_per_rg + l.row as usize) / 2
    }

    #[test]
    fn each_epoch_is_a_permutation_with_random_flips() {
        let idx = index(101, 6);
        let o = epoch_order(&idx, 7, 0, 3);
        let mut imgs: Vec<usize> = o.iter().map(|l| image_of(l, 6)).collect();
        imgs.sort_unstable();
        assert_eq!(imgs, (0..101).collect::<Vec<_>>());
        let flipped = o.iter().filter(|l| (l.rg * 6 + l.row) % 2 == 1).count();
        assert!(flipped > 25 && flipped < 76, "{flipped} flipped of 101");
    }

    #[test]
    fn deterministic_and_epochs_differ() {
        let idx = index(64, 4);
        assert_eq!(epoch_order(&idx, 1, 3, 2), epoch_order(&idx, 1, 3, 2));
        assert_ne!(epoch_order(&idx, 1, 3, 2), epoch_order(&idx, 1, 4, 2));
        assert_ne!(epoch_order(&idx, 1, 3, 2), epoch_order(&idx, 2, 3, 2));
    }

    #[test]
    fn single_row_images_use_their_row() {
        let samples = (0..10)
            .map(|i| SampleRows {
                plain: Some(Loc { rg: 0, row: i }),
                flipped: None,
            })
            .collect();
        let idx = DataIndex {
            samples,
            num_row_groups: 1,
        };
        let mut o = epoch_order(&idx, 0, 0, 4);
        o.sort_unstable();
        assert_eq!(
            o,
            (0..10).map(|i| Loc { rg: 0, row: i }).collect::<Vec<_>>()
        );
    }

    #[test]
    fn rank_shares_partition_each_global_batch_for_any_layout() {
        let idx = index(50, 4);
        let o = epoch_order(&idx, 3, 1, 2);
        // global batch 12 as 1x12, 3x4, 2x3 (accum 2), 6x1 (accum 2)
        let layouts = [(12, 1, 1), (4, 3, 1), (3, 2, 2), (1, 6, 2)];
        let mut per_layout = Vec::new();
        for (batch, world, accum) in layouts {
            let mut steps = Vec::new();
            for step in 0..4 {
                let mut all = Vec::new();
                for rank in 0..world {
                    let s = Sharding {
                        batch,
                        rank,
                        world_size: world,
                        accum,
                    };
                    assert_eq!(s.global_batch(), 12);
                    assert_eq!(s.steps_per_epoch(o.len()), 4);
                    let mine = s.step_samples(&o, step);
                    assert_eq!(mine.len(), batch * accum);
                    all.extend(mine.iter().map(|p| p.pos));
                }
                all.sort_unstable();
                assert_eq!(all, (step * 12..(step + 1) * 12).collect::<Vec<_>>());
                steps.push(all);
            }
            per_layout.push(steps);
        }
        assert!(per_layout.windows(2).all(|w| w[0] == w[1]));
    }

    #[test]
    fn rank_shares_are_storage_local() {
        // 4 ranks over a global batch drawn from 16 row groups: each rank's
        // share spans few row groups.
        let idx = index(512, 8);
        let o = epoch_order(&idx, 0, 0, 16);
        let mut groups = 0;
        for rank in 0..4 {
            let s = Sharding {
                batch: 16,
                rank,
                world_size: 4,
                accum: 1,
            };
            let mut rgs: Vec<u32> = s.step_samples(&o, 0).iter().map(|p| p.loc.rg).collect();
            rgs.dedup();
            groups += rgs.len();
        }
        let mut all: Vec<u32> = o[..64].iter().map(|l| l.rg).collect();
        all.sort_unstable();
        all.dedup();
        // shares overlap only at their boundaries
        assert!(
            groups <= all.len() + 3,
            "{groups} reads for {} groups",
            all.len()
        );
    }
}
