//! Check a cache against its manifest: every shard re-hashed and fully
//! decoded, row counts, keys, flips and shapes, and the statistics file.

use std::path::{Path, PathBuf};

use crate::shards::ShardReader;

use super::manifest::{self, BuildManifest};
use super::{PipelineError, plan, stats};

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct VerifyReport {
    pub cache_dir: PathBuf,
    pub shards_checked: usize,
    pub rows_checked: u64,
    pub problems: Vec<String>,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Verify `dir` (a whole or merged cache, or a part's directory). Problems
/// with the data are collected in the report; only an unreadable manifest
/// is an error.
pub fn verify_cache(
    dir: &Path,
    mut progress: impl FnMut(usize, usize),
) -> Result<VerifyReport, PipelineError> {
    let m = BuildManifest::load(&dir.join(manifest::MANIFEST_FILE))?;
    // A part's manifest lives in CACHE/parts/I; its shards in CACHE/shards.
    let data_root = if m.part.is_some() {
        dir.join("../..")
    } else {
        dir.to_path_buf()
    };
    let mut r = VerifyReport {
        cache_dir: dir.to_path_buf(),
        ..Default::default()
    };
    let [tokens, channels] = m.latent_shape;
    let flips = m.settings.hflip.flips();
    if !m.complete {
        r.problems.push(format!(
            "the build is incomplete: {} of {} shards done (resume it with `rae-cache build ... --resume`)",
            m.shards.len(),
            m.layout.end_shard - m.layout.first_shard
        ));
    }
    for (i, s) in m.shards.iter().enumerate() {
        progress(i, m.shards.len());
        if s.index != m.layout.first_shard + i {
            r.problems
                .push(format!("manifest lists shard {} at position {i}", s.index));
        }
        let Some(file) = &s.file else {
            if s.rows != 0 {
                r.problems
                    .push(format!("shard {} has {} rows but no file", s.index, s.rows));
            }
            continue;
        };
        let path = data_root.join(file);
        let name = file.rsplit('/').next().unwrap_or(file);
        if plan::parse_shard_file_name(name) != Some((s.index, false)) {
            r.problems.push(format!(
                "{file}: file name does not match shard index {}",
                s.index
            ));
        }
        r.shards_checked += 1;
        match super::sha256_file(&path) {
            Ok(h) if Some(&h) == s.sha256.as_ref() => {}
            Ok(h) => {
                r.problems.push(format!(
                    "{file}: sha256 {h} does not match the manifest's {}",
                    s.sha256.clone().unwrap_or_default()
                ));
            }
            Err(e) => {
                r.problems.push(format!("{file}: {e}"));
                continue;
            }
        }
        match check_rows(&path, s, tokens, channels, flips) {
            Ok(rows) => r.rows_checked += rows,
            Err(e) => r.problems.push(format!("{file}: {e}")),
        }
    }
    let rows: u64 = m.shards.iter().map(|s| s.rows).sum();
    if rows != m.totals.rows {
        r.problems.push(format!(
            "shards hold {rows} rows, the manifest's totals say {}",
            m.totals.rows
        ));
    }
    if let Some(stats_file) = &m.stats {
        match stats::load_final(&dir.join(stats_file)) {
            Ok(st) => {
                let side = (tokens as f64).sqrt().round() as usize;
                let want = if side * side == tokens {
                    [channels, side, side]
                } else {
                    [channels, 1, tokens]
                };
                if st.shape != want {
                    r.problems.push(format!(
                        "{stats_file}: shape {:?}, expected {want:?}",
                        st.shape
                    ));
                }
                if st.count != rows {
                    r.problems.push(format!(
                        "{stats_file}: count {} but the shards hold {rows} rows",
                        st.count
                    ));
                }
                if st.mean.iter().chain(&st.var).any(|v| !v.is_finite())
                    || st.var.iter().any(|v| *v < 0.0)
                {
                    r.problems.push(format!(
                        "{stats_file}: non-finite mean or negative variance"
                    ));
                }
            }
            Err(e) => r.problems.push(format!("{stats_file}: {e}")),
        }
    } else if m.part.is_none() && m.complete {
        r.problems
            .push("the manifest names no statistics file".into());
    }
    Ok(r)
}

fn check_rows(
    path: &Path,
    s: &manifest::ShardEntry,
    tokens: usize,
    channels: usize,
    flips: &[bool],
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
            let want_flip = flips[(n as usize) % flips.len()];
            if b.flips[i] != want_flip {
                return Err(format!(
                    "row {n} ({key}): flip {} where {want_flip} was expected",
                    b.flips[i]
                ));
            }
            if !want_flip {
                if let Some(p) = &prev_key {
                    if p >= key {
                        return Err(format!("row {n}: key {key:?} is not after {p:?}"));
                    }
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
    let images = if flips.is_empty() {
        0
    } else {
        n / flips.len() as u64
    };
    if images != s.images {
        return Err(format!("{images} images, the manifest lists {}", s.images));
    }
    Ok(n)
}
