//! Tar archives as image sources, read in place: a tar of per-class tars
//! (`ILSVRC2012_img_train.tar`: label = index of the inner tar's name in
//! the sorted names, key `CLASS/MEMBER` as the extracted folder), or flat
//! tars / WebDataset shards (key = member path; label from `--labels`, else
//! the sample's `<key>.cls` member, else -1).
//!
//! Listing reads the headers only, seeking over the data; the members'
//! offsets are kept, so the images of any range are read in place in
//! archive order (a sequential read) and a resume starts at its first
//! member. An archive that ends early (cut in a header or in a member's
//! data, or missing its end-of-archive block) or whose next header is
//! damaged is listed up to the last complete member.

use crate::error::FileError;
use std::collections::{BTreeSet, HashMap};
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;

use super::bytes::{ByteSource, RegionReader};
use super::{InputFile, Item, ItemReader, LabelsFile, Listing, SourceError, SourceSettings};
use crate::images::{Discovery, ImageEntry, Skipped, is_image_extension};

/// A member's bytes: archive `archive`, `size` bytes at `offset`.
#[derive(Debug, Clone, Copy)]
struct Member {
    archive: usize,
    offset: u64,
    size: u64,
}

/// A regular-file member as listed.
struct Raw {
    path: String,
    offset: u64,
    size: u64,
    /// The content of a WebDataset `.cls` member, read while listing (so
    /// the labels cost no second pass over a streamed archive).
    cls: Option<Vec<u8>>,
}

/// Largest `.cls` member read as a class index.
const MAX_CLS_BYTES: u64 = 64;

/// The members of one tar region, and where it ends early, if it does.
struct Members {
    files: Vec<Raw>,
    /// (locator, reason) of the cut.
    cut: Option<(String, String)>,
    /// The member whose data the cut falls in (its size as the header
    /// says): a nested class tar is still read up to the cut.
    cut_member: Option<Raw>,
    /// Members that are not regular files or not UTF-8 (locator, reason).
    odd: Vec<(String, String)>,
}

/// The regular-file members of the tar at `start..start+len` of `src`
/// (offsets absolute in `src`). `name` prefixes locators.
fn members(src: &Arc<dyn ByteSource>, start: u64, len: u64, name: &str) -> Members {
    let region = RegionReader::new(src.clone(), start, len);
    let region_len = region.len();
    let mut out = Members {
        files: Vec::new(),
        cut: None,
        cut_member: None,
        odd: Vec::new(),
    };
    // Buffer the small header reads (a seek drops the buffer, so keep it
    // near a header's size); `entries_with_seek` seeks over the data.
    let mut archive = tar::Archive::new(std::io::BufReader::with_capacity(2048, region));
    let mut end = 0u64; // end of the last member's padded data (relative)
    let entries = match archive.entries_with_seek() {
        Ok(e) => e,
        Err(e) => {
            out.cut = Some((name.to_string(), format!("unreadable tar: {e}")));
            return out;
        }
    };
    for entry in entries {
        let mut entry = match entry {
            Ok(e) => e,
            Err(e) => {
                out.cut = Some((
                    name.to_string(),
                    format!("archive unreadable after byte {}: {e}", start + end),
                ));
                return out;
            }
        };
        let pos = entry.raw_file_position();
        let size = entry.size();
        let path = String::from_utf8(entry.path_bytes().into_owned());
        end = pos + size.div_ceil(512) * 512;
        let Ok(path) = path else {
            out.odd.push((
                format!("{name}/{}", String::from_utf8_lossy(&entry.path_bytes())),
                "member name is not valid UTF-8".into(),
            ));
            continue;
        };
        let path = path.trim_start_matches("./").to_string();
        let kind = entry.header().entry_type();
        if kind.is_dir() || kind.is_pax_global_extensions() {
            continue;
        }
        if !kind.is_file() {
            out.odd
                .push((format!("{name}/{path}"), "not a regular file".into()));
            continue;
        }
        if pos + size > region_len {
            out.cut = Some((
                format!("{name}/{path}"),
                format!(
                    "archive truncated: this member needs bytes up to {} but the archive ends at {}",
                    start + pos + size,
                    start + region_len
                ),
            ));
            out.cut_member = Some(Raw {
                path,
                offset: start + pos,
                size,
                cls: None,
            });
            return out;
        }
        let cls = (size <= MAX_CLS_BYTES && path.to_ascii_lowercase().ends_with(".cls"))
            .then(|| {
                let mut b = Vec::with_capacity(size as usize);
                std::io::Read::read_to_end(&mut entry, &mut b).ok()?;
                (b.len() as u64 == size).then_some(b)
            })
            .flatten();
        out.files.push(Raw {
            path,
            offset: start + pos,
            size,
            cls,
        });
    }
    // A complete tar ends with zero blocks after its last member; an
    // archive cut exactly between two members has none.
    let mut block = [1u8; 512];
    let marker = end + 512 <= region_len
        && src.read_exact_at(start + end, &mut block).is_ok()
        && block.iter().all(|&b| b == 0);
    if !marker {
        out.cut = Some((
            name.to_string(),
            format!(
                "archive truncated: no end-of-archive block after its last member (ends at byte {})",
                start + region_len
            ),
        ));
    }
    out
}

/// What the listing collects over all archives.
struct Collect {
    entries: Vec<ImageEntry>,
    members: Vec<Member>,
    /// Inner class tar names (nested layout).
    classes: BTreeSet<String>,
    /// Class of each entry (nested layout).
    entry_class: Vec<String>,
    /// WebDataset `.cls` members by sample key (with their content when
    /// it was read while listing).
    cls: HashMap<String, (Member, Option<Vec<u8>>)>,
    /// Non-image members by sample key (locator, reason).
    others: Vec<(String, String, String)>,
    skipped: Vec<Skipped>,
    truncated: Option<Skipped>,
}

/// `dir/abc.seg.jpg` -> `dir/abc` (WebDataset: the key ends at the first
/// dot of the file name).
fn sample_key(path: &str) -> &str {
    let base_start = path.rfind('/').map_or(0, |i| i + 1);
    match path[base_start..].find('.') {
        Some(d) => &path[..base_start + d],
        None => path,
    }
}

impl Collect {
    fn skip_odd(&mut self, odd: Vec<(String, String)>) {
        self.skipped
            .extend(odd.into_iter().map(|(key, reason)| Skipped { key, reason }));
    }

    fn flat(&mut self, archive: usize, name: &str, files: Vec<Raw>, key_prefix: &str) {
        for f in files {
            let locator = format!("{name}/{}", f.path);
            let m = Member {
                archive,
                offset: f.offset,
                size: f.size,
            };
            let key = format!("{key_prefix}{}", f.path);
            if is_image_extension(std::path::Path::new(&f.path)) {
                self.entries.push(ImageEntry {
                    path: PathBuf::from(&locator),
                    key,
                    label: -1,
                });
                self.members.push(m);
            } else if key_prefix.is_empty() && f.path.to_ascii_lowercase().ends_with(".cls") {
                self.cls.insert(sample_key(&f.path).to_string(), (m, f.cls));
            } else {
                self.others.push((
                    sample_key(&key).to_string(),
                    locator,
                    "not an image file extension (jpg, jpeg, png, webp)".into(),
                ));
            }
        }
    }
}

/// Is the first archive a tar of tars?
fn is_nested(first: &Members) -> bool {
    first
        .files
        .first()
        .is_some_and(|f| f.path.to_ascii_lowercase().ends_with(".tar"))
}

/// List the images of `files` (tar archives, in order).
pub(super) fn list(
    root: PathBuf,
    files: &[InputFile],
    webdataset: bool,
    labels: Option<LabelsFile>,
) -> Result<Listing, SourceError> {
    let sources: Vec<Arc<dyn ByteSource>> =
        files.iter().map(|f| f.open()).collect::<Result<_, _>>()?;
    let mut c = Collect {
        entries: Vec::new(),
        members: Vec::new(),
        classes: BTreeSet::new(),
        entry_class: Vec::new(),
        cls: HashMap::new(),
        others: Vec::new(),
        skipped: Vec::new(),
        truncated: None,
    };
    let mut nested = None;
    for (a, (file, src)) in files.iter().zip(&sources).enumerate() {
        let top = members(src, 0, src.len(), &file.name);
        let is_nested = *nested.get_or_insert(!webdataset && is_nested(&top));
        c.skip_odd(top.odd);
        if is_nested {
            // A class tar cut short is read up to the cut, then the
            // listing stops (its `members` reports the cut).
            let cut_inner = top.cut_member.into_iter();
            for inner in top.files.into_iter().chain(cut_inner) {
                let locator = format!("{}/{}", file.name, inner.path);
                let lower = inner.path.to_ascii_lowercase();
                if !lower.ends_with(".tar") {
                    c.skipped.push(Skipped {
                        key: locator,
                        reason: "not a class tar (a tar of per-class tars holds only .tar members)"
                            .into(),
                    });
                    continue;
                }
                let base = inner.path.rsplit('/').next().unwrap_or(&inner.path);
                let class = base[..base.len() - 4].to_string();
                let got = members(src, inner.offset, inner.size, &locator);
                c.skip_odd(got.odd);
                let before = c.entries.len();
                c.flat(a, &locator, got.files, &format!("{class}/"));
                c.entry_class
                    .extend(std::iter::repeat_n(class.clone(), c.entries.len() - before));
                c.classes.insert(class);
                if let Some((key, reason)) = got.cut {
                    c.truncated = Some(Skipped { key, reason });
                    break;
                }
            }
        } else {
            c.flat(a, &file.name, top.files, "");
        }
        if let Some((key, reason)) = top.cut {
            c.truncated.get_or_insert(Skipped { key, reason });
        }
        if c.truncated.is_some() {
            break; // later archives are left out: the listing stays a prefix
        }
    }
    finish(
        root,
        files,
        sources,
        c,
        nested.unwrap_or(false),
        webdataset,
        labels,
    )
}

/// Labels, duplicates, skipped sidecars; the listing.
fn finish(
    root: PathBuf,
    files: &[InputFile],
    sources: Vec<Arc<dyn ByteSource>>,
    mut c: Collect,
    nested: bool,
    webdataset: bool,
    labels: Option<LabelsFile>,
) -> Result<Listing, SourceError> {
    let classes: Vec<String> = if nested {
        if labels.is_some() {
            return Err(SourceError::Invalid(
                "--labels does not apply to a tar of per-class tars (the class tars name the labels)"
                    .into(),
            ));
        }
        let classes: Vec<String> = c.classes.iter().cloned().collect();
        for (e, class) in c.entries.iter_mut().zip(&c.entry_class) {
            e.label = classes.binary_search(class).map_or(-1, |i| i as i32);
        }
        classes
    } else if let Some(l) = &labels {
        l.apply(&mut c.entries)?
    } else {
        for e in c.entries.iter_mut() {
            if let Some((cls, content)) = c.cls.get(sample_key(&e.key)) {
                let label = match content {
                    Some(b) => parse_cls(b),
                    None => read_cls(&sources[cls.archive], cls),
                };
                e.label = label.unwrap_or_else(|reason| {
                    tracing::warn!("{}: {reason}; label -1", e.path.display());
                    -1
                });
            }
        }
        Vec::new()
    };
    // Sidecars of a sample that has an image are part of it, not skipped.
    let with_image: std::collections::HashSet<&str> =
        c.entries.iter().map(|e| sample_key(&e.key)).collect();
    let others = std::mem::take(&mut c.others);
    for (sample, key, reason) in others {
        if !with_image.contains(sample.as_str()) {
            c.skipped.push(Skipped { key, reason });
        }
    }
    super::drop_duplicates(&mut c.entries, &mut c.members, &mut c.skipped);
    let format = if nested {
        "nested-tar"
    } else if webdataset {
        "webdataset"
    } else {
        "tar"
    };
    Ok(Listing {
        discovery: Discovery {
            root,
            classes,
            entries: c.entries,
            skipped: c.skipped,
        },
        reader: Some(Arc::new(TarReader {
            sources,
            names: files.iter().map(|f| f.name.clone()).collect(),
            members: c.members,
        })),
        settings: Some(SourceSettings {
            format: format.into(),
            files: files.iter().map(|f| f.name.clone()).collect(),
            labels_sha256: labels.map(|l| l.sha256),
            image_column: None,
            label_column: None,
        }),
        truncated: c.truncated,
    })
}

/// The integer in a WebDataset `.cls` member.
fn read_cls(src: &Arc<dyn ByteSource>, m: &Member) -> Result<i32, String> {
    if m.size > MAX_CLS_BYTES {
        return Err(format!(
            ".cls member of {} bytes is not a class index",
            m.size
        ));
    }
    let mut buf = vec![0u8; m.size as usize];
    src.read_exact_at(m.offset, &mut buf)
        .map_err(|e| format!("reading the .cls member: {e}"))?;
    parse_cls(&buf)
}

/// A `.cls` member's content as a class index.
fn parse_cls(buf: &[u8]) -> Result<i32, String> {
    let text = String::from_utf8_lossy(buf);
    text.trim()
        .parse()
        .map_err(|_| format!(".cls member {:?} is not an integer", text.trim()))
}

/// Reads listed members at their offsets.
struct TarReader {
    sources: Vec<Arc<dyn ByteSource>>,
    names: Vec<String>,
    members: Vec<Member>,
}

impl ItemReader for TarReader {
    fn stream(
        &self,
        range: Range<usize>,
    ) -> Box<dyn Iterator<Item = Result<Item, SourceError>> + Send + '_> {
        Box::new(range.map(move |idx| {
            let m = self.members[idx];
            let src = &self.sources[m.archive];
            let mut buf = vec![0u8; m.size as usize];
            match src.read_exact_at(m.offset, &mut buf) {
                Ok(()) => Ok((idx, Ok(buf))),
                Err(e) => Err(SourceError::from(FileError::format(PathBuf::from(&self.names[m.archive]), format!(
                        "cannot read the member at bytes {}..{} (the archive is {} bytes as listed; truncated or changed since?): {e}",
                        m.offset,
                        m.offset + m.size,
                        src.len()
                    ),
                ))),
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_of(members: &[(&str, usize)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, len) in members {
            let mut h = tar::Header::new_gnu();
            h.set_size(*len as u64);
            h.set_mode(0o644);
            b.append_data(&mut h, name, vec![7u8; *len].as_slice())
                .unwrap();
        }
        b.into_inner().unwrap()
    }

    fn list_bytes(bytes: &[u8]) -> Members {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.tar");
        std::fs::write(&p, bytes).unwrap();
        let src = super::super::bytes::open_local(&p).unwrap();
        members(&src, 0, src.len(), "a.tar")
    }

    #[test]
    fn every_kind_of_cut_is_found_and_the_complete_members_kept() {
        let whole = tar_of(&[("x/1.jpg", 1000), ("x/2.jpg", 600), ("x/3.jpg", 10)]);
        let m = list_bytes(&whole);
        assert!(m.cut.is_none());
        assert_eq!(
            m.files
                .iter()
                .map(|f| (f.path.as_str(), f.size))
                .collect::<Vec<_>>(),
            [("x/1.jpg", 1000), ("x/2.jpg", 600), ("x/3.jpg", 10)]
        );
        assert_eq!(&whole[m.files[1].offset as usize..][..600], &[7u8; 600][..]);
        // Member 1 takes 512 + 1024 bytes, member 2 512 + 1024.
        for (cut, kept, why) in [
            (1536 + 1536, 2, "end-of-archive"), // between members 2 and 3
            (1536 + 300, 1, "unreadable"),      // inside member 2's header
            (1536 + 512 + 100, 1, "truncated"), // inside member 2's data
            (4096, 3, "end-of-archive"),        // after the data, no end blocks
            (4096 + 10, 3, "unreadable"),       // in the end blocks
        ] {
            let m = list_bytes(&whole[..cut]);
            let (_, reason) = m.cut.expect("cut found");
            assert_eq!(m.files.len(), kept, "cut at {cut}: {reason}");
            assert!(reason.contains(why), "cut at {cut}: {reason}");
        }
    }

    #[test]
    fn webdataset_sample_keys() {
        assert_eq!(sample_key("a/b/x.seg.jpg"), "a/b/x");
        assert_eq!(sample_key("x.cls"), "x");
        assert_eq!(sample_key("a.b/x"), "a.b/x");
    }
}
