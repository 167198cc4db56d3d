//! One or more cache directories opened as a single dataset: manifests
//! checked for agreement (encoder, latent shape, dtype), statistics pooled,
//! every row group of every shard numbered globally, and the rows of each
//! image (its flipped and unflipped latents) paired by key.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::Normalizer;
use super::pipeline::RowGroupSource;
use super::plan::{DataIndex, Loc, SampleRows};
use crate::shards::manifest::{MANIFEST_FILE, STATS_FILE};
use crate::shards::{LatentBatch, LatentStats, Manifest, RowIndex, ShardReader};
use crate::train::{Result, TrainError};
use rayon::prelude::*;

/// Global row group `i` = row group `local` of shard `shard`.
#[derive(Debug, Clone, Copy)]
struct RgRef {
    shard: usize,
    local: usize,
}

/// The shards behind a [`CacheSet`], readable from many threads.
pub struct ShardSource {
    readers: Vec<ShardReader>,
    groups: Vec<RgRef>,
}

impl RowGroupSource for ShardSource {
    fn read(&self, rg: usize) -> Result<LatentBatch> {
        let r = self
            .groups
            .get(rg)
            .ok_or_else(|| TrainError::State(format!("row group {rg} out of range")))?;
        Ok(self.readers[r.shard].read_row_group(r.local)?)
    }
}

/// Opened cache directories.
pub struct CacheSet {
    dirs: Vec<PathBuf>,
    manifests: Vec<Manifest>,
    index: Arc<DataIndex>,
    source: Arc<ShardSource>,
    norm: Normalizer,
    /// Images whose label is a class index (not -1).
    labelled: usize,
}

fn fmt_err(path: &Path, reason: impl Into<String>) -> TrainError {
    crate::error::FileError::format(path, reason).into()
}

impl CacheSet {
    /// Open `dirs` (each with `manifest.json`, `stats.safetensors` and its
    /// shards); a cache that disagrees with the first (encoder, latent shape,
    /// dtype, classes) is refused, naming its directory.
    /// A store URL (`s3://bucket/cache`) is read through the local cache
    /// ([`crate::store::cache`]).
    pub fn open(dirs: &[PathBuf]) -> Result<Self> {
        let dirs = &crate::store::local_cache_dirs(dirs)?[..];
        let Some(first_dir) = dirs.first() else {
            return Err(TrainError::Config("no cache directory given".into()));
        };
        let mut manifests = Vec::new();
        let mut stats = Vec::new();
        for d in dirs {
            manifests.push(Manifest::load(&d.join(MANIFEST_FILE))?);
            stats.push(LatentStats::load(&d.join(STATS_FILE))?);
        }
        let m0 = &manifests[0];
        for (d, m) in dirs.iter().zip(&manifests).skip(1) {
            let diffs = differences(m0, m);
            if !diffs.is_empty() {
                return Err(fmt_err(
                    d,
                    format!(
                        "does not match {}: {}",
                        first_dir.display(),
                        diffs.join("; ")
                    ),
                ));
            }
        }
        let norm = pool_stats(dirs, &stats, m0.encoder.tokens, m0.encoder.channels)?;

        // Number every row group; pair rows by (dir, key).
        let mut index = IndexBuilder::default();
        for (di, (d, m)) in dirs.iter().zip(&manifests).enumerate() {
            index.add_cache(d, m)?;
            tracing::debug!(
                "cache {di}: {} shards, {} images so far",
                m.shards.len(),
                index.samples.len()
            );
        }
        if index.duplicates > 0 {
            tracing::warn!(
                "{} rows repeat a (key, flip) already seen in the same cache; ignored",
                index.duplicates
            );
        }
        let labelled = index.labelled;
        let (data, source) = index.finish();
        Ok(Self {
            dirs: dirs.to_vec(),
            manifests,
            index: Arc::new(data),
            source: Arc::new(source),
            norm,
            labelled,
        })
    }

    /// The cache directories, in the order given.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Their manifests, in the same order.
    pub fn manifests(&self) -> &[Manifest] {
        &self.manifests
    }

    /// Images over all caches (an image's flipped and unflipped rows count once).
    pub fn num_images(&self) -> usize {
        self.index.samples.len()
    }

    /// Images whose label is a class index (not -1).
    pub fn num_labelled(&self) -> usize {
        self.labelled
    }

    /// Classes of the first manifest (all agree).
    pub fn num_classes(&self) -> usize {
        self.manifests.first().map(|m| m.classes.len()).unwrap_or(0)
    }

    /// Latent tokens per image (H x W).
    pub fn tokens(&self) -> usize {
        self.norm.height * self.norm.width
    }

    /// Latent channels C.
    pub fn channels(&self) -> usize {
        self.norm.channels
    }

    /// The pooled latent statistics the loader normalises with.
    pub fn normalizer(&self) -> &Normalizer {
        &self.norm
    }

    /// Where every image's rows live.
    pub fn index(&self) -> Arc<DataIndex> {
        self.index.clone()
    }

    /// The shards, as a row-group source for the loader.
    pub fn source(&self) -> Arc<dyn RowGroupSource> {
        self.source.clone()
    }
}

/// What makes cache `m` unfit to be read with `m0` (encoder, latent
/// shape, dtype, classes); empty when they agree.
fn differences(m0: &Manifest, m: &Manifest) -> Vec<String> {
    let (a, b) = (&m0.encoder, &m.encoder);
    let mut diffs = Vec::new();
    if a.kind != b.kind
        || a.id != b.id
        || a.config_hash != b.config_hash
        || a.revision != b.revision
    {
        diffs.push(format!(
            "encoder {}@{} vs {}@{}",
            b.id, b.config_hash, a.id, a.config_hash
        ));
    }
    if (a.tokens, a.channels) != (b.tokens, b.channels) {
        diffs.push(format!(
            "latent {}x{} vs {}x{}",
            b.tokens, b.channels, a.tokens, a.channels
        ));
    }
    if m.dtype != m0.dtype {
        diffs.push(format!("dtype {:?} vs {:?}", m.dtype, m0.dtype));
    }
    if m.classes != m0.classes {
        diffs.push("class lists differ".into());
    }
    diffs
}

/// The global numbering of row groups and the pairing of each image's
/// rows, built one cache and one shard at a time.
#[derive(Default)]
struct IndexBuilder {
    readers: Vec<ShardReader>,
    groups: Vec<RgRef>,
    samples: Vec<SampleRows>,
    /// Images whose label is a class index (not -1).
    labelled: usize,
    /// Rows whose (key, flip) was already seen in the same cache.
    duplicates: usize,
}

impl IndexBuilder {
    /// Every shard of cache `dir`, in manifest order.
    fn add_cache(&mut self, dir: &Path, m: &Manifest) -> Result<()> {
        let mut by_key: HashMap<String, usize> = HashMap::new();
        // Footers and key columns of all shards, read in parallel.
        let opened: Vec<Result<(PathBuf, ShardReader, RowIndex)>> = m
            .shards
            .par_iter()
            .map(|info| {
                let path = shard_path(dir, &info.file);
                let reader = ShardReader::open(&path)?;
                let idx = reader.read_index()?;
                Ok((path, reader, idx))
            })
            .collect();
        for opened in opened {
            let (path, reader, idx) = opened?;
            if (reader.tokens(), reader.channels()) != (m.encoder.tokens, m.encoder.channels) {
                return Err(fmt_err(
                    &path,
                    format!(
                        "latent {}x{}, manifest says {}x{}",
                        reader.tokens(),
                        reader.channels(),
                        m.encoder.tokens,
                        m.encoder.channels
                    ),
                ));
            }
            self.add_shard(&path, reader, &idx, &mut by_key)?;
        }
        Ok(())
    }

    /// Number the shard's row groups and file each row under its image
    /// (`by_key`: the images of this cache seen so far).
    fn add_shard(
        &mut self,
        path: &Path,
        reader: ShardReader,
        idx: &RowIndex,
        by_key: &mut HashMap<String, usize>,
    ) -> Result<()> {
        let shard_no = self.readers.len();
        let mut row = 0usize;
        for local in 0..reader.num_row_groups() {
            let rg = self.groups.len() as u32;
            self.groups.push(RgRef {
                shard: shard_no,
                local,
            });
            for r in 0..reader.row_group_rows(local) as usize {
                let (Some(key), Some(&flip), Some(&label)) =
                    (idx.keys.get(row), idx.flips.get(row), idx.labels.get(row))
                else {
                    return Err(fmt_err(
                        path,
                        "row groups hold more rows than the key column",
                    ));
                };
                row += 1;
                self.add_row(by_key, key, flip, label, Loc { rg, row: r as u32 });
            }
        }
        if row != idx.keys.len() {
            return Err(fmt_err(
                path,
                "row-group row counts disagree with the key column",
            ));
        }
        self.readers.push(reader);
        Ok(())
    }

    fn add_row(
        &mut self,
        by_key: &mut HashMap<String, usize>,
        key: &str,
        flip: bool,
        label: i32,
        loc: Loc,
    ) {
        let samples = &mut self.samples;
        let labelled = &mut self.labelled;
        let si = *by_key.entry(key.to_string()).or_insert_with(|| {
            samples.push(SampleRows {
                plain: None,
                flipped: None,
            });
            if label >= 0 {
                *labelled += 1;
            }
            samples.len() - 1
        });
        let slot = if flip {
            &mut samples[si].flipped
        } else {
            &mut samples[si].plain
        };
        if slot.is_some() {
            self.duplicates += 1;
        } else {
            *slot = Some(loc);
        }
    }

    fn finish(self) -> (DataIndex, ShardSource) {
        let index = DataIndex {
            samples: self.samples,
            num_row_groups: self.groups.len(),
        };
        let source = ShardSource {
            readers: self.readers,
            groups: self.groups,
        };
        (index, source)
    }
}

/// `dir/<file>` if it exists, else `dir/shards/<file>`.
fn shard_path(dir: &Path, file: &str) -> PathBuf {
    let direct = dir.join(file);
    if direct.is_file() {
        direct
    } else {
        dir.join("shards").join(file)
    }
}

/// Pool per-directory statistics by image count (population variance of
/// the union); a single directory's statistics are used as they are.
fn pool_stats(
    dirs: &[PathBuf],
    stats: &[LatentStats],
    tokens: usize,
    channels: usize,
) -> Result<Normalizer> {
    let s0 = &stats[0];
    for (d, s) in dirs.iter().zip(stats) {
        if s.channels != channels
            || s.height * s.width != tokens
            || (s.channels, s.height, s.width) != (s0.channels, s0.height, s0.width)
        {
            return Err(fmt_err(
                d,
                format!(
                    "statistics are [{}, {}, {}], latents {tokens}x{channels}",
                    s.channels, s.height, s.width
                ),
            ));
        }
    }
    if stats.len() == 1 {
        return Ok(Normalizer {
            mean: s0.mean.clone(),
            var: s0.var.clone(),
            channels: s0.channels,
            height: s0.height,
            width: s0.width,
        });
    }
    let total: f64 = stats.iter().map(|s| s.count as f64).sum();
    if total <= 0.0 {
        return Err(fmt_err(
            &dirs[0],
            "statistics without counts cannot be pooled across directories",
        ));
    }
    let n = s0.mean.len();
    let mut mean = vec![0f64; n];
    for s in stats {
        let w = s.count as f64 / total;
        for (m, x) in mean.iter_mut().zip(&s.mean) {
            *m += w * *x as f64;
        }
    }
    let mut var = vec![0f64; n];
    for s in stats {
        let w = s.count as f64 / total;
        for i in 0..n {
            let d = s.mean[i] as f64 - mean[i];
            var[i] += w * (s.var[i] as f64 + d * d);
        }
    }
    Ok(Normalizer {
        mean: mean.into_iter().map(|x| x as f32).collect(),
        var: var.into_iter().map(|x| x as f32).collect(),
        channels: s0.channels,
        height: s0.height,
        width: s0.width,
    })
}
