//! Parquet image datasets in the Hugging Face `datasets` layout: an image
//! column that is a struct `{bytes: binary, path: string}` (or plain
//! binary) and an integer label column. Class names come from the
//! `huggingface` footer metadata (`ClassLabel` names) when present.
//!
//! Listing reads only the `path` and label columns. Reading decodes one
//! row group of the bytes column at a time, in file order, starting at the
//! row group of the first image asked for. The column chunks a read needs
//! are fetched first, one read (a range request on a store) each.

use crate::error::FileError;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, BinaryArray, LargeBinaryArray, StructArray};
use arrow::datatypes::DataType;
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::{ArrowReaderMetadata, ParquetRecordBatchReaderBuilder};

use super::bytes::ParquetChunks;
use super::{InputFile, Item, ItemReader, Listing, SourceError, SourceOptions, SourceSettings};
use crate::images::{Discovery, ImageEntry, Skipped};

/// One Parquet file of the dataset.
struct File {
    name: String,
    chunks: ParquetChunks,
    meta: ArrowReaderMetadata,
    /// First row of each row group, and the total at the end.
    group_starts: Vec<u64>,
}

/// Where an image is: file, row.
#[derive(Debug, Clone, Copy)]
struct RowRef {
    file: usize,
    row: u64,
}

fn format_err(file: &InputFile, reason: impl Into<String>) -> SourceError {
    SourceError::from(FileError::format(file.path.clone(), reason.into()))
}

/// The image column's `path` child exists (struct layout)?
fn image_layout(file: &InputFile, dt: &DataType, column: &str) -> Result<bool, SourceError> {
    let binary = |d: &DataType| matches!(d, DataType::Binary | DataType::LargeBinary);
    match dt {
        d if binary(d) => Ok(false),
        DataType::Struct(fields) => {
            if !fields
                .iter()
                .any(|f| f.name() == "bytes" && binary(f.data_type()))
            {
                return Err(format_err(
                    file,
                    format!("image column {column:?} is a struct without a binary `bytes` field"),
                ));
            }
            Ok(fields.iter().any(|f| f.name() == "path"))
        }
        other => Err(format_err(
            file,
            format!("image column {column:?} is {other}, not a struct {{bytes, path}} or binary"),
        )),
    }
}

/// `ClassLabel` names of `label` in the `huggingface` footer metadata.
fn hf_class_names(meta: &ArrowReaderMetadata, label: &str) -> Vec<String> {
    let kv = meta.metadata().file_metadata().key_value_metadata();
    let Some(json) = kv
        .into_iter()
        .flatten()
        .find(|kv| kv.key == "huggingface")
        .and_then(|kv| kv.value.as_deref())
    else {
        return Vec::new();
    };
    let v: serde_json::Value = serde_json::from_str(json).unwrap_or_default();
    v["info"]["features"][label]["names"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|n| n.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// Keys and labels of one file's rows.
fn list_file(
    f: usize,
    file: &InputFile,
    opts: &SourceOptions,
    out: &mut (Vec<ImageEntry>, Vec<RowRef>),
) -> Result<File, SourceError> {
    let chunks = ParquetChunks::new(file.open()?);
    let meta = ArrowReaderMetadata::load(&chunks, Default::default())
        .map_err(|e| format_err(file, format!("not a readable Parquet file: {e}")))?;
    let schema = meta.schema().clone();
    let img = schema.field_with_name(&opts.image_column).map_err(|_| {
        format_err(
            file,
            format!("no image column {:?} (--image-column)", opts.image_column),
        )
    })?;
    let has_path = image_layout(file, img.data_type(), &opts.image_column)?;
    let label = &opts.label_column;
    if !label.is_empty() && schema.field_with_name(label).is_err() {
        return Err(format_err(
            file,
            format!("no label column {label:?} (--label-column; an empty name reads no labels)"),
        ));
    }
    let mut cols: Vec<String> = Vec::new();
    if has_path {
        cols.push(format!("{}.path", opts.image_column));
    }
    if !label.is_empty() {
        cols.push(label.clone());
    }
    let mut group_starts = vec![0u64];
    for rg in meta.metadata().row_groups() {
        group_starts.push(group_starts.last().copied().unwrap_or(0) + rg.num_rows() as u64);
    }
    let total = *group_starts.last().unwrap_or(&0);
    let mut row = 0u64;
    if !cols.is_empty() {
        let mask = ProjectionMask::columns(meta.parquet_schema(), cols.iter().map(|s| s.as_str()));
        let groups = 0..meta.metadata().num_row_groups();
        let fetched = chunks
            .prefetch(column_chunks(&meta, &mask, groups))
            .map_err(|e| {
                format_err(file, format!("cannot read the path and label columns: {e}"))
            })?;
        let reader = ParquetRecordBatchReaderBuilder::new_with_metadata(fetched, meta.clone())
            .with_projection(mask)
            .with_batch_size(8192)
            .build()
            .map_err(|e| format_err(file, e.to_string()))?;
        for batch in reader {
            let batch = batch.map_err(|e| format_err(file, e.to_string()))?;
            let paths = has_path
                .then(|| batch.column_by_name(&opts.image_column))
                .flatten()
                .and_then(|c| {
                    c.as_struct_opt()
                        .and_then(|s| s.column_by_name("path").cloned())
                })
                .map(|c| arrow::compute::cast(&c, &DataType::Utf8))
                .transpose()
                .map_err(|e| format_err(file, e.to_string()))?;
            let labels = (!label.is_empty())
                .then(|| batch.column_by_name(label).cloned())
                .flatten()
                .map(|c| arrow::compute::cast(&c, &DataType::Int64))
                .transpose()
                .map_err(|e| format_err(file, format!("label column {label:?}: {e}")))?;
            push_rows(f, file, row, batch.num_rows(), paths, labels, out)?;
            row += batch.num_rows() as u64;
        }
    } else {
        push_rows(f, file, 0, total as usize, None, None, out)?;
    }
    Ok(File {
        name: file.name.clone(),
        chunks,
        meta,
        group_starts,
    })
}

/// (offset, length) of the column chunks of `mask` in row groups `groups`.
fn column_chunks(
    meta: &ArrowReaderMetadata,
    mask: &ProjectionMask,
    groups: Range<usize>,
) -> Vec<(u64, u64)> {
    let rgs = &meta.metadata().row_groups()[groups];
    rgs.iter()
        .flat_map(|rg| rg.columns().iter().enumerate())
        .filter(|(leaf, _)| mask.leaf_included(*leaf))
        // As `byte_range`, which panics on negative values in a damaged
        // footer: such a chunk is left to the reader to refuse.
        .filter_map(|(_, c)| {
            let start = c.dictionary_page_offset().unwrap_or(c.data_page_offset());
            u64::try_from(start)
                .ok()
                .zip(u64::try_from(c.compressed_size()).ok())
        })
        .collect()
}

fn push_rows(
    f: usize,
    file: &InputFile,
    first_row: u64,
    n: usize,
    paths: Option<ArrayRef>,
    labels: Option<ArrayRef>,
    out: &mut (Vec<ImageEntry>, Vec<RowRef>),
) -> Result<(), SourceError> {
    let paths = paths.as_ref().map(|a| a.as_string::<i32>());
    let labels = labels
        .as_ref()
        .map(|a| a.as_primitive::<arrow::datatypes::Int64Type>());
    for i in 0..n {
        let row = first_row + i as u64;
        let locator = format!("{}#{row}", file.name);
        let key = paths
            .filter(|p| p.is_valid(i) && !p.value(i).is_empty())
            .map_or_else(|| locator.clone(), |p| p.value(i).to_string());
        let label = match labels {
            Some(l) if l.is_valid(i) => i32::try_from(l.value(i)).map_err(|_| {
                format_err(
                    file,
                    format!("row {row}: label {} out of range", l.value(i)),
                )
            })?,
            _ => -1,
        };
        out.0.push(ImageEntry {
            path: PathBuf::from(locator),
            key,
            label,
        });
        out.1.push(RowRef { file: f, row });
    }
    Ok(())
}

/// List the rows of `files` (in order).
pub(super) fn list(
    root: PathBuf,
    files: &[InputFile],
    opts: &SourceOptions,
) -> Result<Listing, SourceError> {
    let mut rows = (Vec::new(), Vec::new());
    let mut opened = Vec::new();
    let mut truncated = None;
    let mut classes = Vec::new();
    for (f, file) in files.iter().enumerate() {
        match list_file(f, file, opts, &mut rows) {
            Ok(pf) => {
                if f == 0 && !opts.label_column.is_empty() {
                    classes = hf_class_names(&pf.meta, &opts.label_column);
                }
                opened.push(pf);
            }
            // A file without a readable footer (cut short, still being
            // copied): list what came before it, as for a truncated tar.
            Err(SourceError::File(FileError::Format { reason, .. }))
                if reason.starts_with("not a readable Parquet") =>
            {
                truncated = Some(Skipped {
                    key: file.name.clone(),
                    reason,
                });
                break;
            }
            Err(e) => return Err(e),
        }
    }
    let (mut entries, mut refs) = rows;
    let mut skipped = Vec::new();
    super::drop_duplicates(&mut entries, &mut refs, &mut skipped);
    Ok(Listing {
        discovery: Discovery {
            root,
            classes,
            entries,
            skipped,
        },
        reader: Some(Arc::new(ParquetReader {
            files: opened,
            rows: refs,
            image_column: opts.image_column.clone(),
            recent: Default::default(),
        })),
        settings: Some(SourceSettings {
            format: "parquet".into(),
            files: files.iter().map(|f| f.name.clone()).collect(),
            labels_sha256: None,
            image_column: Some(opts.image_column.clone()),
            label_column: Some(opts.label_column.clone()),
        }),
        truncated,
    })
}

/// Row groups kept decoded across `stream` calls: a reader asked for one
/// image at a time (the decoder's training targets, in shuffled order)
/// would otherwise decode a whole row group per image.
const RECENT_GROUPS: usize = 4;

/// Reads rows' image bytes a row group at a time.
struct ParquetReader {
    files: Vec<File>,
    rows: Vec<RowRef>,
    image_column: String,
    /// The last row groups decoded, most recent first.
    recent: std::sync::Mutex<std::collections::VecDeque<Arc<Group>>>,
}

/// One row group's image bytes column, or why it cannot be read.
struct Group {
    file: usize,
    index: usize,
    first_row: u64,
    bytes: Result<ArrayRef, String>,
}

impl ParquetReader {
    /// The row group holding `row` of `file`: a recent one, else decoded
    /// (outside the lock, so parallel readers decode in parallel).
    fn group(&self, file: usize, row: u64) -> Result<Arc<Group>, SourceError> {
        let starts = &self.files[file].group_starts;
        let holds = |g: &Group| g.file == file && row >= g.first_row && row < starts[g.index + 1];
        let lock = || self.recent.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(g) = lock().iter().find(|g| holds(g)) {
            return Ok(g.clone());
        }
        let g = Arc::new(self.load(file, row)?);
        let mut recent = lock();
        recent.push_front(g.clone());
        recent.truncate(RECENT_GROUPS);
        Ok(g)
    }

    fn load(&self, file: usize, row: u64) -> Result<Group, SourceError> {
        let f = &self.files[file];
        let index = f.group_starts.partition_point(|&s| s <= row) - 1;
        let first_row = f.group_starts[index];
        let n = (f.group_starts[index + 1] - first_row) as usize;
        let col = format!("{}.bytes", self.image_column);
        let is_struct = matches!(
            f.meta
                .schema()
                .field_with_name(&self.image_column)
                .map(|x| x.data_type().clone()),
            Ok(DataType::Struct(_))
        );
        let mask = ProjectionMask::columns(
            f.meta.parquet_schema(),
            [if is_struct {
                col.as_str()
            } else {
                self.image_column.as_str()
            }],
        );
        let read = || -> Result<ArrayRef, parquet::errors::ParquetError> {
            let chunks = f
                .chunks
                .prefetch(column_chunks(&f.meta, &mask, index..index + 1))
                .map_err(|e| parquet::errors::ParquetError::External(Box::new(e)))?;
            let mut reader =
                ParquetRecordBatchReaderBuilder::new_with_metadata(chunks, f.meta.clone())
                    .with_projection(mask)
                    .with_row_groups(vec![index])
                    .with_batch_size(n.max(1))
                    .build()?;
            let batch = reader
                .next()
                .transpose()?
                .ok_or_else(|| parquet::errors::ParquetError::General("empty row group".into()))?;
            let c = batch.column(0).clone();
            Ok(match c.as_struct_opt() {
                Some(s) => bytes_child(s)?,
                None => c,
            })
        };
        let bytes = match read() {
            Ok(a) => Ok(a),
            Err(parquet::errors::ParquetError::External(e)) if e.is::<std::io::Error>() => {
                return Err(SourceError::from(FileError::format(
                    PathBuf::from(&f.name),
                    format!("cannot read row group {index}: {e}"),
                )));
            }
            Err(e) => Err(format!(
                "row group {index} of {} is unreadable: {e}",
                f.name
            )),
        };
        Ok(Group {
            file,
            index,
            first_row,
            bytes,
        })
    }
}

fn bytes_child(s: &StructArray) -> Result<ArrayRef, parquet::errors::ParquetError> {
    s.column_by_name("bytes")
        .cloned()
        .ok_or_else(|| parquet::errors::ParquetError::General("no `bytes` field".into()))
}

/// Row `i` of a binary column (`None`: null).
fn binary_value(a: &ArrayRef, i: usize) -> Option<Vec<u8>> {
    if a.is_null(i) {
        return None;
    }
    if let Some(b) = a.as_any().downcast_ref::<BinaryArray>() {
        return Some(b.value(i).to_vec());
    }
    a.as_any()
        .downcast_ref::<LargeBinaryArray>()
        .map(|b| b.value(i).to_vec())
}

impl ItemReader for ParquetReader {
    fn stream(
        &self,
        range: Range<usize>,
    ) -> Box<dyn Iterator<Item = Result<Item, SourceError>> + Send + '_> {
        let mut group: Option<Arc<Group>> = None;
        Box::new(range.map(move |idx| {
            let r = self.rows[idx];
            let f = &self.files[r.file];
            let fits = group.as_ref().is_some_and(|g| {
                g.file == r.file && r.row >= g.first_row && r.row < f.group_starts[g.index + 1]
            });
            if !fits {
                group = Some(self.group(r.file, r.row)?);
            }
            let g = group.as_ref().expect("loaded above");
            let item = match &g.bytes {
                Ok(a) => binary_value(a, (r.row - g.first_row) as usize)
                    .ok_or_else(|| "image bytes are null".to_string()),
                Err(reason) => Err(reason.clone()),
            };
            Ok((idx, item))
        }))
    }
}
