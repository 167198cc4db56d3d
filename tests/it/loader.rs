//! The training loader on a tiny cache written with the shard writer:
//! epochs are permutations (each image once, one of its flips), epochs
//! differ, a seed fixes the order, a cursor resumes exactly, rank slices are
//! disjoint and cover the epoch, latents arrive normalised as [B, C, H, W].

use crate::common::tiny_cache;

use std::collections::BTreeSet;

use candle_core::Device;
use rae_cache::train::checkpoint::LoaderCursor;
use rae_cache::train::loader::{Batch, CacheSet, Loader, LoaderConfig};

fn cfg(batch: usize, seed: u64) -> LoaderConfig {
    LoaderConfig {
        batch_size: batch,
        seed,
        shuffle_window: 2,
        workers: 2,
        prefetch: 2,
        rank: 0,
        world_size: 1,
        accum: 1,
        noise: false,
        raw: false,
    }
}

fn take(l: &mut Loader, n: usize) -> Vec<Batch> {
    (0..n).map(|_| l.next_batch().unwrap()).collect()
}

fn ids(batches: &[Batch]) -> Vec<(String, bool)> {
    batches
        .iter()
        .flat_map(|b| b.keys.iter().cloned().zip(b.flips.iter().copied()))
        .collect()
}

#[test]
fn epochs_are_permutations_with_flips_and_seeded() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = tiny_cache::Spec::default();
    tiny_cache::write(tmp.path(), &spec);
    let set = CacheSet::open(&[tmp.path().to_path_buf()]).unwrap();
    assert_eq!(set.num_images(), spec.images);
    let mut l = Loader::new(&set, &cfg(5, 11), LoaderCursor::default(), &Device::Cpu).unwrap();
    assert_eq!(l.steps_per_epoch(), 8);
    let e0 = ids(&take(&mut l, 8));
    let e1 = ids(&take(&mut l, 8));
    for e in [&e0, &e1] {
        let keys: BTreeSet<&String> = e.iter().map(|(k, _)| k).collect();
        assert_eq!(keys.len(), spec.images, "every image exactly once");
        let flipped = e.iter().filter(|(_, f)| *f).count();
        assert!(
            flipped > 5 && flipped < 35,
            "{flipped} flipped rows of {}",
            spec.images
        );
    }
    assert_ne!(e0, e1, "epochs differ");
    let mut same = Loader::new(&set, &cfg(5, 11), LoaderCursor::default(), &Device::Cpu).unwrap();
    assert_eq!(ids(&take(&mut same, 8)), e0, "same seed, same order");
    let mut other = Loader::new(&set, &cfg(5, 12), LoaderCursor::default(), &Device::Cpu).unwrap();
    assert_ne!(ids(&take(&mut other, 8)), e0, "another seed, another order");
}

#[test]
fn cursor_resume_equals_uninterrupted() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = tiny_cache::Spec::default();
    tiny_cache::write(tmp.path(), &spec);
    let set = CacheSet::open(&[tmp.path().to_path_buf()]).unwrap();
    let mut full = Loader::new(&set, &cfg(4, 3), LoaderCursor::default(), &Device::Cpu).unwrap();
    let all = take(&mut full, 25);
    let mut first = Loader::new(&set, &cfg(4, 3), LoaderCursor::default(), &Device::Cpu).unwrap();
    take(&mut first, 13);
    let cursor = first.cursor();
    drop(first);
    let mut resumed = Loader::new(&set, &cfg(4, 3), cursor, &Device::Cpu).unwrap();
    for want in &all[13..] {
        let got = resumed.next_batch().unwrap();
        assert_eq!(got.keys, want.keys);
        assert_eq!(got.flips, want.flips);
        let same = got.x.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            == want.x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(same, "latents of a resumed batch differ");
    }
}

#[test]
fn rank_slices_are_disjoint_and_cover_the_epoch() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = tiny_cache::Spec {
        images: 36,
        ..Default::default()
    };
    tiny_cache::write(tmp.path(), &spec);
    let set = CacheSet::open(&[tmp.path().to_path_buf()]).unwrap();
    let world = 3;
    let mut seen = Vec::new();
    for rank in 0..world {
        let c = LoaderConfig {
            rank,
            world_size: world,
            ..cfg(4, 5)
        };
        let mut l = Loader::new(&set, &c, LoaderCursor::default(), &Device::Cpu).unwrap();
        assert_eq!(l.steps_per_epoch(), 3);
        seen.extend(ids(&take(&mut l, 3)).into_iter().map(|(k, _)| k));
    }
    let unique: BTreeSet<&String> = seen.iter().collect();
    assert_eq!(seen.len(), 36);
    assert_eq!(unique.len(), 36, "ranks overlap");
}

/// The samples of every optimizer step, as sets of layout-independent ids,
/// for a (batch, world, accum) layout starting at `cursor`.
fn step_sets(
    set: &CacheSet,
    (batch, world, accum): (usize, usize, usize),
    cursor: LoaderCursor,
    steps: usize,
) -> Vec<BTreeSet<u64>> {
    let mut out = vec![BTreeSet::new(); steps];
    for rank in 0..world {
        let c = LoaderConfig {
            rank,
            world_size: world,
            accum,
            ..cfg(batch, 5)
        };
        let mut l = Loader::new(set, &c, cursor, &Device::Cpu).unwrap();
        for s in out.iter_mut() {
            for m in 0..accum {
                let b = l.next_batch().unwrap();
                assert_eq!(b.micro, m);
                assert!(
                    b.sample_ids.iter().all(|id| s.insert(*id)),
                    "a sample twice in one step"
                );
            }
        }
    }
    out
}

#[test]
fn global_batches_do_not_depend_on_the_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = tiny_cache::Spec {
        images: 36,
        ..Default::default()
    };
    tiny_cache::write(tmp.path(), &spec);
    let set = CacheSet::open(&[tmp.path().to_path_buf()]).unwrap();
    // global batch 8: one process, 2 ranks, 4 ranks with accumulation 2;
    // 4 steps per epoch, so 6 steps cross into epoch 1
    let one = step_sets(&set, (8, 1, 1), LoaderCursor::default(), 6);
    assert_eq!(one, step_sets(&set, (4, 2, 1), LoaderCursor::default(), 6));
    assert_eq!(one, step_sets(&set, (1, 4, 2), LoaderCursor::default(), 6));
    // resume step 3 of a 1-process run on 2 ranks
    let mut l = Loader::new(&set, &cfg(8, 5), LoaderCursor::default(), &Device::Cpu).unwrap();
    take(&mut l, 3);
    let resumed = step_sets(&set, (2, 2, 2), l.cursor(), 3);
    assert_eq!(resumed[..], one[3..]);
}

#[test]
fn latents_are_normalised_chw() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = tiny_cache::Spec {
        images: 8,
        both_flips: false,
        ..Default::default()
    };
    tiny_cache::write(tmp.path(), &spec);
    let set = CacheSet::open(&[tmp.path().to_path_buf()]).unwrap();
    let norm = set.normalizer().clone();
    let mut l = Loader::new(&set, &cfg(2, 0), LoaderCursor::default(), &Device::Cpu).unwrap();
    let b = l.next_batch().unwrap();
    let side = (spec.tokens as f64).sqrt() as usize;
    assert_eq!(b.x.dims(), &[2, spec.channels, side, side]);
    let x = b.x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let img: usize = b.keys[0].rsplit("img").next().unwrap()[..4]
        .parse()
        .unwrap();
    assert!(!b.flips[0], "single-row cache");
    let raw = tiny_cache::latent(&spec, img, false);
    let (c, t) = (spec.channels, spec.tokens);
    let mut worst = 0f32;
    for ch in 0..c {
        for tok in 0..t {
            let e = ch * t + tok; // [C, H, W] index
            let want = (raw[tok * c + ch] - norm.mean[e]) / (norm.var[e] + 1e-5).sqrt();
            worst = worst.max((x[e] - want).abs());
        }
    }
    assert!(worst < 1e-5, "normalised latents differ by {worst}");
    // the whole cache normalised has ~zero mean per element
    let labels = b.y.to_vec1::<i64>().unwrap();
    assert_eq!(labels[0] as usize, img % spec.classes);
}

#[test]
fn mismatched_caches_are_rejected() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    tiny_cache::write(a.path(), &tiny_cache::Spec::default());
    tiny_cache::write(
        b.path(),
        &tiny_cache::Spec {
            channels: 4,
            ..Default::default()
        },
    );
    assert!(CacheSet::open(&[a.path().to_path_buf(), b.path().to_path_buf()]).is_err());
    // two compatible caches: their images add up
    let c = tempfile::tempdir().unwrap();
    tiny_cache::write(
        c.path(),
        &tiny_cache::Spec {
            images: 10,
            seed: 7,
            ..Default::default()
        },
    );
    let set = CacheSet::open(&[a.path().to_path_buf(), c.path().to_path_buf()]).unwrap();
    assert_eq!(set.num_images(), 50);
}
