//! Build inputs in object storage (`s3://bucket/train.tar`,
//! `s3://bucket/imagenet/data/`, `file:///...`): the objects of a URL as
//! [`InputFile`]s named as the same files on a local disk would be (so the
//! keys, the recorded file names and the built bytes are those of the
//! local build), each read through [`RemoteObject`]; and an image-folder
//! prefix listed as [`crate::images::discover`] lists a local folder.
//!
//! A [`RemoteObject`] reads a tar as a stream: a positioned read opens a
//! ranged GET from there (up to [`WINDOW`] bytes ahead) and the next reads
//! continue on its body, skipping forward over what is not needed, so an
//! archive read in order costs one request per window and holds one
//! network chunk in memory. A read that goes backwards or far ahead opens
//! a new one. Parquet column chunks are exact range requests
//! ([`ByteSource::read_range`]).

use std::collections::BTreeSet;
use std::io::{self, Read};
use std::ops::Range;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use super::bytes::ByteSource;
use super::{InputFile, InputFormat, Item, ItemReader, Listing, SourceError};
use crate::images::{Discovery, ImageEntry, Skipped, is_image_extension};
use crate::store::{RangeStream, Remote, StoreError};

/// Bytes asked for by one streamed GET (a new request after each window).
pub const WINDOW: u64 = 32 << 20;
/// Farthest a stream is read ahead (and discarded) to reach a later offset
/// rather than opening a new request.
const MAX_SKIP: u64 = 4 << 20;
/// Open streams kept per object (readers of different places at once).
const MAX_STREAMS: usize = 4;

/// A body being read: the next byte is at `pos`, the stream ends at `end`.
struct Cursor {
    pos: u64,
    end: u64,
    body: RangeStream,
}

/// One object of a store, read by ranged GETs.
pub struct RemoteObject {
    remote: Remote,
    rel: String,
    url: String,
    len: u64,
    /// Streams left open by earlier reads, most recent last.
    cursors: Mutex<Vec<Cursor>>,
}

impl RemoteObject {
    /// Object `rel` of `remote`, `len` bytes long (as listed).
    pub fn new(remote: Remote, rel: &str, len: u64) -> Self {
        Self {
            url: remote.url_of(rel),
            remote,
            rel: rel.to_string(),
            len,
            cursors: Mutex::new(Vec::new()),
        }
    }

    fn store_err(e: StoreError) -> io::Error {
        io::Error::other(e.to_string())
    }

    /// A cursor that can reach `offset..offset + n`: an open one a little
    /// behind it, else a new request.
    fn cursor_for(&self, offset: u64, n: u64) -> io::Result<Cursor> {
        let mut open = self.cursors.lock().unwrap_or_else(|p| p.into_inner());
        let found = open
            .iter()
            .position(|c| c.pos <= offset && offset - c.pos <= MAX_SKIP && offset + n <= c.end);
        if let Some(i) = found {
            return Ok(open.remove(i));
        }
        drop(open);
        let end = self.len.min(offset + n.max(WINDOW));
        let body = self
            .remote
            .stream_range(&self.rel, offset..end)
            .map_err(Self::store_err)?;
        Ok(Cursor {
            pos: offset,
            end,
            body,
        })
    }
}

impl ByteSource for RemoteObject {
    fn name(&self) -> &str {
        &self.url
    }

    fn len(&self) -> u64 {
        self.len
    }

    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let n = buf.len() as u64;
        if n == 0 {
            return Ok(());
        }
        if offset + n > self.len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "{}: bytes {offset}..{} asked for, the object has {}",
                    self.url,
                    offset + n,
                    self.len
                ),
            ));
        }
        let mut c = self.cursor_for(offset, n)?;
        let skip = offset - c.pos;
        let skipped = io::copy(&mut (&mut c.body).take(skip), &mut io::sink())?;
        if skipped < skip {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        c.body.read_exact(buf)?;
        c.pos = offset + n;
        if c.pos < c.end {
            let mut open = self.cursors.lock().unwrap_or_else(|p| p.into_inner());
            if open.len() >= MAX_STREAMS {
                open.remove(0);
            }
            open.push(c);
        }
        Ok(())
    }

    fn read_range(&self, offset: u64, len: usize) -> io::Result<bytes::Bytes> {
        let end = offset + len as u64;
        if end > self.len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "{}: bytes {offset}..{end} asked for, the object has {}",
                    self.url, self.len
                ),
            ));
        }
        if len == 0 {
            return Ok(bytes::Bytes::new());
        }
        let b = self
            .remote
            .get_range(&self.rel, offset..end)
            .map_err(Self::store_err)?;
        if b.len() != len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{}: {} bytes came for {len} asked", self.url, b.len()),
            ));
        }
        Ok(b)
    }
}

/// `url` split into the store prefix above its last part, and that part.
fn split_url(url: &str) -> (&str, &str) {
    let t = url.trim_end_matches('/');
    let scheme_end = t.find("://").map_or(0, |i| i + 3);
    match t[scheme_end..].rfind('/') {
        Some(i) => (&t[..scheme_end + i], &t[scheme_end + i + 1..]),
        None => (t, ""),
    }
}

/// Whether any part of `rel` is hidden (starts with a dot).
fn hidden(rel: &str) -> bool {
    rel.split('/').any(|p| p.starts_with('.'))
}

/// The objects under the prefix `url`: (name relative to it, size), hidden
/// ones left out.
fn list_prefix(remote: &Remote) -> Result<Vec<(String, u64)>, SourceError> {
    Ok(remote
        .list("")?
        .into_iter()
        .filter(|(rel, _)| !hidden(rel))
        .collect())
}

fn has_ext(name: &str, ext: &str) -> bool {
    super::has_ext(name, ext)
}

/// The format of the store input `url` when not given: an object named
/// `.tar` / `.parquet` by its name; a prefix as a local directory is
/// (images anywhere: a folder; else Parquet files anywhere; else tars at
/// its top).
pub(super) fn detect(url: &str) -> Result<InputFormat, SourceError> {
    let (_, last) = split_url(url);
    if !url.ends_with('/') {
        if has_ext(last, "tar") {
            return Ok(InputFormat::Tar);
        }
        if has_ext(last, "parquet") {
            return Ok(InputFormat::Parquet);
        }
    }
    let remote = Remote::open(url)?;
    let objects = list_prefix(&remote)?;
    if objects.is_empty() {
        return Err(SourceError::Invalid(format!(
            "{url}: no object under this prefix (or no such bucket); give an object or a prefix holding images, .tar or .parquet files"
        )));
    }
    let any = |f: &dyn Fn(&str) -> bool| objects.iter().any(|(r, _)| f(r));
    Ok(if any(&|r| is_image_extension(std::path::Path::new(r))) {
        InputFormat::Folder
    } else if any(&|r| has_ext(r, "parquet")) {
        InputFormat::Parquet
    } else if any(&|r| !r.contains('/') && has_ext(r, "tar")) {
        InputFormat::Tar
    } else {
        InputFormat::Folder
    })
}

fn input_file(remote: &Remote, rel: &str, size: u64, name: String) -> InputFile {
    InputFile {
        path: PathBuf::from(remote.url_of(rel)),
        name,
        source: Some(Arc::new(RemoteObject::new(remote.clone(), rel, size))),
    }
}

/// The input files of the store URL `url`, named as the local files would
/// be: an object by its name; a `*`/`?` pattern in the last part by the
/// names it matches; a prefix (`.../data/`) by `data/REL` for each
/// `*.ext` object below it (recursively when `deep`), sorted.
pub(super) fn input_files(url: &str, ext: &str, deep: bool) -> Result<Vec<InputFile>, SourceError> {
    let (parent, last) = split_url(url);
    if last.contains(['*', '?']) {
        let remote = Remote::open(parent)?;
        let found: Vec<InputFile> = list_prefix(&remote)?
            .into_iter()
            .filter(|(rel, _)| !rel.contains('/'))
            .filter(|(rel, _)| super::wildcard(last.as_bytes(), rel.as_bytes()))
            .map(|(rel, size)| input_file(&remote, &rel, size, rel.clone()))
            .collect();
        if found.is_empty() {
            return Err(SourceError::Invalid(format!("no object matches {url}")));
        }
        return Ok(found);
    }
    if !url.ends_with('/') && !last.is_empty() {
        let remote = Remote::open(parent)?;
        if let Some(meta) = remote.head(last)? {
            return Ok(vec![input_file(&remote, last, meta.size, last.to_string())]);
        }
    }
    // A prefix: as a local directory of that name.
    let remote = Remote::open(url)?;
    let found: Vec<InputFile> = list_prefix(&remote)?
        .into_iter()
        .filter(|(rel, _)| has_ext(rel, ext) && (deep || !rel.contains('/')))
        .map(|(rel, size)| input_file(&remote, &rel, size, format!("{last}/{rel}")))
        .collect();
    if found.is_empty() {
        return Err(SourceError::Invalid(format!(
            "{url}: no such object, and no .{ext} object under it as a prefix"
        )));
    }
    Ok(found)
}

/// List an image-folder prefix as [`crate::images::discover`] lists a
/// local folder: one sub-prefix per class (sorted names give the labels),
/// or flat; keys are the names below the prefix. Objects that a local
/// folder would skip are skipped with the same reasons (a store has no
/// empty folders, links or special files).
pub(super) fn list_folder(url: &str) -> Result<Listing, SourceError> {
    let remote = Remote::open(url)?;
    let all = remote.list("")?;
    let mut skipped: Vec<Skipped> = Vec::new();
    let mut hidden_seen = BTreeSet::new();
    let mut objects = Vec::new();
    for (rel, size) in all {
        // A hidden part hides everything below it, recorded once.
        let parts: Vec<&str> = rel.split('/').collect();
        if let Some(i) = parts.iter().position(|p| p.starts_with('.')) {
            let key = parts[..=i].join("/");
            if hidden_seen.insert(key.clone()) {
                skipped.push(Skipped {
                    key,
                    reason: "hidden".into(),
                });
            }
            continue;
        }
        objects.push((rel, size));
    }
    let classes: Vec<String> = objects
        .iter()
        .filter_map(|(r, _)| r.split_once('/').map(|(c, _)| c.to_string()))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let class_layout = !classes.is_empty();
    let mut entries = Vec::new();
    let mut sizes = Vec::new();
    for (rel, size) in objects {
        if !is_image_extension(std::path::Path::new(&rel)) {
            skipped.push(Skipped {
                key: rel,
                reason: "not an image file extension (jpg, jpeg, png, webp)".into(),
            });
            continue;
        }
        let label = match rel.split_once('/') {
            Some((class, _)) => classes.binary_search_by(|c| c.as_str().cmp(class)),
            None if class_layout => {
                skipped.push(Skipped {
                    key: rel,
                    reason: "file outside the class folders".into(),
                });
                continue;
            }
            None => Err(0),
        };
        entries.push(ImageEntry {
            path: PathBuf::from(remote.url_of(&rel)),
            label: label.map_or(-1, |i| i as i32),
            key: rel,
        });
        sizes.push(size);
    }
    let mut order: Vec<usize> = (0..entries.len()).collect();
    order.sort_by(|&a, &b| entries[a].key.cmp(&entries[b].key));
    let entries: Vec<ImageEntry> = order.iter().map(|&i| entries[i].clone()).collect();
    skipped.sort_by(|a, b| a.key.cmp(&b.key));
    let rels = entries.iter().map(|e| e.key.clone()).collect();
    Ok(Listing {
        discovery: Discovery {
            root: PathBuf::from(url),
            classes,
            entries,
            skipped,
        },
        reader: Some(Arc::new(FolderReader { remote, rels })),
        // As a local folder: nothing recorded beyond the image list.
        settings: None,
        truncated: None,
    })
}

/// Images fetched at once by [`FolderReader`] (one GET each, concurrently).
const FOLDER_BATCH: usize = 16;

/// Reads the images of a folder prefix, a batch of GETs at a time.
struct FolderReader {
    remote: Remote,
    rels: Vec<String>,
}

impl ItemReader for FolderReader {
    fn stream(
        &self,
        range: Range<usize>,
    ) -> Box<dyn Iterator<Item = Result<Item, SourceError>> + Send + '_> {
        let starts = range.clone().step_by(FOLDER_BATCH);
        Box::new(starts.flat_map(move |start| {
            let batch = start..(start + FOLDER_BATCH).min(range.end);
            let got = self.remote.get_many(&self.rels[batch.clone()]);
            let items: Vec<Result<Item, SourceError>> = batch
                .zip(got)
                .map(|(idx, r)| match r {
                    Ok(Some(b)) => Ok((idx, Ok(b.to_vec()))),
                    // Gone since listing: that image is rejected, as a
                    // local file removed during a build.
                    Ok(None) => Ok((idx, Err("no such object (removed since listing?)".into()))),
                    Err(e) => Err(SourceError::from(e)),
                })
                .collect();
            items
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_at_their_last_part() {
        assert_eq!(split_url("s3://b/x/train.tar"), ("s3://b/x", "train.tar"));
        assert_eq!(split_url("s3://b/data/"), ("s3://b", "data"));
        assert_eq!(split_url("s3://b"), ("s3://b", ""));
        assert_eq!(split_url("file:///tmp/a.tar"), ("file:///tmp", "a.tar"));
    }

    /// A tar in a `file://` store read the way the listing and the reader
    /// read it: forward positioned reads on one stream, a backward read
    /// on a new one, exact ranges, and reads past the end refused.
    #[test]
    fn positioned_reads_of_a_store_object_give_the_file_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(dir.path().join("a.bin"), &data).unwrap();
        let url = format!("file://{}", dir.path().display());
        let remote = Remote::open(&url).unwrap();
        let obj = RemoteObject::new(remote, "a.bin", data.len() as u64);
        for (off, n) in [(0usize, 512usize), (1024, 100), (200_000, 5000), (10, 10)] {
            let mut buf = vec![0u8; n];
            obj.read_exact_at(off as u64, &mut buf).unwrap();
            assert_eq!(buf, data[off..off + n], "read at {off}");
        }
        let b = obj.read_range(299_000, 1000).unwrap();
        assert_eq!(&b[..], &data[299_000..]);
        let mut buf = [0u8; 10];
        let e = obj.read_exact_at(299_995, &mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        assert!(obj.read_range(299_995, 10).is_err());
    }

    /// Objects of a `file://` store named as the same local files: a
    /// prefix as its directory (`data/...`, Parquet recursively, tars at
    /// its top, hidden names left out), a pattern, one object; a missing
    /// one names its URL; a prefix's format detected from its objects.
    #[test]
    fn store_inputs_are_named_as_the_local_files() {
        let dir = tempfile::tempdir().unwrap();
        for f in [
            "data/a/x.parquet",
            "data/y.parquet",
            "data/.h.parquet",
            "data/a/z.tar",
            "wds/shard-1.tar",
            "wds/shard-2.tar",
            "wds/other.tar",
            "img/c1/p.jpg",
        ] {
            let p = dir.path().join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, b"x").unwrap();
        }
        let base = format!("file://{}", dir.path().display());
        let names = |url: &str, ext: &str, deep: bool| -> Vec<String> {
            let mut v: Vec<String> = input_files(url, ext, deep)
                .unwrap()
                .into_iter()
                .map(|f| f.name)
                .collect();
            v.sort();
            v
        };
        assert_eq!(
            names(&format!("{base}/data/"), "parquet", true),
            ["data/a/x.parquet", "data/y.parquet"]
        );
        assert_eq!(
            names(&format!("{base}/wds/shard-*.tar"), "tar", false),
            ["shard-1.tar", "shard-2.tar"]
        );
        assert_eq!(
            names(&format!("{base}/wds/other.tar"), "tar", false),
            ["other.tar"]
        );
        let missing = format!("{base}/wds/none.tar");
        let e = input_files(&missing, "tar", false)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains(&missing), "{e}");
        assert_eq!(
            detect(&format!("{base}/data/")).unwrap(),
            InputFormat::Parquet
        );
        assert_eq!(detect(&format!("{base}/wds")).unwrap(), InputFormat::Tar);
        assert_eq!(
            detect(&format!("{base}/img/")).unwrap(),
            InputFormat::Folder
        );
        assert_eq!(detect(&format!("{base}/x.tar")).unwrap(), InputFormat::Tar);
    }
}
