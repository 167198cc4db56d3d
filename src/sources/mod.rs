//! Input sources of a build besides an image folder: tar archives (a tar
//! of per-class tars like `ILSVRC2012_img_train.tar`, a flat tar with a
//! `--labels` file, WebDataset shards) and Parquet image datasets (the
//! Hugging Face `datasets` layout), read in place, never extracted.
//!
//! Contract shared with the folder layout (see `pipeline::plan`):
//! * Listing gives the images (key, label) in a deterministic order and
//!   the inputs seen but not taken (`skipped`). The order is the sources'
//!   stored order: input files sorted by name, then members (rows) as
//!   stored, so reading is sequential. Keys are what the extracted folder
//!   would give (`n01440764/n01440764_10026.JPEG` for the nested tar, the
//!   member path for a flat tar or WebDataset, the `path` field of the
//!   image for Parquet, else `FILE#ROW`), so a source stored in sorted key
//!   order builds the same bytes as its extracted folder. The member's
//!   place in its archive (`train.tar/n01440764.tar/x.JPEG`) names it in
//!   messages.
//! * [`ItemReader::stream`] hands out the bytes of any range of the
//!   listing in order, starting there without reading what is before
//!   (resume and parts). A member or row whose bytes cannot be had is an
//!   item error (the image is rejected); a source that cannot be read any
//!   more (truncated since listing, I/O error) ends the stream with an
//!   error, which stops the build where `--resume` can continue.
//! * A source that ends early (a truncated or damaged archive, an
//!   unreadable Parquet file) is listed up to that point and the listing
//!   says so ([`Listing::truncated`]); everything after it is left out,
//!   so the listing is a prefix of the complete source's.
//! * Bytes come from [`bytes::ByteSource`] (length + positioned reads): a
//!   local file, or an object in a store when an input is a URL
//!   (`s3://bucket/train.tar`, `s3://bucket/data/`, see [`remote`]), named
//!   as the local file would be so the build is the same.

pub mod bytes;
mod labels;
mod parquet_images;
pub mod remote;
mod tar_images;

use crate::error::FileError;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::images::{Discovery, Skipped};

pub use labels::LabelsFile;

/// `--input-format`.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum InputFormat {
    /// Decide from the inputs: a directory holding images is a folder;
    /// `.tar` files (or a directory of them) are tar archives, `.parquet`
    /// files (or a directory of them) a Parquet dataset.
    #[default]
    Auto,
    /// An image folder (class sub-folders or flat).
    Folder,
    /// Tar archives: a tar of per-class tars, or a flat tar / WebDataset
    /// shards (decided from the first archive's members).
    Tar,
    /// WebDataset shards: flat tars, `<key>.cls` members give the labels.
    Webdataset,
    /// Parquet files with an image column (Hugging Face `datasets` layout).
    Parquet,
}

/// How to read the inputs of a build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceOptions {
    /// The format, or `Auto`.
    pub format: InputFormat,
    /// Labels for archive members (see [`LabelsFile`]).
    pub labels: Option<PathBuf>,
    /// Parquet: the image column (a struct with `bytes` and `path`, or binary).
    pub image_column: String,
    /// Parquet: the integer label column; empty: no labels (-1).
    pub label_column: String,
}

/// Default `--image-column`.
pub const DEFAULT_IMAGE_COLUMN: &str = "image";
/// Default `--label-column`.
pub const DEFAULT_LABEL_COLUMN: &str = "label";

impl Default for SourceOptions {
    fn default() -> Self {
        Self {
            format: InputFormat::Auto,
            labels: None,
            image_column: DEFAULT_IMAGE_COLUMN.into(),
            label_column: DEFAULT_LABEL_COLUMN.into(),
        }
    }
}

/// What a non-folder source was: recorded in the build settings, so a
/// `--resume` reading something else is refused.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SourceSettings {
    /// `nested-tar`, `tar`, `webdataset` or `parquet`.
    pub format: String,
    /// The input files in reading order (names relative to the inputs given).
    pub files: Vec<String>,
    /// sha256 of the `--labels` file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels_sha256: Option<String>,
    /// Parquet image column.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_column: Option<String>,
    /// Parquet label column.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label_column: Option<String>,
}

/// Why a source cannot be listed or read.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// A file could not be read or written, or its content is wrong.
    #[error(transparent)]
    File(#[from] crate::error::FileError),
    /// A store input could not be listed or read (its URL and the store's answer).
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// The inputs or options do not fit together.
    #[error("{0}")]
    Invalid(String),
}

/// One image's bytes, or why there are none (the image is then rejected).
pub type Item = (usize, Result<Vec<u8>, String>);

/// Reads the images of a listing.
pub trait ItemReader: Send + Sync {
    /// The images `range` (indices into the listing), in order. An `Err`
    /// ends the stream: the source cannot be read any more.
    fn stream(
        &self,
        range: Range<usize>,
    ) -> Box<dyn Iterator<Item = Result<Item, SourceError>> + Send + '_>;
}

/// The images of a source, and how to read them.
pub struct Listing {
    /// Keys, labels and class names; an entry's `path` is its place in the
    /// source (`train.tar/n01440764.tar/x.JPEG`, `file.parquet#12`).
    pub discovery: Discovery,
    /// Reads the images' bytes; `None` for a folder (read by path).
    pub reader: Option<Arc<dyn ItemReader>>,
    /// `None` for a folder.
    pub settings: Option<SourceSettings>,
    /// The source ended early: where, and why (the listing is what came
    /// before).
    pub truncated: Option<Skipped>,
}

impl std::fmt::Debug for Listing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listing")
            .field("discovery", &self.discovery)
            .field("settings", &self.settings)
            .field("truncated", &self.truncated)
            .finish()
    }
}

/// An input file with the name it is known by in keys and settings.
#[derive(Debug, Clone)]
pub(crate) struct InputFile {
    /// The local path, or the object's URL (in messages).
    pub path: PathBuf,
    pub name: String,
    /// The object, for a store input (`None`: the local file `path`).
    pub source: Option<Arc<dyn bytes::ByteSource>>,
}

impl std::fmt::Debug for dyn bytes::ByteSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl InputFile {
    /// Its bytes.
    pub fn open(&self) -> Result<Arc<dyn bytes::ByteSource>, SourceError> {
        match &self.source {
            Some(s) => Ok(s.clone()),
            None => bytes::open_local(&self.path),
        }
    }
}

/// A build input given as a store URL (`s3://...`, `file://...`).
fn url_of(input: &Path) -> Option<&str> {
    crate::store::is_url(input)
        .then(|| input.to_str())
        .flatten()
}

/// What the inputs are, once `Auto` is decided.
#[derive(Debug)]
pub enum Resolved {
    /// An image folder: list it with [`crate::images::discover`].
    Folder(PathBuf),
    /// Anything else: list it with [`list`].
    Files(InputFormat),
}

/// Decide the format of `inputs` (`opts.format`, or detected).
pub fn resolve(inputs: &[PathBuf], format: InputFormat) -> Result<Resolved, SourceError> {
    let Some(first) = inputs.first() else {
        return Err(SourceError::Invalid("no input given".into()));
    };
    let format = match format {
        InputFormat::Auto => detect(inputs)?,
        f => f,
    };
    if format == InputFormat::Folder {
        if inputs.len() == 1 && url_of(first).is_some() {
            // A folder prefix in a store is listed like the other sources.
            return Ok(Resolved::Files(InputFormat::Folder));
        }
        if inputs.len() > 1 {
            return Err(SourceError::Invalid(
                "an image folder build takes one directory".into(),
            ));
        }
        return Ok(Resolved::Folder(first.clone()));
    }
    Ok(Resolved::Files(format))
}

fn detect(inputs: &[PathBuf]) -> Result<InputFormat, SourceError> {
    if let [one] = inputs
        && let Some(url) = url_of(one)
    {
        return remote::detect(url);
    }
    if inputs.len() == 1 && inputs[0].is_dir() {
        let dir = &inputs[0];
        if holds_image(dir) {
            return Ok(InputFormat::Folder);
        }
        if !files_under(dir, "parquet", true)?.is_empty() {
            return Ok(InputFormat::Parquet);
        }
        if !files_under(dir, "tar", false)?.is_empty() {
            return Ok(InputFormat::Tar);
        }
        return Ok(InputFormat::Folder);
    }
    let mut found = None;
    for input in inputs {
        let name = input.to_string_lossy().to_ascii_lowercase();
        let f = if name.ends_with(".parquet") {
            InputFormat::Parquet
        } else if name.ends_with(".tar") {
            InputFormat::Tar
        } else {
            return Err(SourceError::Invalid(format!(
                "cannot tell the format of {} (not a directory, .tar or .parquet); use --input-format",
                input.display()
            )));
        };
        if found.is_some_and(|g| g != f) {
            return Err(SourceError::Invalid(
                "inputs mix .tar and .parquet files; give one kind".into(),
            ));
        }
        found = Some(f);
    }
    found.ok_or_else(|| SourceError::Invalid("no input given".into()))
}

/// Whether `dir` holds an image file anywhere below it (stops at the first).
fn holds_image(dir: &Path) -> bool {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return false;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            if holds_image(&p) {
                return true;
            }
        } else if crate::images::is_image_extension(&p) {
            return true;
        }
    }
    false
}

/// Files named `*.{ext}` under `dir` (recursively when `deep`), sorted by
/// their path relative to `dir`, hidden names left out.
fn files_under(dir: &Path, ext: &str, deep: bool) -> Result<Vec<InputFile>, SourceError> {
    fn walk(
        dir: &Path,
        rel: &str,
        ext: &str,
        deep: bool,
        out: &mut Vec<InputFile>,
    ) -> Result<(), SourceError> {
        let io = |source| SourceError::from(FileError::io(dir.to_path_buf(), source));
        for e in std::fs::read_dir(dir).map_err(io)? {
            let e = e.map_err(io)?;
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            let key = if rel.is_empty() {
                name.clone()
            } else {
                format!("{rel}/{name}")
            };
            let p = e.path();
            if p.is_dir() {
                if deep {
                    walk(&p, &key, ext, deep, out)?;
                }
            } else if has_ext(&name, ext) {
                out.push(InputFile {
                    path: p,
                    name: key,
                    source: None,
                });
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, "", ext, deep, &mut out)?;
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

fn has_ext(name: &str, ext: &str) -> bool {
    name.rsplit_once('.')
        .is_some_and(|(_, e)| e.eq_ignore_ascii_case(ext))
}

/// `*` and `?` wildcards against a whole name.
fn wildcard(pattern: &[u8], name: &[u8]) -> bool {
    match (pattern.split_first(), name.split_first()) {
        (None, None) => true,
        (Some((b'*', rest)), _) => {
            wildcard(rest, name) || (!name.is_empty() && wildcard(pattern, &name[1..]))
        }
        (Some((b'?', rest)), Some((_, nrest))) => wildcard(rest, nrest),
        (Some((p, rest)), Some((n, nrest))) if p == n => wildcard(rest, nrest),
        _ => false,
    }
}

/// The input files: directories expanded (`*.ext`, recursively for
/// Parquet), a `*`/`?` pattern in the file name expanded (for lists too
/// long for a shell), others taken as they are; sorted by name, each once.
pub(crate) fn input_files(inputs: &[PathBuf], ext: &str) -> Result<Vec<InputFile>, SourceError> {
    let mut out: Vec<InputFile> = Vec::new();
    for input in inputs {
        if let Some(url) = url_of(input) {
            out.extend(remote::input_files(url, ext, ext == "parquet")?);
            continue;
        }
        let name = input
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| input.display().to_string());
        if input.is_dir() {
            let prefix = name.clone();
            let found = files_under(input, ext, ext == "parquet")?;
            if found.is_empty() {
                return Err(SourceError::Invalid(format!(
                    "no .{ext} file in {}",
                    input.display()
                )));
            }
            out.extend(found.into_iter().map(|f| InputFile {
                name: format!("{prefix}/{}", f.name),
                path: f.path,
                source: None,
            }));
        } else if name.contains(['*', '?']) && !input.exists() {
            let parent = input.parent().filter(|p| !p.as_os_str().is_empty());
            let parent = parent.unwrap_or(Path::new("."));
            let mut found: Vec<InputFile> = std::fs::read_dir(parent)
                .map_err(|source| SourceError::from(FileError::io(parent.to_path_buf(), source)))?
                .flatten()
                .filter_map(|e| {
                    let n = e.file_name().to_string_lossy().into_owned();
                    wildcard(name.as_bytes(), n.as_bytes()).then(|| InputFile {
                        path: e.path(),
                        name: n,
                        source: None,
                    })
                })
                .collect();
            if found.is_empty() {
                return Err(SourceError::Invalid(format!(
                    "no file matches {}",
                    input.display()
                )));
            }
            out.append(&mut found);
        } else if input.is_file() {
            out.push(InputFile {
                path: input.clone(),
                name,
                source: None,
            });
        } else {
            return Err(SourceError::from(FileError::io(
                input.clone(),
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
            )));
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name).then(a.path.cmp(&b.path)));
    out.dedup_by(|a, b| a.path == b.path);
    Ok(out)
}

/// List the images of `inputs` read as `format` (not a folder).
pub fn list(
    inputs: &[PathBuf],
    format: InputFormat,
    opts: &SourceOptions,
) -> Result<Listing, SourceError> {
    let labels = opts.labels.as_deref().map(LabelsFile::read).transpose()?;
    let root = inputs.first().cloned().unwrap_or_default();
    match format {
        InputFormat::Tar | InputFormat::Webdataset => {
            let files = input_files(inputs, "tar")?;
            tar_images::list(root, &files, format == InputFormat::Webdataset, labels)
        }
        InputFormat::Parquet => {
            if labels.is_some() {
                return Err(SourceError::Invalid(
                    "--labels applies to tar archives; a Parquet dataset has its label column (--label-column)".into(),
                ));
            }
            let files = input_files(inputs, "parquet")?;
            parquet_images::list(root, &files, opts)
        }
        InputFormat::Folder if inputs.len() == 1 && url_of(&root).is_some() => {
            if labels.is_some() {
                return Err(SourceError::Invalid(
                    "--labels applies to tar archives, not to an image folder".into(),
                ));
            }
            remote::list_folder(url_of(&root).unwrap_or_default())
        }
        InputFormat::Auto | InputFormat::Folder => Err(SourceError::Invalid(
            "an image folder is listed by images::discover".into(),
        )),
    }
}

/// Drop entries whose key was already taken (the first one stays), keeping
/// `aux` (per-entry reader data) in step; the others go to `skipped`.
pub(crate) fn drop_duplicates<T>(
    entries: &mut Vec<crate::images::ImageEntry>,
    aux: &mut Vec<T>,
    skipped: &mut Vec<Skipped>,
) {
    let mut seen: std::collections::HashMap<String, PathBuf> = Default::default();
    let mut keep = Vec::with_capacity(entries.len());
    for e in entries.iter() {
        match seen.get(&e.key) {
            Some(first) => {
                skipped.push(Skipped {
                    key: e.path.display().to_string(),
                    reason: format!("duplicate key {} (first at {})", e.key, first.display()),
                });
                keep.push(false);
            }
            None => {
                seen.insert(e.key.clone(), e.path.clone());
                keep.push(true);
            }
        }
    }
    let mut it = keep.iter();
    entries.retain(|_| *it.next().unwrap_or(&true));
    let mut it = keep.iter();
    aux.retain(|_| *it.next().unwrap_or(&true));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards() {
        assert!(wildcard(b"shard-*.tar", b"shard-0001.tar"));
        assert!(wildcard(b"s?.tar", b"s1.tar"));
        assert!(!wildcard(b"shard-*.tar", b"shard-0001.tar.idx"));
        assert!(wildcard(b"*", b""));
    }

    #[test]
    fn detection_by_extension() {
        let p = |s: &str| PathBuf::from(s);
        assert_eq!(detect(&[p("a.tar"), p("b.TAR")]).unwrap(), InputFormat::Tar);
        assert_eq!(detect(&[p("a.parquet")]).unwrap(), InputFormat::Parquet);
        assert!(detect(&[p("a.tar"), p("b.parquet")]).is_err());
        assert!(detect(&[p("a.zip")]).is_err());
    }
}
