//! Resolve model weights: a local directory, or a Hugging Face repo id
//! through the HF cache (offline unless a download is asked for).
//!
//! Cache layout (huggingface_hub's): `<root>/models--org--name/refs/<rev>`
//! holds a commit hash, `<root>/models--org--name/snapshots/<hash>/<file>`
//! the files. `<root>` is `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
//! `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`
//! (hf-hub's `Cache::from_env` knows only `HF_HOME` and the home default).

use std::path::{Path, PathBuf};

/// Why a model directory cannot be found or used.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    /// Neither a directory nor in the local Hugging Face cache.
    #[error("model {id:?} not found; looked in: {looked}. {hint}")]
    NotFound {
        /// The directory or repo id asked for.
        id: String,
        /// The places searched.
        looked: String,
        /// What to do about it.
        hint: String,
    },
    /// The directory exists but lacks a file or holds a bad one.
    #[error("{path}: {reason}")]
    Invalid {
        /// The offending path.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// `--allow-download` given to a build without the `download` feature,
    /// or the download itself failed.
    #[error("cannot download {id:?}: {reason}")]
    Download {
        /// The repo id.
        id: String,
        /// Why it failed.
        reason: String,
    },
}

/// A resolved model directory (local or inside the HF cache snapshot).
#[derive(Debug, Clone)]
pub struct ResolvedModel {
    /// The directory holding the model files.
    pub dir: PathBuf,
    /// The id it was asked for by (a path or a repo id).
    pub id: String,
    /// The HF cache snapshot (commit) it came from, if any.
    pub revision: Option<String>,
}

/// The files an encoder directory must hold.
pub const MODEL_FILES: [&str; 3] = [
    "config.json",
    "model.safetensors",
    "preprocessor_config.json",
];

/// Find a model directory: a local folder, else a repo id in the local
/// Hugging Face cache (downloaded first when `allow_download` and built with
/// the `download` feature).
pub fn resolve_model(id_or_dir: &str, allow_download: bool) -> Result<ResolvedModel, WeightsError> {
    let local = Path::new(id_or_dir);
    if local.is_dir() {
        return Ok(local_model(local, id_or_dir));
    }
    match hf_cache_root() {
        Some(root) => resolve_model_in(id_or_dir, allow_download, &root),
        None => Err(WeightsError::NotFound {
            id: id_or_dir.to_string(),
            looked: format!(
                "{id_or_dir} (not a directory); no Hugging Face cache (HF_HUB_CACHE, HF_HOME and HOME are unset)"
            ),
            hint: hint(id_or_dir),
        }),
    }
}

/// The HF hub cache root from the environment (see the module docs).
pub fn hf_cache_root() -> Option<PathBuf> {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(p) = var("HF_HUB_CACHE").or_else(|| var("HUGGINGFACE_HUB_CACHE")) {
        return Some(p);
    }
    if let Some(home) = var("HF_HOME") {
        return Some(home.join("hub"));
    }
    if let Some(xdg) = var("XDG_CACHE_HOME") {
        return Some(xdg.join("huggingface").join("hub"));
    }
    var("HOME").map(|h| h.join(".cache").join("huggingface").join("hub"))
}

fn local_model(dir: &Path, id: &str) -> ResolvedModel {
    ResolvedModel {
        dir: dir.to_path_buf(),
        id: id.to_string(),
        revision: None,
    }
}

fn hint(id: &str) -> String {
    let repo = id.split('@').next().unwrap_or(id);
    if cfg!(feature = "download") {
        format!("Run `huggingface-cli download {repo}` or pass --allow-download.")
    } else {
        format!(
            "Run `huggingface-cli download {repo}` (or use a build with `--features download` and pass --allow-download)."
        )
    }
}

/// `org/name` or `org/name@revision`.
fn split_id(id: &str) -> (&str, &str) {
    match id.split_once('@') {
        Some((repo, rev)) if !rev.is_empty() => (repo, rev),
        Some((repo, _)) => (repo, "main"),
        None => (id, "main"),
    }
}

/// `resolve_model` against an explicit cache root (`cache_root` plays the
/// part of `$HF_HUB_CACHE`); a local directory still wins.
pub fn resolve_model_in(
    id_or_dir: &str,
    allow_download: bool,
    cache_root: &Path,
) -> Result<ResolvedModel, WeightsError> {
    let local = Path::new(id_or_dir);
    if local.is_dir() {
        return Ok(local_model(local, id_or_dir));
    }
    let (repo, rev) = split_id(id_or_dir);
    let mut looked = vec![format!("{id_or_dir} (not a directory)")];
    if !repo.contains('/') || repo.starts_with('/') || repo.starts_with('.') {
        looked.push("(not a Hugging Face repo id of the form org/name)".to_string());
        return Err(WeightsError::NotFound {
            id: id_or_dir.into(),
            looked: looked.join("; "),
            hint: hint(id_or_dir),
        });
    }
    match lookup_cache(repo, rev, cache_root, &mut looked) {
        Some(found) => return Ok(found),
        None if allow_download => return download(repo, rev, cache_root),
        None => {}
    }
    Err(WeightsError::NotFound {
        id: id_or_dir.to_string(),
        looked: looked.join("; "),
        hint: hint(id_or_dir),
    })
}

/// Find `repo` at `rev` (a branch/tag under refs/, or a commit hash) in the
/// cache; notes every path tried in `looked`.
fn lookup_cache(
    repo: &str,
    rev: &str,
    root: &Path,
    looked: &mut Vec<String>,
) -> Option<ResolvedModel> {
    let folder = hf_hub::Repo::model(repo.to_string()).folder_name();
    let repo_dir = root.join(folder);
    let ref_path = repo_dir.join("refs").join(rev);
    let commit = match std::fs::read_to_string(&ref_path) {
        Ok(s) => s.trim().to_string(),
        Err(_) => {
            looked.push(format!("{} (missing)", ref_path.display()));
            // The revision may itself be a commit hash with no ref.
            rev.to_string()
        }
    };
    if commit.is_empty() || commit.contains(['/', '\\']) || commit.starts_with('.') {
        return None;
    }
    let snapshot = repo_dir.join("snapshots").join(&commit);
    let missing: Vec<&str> = MODEL_FILES
        .iter()
        .copied()
        .filter(|f| !snapshot.join(f).is_file())
        .collect();
    if !snapshot.is_dir() {
        looked.push(format!("{} (missing)", snapshot.display()));
        return None;
    }
    if !missing.is_empty() {
        looked.push(format!(
            "{} (lacks {})",
            snapshot.display(),
            missing.join(", ")
        ));
        return None;
    }
    tracing::debug!(repo, rev, commit = %commit, "found in HF cache");
    Some(ResolvedModel {
        dir: snapshot,
        id: repo.to_string(),
        revision: Some(commit),
    })
}

#[cfg(feature = "download")]
fn download(repo: &str, rev: &str, cache_root: &Path) -> Result<ResolvedModel, WeightsError> {
    use hf_hub::api::sync::ApiBuilder;
    let err = |reason: String| WeightsError::Download {
        id: repo.to_string(),
        reason,
    };
    let cache = hf_hub::Cache::new(cache_root.to_path_buf());
    // `from_cache` reads neither HF_ENDPOINT nor HF_TOKEN; honour both.
    let token = std::env::var("HF_TOKEN")
        .ok()
        .filter(|t| !t.is_empty())
        .or_else(|| cache.token());
    let mut builder = ApiBuilder::from_cache(cache)
        .with_progress(true)
        .with_token(token);
    if let Ok(endpoint) = std::env::var("HF_ENDPOINT") {
        builder = builder.with_endpoint(endpoint);
    }
    let api = builder.build().map_err(|e| err(e.to_string()))?;
    let hub_repo = api.repo(hf_hub::Repo::with_revision(
        repo.to_string(),
        hf_hub::RepoType::Model,
        rev.to_string(),
    ));
    let mut dir = None;
    for f in MODEL_FILES {
        tracing::info!(repo, file = f, "downloading");
        let path = hub_repo.get(f).map_err(|e| err(format!("{f}: {e}")))?;
        dir = path.parent().map(Path::to_path_buf);
    }
    let dir = dir.ok_or_else(|| err("no files downloaded".into()))?;
    let revision = dir.file_name().map(|n| n.to_string_lossy().into_owned());
    Ok(ResolvedModel {
        dir,
        id: repo.to_string(),
        revision,
    })
}

#[cfg(not(feature = "download"))]
fn download(repo: &str, _rev: &str, _cache_root: &Path) -> Result<ResolvedModel, WeightsError> {
    Err(WeightsError::Download {
        id: repo.to_string(),
        reason: format!(
            "not in the local Hugging Face cache, and this build has no download support (rebuild with \
             `--features download`, or run `huggingface-cli download {repo}`)"
        ),
    })
}

/// Find one weights file (a frozen network's checkpoint, e.g. VGG16 for
/// LPIPS): `id_or_path` is the file itself, a directory holding one of
/// `files`, or a Hugging Face repo id (`org/name[@rev]`) whose snapshot in
/// the local cache holds one of them (offline). `files` are tried in order.
/// The error lists every place looked at and ends with `hint` (what to
/// download).
pub fn resolve_file(id_or_path: &str, files: &[&str], hint: &str) -> Result<PathBuf, WeightsError> {
    resolve_file_in(id_or_path, files, hint, hf_cache_root().as_deref())
}

/// [`resolve_file`] against an explicit Hugging Face cache root (`None`:
/// no cache).
pub fn resolve_file_in(
    id_or_path: &str,
    files: &[&str],
    hint: &str,
    cache_root: Option<&Path>,
) -> Result<PathBuf, WeightsError> {
    let local = Path::new(id_or_path);
    if local.is_file() {
        return Ok(local.to_path_buf());
    }
    let mut looked = Vec::new();
    let first_in = |dir: &Path, looked: &mut Vec<String>| {
        let found = files.iter().map(|f| dir.join(f)).find(|p| p.is_file());
        if found.is_none() {
            looked.push(format!(
                "{} (holds none of {})",
                dir.display(),
                files.join(", ")
            ));
        }
        found
    };
    if local.is_dir() {
        if let Some(p) = first_in(local, &mut looked) {
            return Ok(p);
        }
    } else {
        looked.push(format!("{id_or_path} (no such file or directory)"));
        let (repo, rev) = split_id(id_or_path);
        let is_repo = repo.contains('/') && !repo.starts_with(['/', '.']) && !local.exists();
        match cache_root {
            Some(root) if is_repo => {
                let repo_dir = root.join(hf_hub::Repo::model(repo.to_string()).folder_name());
                let commit = std::fs::read_to_string(repo_dir.join("refs").join(rev))
                    .map(|s| s.trim().to_string())
                    .unwrap_or_else(|_| rev.to_string());
                if !commit.is_empty() && !commit.contains(['/', '\\']) && !commit.starts_with('.') {
                    let snapshot = repo_dir.join("snapshots").join(&commit);
                    if let Some(p) = first_in(&snapshot, &mut looked) {
                        return Ok(p);
                    }
                }
            }
            None if is_repo => looked
                .push("no Hugging Face cache (HF_HUB_CACHE, HF_HOME and HOME are unset)".into()),
            _ => {}
        }
    }
    Err(WeightsError::NotFound {
        id: id_or_path.to_string(),
        looked: looked.join("; "),
        hint: hint.to_string(),
    })
}

#[cfg(test)]
mod resolve_file_tests {
    use super::*;

    #[test]
    fn file_dir_and_cache_snapshot() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("vgg.pth");
        std::fs::write(&file, b"x").unwrap();
        let files = ["model.safetensors", "vgg.pth"];
        assert_eq!(
            resolve_file_in(file.to_str().unwrap(), &files, "", None).unwrap(),
            file
        );
        assert_eq!(
            resolve_file_in(tmp.path().to_str().unwrap(), &files, "", None).unwrap(),
            file
        );
        let root = tmp.path().join("hub");
        let snap = root.join("models--timm--vgg16.tv_in1k/snapshots/abc");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::create_dir_all(root.join("models--timm--vgg16.tv_in1k/refs")).unwrap();
        std::fs::write(root.join("models--timm--vgg16.tv_in1k/refs/main"), "abc\n").unwrap();
        std::fs::write(snap.join("model.safetensors"), b"x").unwrap();
        let got = resolve_file_in("timm/vgg16.tv_in1k", &files, "", Some(&root)).unwrap();
        assert_eq!(got, snap.join("model.safetensors"));
        let err = resolve_file_in("timm/nothing", &files, "download it", Some(&root)).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("timm/nothing") && msg.contains("download it"),
            "{msg}"
        );
    }
}
