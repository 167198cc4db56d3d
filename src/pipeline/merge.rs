//! Combine the parts of a multi-machine build (`--num-parts N --part I`)
//! into one manifest and exact statistics.

use std::path::{Path, PathBuf};

use crate::shards::StatsAccumulator;

use super::build_state::{self, BuildManifest};
use super::lock::{DirLock, lock_dir};
use super::{PipelineError, io_err};

/// Left fold, in shard order, of the per-shard accumulators of the given
/// (build root, manifest) pairs: the same operations a whole build does.
pub fn fold_states(parts: &[(&Path, &BuildManifest)]) -> Result<StatsAccumulator, PipelineError> {
    let [tokens, channels] = parts.first().map(|(_, m)| m.latent_shape).unwrap_or([0, 0]);
    let mut acc = StatsAccumulator::new(tokens, channels);
    for (root, m) in parts {
        for s in m.shards.iter().filter(|s| s.file.is_some()) {
            let st = StatsAccumulator::load_state(&super::state_file(root, s.index))?;
            if st.count != s.rows || (st.tokens, st.channels) != (tokens, channels) {
                return Err(PipelineError::Invalid(format!(
                    "statistics state of shard {} counts {} rows, the manifest lists {}",
                    s.index, st.count, s.rows
                )));
            }
            acc.merge(&st)?;
        }
    }
    Ok(acc)
}

/// What a merge did, for the CLI's report and `--json`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MergeSummary {
    /// The merged cache.
    pub cache_dir: PathBuf,
    /// Parts merged.
    pub parts: usize,
    /// Shard files, all parts.
    pub shards: usize,
    /// Rows, all parts.
    pub rows: u64,
    /// Images encoded, all parts.
    pub images_encoded: u64,
    /// Images rejected, all parts.
    pub images_rejected: u64,
    /// Bytes of the shard files.
    pub bytes: u64,
}

/// Merge `out/parts/*` into `out/manifest.json` + `out/stats.safetensors`.
/// Refuses, naming it, if a part is missing, incomplete or inconsistent.
pub fn merge_parts(out: &Path) -> Result<MergeSummary, PipelineError> {
    let _lock = lock_dir(out, build_state::LOCK_FILE)?;
    let parts_dir = out.join(build_state::PARTS_DIR);
    // A part still being built holds its own lock: keep them all.
    let (manifests, _part_locks) = load_parts(out, &parts_dir)?;
    let total = check_parts(&manifests)?;
    check_shard_files(out, &manifests)?;

    let roots: Vec<PathBuf> = (0..manifests.len())
        .map(|i| parts_dir.join(i.to_string()))
        .collect();
    let pairs: Vec<(&Path, &BuildManifest)> = roots
        .iter()
        .map(|r| r.as_path())
        .zip(manifests.iter())
        .collect();
    let acc = fold_states(&pairs)?;
    if acc.count > 0 {
        acc.save_stats(&out.join(build_state::STATS_FILE))?;
    }
    copy_states(out, &pairs)?;

    let merged = merged_manifest(&manifests, total, acc.count > 0);
    merged.save(out)?;
    Ok(MergeSummary {
        cache_dir: out.to_path_buf(),
        parts: manifests.len(),
        shards: merged.shards.iter().filter(|s| s.file.is_some()).count(),
        rows: merged.totals.rows,
        images_encoded: merged.totals.images_encoded,
        images_rejected: merged.totals.images_rejected,
        bytes: merged.totals.bytes,
    })
}

/// Every part's build state, in part order, with the parts' locks held.
/// Refuses a missing part and a directory that is not one of the parts.
fn load_parts(
    out: &Path,
    parts_dir: &Path,
) -> Result<(Vec<BuildManifest>, Vec<DirLock>), PipelineError> {
    if !parts_dir.is_dir() {
        return Err(PipelineError::Invalid(format!(
            "{} has no parts/ directory: nothing to merge (was it built with --num-parts?)",
            out.display()
        )));
    }
    let first = load_part(parts_dir, 0)?;
    let count = first.part.map(|p| p.count).unwrap_or(0);
    if count == 0 {
        return Err(PipelineError::Invalid(format!(
            "{}: part 0 has no part number",
            parts_dir.display()
        )));
    }
    let locks = (0..count)
        .map(|i| parts_dir.join(i.to_string()))
        .filter(|dir| dir.is_dir())
        .map(|dir| lock_dir(&dir, build_state::LOCK_FILE))
        .collect::<Result<Vec<_>, _>>()?;
    let mut manifests = vec![first];
    for i in 1..count {
        manifests.push(load_part(parts_dir, i)?);
    }
    // Anything beyond the expected parts is a mistake (another build?).
    for e in std::fs::read_dir(parts_dir).map_err(io_err(parts_dir))? {
        let name = e.map_err(io_err(parts_dir))?.file_name();
        let name = name.to_string_lossy();
        if name.parse::<usize>().map(|i| i >= count).unwrap_or(false) {
            return Err(PipelineError::Invalid(format!(
                "{}/{name} is not part of a {count}-part build",
                parts_dir.display()
            )));
        }
    }
    Ok((manifests, locks))
}

fn load_part(parts_dir: &Path, i: usize) -> Result<BuildManifest, PipelineError> {
    let root = parts_dir.join(i.to_string());
    let p = root.join(build_state::BUILD_STATE_FILE);
    if !p.is_file() {
        return Err(PipelineError::Invalid(format!(
            "part {i} is missing ({} not found): run its build (`--part {i}`) before merging",
            p.display()
        )));
    }
    Ok(BuildManifest::load(&root)?)
}

/// Part `i` of the `manifests.len()` must say so, be complete, have part
/// 0's settings and continue where part `i - 1` ends. Returns the total
/// shard count, which the parts must cover.
fn check_parts(manifests: &[BuildManifest]) -> Result<usize, PipelineError> {
    let count = manifests.len();
    let base = &manifests[0].settings;
    let mut expected_shard = 0usize;
    for (i, m) in manifests.iter().enumerate() {
        let p = m.part.unwrap_or(super::PartSpec {
            index: usize::MAX,
            count: 0,
        });
        if p.index != i || p.count != count {
            return Err(PipelineError::Invalid(format!(
                "parts/{i}/manifest.json says part {} of {}, expected part {i} of {count}",
                p.index, p.count
            )));
        }
        if !m.complete {
            return Err(PipelineError::Invalid(format!(
                "part {i} is incomplete ({} of its {} shards done): finish it with `rae-cache build ... --num-parts {count} --part {i} --resume`",
                m.shards.len(),
                m.layout.end_shard - m.layout.first_shard
            )));
        }
        let mut s = m.settings.clone();
        s.part = base.part;
        let diffs = base.differences(&s);
        if !diffs.is_empty() {
            return Err(PipelineError::Invalid(format!(
                "part {i} was built with different arguments than part 0:\n  {}",
                diffs.join("\n  ")
            )));
        }
        if m.layout.first_shard != expected_shard || m.next_shard() != m.layout.end_shard {
            return Err(PipelineError::Invalid(format!(
                "part {i} covers shards {}..{}, expected to start at {expected_shard}",
                m.layout.first_shard, m.layout.end_shard
            )));
        }
        expected_shard = m.layout.end_shard;
    }
    let total = manifests[0].layout.total_shards;
    if expected_shard != total {
        return Err(PipelineError::Invalid(format!(
            "parts cover {expected_shard} of {total} shards"
        )));
    }
    Ok(total)
}

/// Every listed shard file must be there (not re-hashed here: `verify` does that).
fn check_shard_files(out: &Path, manifests: &[BuildManifest]) -> Result<(), PipelineError> {
    let files = manifests
        .iter()
        .flat_map(|m| &m.shards)
        .filter_map(|s| s.file.as_ref());
    for f in files {
        if !out.join(f).is_file() {
            return Err(PipelineError::Invalid(format!(
                "shard {} listed by part manifests is missing",
                out.join(f).display()
            )));
        }
    }
    Ok(())
}

/// Per-shard states move next to the merged manifest so the cache is
/// self-contained (and a later merge of merges would work the same way).
fn copy_states(out: &Path, parts: &[(&Path, &BuildManifest)]) -> Result<(), PipelineError> {
    let state_dir = out.join(build_state::STATE_DIR);
    std::fs::create_dir_all(&state_dir).map_err(io_err(&state_dir))?;
    for (root, m) in parts {
        for s in m.shards.iter().filter(|s| s.file.is_some()) {
            let from = super::state_file(root, s.index);
            let to = super::state_file(out, s.index);
            std::fs::copy(&from, &to).map_err(io_err(&to))?;
        }
    }
    Ok(())
}

/// The whole build's state: part 0's, with every part's shards and runs.
fn merged_manifest(manifests: &[BuildManifest], total: usize, has_stats: bool) -> BuildManifest {
    let mut merged = manifests[0].clone();
    merged.part = None;
    merged.settings.num_parts = None;
    merged.settings.part = None;
    merged.layout.first_shard = 0;
    merged.layout.end_shard = total;
    merged.shards = manifests
        .iter()
        .flat_map(|m| m.shards.iter().cloned())
        .collect();
    merged.stats = has_stats.then(|| build_state::STATS_FILE.into());
    merged.complete = true;
    merged.build_log.seconds = manifests.iter().map(|m| m.build_log.seconds).sum();
    merged.build_log.runs = manifests.iter().map(|m| m.build_log.runs).sum();
    merged.build_log.updated_unix = build_state::unix_now();
    merged.refresh_totals();
    merged
}
