//! `--labels FILE`: labels for archive members that carry none.
//!
//! Accepted forms (blank lines and lines starting with `#` are ignored):
//! * keyed: `KEY<sep>LABEL` per line, `<sep>` a tab, a comma or spaces.
//!   Only the first token after the key is the label, so Kaggle's
//!   `LOC_val_solution.csv` (`ImageId,PredictionString` with the synset
//!   first) works as it is. A key matches an image whose key, key without
//!   extension, file name, or file name without extension equals it (first
//!   match in that order); lines matching no image (a header) are ignored,
//!   and images matching no line get label -1.
//! * plain: one label per line, the i-th line for the i-th image in sorted
//!   key order (ImageNet's `ILSVRC2012_validation_ground_truth.txt`); the
//!   line count must equal the image count.
//!
//! Labels that are all integers are class indices as written; otherwise
//! they are class names, and the label is the name's index in the sorted
//! list of the names used (the order the folder layout gives class folders).

use crate::error::FileError;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use sha2::Digest;

use super::SourceError;
use crate::images::ImageEntry;

/// A parsed labels file.
#[derive(Debug, Clone)]
pub struct LabelsFile {
    path: PathBuf,
    lines: Lines,
    /// sha256 of the file's bytes (recorded in the build settings).
    pub sha256: String,
}

#[derive(Debug, Clone)]
enum Lines {
    Keyed(Vec<(String, String)>),
    Plain(Vec<String>),
}

fn split_tokens(line: &str) -> Vec<&str> {
    line.split(|c: char| c == ',' || c == '\t' || c.is_whitespace())
        .filter(|t| !t.is_empty())
        .collect()
}

impl LabelsFile {
    /// Read and parse `path`.
    pub fn read(path: &Path) -> Result<Self, SourceError> {
        let bytes = std::fs::read(path)
            .map_err(|source| SourceError::from(FileError::io(path.to_path_buf(), source)))?;
        let text = String::from_utf8(bytes.clone()).map_err(|_| {
            SourceError::from(FileError::format(path, "labels file is not UTF-8 text"))
        })?;
        let rows: Vec<(usize, Vec<&str>)> = text
            .lines()
            .enumerate()
            .map(|(i, l)| (i + 1, l.trim()))
            .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'))
            .map(|(i, l)| (i, split_tokens(l)))
            .collect();
        let plain = rows.iter().all(|(_, t)| t.len() == 1);
        let lines = if plain {
            Lines::Plain(rows.iter().map(|(_, t)| t[0].to_string()).collect())
        } else {
            let mut v = Vec::with_capacity(rows.len());
            for (n, t) in &rows {
                if t.len() < 2 {
                    return Err(FileError::format(
                        path,
                        format!("line {n}: expected KEY and LABEL, found one token"),
                    )
                    .into());
                }
                v.push((t[0].to_string(), t[1].to_string()));
            }
            Lines::Keyed(v)
        };
        Ok(Self {
            path: path.to_path_buf(),
            lines,
            sha256: crate::fsutil::hex(&sha2::Sha256::digest(&bytes)),
        })
    }

    /// Set the label of every entry; returns the class names (empty when
    /// the labels are indices).
    pub fn apply(&self, entries: &mut [ImageEntry]) -> Result<Vec<String>, SourceError> {
        // The raw label text of each entry (None: not in the file).
        let raw: Vec<Option<&str>> = match &self.lines {
            Lines::Plain(labels) => {
                if labels.len() != entries.len() {
                    return Err(SourceError::from(FileError::format(
                        self.path.clone(),
                        format!(
                            "{} labels for {} images (a file of one label per line must have one line per image, in sorted key order)",
                            labels.len(),
                            entries.len()
                        ),
                    )));
                }
                let mut order: Vec<usize> = (0..entries.len()).collect();
                order.sort_by(|&a, &b| entries[a].key.cmp(&entries[b].key));
                let mut raw = vec![None; entries.len()];
                for (label, &i) in labels.iter().zip(&order) {
                    raw[i] = Some(label.as_str());
                }
                raw
            }
            Lines::Keyed(pairs) => {
                let map: HashMap<&str, &str> = pairs
                    .iter()
                    .map(|(k, l)| (k.as_str(), l.as_str()))
                    .collect();
                entries
                    .iter()
                    .map(|e| candidates(&e.key).iter().find_map(|c| map.get(c).copied()))
                    .collect()
            }
        };
        let unmatched = raw.iter().filter(|r| r.is_none()).count();
        if unmatched > 0 {
            tracing::warn!(
                "{unmatched} image(s) have no line in {}: label -1",
                self.path.display()
            );
        }
        let numeric = raw.iter().flatten().all(|l| l.parse::<i32>().is_ok());
        if numeric {
            for (e, r) in entries.iter_mut().zip(&raw) {
                e.label = r.and_then(|l| l.parse().ok()).unwrap_or(-1);
            }
            return Ok(Vec::new());
        }
        let names: Vec<String> = raw
            .iter()
            .flatten()
            .copied()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .map(String::from)
            .collect();
        for (e, r) in entries.iter_mut().zip(&raw) {
            e.label = r
                .and_then(|l| names.binary_search_by(|n| n.as_str().cmp(l)).ok())
                .map_or(-1, |i| i as i32);
        }
        Ok(names)
    }
}

/// The names a labels-file key may give for image key `key`.
fn candidates(key: &str) -> Vec<&str> {
    let base = key.rsplit('/').next().unwrap_or(key);
    let no_ext = |s: &str| -> usize { s.rfind('.').unwrap_or(s.len()) };
    vec![key, &key[..no_ext(key)], base, &base[..no_ext(base)]]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(keys: &[&str]) -> Vec<ImageEntry> {
        keys.iter()
            .map(|k| ImageEntry {
                path: PathBuf::from(k),
                key: k.to_string(),
                label: -1,
            })
            .collect()
    }

    fn parse(text: &str) -> LabelsFile {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("labels.txt");
        std::fs::write(&p, text).unwrap();
        LabelsFile::read(&p).unwrap()
    }

    #[test]
    fn keyed_names_map_to_sorted_indices() {
        let f = parse(
            "ImageId,PredictionString\nval_2,n02 1 2 3 4\nval_1,n01 5 6 7 8\n# c\n\nval_3\tn02\n",
        );
        let mut e = entries(&[
            "v/val_1.JPEG",
            "v/val_2.JPEG",
            "v/val_3.JPEG",
            "v/other.JPEG",
        ]);
        let classes = f.apply(&mut e).unwrap();
        assert_eq!(classes, ["n01", "n02"]);
        assert_eq!(e.iter().map(|e| e.label).collect::<Vec<_>>(), [0, 1, 1, -1]);
    }

    #[test]
    fn plain_numbers_follow_sorted_keys() {
        let f = parse("7\n3\n5\n");
        let mut e = entries(&["c.jpg", "a.jpg", "b.jpg"]);
        assert!(f.apply(&mut e).unwrap().is_empty());
        assert_eq!(e.iter().map(|e| e.label).collect::<Vec<_>>(), [5, 7, 3]);
        let mut short = entries(&["a.jpg"]);
        assert!(f.apply(&mut short).is_err());
    }

    #[test]
    fn keyed_numbers_with_spaces() {
        let f = parse("a.jpg 4\nb 2\n");
        let mut e = entries(&["x/a.jpg", "x/b.png"]);
        f.apply(&mut e).unwrap();
        assert_eq!(e.iter().map(|e| e.label).collect::<Vec<_>>(), [4, 2]);
    }
}
