//! Check a cache against its `manifest.json`: every shard re-hashed and
//! fully decoded, row counts, keys, flips and shapes, and the statistics.
//! Works on any cache with the public manifest (built, merged or sampled).

use std::path::{Path, PathBuf};

use crate::progress::Progress;
use crate::shards::{LatentStats, Manifest, ShardInfo, ShardReader};

use super::PipelineError;
use super::build_state::{self, BuildManifest};

/// What a verify found.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct VerifyReport {
    /// The cache checked.
    pub cache_dir: PathBuf,
    /// Shards re-hashed and read.
    pub shards_checked: usize,
    /// Rows decoded.
    pub rows_checked: u64,
    /// Every mismatch found, one line each (empty: the cache is sound).
    pub problems: Vec<String>,
}

impl VerifyReport {
    /// True when nothing is wrong.
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Shard files are named relative to the cache directory; a part's
/// manifest lives two levels down, in CACHE/parts/I.
pub fn data_root(dir: &Path, m: &Manifest) -> PathBuf {
    if m.part.num_parts > 1 && dir.join(build_state::BUILD_STATE_FILE).exists() {
        dir.join("../..")
    } else {
        dir.to_path_buf()
    }
}

/// Verify `dir`, reporting shards checked to `progress`. Problems with the
/// data are collected in the report; only an unreadable manifest is an
/// error.
pub fn verify_cache(
    dir: &Path,
    progress: &mut dyn Progress,
) -> Result<VerifyReport, PipelineError> {
    let m = Manifest::load(&dir.join(build_state::MANIFEST_FILE))?;
    let root = data_root(dir, &m);
    let mut r = VerifyReport {
        cache_dir: dir.to_path_buf(),
        ..Default::default()
    };
    let flips = m.hflip.flips();
    if let Some(st) = BuildManifest::load(dir).ok().filter(|st| !st.complete) {
        r.problems.push(format!(
            "the build is incomplete: {} of {} shards done (resume it with `rae-cache build ... --resume`)",
            st.shards.len(),
            st.layout.end_shard - st.layout.first_shard
        ));
    }
    let mut seen = std::collections::BTreeSet::new();
    progress.start(m.shards.len() as u64);
    for s in &m.shards {
        if !seen.insert(s.file.clone()) {
            r.problems.push(format!("{}: listed twice", s.file));
        }
        r.shards_checked += 1;
        check_shard(&mut r, &root.join(&s.file), s, &m, flips);
        progress.advance(1);
    }
    progress.finish();
    let rows: u64 = m.shards.iter().map(|s| s.rows).sum();
    if rows != m.totals.rows {
        r.problems.push(format!(
            "shards hold {rows} rows, the manifest's totals say {}",
            m.totals.rows
        ));
    }
    if rows != m.totals.images * flips.len() as u64 {
        r.problems.push(format!(
            "{rows} rows for {} images with {} flip(s) per image",
            m.totals.images,
            flips.len()
        ));
    }
    r.problems.extend(check_stats(dir, &m, rows));
    Ok(r)
}

/// One shard: its sha256, size and rows, into the report.
fn check_shard(r: &mut VerifyReport, path: &Path, s: &ShardInfo, m: &Manifest, flips: &[bool]) {
    match crate::fsutil::sha256_file(path).map_err(super::io_err(path)) {
        Ok(h) if h == s.sha256 => {}
        Ok(h) => r.problems.push(format!(
            "{}: sha256 {h} does not match the manifest's {}",
            s.file, s.sha256
        )),
        Err(e) => {
            r.problems.push(format!("{}: {e}", s.file));
            return;
        }
    }
    match std::fs::metadata(path) {
        Ok(md) if md.len() != s.bytes => r.problems.push(format!(
            "{}: {} bytes, the manifest lists {}",
            s.file,
            md.len(),
            s.bytes
        )),
        _ => {}
    }
    let (tokens, channels) = (m.encoder.tokens, m.encoder.channels);
    match check_rows(path, s, tokens, channels, flips, m.classes.len()) {
        Ok(rows) => r.rows_checked += rows,
        Err(e) => r.problems.push(format!("{}: {e}", s.file)),
    }
}

/// `stats.safetensors`: its shape, count and values; or that it is missing
/// where it should be (a whole build with rows).
fn check_stats(dir: &Path, m: &Manifest, rows: u64) -> Vec<String> {
    let stats_path = dir.join(build_state::STATS_FILE);
    let name = build_state::STATS_FILE;
    if !stats_path.exists() {
        return if m.part.num_parts <= 1 && rows > 0 {
            vec![format!("{name} is missing")]
        } else {
            Vec::new()
        };
    }
    let st = match LatentStats::load(&stats_path) {
        Ok(st) => st,
        Err(e) => return vec![format!("{name}: {e}")],
    };
    let mut problems = Vec::new();
    let channels = m.encoder.channels;
    let side = (m.encoder.tokens as f64).sqrt().round() as usize;
    if [st.channels, st.height, st.width] != [channels, side, side] {
        problems.push(format!(
            "{name}: shape [{}, {}, {}], expected [{channels}, {side}, {side}]",
            st.channels, st.height, st.width
        ));
    }
    if st.count != rows {
        problems.push(format!(
            "{name}: count {} but the shards hold {rows} rows",
            st.count
        ));
    }
    if st.mean.iter().chain(&st.var).any(|v| !v.is_finite()) || st.var.iter().any(|v| *v < 0.0) {
        problems.push(format!("{name}: non-finite mean or negative variance"));
    }
    problems
}

fn check_rows(
    path: &Path,
    s: &ShardInfo,
    tokens: usize,
    channels: usize,
    flips: &[bool],
    classes: usize,
) -> Result<u64, String> {
    let reader = ShardReader::open(path).map_err(|e| e.to_string())?;
    if reader.num_rows() != s.rows {
        return Err(format!(
            "{} rows, the manifest lists {}",
            reader.num_rows(),
            s.rows
        ));
    }
    let per = tokens * channels;
    let mut n = 0u64;
    let mut prev_key: Option<String> = None;
    for g in 0..reader.num_row_groups() {
        let b = reader
            .read_row_group(g)
            .map_err(|e| format!("row group {g}: {e}"))?;
        if b.tokens != tokens || b.channels != channels {
            return Err(format!(
                "row group {g}: latent shape [{}, {}], expected [{tokens}, {channels}]",
                b.tokens, b.channels
            ));
        }
        if b.latents.len() != b.keys.len() * per
            || b.labels.len() != b.keys.len()
            || b.flips.len() != b.keys.len()
        {
            return Err(format!("row group {g}: column lengths disagree"));
        }
        if b.latents.iter().any(|v| !v.is_finite()) {
            return Err(format!("row group {g}: non-finite latent values"));
        }
        for (i, key) in b.keys.iter().enumerate() {
            let label = b.labels[i];
            if label < -1 || (classes > 0 && label >= classes as i32) {
                return Err(format!(
                    "row {n} ({key}): label {label} outside the {classes} classes"
                ));
            }
            let want_flip = flips[(n as usize) % flips.len()];
            if b.flips[i] != want_flip {
                return Err(format!(
                    "row {n} ({key}): flip {} where {want_flip} was expected",
                    b.flips[i]
                ));
            }
            if !want_flip {
                if let Some(p) = &prev_key
                    && p >= key
                {
                    return Err(format!("row {n}: key {key:?} is not after {p:?}"));
                }
                prev_key = Some(key.clone());
            } else if prev_key.as_ref() != Some(key) {
                return Err(format!(
                    "row {n}: flipped row of {key:?} does not follow its unflipped row"
                ));
            }
            n += 1;
        }
    }
    if n != s.rows {
        return Err(format!("decoded {n} rows, the manifest lists {}", s.rows));
    }
    Ok(n)
}
