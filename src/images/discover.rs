//! Dataset folder discovery: ImageNet layout (one sub-folder per class) or a
//! flat folder of images.
//!
//! * Class layout when the root holds at least one (non-hidden) directory:
//!   labels are indices into the sorted class names (torchvision
//!   `ImageFolder`), files anywhere below a class folder are taken with their
//!   relative key, loose files in the root are skipped.
//! * Flat layout otherwise: label -1.
//! * Keys use `/` separators and entries are sorted by key (byte order), so
//!   the result does not depend on the file system's listing order.
//! * Hidden names (leading `.`) and files without an image extension are
//!   skipped with a reason. Symlinks are followed; a directory whose
//!   canonical path was already visited (a loop, or a second link to the same
//!   folder) is skipped, so the walk always terminates and reads each folder
//!   once.
//! * An unreadable directory is an error naming it.

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};

use super::{Discovery, ImageEntry, ImageError, Skipped, is_image_extension};

/// List images under `root` (ImageNet layout or flat), deterministic order.
pub fn discover(root: &Path) -> Result<Discovery, ImageError> {
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ImageError::Io { path, source }
    };
    let canonical_root = fs::canonicalize(root).map_err(io_err(root))?;
    if !canonical_root.is_dir() {
        return Err(ImageError::Io {
            path: root.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::NotADirectory,
                "dataset root is not a directory",
            ),
        });
    }
    let mut walk = Walk {
        visited: HashSet::from([canonical_root]),
        files: Vec::new(),
        skipped: Vec::new(),
    };
    let top = walk.list(root, "")?;

    let mut classes: Vec<String> = top
        .iter()
        .filter(|c| c.is_dir)
        .map(|c| c.name.clone())
        .collect();
    classes.sort();
    let class_layout = !classes.is_empty();
    for child in &top {
        if child.is_dir {
            walk.descend(&child.path, &child.key)?;
        } else if class_layout {
            walk.skip(&child.key, "file outside the class folders");
        } else {
            walk.files.push(child.key.clone());
        }
    }

    let mut entries: Vec<ImageEntry> = walk
        .files
        .into_iter()
        .map(|key| {
            let label = if class_layout {
                let class = key.split('/').next().unwrap_or_default();
                classes
                    .binary_search_by(|c| c.as_str().cmp(class))
                    .map(|i| i as i32)
                    .unwrap_or(-1)
            } else {
                -1
            };
            let path = key
                .split('/')
                .fold(root.to_path_buf(), |p, part| p.join(part));
            ImageEntry { path, key, label }
        })
        .collect();
    entries.sort_by(|a, b| a.key.cmp(&b.key));
    let mut skipped = walk.skipped;
    skipped.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(Discovery {
        root: root.to_path_buf(),
        classes,
        entries,
        skipped,
    })
}

/// One usable child of a directory: an image file or a directory to visit.
struct Child {
    name: String,
    key: String,
    path: PathBuf,
    is_dir: bool,
}

struct Walk {
    /// Canonical paths of the directories already listed.
    visited: HashSet<PathBuf>,
    /// Keys of the images found.
    files: Vec<String>,
    skipped: Vec<Skipped>,
}

impl Walk {
    fn skip(&mut self, key: &str, reason: impl Into<String>) {
        self.skipped.push(Skipped {
            key: key.to_string(),
            reason: reason.into(),
        });
    }

    /// Visit directory `dir` (key `key`) and everything below it.
    fn descend(&mut self, dir: &Path, key: &str) -> Result<(), ImageError> {
        let canonical = fs::canonicalize(dir).map_err(|source| ImageError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        if !self.visited.insert(canonical.clone()) {
            self.skip(
                key,
                format!(
                    "directory {} already visited (symlink loop or duplicate link)",
                    canonical.display()
                ),
            );
            return Ok(());
        }
        for child in self.list(dir, key)? {
            if child.is_dir {
                self.descend(&child.path, &child.key)?;
            } else {
                self.files.push(child.key);
            }
        }
        Ok(())
    }

    /// List `dir`, sorted by name; record skipped entries, return the rest.
    fn list(&mut self, dir: &Path, key: &str) -> Result<Vec<Child>, ImageError> {
        let io_err = |source| ImageError::Io {
            path: dir.to_path_buf(),
            source,
        };
        let mut children = Vec::new();
        for item in fs::read_dir(dir).map_err(io_err)? {
            let item = item.map_err(io_err)?;
            let path = item.path();
            let name_os = item.file_name();
            let Some(name) = name_os.to_str() else {
                let lossy = name_os.to_string_lossy();
                let k = if key.is_empty() {
                    lossy.to_string()
                } else {
                    format!("{key}/{lossy}")
                };
                self.skip(&k, "file name is not valid UTF-8");
                continue;
            };
            let child_key = if key.is_empty() {
                name.to_string()
            } else {
                format!("{key}/{name}")
            };
            if name.starts_with('.') {
                self.skip(&child_key, "hidden");
                continue;
            }
            // `metadata` follows symlinks; a dangling link fails here.
            let meta = match fs::metadata(&path) {
                Ok(m) => m,
                Err(e) => {
                    let is_link = fs::symlink_metadata(&path)
                        .map(|m| m.file_type().is_symlink())
                        .unwrap_or(false);
                    if is_link {
                        self.skip(&child_key, format!("broken symbolic link: {e}"));
                        continue;
                    }
                    return Err(ImageError::Io { path, source: e });
                }
            };
            if meta.is_dir() {
                children.push(Child {
                    name: name.to_string(),
                    key: child_key,
                    path,
                    is_dir: true,
                });
            } else if !meta.is_file() {
                self.skip(&child_key, "not a regular file");
            } else if !is_image_extension(&path) {
                self.skip(
                    &child_key,
                    "not an image file extension (jpg, jpeg, png, webp)",
                );
            } else {
                children.push(Child {
                    name: name.to_string(),
                    key: child_key,
                    path,
                    is_dir: false,
                });
            }
        }
        children.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(children)
    }
}
