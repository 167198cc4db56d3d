//! Load state dicts from `.safetensors` or PyTorch `.pt`/`.pth` files
//! (optionally wrapped in an `ema` / `model` / `state_dict` entry) into a
//! VarBuilder (inference) or a VarMap (training).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};

use super::ModelError;

/// Which entry of a checkpoint holds the weights.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum WeightsKey {
    /// `ema` if present, else `model`, else `state_dict`, else the top level.
    #[default]
    Auto,
    /// The top-level dict is the state dict.
    Root,
    /// A named entry (`ema`, `model`, ...).
    Key(String),
}

impl WeightsKey {
    /// `auto` (or empty), `root` (or `none`), else the name of an entry.
    pub fn parse(s: &str) -> Self {
        match s {
            "" | "auto" => Self::Auto,
            "root" | "none" => Self::Root,
            k => Self::Key(k.to_string()),
        }
    }
}

const AUTO_KEYS: [&str; 3] = ["ema", "model", "state_dict"];

fn io_err(path: &Path, e: impl std::fmt::Display) -> ModelError {
    ModelError::Weights {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// Drop wrapper prefixes left by DDP / torch.compile.
fn clean_name(name: &str) -> String {
    let mut n = name;
    loop {
        if let Some(r) = n.strip_prefix("module.") {
            n = r;
        } else if let Some(r) = n.strip_prefix("_orig_mod.") {
            n = r;
        } else {
            return n.to_string();
        }
    }
}

/// Whether `path` names a PyTorch pickle (`.pt`, `.pth`, `.bin`, `.ckpt`).
pub(crate) fn is_pickle(path: &Path) -> bool {
    matches!(
        path.extension()
            .and_then(|e| e.to_str())
            .map(|e| e.to_ascii_lowercase())
            .as_deref(),
        Some("pt" | "pth" | "bin" | "ckpt")
    )
}

/// Read every tensor of a checkpoint (on `device`, dtype as stored).
pub fn load_state_dict(
    path: &Path,
    key: &WeightsKey,
    device: &Device,
) -> Result<HashMap<String, Tensor>, ModelError> {
    if !path.exists() {
        return Err(io_err(path, "file not found"));
    }
    let raw: Vec<(String, Tensor)> = if is_pickle(path) {
        read_pth(path, key)?
    } else {
        let all = candle_core::safetensors::load(path, device).map_err(|e| io_err(path, e))?;
        let all: Vec<(String, Tensor)> = all.into_iter().collect();
        select_prefixed(path, all, key)?
    };
    if raw.is_empty() {
        return Err(io_err(path, "no tensors found"));
    }
    let mut out = HashMap::with_capacity(raw.len());
    for (k, t) in raw {
        out.insert(
            clean_name(&k),
            t.to_device(device).map_err(|e| io_err(path, e))?,
        );
    }
    Ok(out)
}

fn read_pth(path: &Path, key: &WeightsKey) -> Result<Vec<(String, Tensor)>, ModelError> {
    let read = |k: Option<&str>| candle_core::pickle::read_all_with_key(path, k);
    match key {
        WeightsKey::Root => read(None).map_err(|e| io_err(path, e)),
        WeightsKey::Key(k) => read(Some(k)).map_err(|e| io_err(path, format!("entry {k:?}: {e}"))),
        WeightsKey::Auto => {
            for k in AUTO_KEYS {
                if let Ok(v) = read(Some(k))
                    && !v.is_empty()
                {
                    tracing::debug!(file = %path.display(), entry = k, "weights from wrapped checkpoint");
                    return Ok(v);
                }
            }
            read(None).map_err(|e| io_err(path, e))
        }
    }
}

/// safetensors files flatten wrappers as `ema.xxx`; pick the wanted prefix.
fn select_prefixed(
    path: &Path,
    all: Vec<(String, Tensor)>,
    key: &WeightsKey,
) -> Result<Vec<(String, Tensor)>, ModelError> {
    let take = |prefix: &str, all: &[(String, Tensor)]| -> Vec<(String, Tensor)> {
        let p = format!("{prefix}.");
        all.iter()
            .filter_map(|(k, t)| k.strip_prefix(&p).map(|r| (r.to_string(), t.clone())))
            .collect()
    };
    match key {
        WeightsKey::Root => Ok(all),
        WeightsKey::Key(k) => {
            let v = take(k, &all);
            if v.is_empty() {
                Err(io_err(path, format!("no tensors under {k:?}")))
            } else {
                Ok(v)
            }
        }
        WeightsKey::Auto => {
            for k in AUTO_KEYS {
                let v = take(k, &all);
                if !v.is_empty() {
                    return Ok(v);
                }
            }
            Ok(all)
        }
    }
}

/// A VarBuilder over loaded tensors (inference), converted to `dtype`.
pub fn var_builder(
    tensors: HashMap<String, Tensor>,
    dtype: DType,
    device: &Device,
) -> VarBuilder<'static> {
    VarBuilder::from_tensors(tensors, dtype, device)
}

/// Put loaded tensors into a VarMap (trainable `Var`s; frozen names are
/// detached by the models). Existing entries are replaced.
pub fn fill_varmap(
    varmap: &VarMap,
    tensors: &HashMap<String, Tensor>,
    dtype: DType,
) -> candle_core::Result<()> {
    let mut data = varmap
        .data()
        .lock()
        .map_err(|_| candle_core::Error::Msg("varmap lock poisoned".into()))?;
    for (k, t) in tensors {
        data.insert(k.clone(), Var::from_tensor(&t.to_dtype(dtype)?)?);
    }
    Ok(())
}

/// Names that a model keeps frozen (never trained): the fixed sin-cos
/// position tables, the Gaussian-Fourier frequencies and rope buffers.
pub fn is_frozen(name: &str) -> bool {
    name == "pos_embed"
        || name == "decoder_pos_embed"
        || name == "t_embedder.W"
        || name.ends_with("feat_rope.freqs_cos")
        || name.ends_with("feat_rope.freqs_sin")
}

/// Every (name, Var) pair of a VarMap, sorted by name.
pub fn sorted_vars(varmap: &VarMap) -> Vec<(String, Var)> {
    let data = match varmap.data().lock() {
        Ok(d) => d,
        Err(p) => p.into_inner(),
    };
    let mut v: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// The trainable (name, Var) pairs of a VarMap, sorted by name.
pub fn trainable_vars(varmap: &VarMap) -> Vec<(String, Var)> {
    let mut v = sorted_vars(varmap);
    v.retain(|(k, _)| !is_frozen(k));
    v
}

/// Add the file name to a candle error raised while building a model
/// (candle names the missing key / the expected and found shapes).
pub fn with_file(path: &Path, e: candle_core::Error) -> ModelError {
    ModelError::Weights {
        path: PathBuf::from(path),
        reason: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_keys_and_frozen() {
        assert_eq!(
            clean_name("module._orig_mod.blocks.0.norm1.weight"),
            "blocks.0.norm1.weight"
        );
        assert_eq!(WeightsKey::parse("ema"), WeightsKey::Key("ema".into()));
        assert_eq!(WeightsKey::parse("auto"), WeightsKey::Auto);
        assert!(
            is_frozen("pos_embed")
                && is_frozen("t_embedder.W")
                && is_frozen("enc_feat_rope.freqs_cos")
        );
        assert!(
            !is_frozen("t_embedder.mlp.0.weight")
                && !is_frozen("y_embedder.embedding_table.weight")
        );
    }

    #[test]
    fn missing_file_is_named() {
        let e = load_state_dict(
            Path::new("/nonexistent/x.pt"),
            &WeightsKey::Auto,
            &Device::Cpu,
        )
        .unwrap_err();
        assert!(e.to_string().contains("/nonexistent/x.pt"), "{e}");
    }
}
