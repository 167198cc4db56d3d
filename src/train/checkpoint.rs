//! Run-dir checkpoints: one safetensors file per save holding the model
//! weights (`model.*`), the EMA weights (`ema.*`), the AdamW moments
//! (`optim.m.*`, `optim.v.*`), any further named tensors of the run
//! (`aux.*`: e.g. the stage-1 discriminator), and in the metadata the step, the loader
//! cursor, an optional RNG state, per-parameter optimizer step counts and
//! the run config (JSON). Written to a temp name, fsynced, renamed; a
//! `latest` file names the newest; only the last K are kept. Tensors
//! round-trip bit-exactly.
//!
//! Layout: `RUN_DIR/checkpoints/step-00001000.safetensors`,
//! `RUN_DIR/checkpoints/latest` (the file name, one line).

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::optim::{AdamWState, ParamState};
use super::{Result, TrainError, io_err};
use crate::fsutil;
use crate::models::WeightsKey;

/// Value of the `format` metadata key that marks a training checkpoint.
pub const FORMAT: &str = "rae-cache-train-checkpoint";
/// Value of the `format_version` metadata key; loading requires this one.
pub const FORMAT_VERSION: &str = "1";
const DIR: &str = "checkpoints";
const LATEST: &str = "latest";

/// Where the loader stands: the next batch is batch `step_in_epoch` of
/// epoch `epoch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct LoaderCursor {
    /// Epoch (0-based) of the next batch.
    pub epoch: u64,
    /// Optimizer step (global batch) within that epoch.
    pub step_in_epoch: u64,
}

/// The exact position of a ChaCha8 stream, so a resumed run draws the same
/// numbers an uninterrupted one would.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    /// 32-byte seed, hex.
    pub seed: String,
    /// ChaCha8 stream number.
    pub stream: u64,
    /// 128-bit word position, decimal (JSON numbers are not 128-bit safe).
    pub word_pos: String,
}

impl RngState {
    /// Record `rng`'s seed, stream and position.
    pub fn capture(rng: &ChaCha8Rng) -> Self {
        let seed = crate::fsutil::hex(&rng.get_seed());
        Self {
            seed,
            stream: rng.get_stream(),
            word_pos: rng.get_word_pos().to_string(),
        }
    }

    /// A generator at exactly the recorded position.
    pub fn restore(&self) -> Result<ChaCha8Rng> {
        use rand::SeedableRng;
        let bad = |what: &str| TrainError::State(format!("rng state: bad {what}"));
        if self.seed.len() != 64 || !self.seed.is_ascii() {
            return Err(bad("seed"));
        }
        let mut seed = [0u8; 32];
        for (i, b) in seed.iter_mut().enumerate() {
            *b = u8::from_str_radix(&self.seed[2 * i..2 * i + 2], 16).map_err(|_| bad("seed"))?;
        }
        let word_pos: u128 = self.word_pos.parse().map_err(|_| bad("word_pos"))?;
        let mut rng = ChaCha8Rng::from_seed(seed);
        rng.set_stream(self.stream);
        rng.set_word_pos(word_pos);
        Ok(rng)
    }
}

/// Everything a run needs to continue exactly where it stopped.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// Optimizer steps taken.
    pub step: u64,
    /// Model weights by reference name (trainable and frozen).
    pub model: BTreeMap<String, Tensor>,
    /// EMA weights by reference name (empty when the run keeps no EMA).
    pub ema: BTreeMap<String, Tensor>,
    /// AdamW moments and step counts.
    pub optim: AdamWState,
    /// Where the loader resumes (the first step not yet taken).
    pub cursor: LoaderCursor,
    /// A generator to resume, if the run keeps one (the trainer derives all its
    /// randomness from the seed and stores none).
    pub rng: Option<RngState>,
    /// The run configuration, JSON.
    pub config: String,
    /// Free-form extra metadata (e.g. last loss).
    pub extra: BTreeMap<String, String>,
    /// Further named tensors the run keeps besides the model (e.g. the
    /// stage-1 discriminator's heads, spectral-norm buffers and optimizer
    /// moments), stored as `aux.<name>`. Empty for runs without any, and
    /// when reading checkpoints written before it existed.
    pub aux: BTreeMap<String, Tensor>,
}

/// Append an optimizer's moments to `tensors` as `{prefix}.m.<param>` and
/// `{prefix}.v.<param>`; returns the per-parameter step counts (metadata).
pub fn push_optim<'a>(
    state: &'a AdamWState,
    prefix: &str,
    tensors: &mut Vec<(String, &'a Tensor)>,
) -> BTreeMap<String, u64> {
    let mut param_steps = BTreeMap::new();
    for (k, s) in &state.params {
        tensors.push((format!("{prefix}.m.{k}"), &s.m));
        tensors.push((format!("{prefix}.v.{k}"), &s.v));
        param_steps.insert(k.clone(), s.step);
    }
    param_steps
}

/// Rebuild an optimizer state from its step counts and the moments `ms`,
/// `vs` by parameter name (as [`push_optim`] wrote them under `prefix`);
/// every counted parameter needs both moments and no moment may be left.
pub fn assemble_optim(
    step: u64,
    param_steps: BTreeMap<String, u64>,
    mut ms: BTreeMap<String, Tensor>,
    mut vs: BTreeMap<String, Tensor>,
    prefix: &str,
    path: &Path,
) -> Result<AdamWState> {
    let mut params = BTreeMap::new();
    for (name, s) in param_steps {
        let m = ms
            .remove(&name)
            .ok_or_else(|| fmt_err(path, format!("missing {prefix}.m.{name}")))?;
        let v = vs
            .remove(&name)
            .ok_or_else(|| fmt_err(path, format!("missing {prefix}.v.{name}")))?;
        params.insert(name, ParamState { m, v, step: s });
    }
    if let Some(k) = ms.keys().chain(vs.keys()).next() {
        return Err(fmt_err(
            path,
            format!("optimizer moment {prefix}.*.{k} without a step count"),
        ));
    }
    Ok(AdamWState { step, params })
}

/// `RUN_DIR/checkpoints`.
pub fn checkpoint_dir(run_dir: &Path) -> PathBuf {
    run_dir.join(DIR)
}

fn file_name(step: u64) -> String {
    format!("step-{step:08}.safetensors")
}

fn parse_step(name: &str) -> Option<u64> {
    name.strip_prefix("step-")?
        .strip_suffix(".safetensors")?
        .parse()
        .ok()
}

fn fmt_err(path: &Path, reason: impl Into<String>) -> TrainError {
    crate::error::FileError::format(path, reason).into()
}

/// Write `ck` into `run_dir`, point `latest` at it, and delete all but the
/// newest `keep` checkpoints (`keep` 0 = keep all). Returns the file path.
pub fn save(run_dir: &Path, ck: &Checkpoint, keep: usize) -> Result<PathBuf> {
    let dir = checkpoint_dir(run_dir);
    fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    let name = file_name(ck.step);
    let path = dir.join(&name);

    let mut tensors: Vec<(String, &Tensor)> = Vec::new();
    for (k, t) in &ck.model {
        tensors.push((format!("model.{k}"), t));
    }
    for (k, t) in &ck.ema {
        tensors.push((format!("ema.{k}"), t));
    }
    let param_steps = push_optim(&ck.optim, "optim", &mut tensors);
    for (k, t) in &ck.aux {
        tensors.push((format!("aux.{k}"), t));
    }

    let mut meta: HashMap<String, String> = HashMap::new();
    meta.insert("format".into(), FORMAT.into());
    meta.insert("format_version".into(), FORMAT_VERSION.into());
    meta.insert("step".into(), ck.step.to_string());
    meta.insert("optim.step".into(), ck.optim.step.to_string());
    meta.insert("optim.param_steps".into(), to_json(&param_steps)?);
    meta.insert("cursor".into(), to_json(&ck.cursor)?);
    if let Some(rng) = &ck.rng {
        meta.insert("rng".into(), to_json(rng)?);
    }
    meta.insert("config".into(), ck.config.clone());
    for (k, v) in &ck.extra {
        meta.insert(format!("extra.{k}"), v.clone());
    }

    let tmp = fsutil::temp_path(&path);
    safetensors::serialize_to_file(tensors, Some(meta), &tmp)
        .map_err(|e| fmt_err(&tmp, format!("safetensors: {e}")))?;
    fsutil::sort_safetensors_header(&tmp).map_err(io_err(&tmp))?;
    File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(io_err(&tmp))?;
    fsutil::commit_temp(&tmp, &path).map_err(io_err(&path))?;
    let latest = dir.join(LATEST);
    fsutil::write_atomic(&latest, format!("{name}\n").as_bytes()).map_err(io_err(&latest))?;
    if keep > 0 {
        prune(&dir, keep, ck.step)?;
    }
    Ok(path)
}

/// Delete the oldest checkpoints so that `keep` remain; never the current.
fn prune(dir: &Path, keep: usize, current: u64) -> Result<()> {
    let mut steps = list(dir)?;
    steps.sort_unstable();
    let excess = steps.len().saturating_sub(keep);
    for &(step, ref path) in steps.iter().take(excess) {
        if step != current {
            fs::remove_file(path).map_err(io_err(path))?;
        }
    }
    Ok(())
}

fn list(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => {
            return Err(crate::error::FileError::io(dir, e).into());
        }
    };
    for entry in rd {
        let entry = entry.map_err(io_err(dir))?;
        let name = entry.file_name();
        if let Some(step) = name.to_str().and_then(parse_step) {
            out.push((step, entry.path()));
        }
    }
    Ok(out)
}

/// Checkpoints in `run_dir`, oldest first.
pub fn list_checkpoints(run_dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut v = list(&checkpoint_dir(run_dir))?;
    v.sort_unstable();
    Ok(v)
}

/// The checkpoint `latest` names, else the highest-numbered one, else None.
pub fn latest(run_dir: &Path) -> Result<Option<PathBuf>> {
    let dir = checkpoint_dir(run_dir);
    let pointer = dir.join(LATEST);
    match fs::read_to_string(&pointer) {
        Ok(s) => {
            let name = s.trim();
            if parse_step(name).is_none() || name.contains('/') {
                return Err(fmt_err(
                    &pointer,
                    format!("does not name a checkpoint: {name:?}"),
                ));
            }
            let p = dir.join(name);
            if p.is_file() {
                return Ok(Some(p));
            }
            tracing::warn!(
                "{} names {name}, which is missing; using the newest file",
                pointer.display()
            );
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(crate::error::FileError::io(pointer, e).into());
        }
    }
    Ok(list_checkpoints(run_dir)?.pop().map(|(_, p)| p))
}

/// The safetensors `__metadata__` of a rae-cache training checkpoint,
/// reading only the file's header (a checkpoint of a large model is many
/// GB); `None` for any other safetensors file.
pub fn read_metadata(path: &Path) -> Result<Option<BTreeMap<String, String>>> {
    use std::io::Read;
    let mut f = File::open(path).map_err(io_err(path))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(io_err(path))?;
    let n = u64::from_le_bytes(len);
    if n > 100_000_000 {
        return Err(fmt_err(path, format!("safetensors header of {n} bytes")));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(io_err(path))?;
    let v: serde_json::Value = serde_json::from_slice(&header)
        .map_err(|e| fmt_err(path, format!("safetensors header: {e}")))?;
    let meta: BTreeMap<String, String> = match v.get("__metadata__") {
        Some(m) => serde_json::from_value(m.clone())
            .map_err(|e| fmt_err(path, format!("safetensors metadata: {e}")))?,
        None => return Ok(None),
    };
    Ok((meta.get("format").map(String::as_str) == Some(FORMAT)).then_some(meta))
}

/// The run config stored in a checkpoint, reading only the file's header.
pub fn read_config(path: &Path) -> Result<String> {
    let meta =
        read_metadata(path)?.ok_or_else(|| fmt_err(path, "not a rae-cache training checkpoint"))?;
    meta.get("config")
        .cloned()
        .ok_or_else(|| fmt_err(path, "metadata lacks \"config\""))
}

/// The checkpoint file a user means by `path`: a run directory, its
/// `checkpoints/` directory or the `latest` pointer resolve to the
/// checkpoint `latest` names; any other path is taken as it is.
pub fn resolve(path: &Path) -> Result<PathBuf> {
    let run_dir = if path.is_dir() {
        if path.join(DIR).is_dir() {
            Some(path.to_path_buf())
        } else if path.file_name().is_some_and(|n| n == DIR) {
            Some(path.parent().unwrap_or(Path::new(".")).to_path_buf())
        } else {
            return Err(fmt_err(
                path,
                "a directory that is neither a run directory (with checkpoints/) nor its checkpoints/",
            ));
        }
    } else if path.file_name().is_some_and(|n| n == LATEST)
        && path
            .parent()
            .and_then(Path::file_name)
            .is_some_and(|n| n == DIR)
    {
        path.parent().and_then(Path::parent).map(Path::to_path_buf)
    } else {
        None
    };
    match run_dir {
        None => Ok(path.to_path_buf()),
        Some(run) => latest(&run)?.ok_or_else(|| {
            fmt_err(
                &checkpoint_dir(&run),
                "holds no checkpoint (step-*.safetensors)",
            )
        }),
    }
}

/// `auto` takes a run's EMA weights only once the initial (random) weights
/// hold at most this share of them: `decay^step` (0.9995 needs 9,208 steps;
/// after 1,500 it is still 47% initial weights, and its samples barely
/// depend on the label).
pub const EMA_MAX_INITIAL_SHARE: f64 = 0.01;

/// A trained model named on the command line, resolved.
#[derive(Debug, Clone)]
pub struct TrainedModel {
    /// The checkpoint file.
    pub file: PathBuf,
    /// The run's model preset or config file (rae-cache checkpoints only).
    pub model: Option<String>,
    /// The weights to load.
    pub weights: WeightsKey,
    /// Why `auto` chose these weights (rae-cache checkpoints only).
    pub reason: Option<String>,
}

/// Resolve `path` (see [`resolve`]) and, for a rae-cache training
/// checkpoint with `requested` = auto, choose between the EMA and the raw
/// weights by the EMA's remaining share of the initial weights.
pub fn open_trained(path: &Path, requested: &WeightsKey) -> Result<TrainedModel> {
    let file = resolve(path)?;
    let meta = if file.is_file() && !crate::models::state_dict::is_pickle(&file) {
        read_metadata(&file)?
    } else {
        None
    };
    let Some(meta) = meta else {
        return Ok(TrainedModel {
            file,
            model: None,
            weights: requested.clone(),
            reason: None,
        });
    };
    let config = meta
        .get("config")
        .map(|c| serde_json::from_str::<serde_json::Value>(c));
    let config = match config {
        Some(Ok(v)) => v,
        _ => return Err(fmt_err(&file, "metadata lacks a readable \"config\"")),
    };
    let step: u64 = meta.get("step").and_then(|s| s.parse().ok()).unwrap_or(0);
    let decay = config["ema"].as_f64().unwrap_or(0.0);
    let (weights, reason) = match requested {
        WeightsKey::Auto => {
            let share = decay.powf(step as f64);
            let take_ema = share <= EMA_MAX_INITIAL_SHARE;
            let why = format!(
                "step {step}, EMA decay {decay}: the EMA still holds {:.1}% of the initial weights \
                 ({} {:.0}%); using the {} weights (--weights-key ema|model to choose)",
                share * 100.0,
                if take_ema { "at most" } else { "more than" },
                EMA_MAX_INITIAL_SHARE * 100.0,
                if take_ema { "EMA" } else { "raw (non-EMA)" }
            );
            let key = if take_ema { "ema" } else { "model" };
            (WeightsKey::Key(key.into()), Some(why))
        }
        other => (other.clone(), None),
    };
    Ok(TrainedModel {
        file,
        model: config["model"].as_str().map(str::to_string),
        weights,
        reason,
    })
}

/// Read a checkpoint back, tensors on `device`.
pub fn load(path: &Path, device: &Device) -> Result<Checkpoint> {
    let buf = fs::read(path).map_err(io_err(path))?;
    let (_, st_meta) = safetensors::SafeTensors::read_metadata(&buf)
        .map_err(|e| fmt_err(path, format!("safetensors: {e}")))?;
    let meta = st_meta.metadata().clone().unwrap_or_default();
    let get = |k: &str| {
        meta.get(k)
            .ok_or_else(|| fmt_err(path, format!("metadata lacks {k:?}")))
    };
    if get("format")? != FORMAT {
        return Err(fmt_err(path, "not a rae-cache training checkpoint"));
    }
    if get("format_version")? != FORMAT_VERSION {
        return Err(fmt_err(
            path,
            format!(
                "checkpoint format version {} unsupported",
                get("format_version")?
            ),
        ));
    }
    let num = |k: &str| -> Result<u64> {
        get(k)?
            .parse()
            .map_err(|_| fmt_err(path, format!("metadata {k:?} is not an integer")))
    };
    let from_json = |k: &str| -> Result<serde_json::Value> {
        serde_json::from_str(get(k)?).map_err(|e| fmt_err(path, format!("metadata {k:?}: {e}")))
    };
    let step = num("step")?;
    let optim_step = num("optim.step")?;
    let param_steps: BTreeMap<String, u64> =
        serde_json::from_value(from_json("optim.param_steps")?)
            .map_err(|e| fmt_err(path, format!("optim.param_steps: {e}")))?;
    let cursor: LoaderCursor = serde_json::from_value(from_json("cursor")?)
        .map_err(|e| fmt_err(path, format!("cursor: {e}")))?;
    let rng = match meta.get("rng") {
        Some(s) => Some(serde_json::from_str(s).map_err(|e| fmt_err(path, format!("rng: {e}")))?),
        None => None,
    };
    let config = get("config")?.clone();
    let extra = meta
        .iter()
        .filter_map(|(k, v)| k.strip_prefix("extra.").map(|k| (k.to_string(), v.clone())))
        .collect();

    let all = candle_core::safetensors::load_buffer(&buf, device)?;
    let (mut model, mut ema) = (BTreeMap::new(), BTreeMap::new());
    let (mut ms, mut vs, mut aux) = (BTreeMap::new(), BTreeMap::new(), BTreeMap::new());
    for (k, t) in all {
        if let Some(n) = k.strip_prefix("model.") {
            model.insert(n.to_string(), t);
        } else if let Some(n) = k.strip_prefix("ema.") {
            ema.insert(n.to_string(), t);
        } else if let Some(n) = k.strip_prefix("optim.m.") {
            ms.insert(n.to_string(), t);
        } else if let Some(n) = k.strip_prefix("optim.v.") {
            vs.insert(n.to_string(), t);
        } else if let Some(n) = k.strip_prefix("aux.") {
            aux.insert(n.to_string(), t);
        } else {
            return Err(fmt_err(path, format!("unexpected tensor {k:?}")));
        }
    }
    let optim = assemble_optim(optim_step, param_steps, ms, vs, "optim", path)?;
    Ok(Checkpoint {
        step,
        model,
        ema,
        optim,
        cursor,
        rng,
        config,
        extra,
        aux,
    })
}

fn to_json<T: Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| TrainError::State(format!("json: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn tensor(vals: &[f32]) -> Tensor {
        Tensor::new(vals, &Device::Cpu).unwrap()
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        t.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect()
    }

    fn sample(step: u64, rng: &ChaCha8Rng) -> Checkpoint {
        let mut model = BTreeMap::new();
        model.insert("w".into(), tensor(&[1.0, f32::MIN_POSITIVE, -0.0, 3.5e-12]));
        model.insert("frozen".into(), tensor(&[7.0]));
        let mut ema = BTreeMap::new();
        ema.insert("w".into(), tensor(&[0.5, 0.25, 0.125, 1e-30]));
        let mut params = BTreeMap::new();
        params.insert(
            "w".into(),
            ParamState {
                m: tensor(&[0.1, 0.2, 0.3, 0.4]),
                v: tensor(&[1e-9, 2e-9, 3e-9, 4e-9]),
                step,
            },
        );
        Checkpoint {
            step,
            model,
            ema,
            optim: AdamWState { step, params },
            cursor: LoaderCursor {
                epoch: 3,
                step_in_epoch: 17,
            },
            rng: Some(RngState::capture(rng)),
            config: r#"{"lr":0.0002}"#.into(),
            extra: [("loss".to_string(), "0.5".to_string())].into(),
            aux: [("disc.heads.0.w".to_string(), tensor(&[2.5, -1e-20]))].into(),
        }
    }

    #[test]
    fn roundtrip_bit_exact_and_rng_resumes() {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(42);
        let _: u64 = rng.random();
        let ck = sample(5, &rng);
        let p = save(dir.path(), &ck, 3).unwrap();
        assert_eq!(latest(dir.path()).unwrap().unwrap(), p);
        assert_eq!(read_config(&p).unwrap(), ck.config);
        let back = load(&p, &Device::Cpu).unwrap();
        assert_eq!(back.step, 5);
        assert_eq!(back.cursor, ck.cursor);
        assert_eq!(back.config, ck.config);
        assert_eq!(back.extra, ck.extra);
        assert_eq!(bits(&back.model["w"]), bits(&ck.model["w"]));
        assert_eq!(bits(&back.ema["w"]), bits(&ck.ema["w"]));
        assert_eq!(back.aux.len(), 1);
        assert_eq!(
            bits(&back.aux["disc.heads.0.w"]),
            bits(&ck.aux["disc.heads.0.w"])
        );
        assert_eq!(
            bits(&back.optim.params["w"].v),
            bits(&ck.optim.params["w"].v)
        );
        assert_eq!(back.optim.params["w"].step, 5);
        let mut r2 = back.rng.unwrap().restore().unwrap();
        let a: [u64; 4] = rng.random();
        let b: [u64; 4] = r2.random();
        assert_eq!(a, b);
    }

    #[test]
    fn keeps_last_k_and_latest_points_to_newest() {
        let dir = tempfile::tempdir().unwrap();
        let rng = ChaCha8Rng::seed_from_u64(0);
        for step in [10, 20, 30, 40] {
            save(dir.path(), &sample(step, &rng), 2).unwrap();
        }
        let steps: Vec<u64> = list_checkpoints(dir.path())
            .unwrap()
            .iter()
            .map(|x| x.0)
            .collect();
        assert_eq!(steps, vec![30, 40]);
        let l = latest(dir.path()).unwrap().unwrap();
        assert!(l.ends_with("step-00000040.safetensors"));
        // no temp files left behind
        let names: Vec<String> = fs::read_dir(checkpoint_dir(dir.path()))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.contains(".tmp-")), "{names:?}");
    }

    #[test]
    fn rejects_foreign_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.safetensors");
        candle_core::safetensors::save(&HashMap::from([("a".to_string(), tensor(&[1.0]))]), &p)
            .unwrap();
        assert!(load(&p, &Device::Cpu).is_err());
        assert!(read_config(&p).is_err());
        assert!(latest(dir.path()).unwrap().is_none());
    }

    /// A run directory, its checkpoints/ and the `latest` pointer all name
    /// the newest checkpoint; `auto` takes the EMA only once decay^step is
    /// at most 1%.
    #[test]
    fn run_dir_resolves_and_auto_picks_weights_by_ema_share() {
        let dir = tempfile::tempdir().unwrap();
        let rng = ChaCha8Rng::seed_from_u64(1);
        let mut ck = sample(1500, &rng);
        ck.config = r#"{"ema":0.9995,"model":"ditdh-s"}"#.into();
        save(dir.path(), &ck, 0).unwrap();
        ck.step = 10_000;
        let newest = save(dir.path(), &ck, 0).unwrap();
        let run = dir.path();
        for p in [
            run.to_path_buf(),
            checkpoint_dir(run),
            checkpoint_dir(run).join(LATEST),
        ] {
            assert_eq!(resolve(&p).unwrap(), newest, "{}", p.display());
        }
        assert_eq!(resolve(&newest).unwrap(), newest);
        let t = open_trained(run, &WeightsKey::Auto).unwrap();
        assert_eq!(t.model.as_deref(), Some("ditdh-s"));
        assert_eq!(t.weights, WeightsKey::Key("ema".into())); // 0.9995^10000 = 0.7%
        let old = checkpoint_dir(run).join(file_name(1500));
        let t = open_trained(&old, &WeightsKey::Auto).unwrap();
        assert_eq!(t.weights, WeightsKey::Key("model".into())); // 47% initial
        assert!(t.reason.unwrap().contains("47.2%"));
        let forced = open_trained(&old, &WeightsKey::Key("ema".into())).unwrap();
        assert_eq!(forced.weights, WeightsKey::Key("ema".into()));
        let empty = tempfile::tempdir().unwrap();
        std::fs::create_dir(checkpoint_dir(empty.path())).unwrap();
        assert!(resolve(empty.path()).is_err());
    }
}
