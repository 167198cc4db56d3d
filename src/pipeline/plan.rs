//! Shard planning: which images go to which shard, and which shards a part
//! of a multi-machine build owns.
//!
//! The shard of an image depends only on its index in the sorted image list
//! (`shard = index / images_per_shard`), never on which images failed to
//! decode. So a shard may hold fewer rows than planned (rejected images leave
//! holes), but every build with the same list and arguments — whole, resumed,
//! or split into parts — puts every image in the same shard.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::PipelineError;
use crate::images::{Discovery, ImageEntry, Skipped};
use crate::sources::{self, ItemReader, Resolved, SourceOptions, SourceSettings};

/// Part `index` of `count` in a multi-machine build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PartSpec {
    /// Which part, 0-based.
    pub index: usize,
    /// How many parts.
    pub count: usize,
}

/// Which images go to which shard, and which shards this build writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardPlan {
    /// Images of the whole build (all parts).
    pub num_images: usize,
    /// Images per shard (the last shard may hold fewer).
    pub images_per_shard: usize,
    /// Shards this build writes (global shard indices).
    pub shards: Range<usize>,
}

impl ShardPlan {
    /// Plan `num_images` images at `images_per_shard` each, restricted to
    /// the part's contiguous range of whole shards when `part` is given.
    pub fn new(
        num_images: usize,
        images_per_shard: usize,
        part: Option<PartSpec>,
    ) -> Result<Self, String> {
        if images_per_shard == 0 {
            return Err("images per shard must be at least 1".into());
        }
        let total = num_images.div_ceil(images_per_shard);
        let shards = match part {
            None => 0..total,
            Some(p) => {
                if p.count == 0 || p.index >= p.count {
                    return Err(format!(
                        "--part {} is out of range for --num-parts {}",
                        p.index, p.count
                    ));
                }
                // Balanced contiguous split; parts may be empty when there
                // are fewer shards than parts.
                (p.index * total / p.count)..((p.index + 1) * total / p.count)
            }
        };
        Ok(Self {
            num_images,
            images_per_shard,
            shards,
        })
    }

    /// Total shards of the whole build (all parts together).
    pub fn total_shards(&self) -> usize {
        self.num_images.div_ceil(self.images_per_shard)
    }

    /// The shard image `image` (global index) goes to.
    pub fn shard_of(&self, image: usize) -> usize {
        image / self.images_per_shard
    }

    /// Global image indices held by shard `s`.
    pub fn images_of(&self, s: usize) -> Range<usize> {
        let a = (s * self.images_per_shard).min(self.num_images);
        let b = ((s + 1) * self.images_per_shard).min(self.num_images);
        a..b
    }

    /// Global image indices this build (or part) encodes.
    pub fn images(&self) -> Range<usize> {
        let start = self.images_of(self.shards.start).start;
        if self.shards.is_empty() {
            return start..start;
        }
        start..self.images_of(self.shards.end - 1).end
    }

    /// Images from shard `from` (inclusive) to the end of this build.
    pub fn images_from_shard(&self, from: usize) -> Range<usize> {
        let all = self.images();
        if from >= self.shards.end {
            return all.end..all.end;
        }
        self.images_of(from).start..all.end
    }
}

/// The images a build encodes (in listing order, after `--limit`) and the
/// shards they go to.
#[derive(Clone)]
pub struct Inputs {
    /// The listing; its `entries` are the images encoded.
    pub images: Discovery,
    /// Their shards.
    pub shards: ShardPlan,
    /// Reads the images of an archive or Parquet source; `None`: a folder,
    /// whose images are read by path.
    pub reader: Option<Arc<dyn ItemReader>>,
    /// What the source is (`None` for a folder).
    pub source: Option<SourceSettings>,
    /// The source ended early: the images are those of the whole shards
    /// before the cut, and the build stops there (see `run_build`).
    pub truncated: Option<Skipped>,
}

impl std::fmt::Debug for Inputs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inputs")
            .field("images", &self.images)
            .field("shards", &self.shards)
            .field("source", &self.source)
            .field("truncated", &self.truncated)
            .finish()
    }
}

impl Inputs {
    /// List the images under `root` (the first `limit` of them) and plan
    /// their shards. An empty list is refused.
    pub fn discover(
        root: &Path,
        limit: Option<usize>,
        images_per_shard: usize,
        part: Option<PartSpec>,
    ) -> Result<Self, PipelineError> {
        let images = crate::images::discover(root)?;
        Self::plan(images, None, limit, images_per_shard, part)
    }

    /// List the images of `inputs` (an image folder, tar archives or
    /// Parquet files, see [`crate::sources`]) and plan their shards.
    pub fn list(
        inputs: &[PathBuf],
        opts: &SourceOptions,
        limit: Option<usize>,
        images_per_shard: usize,
        part: Option<PartSpec>,
    ) -> Result<Self, PipelineError> {
        let format = match sources::resolve(inputs, opts.format)? {
            Resolved::Folder(root) => {
                if opts.labels.is_some() {
                    return Err(PipelineError::Invalid(
                        "--labels applies to tar archives, not to an image folder".into(),
                    ));
                }
                return Self::discover(&root, limit, images_per_shard, part);
            }
            Resolved::Files(f) => f,
        };
        let listing = sources::list(inputs, format, opts)?;
        Self::plan(
            listing.discovery,
            Some((listing.reader, listing.settings, listing.truncated)),
            limit,
            images_per_shard,
            part,
        )
    }

    fn plan(
        mut images: Discovery,
        source: Option<SourceParts>,
        limit: Option<usize>,
        images_per_shard: usize,
        part: Option<PartSpec>,
    ) -> Result<Self, PipelineError> {
        let (reader, settings, mut truncated) = source.unwrap_or((None, None, None));
        if let Some(n) = limit {
            if images.entries.len() >= n {
                truncated = None; // the cut is past the images asked for
            }
            images.entries.truncate(n);
        }
        if let Some(cut) = &truncated {
            if part.is_some() {
                return Err(PipelineError::Invalid(format!(
                    "{}: {}; parts need the complete source (its image count decides the split)",
                    cut.key, cut.reason
                )));
            }
            // Only whole shards: the last one's images may continue past
            // the cut, and a shard is never rewritten on resume.
            let whole = images.entries.len() / images_per_shard.max(1) * images_per_shard;
            let left = images.entries.len() - whole;
            images.entries.truncate(whole);
            images.skipped.push(cut.clone());
            tracing::warn!(
                "{}: {}; building the {whole} images of the whole shards before it ({left} more listed wait for the rest)",
                cut.key,
                cut.reason
            );
        } else if images.entries.is_empty() {
            return Err(PipelineError::NoImages {
                path: images.root.clone(),
            });
        }
        let shards = ShardPlan::new(images.entries.len(), images_per_shard, part)
            .map_err(PipelineError::Invalid)?;
        Ok(Self {
            images,
            shards,
            reader,
            source: settings,
            truncated,
        })
    }

    /// The images, in listing order.
    pub fn entries(&self) -> &[ImageEntry] {
        &self.images.entries
    }
}

/// What a non-folder listing adds: its reader, settings and cut.
type SourceParts = (
    Option<Arc<dyn ItemReader>>,
    Option<SourceSettings>,
    Option<Skipped>,
);

/// `shards/part-NNNNN.parquet`, relative to the cache directory.
pub fn shard_file_name(index: usize) -> String {
    format!("part-{index:05}.parquet")
}

/// Parse `part-NNNNN.parquet` (optionally as a temp name `.part-NNNNN.parquet.tmp-*`).
pub fn parse_shard_file_name(name: &str) -> Option<(usize, bool)> {
    let (name, temp) = match name.strip_prefix('.') {
        Some(rest) => (rest, true),
        None => (name, false),
    };
    let rest = name.strip_prefix("part-")?;
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    if digits.is_empty() {
        return None;
    }
    let tail = &rest[digits.len()..];
    let idx = digits.parse().ok()?;
    if !temp && tail == ".parquet" {
        Some((idx, false))
    } else if tail.starts_with(".parquet") && (temp || tail.contains("tmp")) && tail != ".parquet" {
        Some((idx, true))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_build_covers_everything() {
        let p = ShardPlan::new(10, 4, None).unwrap();
        assert_eq!(p.shards, 0..3);
        assert_eq!(p.images(), 0..10);
        assert_eq!(p.images_of(2), 8..10);
        assert_eq!(p.shard_of(7), 1);
        assert_eq!(p.images_from_shard(1), 4..10);
        assert_eq!(p.images_from_shard(3), 10..10);
    }

    #[test]
    fn parts_tile_the_shards_exactly() {
        for n in [0usize, 1, 5, 6, 7, 100] {
            for k in [1usize, 2, 3, 7] {
                for count in 1..6 {
                    let whole = ShardPlan::new(n, k, None).unwrap();
                    let mut next_shard = 0;
                    let mut next_image = 0;
                    for index in 0..count {
                        let p = ShardPlan::new(n, k, Some(PartSpec { index, count })).unwrap();
                        assert_eq!(p.shards.start, next_shard);
                        next_shard = p.shards.end;
                        let imgs = p.images();
                        assert_eq!(imgs.start, next_image, "n={n} k={k} part {index}/{count}");
                        next_image = imgs.end;
                    }
                    assert_eq!(next_shard, whole.total_shards());
                    assert_eq!(next_image, n);
                }
            }
        }
    }

    #[test]
    fn bad_part_refused() {
        assert!(ShardPlan::new(10, 2, Some(PartSpec { index: 2, count: 2 })).is_err());
        assert!(ShardPlan::new(10, 0, None).is_err());
    }

    #[test]
    fn shard_names_round_trip() {
        assert_eq!(shard_file_name(3), "part-00003.parquet");
        assert_eq!(
            parse_shard_file_name("part-00003.parquet"),
            Some((3, false))
        );
        assert_eq!(
            parse_shard_file_name(".part-00003.parquet.tmp-123"),
            Some((3, true))
        );
        assert_eq!(
            parse_shard_file_name("part-00003.parquet.tmp-1"),
            Some((3, true))
        );
        assert_eq!(parse_shard_file_name("manifest.json"), None);
        assert_eq!(parse_shard_file_name("part-x.parquet"), None);
    }
}
