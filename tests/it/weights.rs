//! `resolve_model` against fake Hugging Face cache layouts in temp dirs
//! (the cache root is passed explicitly: no environment races, no network).

use std::fs;
use std::path::Path;

use rae_cache::weights::{MODEL_FILES, WeightsError, resolve_model, resolve_model_in};

const REV: &str = "0123456789abcdef0123456789abcdef01234567";

/// `models--org--name/refs/<branch>` -> `snapshots/<rev>/` with `files`.
fn fake_repo(root: &Path, repo: &str, branch: &str, rev: &str, files: &[&str]) {
    let repo_dir = root.join(format!("models--{}", repo.replace('/', "--")));
    fs::create_dir_all(repo_dir.join("refs")).unwrap();
    // huggingface_hub writes the hash without a newline; tolerate one anyway.
    fs::write(repo_dir.join("refs").join(branch), format!("{rev}\n")).unwrap();
    let snap = repo_dir.join("snapshots").join(rev);
    fs::create_dir_all(&snap).unwrap();
    for f in files {
        fs::write(snap.join(f), b"{}").unwrap();
    }
}

#[test]
fn finds_main_snapshot_and_records_revision() {
    let tmp = tempfile::tempdir().unwrap();
    fake_repo(
        tmp.path(),
        "facebook/dinov2-with-registers-base",
        "main",
        REV,
        &MODEL_FILES,
    );
    let m = resolve_model_in("facebook/dinov2-with-registers-base", false, tmp.path()).unwrap();
    assert_eq!(m.id, "facebook/dinov2-with-registers-base");
    assert_eq!(m.revision.as_deref(), Some(REV));
    assert_eq!(
        m.dir,
        tmp.path()
            .join("models--facebook--dinov2-with-registers-base/snapshots")
            .join(REV)
    );
    for f in MODEL_FILES {
        assert!(m.dir.join(f).is_file());
    }
}

#[test]
fn revision_as_branch_or_commit() {
    let tmp = tempfile::tempdir().unwrap();
    let other = "fedcba9876543210fedcba9876543210fedcba98";
    fake_repo(tmp.path(), "org/model", "main", REV, &MODEL_FILES);
    fake_repo(tmp.path(), "org/model", "v2", other, &MODEL_FILES);
    let m = resolve_model_in("org/model@v2", false, tmp.path()).unwrap();
    assert_eq!(m.revision.as_deref(), Some(other));
    // A commit hash with no ref of its own.
    let m = resolve_model_in(&format!("org/model@{REV}"), false, tmp.path()).unwrap();
    assert_eq!(m.revision.as_deref(), Some(REV));
    assert_eq!(m.id, "org/model");
}

#[test]
fn miss_lists_places_and_hint() {
    let tmp = tempfile::tempdir().unwrap();
    let err = resolve_model_in("org/absent", false, tmp.path()).unwrap_err();
    match &err {
        WeightsError::NotFound { id, looked, hint } => {
            assert_eq!(id, "org/absent");
            assert!(looked.contains("org/absent (not a directory)"), "{looked}");
            assert!(looked.contains("models--org--absent"), "{looked}");
            assert!(
                hint.contains("huggingface-cli download org/absent"),
                "{hint}"
            );
        }
        other => panic!("unexpected {other:?}"),
    }
    let msg = err.to_string();
    assert!(msg.contains("huggingface-cli download"), "{msg}");
}

#[test]
fn incomplete_snapshot_is_a_miss_naming_the_missing_file() {
    let tmp = tempfile::tempdir().unwrap();
    fake_repo(
        tmp.path(),
        "org/partial",
        "main",
        REV,
        &["config.json", "preprocessor_config.json"],
    );
    match resolve_model_in("org/partial", false, tmp.path()).unwrap_err() {
        WeightsError::NotFound { looked, .. } => {
            assert!(looked.contains("lacks model.safetensors"), "{looked}")
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn existing_directory_is_used_as_is() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("my-encoder");
    fs::create_dir_all(&dir).unwrap();
    let s = dir.to_str().unwrap();
    let m = resolve_model(s, false).unwrap();
    assert_eq!(m.dir, dir);
    assert_eq!(m.id, s);
    assert_eq!(m.revision, None);
    // Also through the explicit-cache entry point.
    let m = resolve_model_in(s, false, &tmp.path().join("no-cache")).unwrap();
    assert_eq!(m.dir, dir);
}

#[cfg(not(feature = "download"))]
#[test]
fn allow_download_without_feature_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    match resolve_model_in("org/absent", true, tmp.path()).unwrap_err() {
        WeightsError::Download { id, reason } => {
            assert_eq!(id, "org/absent");
            assert!(reason.contains("--features download"), "{reason}");
        }
        other => panic!("unexpected {other:?}"),
    }
    // Nothing was created in the cache.
    assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 0);
    // A model already in the cache resolves whatever the flag says.
    fake_repo(tmp.path(), "org/here", "main", REV, &MODEL_FILES);
    assert!(resolve_model_in("org/here", true, tmp.path()).is_ok());
}

#[test]
fn not_a_repo_id() {
    let tmp = tempfile::tempdir().unwrap();
    match resolve_model_in("./does/not/exist", false, tmp.path()).unwrap_err() {
        WeightsError::NotFound { looked, .. } => {
            assert!(looked.contains("not a Hugging Face repo id"), "{looked}")
        }
        other => panic!("unexpected {other:?}"),
    }
}
