//! [`ShardReader`]: a validated shard, read one row group at a time with
//! latents dequantised to f32. The footer is parsed once; every read opens
//! its own file handle, so one reader serves many threads.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use arrow::array::{Array, AsArray, FixedSizeListArray};
use arrow::datatypes::{Float16Type, Float32Type, Int8Type, Int32Type, UInt16Type};
use arrow::record_batch::RecordBatch;
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::{
    ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReaderBuilder,
};

use super::schema::{self, COL_FLIP, COL_KEY, COL_LABEL, COL_LATENT, COL_SCALE, Layout};
use super::{LatentBatch, LatentDType, ShardError, pages, quant};

/// Keys, labels and flips of a shard, without latents (cheap to read).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RowIndex {
    /// Row keys.
    pub keys: Vec<String>,
    /// Class indices.
    pub labels: Vec<i32>,
    /// Whether each row is the flipped crop.
    pub flips: Vec<bool>,
}

/// Reads one shard: footer checked on open, then row groups on demand.
pub struct ShardReader {
    path: PathBuf,
    meta: ArrowReaderMetadata,
    metadata: BTreeMap<String, String>,
    layout: Layout,
}

impl ShardReader {
    /// Open `path` and validate its footer and schema.
    pub fn open(path: &Path) -> Result<Self, ShardError> {
        let file = File::open(path).map_err(|e| ShardError::io(path, e))?;
        let meta = ArrowReaderMetadata::load(&file, ArrowReaderOptions::new())
            .map_err(|e| ShardError::parquet(path, e))?;
        let metadata: BTreeMap<String, String> = meta
            .metadata()
            .file_metadata()
            .key_value_metadata()
            .into_iter()
            .flatten()
            // The encoded Arrow schema is an implementation detail.
            .filter(|kv| kv.key != "ARROW:schema")
            .map(|kv| (kv.key.clone(), kv.value.clone().unwrap_or_default()))
            .collect();
        let layout = schema::validate(path, &metadata, meta.schema())?;
        Ok(ShardReader {
            path: path.to_path_buf(),
            meta,
            metadata,
            layout,
        })
    }

    /// The shard file.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// dtype and shape from the footer.
    pub fn layout(&self) -> Layout {
        self.layout
    }
    /// Storage type of the latents.
    pub fn dtype(&self) -> LatentDType {
        self.layout.dtype
    }
    /// Tokens per row.
    pub fn tokens(&self) -> usize {
        self.layout.tokens
    }
    /// Channels per token.
    pub fn channels(&self) -> usize {
        self.layout.channels
    }
    /// Rows in the shard.
    pub fn num_rows(&self) -> u64 {
        self.meta.metadata().file_metadata().num_rows().max(0) as u64
    }
    /// Parquet row groups in the shard.
    pub fn num_row_groups(&self) -> usize {
        self.meta.metadata().num_row_groups()
    }
    /// Rows in row group `i` (0 if out of range).
    pub fn row_group_rows(&self, i: usize) -> u64 {
        self.meta
            .metadata()
            .row_groups()
            .get(i)
            .map(|rg| rg.num_rows().max(0) as u64)
            .unwrap_or(0)
    }
    /// Footer key-value metadata (without the encoded Arrow schema).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }
    /// The parquet footer, e.g. to inspect encodings and sizes.
    pub fn parquet_metadata(&self) -> &parquet::file::metadata::ParquetMetaData {
        self.meta.metadata()
    }

    /// Row group `i`, with latents dequantised to f32.
    pub fn read_row_group(&self, i: usize) -> Result<LatentBatch, ShardError> {
        self.check_group(i)?;
        let rows = self.row_group_rows(i) as usize;
        let index = self.read_index_of(vec![i])?;
        if index.keys.len() != rows {
            return Err(ShardError::format(
                &self.path,
                format!("row group {i}: {} keys for {rows} rows", index.keys.len()),
            ));
        }
        let mut latents = vec![0f32; rows * self.layout.tokens * self.layout.channels];
        match self.latents_from_pages(i, &mut latents) {
            Ok(()) => Ok(LatentBatch {
                keys: index.keys,
                labels: index.labels,
                flips: index.flips,
                latents,
                tokens: self.layout.tokens,
                channels: self.layout.channels,
            }),
            Err(why) => {
                tracing::debug!(path = %self.path.display(), group = i, %why, "generic Arrow read");
                self.read_row_group_arrow(i)
            }
        }
    }

    /// The same as [`read_row_group`](Self::read_row_group) through the
    /// generic Arrow reader (kept for files the page fast path declines,
    /// and to test the fast path against).
    #[doc(hidden)]
    pub fn read_row_group_arrow(&self, i: usize) -> Result<LatentBatch, ShardError> {
        self.check_group(i)?;
        let mut out = self.empty_batch(self.row_group_rows(i) as usize);
        for batch in self.batches(vec![i], ProjectionMask::all())? {
            self.append(&batch?, &mut out)?;
        }
        Ok(out)
    }

    fn check_group(&self, i: usize) -> Result<(), ShardError> {
        if i >= self.num_row_groups() {
            return Err(ShardError::format(
                &self.path,
                format!(
                    "row group {i} out of range ({} row groups)",
                    self.num_row_groups()
                ),
            ));
        }
        Ok(())
    }

    /// Latents of row group `i` decoded from the pages (see pages.rs);
    /// `Err` says why the fast path declined.
    #[doc(hidden)]
    pub fn latents_from_pages(&self, i: usize, dst: &mut [f32]) -> Result<(), String> {
        use parquet::basic::Type as Phys;
        let descr = self.meta.parquet_schema();
        let leaf = |name: &str| {
            descr
                .columns()
                .iter()
                .position(|c| c.path().parts().first().map(String::as_str) == Some(name))
                .ok_or_else(|| format!("no leaf column for {name}"))
        };
        let rg = self.meta.metadata().row_group(i);
        let rows = rg.num_rows().max(0) as usize;
        let file = std::sync::Arc::new(File::open(&self.path).map_err(|e| e.to_string())?);
        let read = |name: &str, kind: pages::Kind, dst: &mut [f32]| -> Result<(), String> {
            let li = leaf(name)?;
            let c = descr.column(li);
            let ok = match kind {
                pages::Kind::F16 => {
                    c.physical_type() == Phys::FIXED_LEN_BYTE_ARRAY && c.type_length() == 2
                }
                pages::Kind::F32 => c.physical_type() == Phys::FLOAT,
                _ => c.physical_type() == Phys::INT32,
            };
            if !ok {
                return Err(format!("{name}: physical type {}", c.physical_type()));
            }
            pages::read_column(
                file.clone(),
                rg.column(li),
                rows,
                c.max_def_level(),
                c.max_rep_level(),
                kind,
                dst,
            )
        };
        match self.layout.dtype {
            LatentDType::F16 => read(COL_LATENT, pages::Kind::F16, dst),
            LatentDType::F32 => read(COL_LATENT, pages::Kind::F32, dst),
            LatentDType::Bf16 => read(COL_LATENT, pages::Kind::Bf16InI32, dst),
            LatentDType::Int8 => {
                let mut scales = vec![0f32; rows * self.layout.tokens];
                read(COL_SCALE, pages::Kind::F32, &mut scales)?;
                read(COL_LATENT, pages::Kind::I8InI32, dst)?;
                for (token, &s) in dst.chunks_exact_mut(self.layout.channels).zip(&scales) {
                    token.iter_mut().for_each(|q| *q *= s);
                }
                Ok(())
            }
        }
    }

    /// Every row of the shard, in order.
    pub fn read_all(&self) -> Result<LatentBatch, ShardError> {
        let mut out = self.empty_batch(self.num_rows() as usize);
        for g in 0..self.num_row_groups() {
            let b = self.read_row_group(g)?;
            out.keys.extend(b.keys);
            out.labels.extend(b.labels);
            out.flips.extend(b.flips);
            out.latents.extend_from_slice(&b.latents);
        }
        Ok(out)
    }

    /// Keys, labels and flips of every row; the latent column is not read.
    pub fn read_index(&self) -> Result<RowIndex, ShardError> {
        self.read_index_of((0..self.num_row_groups()).collect())
    }

    fn read_index_of(&self, groups: Vec<usize>) -> Result<RowIndex, ShardError> {
        let schema = self.meta.schema();
        let roots = [COL_KEY, COL_LABEL, COL_FLIP]
            .iter()
            .map(|c| {
                schema
                    .index_of(c)
                    .map_err(|_| ShardError::format(&self.path, format!("missing column {c}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mask = ProjectionMask::roots(self.meta.parquet_schema(), roots);
        let mut out = RowIndex::default();
        for batch in self.batches(groups, mask)? {
            let batch = batch?;
            self.append_index(&batch, &mut out.keys, &mut out.labels, &mut out.flips)?;
        }
        Ok(out)
    }

    fn empty_batch(&self, rows: usize) -> LatentBatch {
        LatentBatch {
            keys: Vec::with_capacity(rows),
            labels: Vec::with_capacity(rows),
            flips: Vec::with_capacity(rows),
            latents: Vec::with_capacity(rows * self.layout.tokens * self.layout.channels),
            tokens: self.layout.tokens,
            channels: self.layout.channels,
        }
    }

    fn batches(
        &self,
        groups: Vec<usize>,
        mask: ProjectionMask,
    ) -> Result<impl Iterator<Item = Result<RecordBatch, ShardError>> + '_, ShardError> {
        let file = File::open(&self.path).map_err(|e| ShardError::io(&self.path, e))?;
        let largest = (0..self.num_row_groups())
            .map(|g| self.row_group_rows(g))
            .max()
            .unwrap_or(1);
        let reader = ParquetRecordBatchReaderBuilder::new_with_metadata(file, self.meta.clone())
            .with_row_groups(groups)
            .with_projection(mask)
            .with_batch_size(largest.clamp(1, 1 << 16) as usize)
            .build()
            .map_err(|e| ShardError::parquet(&self.path, e))?;
        Ok(reader.map(move |b| b.map_err(|e| ShardError::format(&self.path, e.to_string()))))
    }

    fn column<'a>(&self, batch: &'a RecordBatch, name: &str) -> Result<&'a dyn Array, ShardError> {
        let col = batch
            .column_by_name(name)
            .ok_or_else(|| ShardError::format(&self.path, format!("missing column {name}")))?;
        if col.null_count() > 0 {
            return Err(ShardError::format(
                &self.path,
                format!("column {name} has null rows"),
            ));
        }
        Ok(col.as_ref())
    }

    fn append_index(
        &self,
        batch: &RecordBatch,
        keys: &mut Vec<String>,
        labels: &mut Vec<i32>,
        flips: &mut Vec<bool>,
    ) -> Result<(), ShardError> {
        let bad =
            |c: &str| ShardError::format(&self.path, format!("column {c} has an unexpected type"));
        let k = self
            .column(batch, COL_KEY)?
            .as_string_opt::<i32>()
            .ok_or_else(|| bad(COL_KEY))?;
        keys.extend(k.iter().map(|s| s.unwrap_or_default().to_owned()));
        let l = self
            .column(batch, COL_LABEL)?
            .as_primitive_opt::<Int32Type>()
            .ok_or_else(|| bad(COL_LABEL))?;
        labels.extend_from_slice(l.values());
        let f = self
            .column(batch, COL_FLIP)?
            .as_boolean_opt()
            .ok_or_else(|| bad(COL_FLIP))?;
        flips.extend(f.values().iter());
        Ok(())
    }

    /// Values of a fixed-size list column as one flat child array slice,
    /// rejecting null items (this writer never produces them).
    fn list_values(
        &self,
        batch: &RecordBatch,
        name: &str,
        len: usize,
    ) -> Result<arrow::array::ArrayRef, ShardError> {
        let list: &FixedSizeListArray = self
            .column(batch, name)?
            .as_fixed_size_list_opt()
            .ok_or_else(|| {
                ShardError::format(
                    &self.path,
                    format!("column {name} is not a fixed-size list"),
                )
            })?;
        if list.value_length() as usize != len {
            return Err(ShardError::format(
                &self.path,
                format!(
                    "column {name} has lists of {} values, expected {len}",
                    list.value_length()
                ),
            ));
        }
        let start = if list.is_empty() {
            0
        } else {
            list.value_offset_at(0)
        };
        let values = list.values().slice(start, list.len() * len);
        if values.null_count() > 0 {
            return Err(ShardError::format(
                &self.path,
                format!("column {name} has null elements"),
            ));
        }
        Ok(values)
    }

    fn append(&self, batch: &RecordBatch, out: &mut LatentBatch) -> Result<(), ShardError> {
        self.append_index(batch, &mut out.keys, &mut out.labels, &mut out.flips)?;
        let (tokens, channels) = (self.layout.tokens, self.layout.channels);
        let n = tokens * channels;
        let values = self.list_values(batch, COL_LATENT, n)?;
        let start = out.latents.len();
        out.latents.resize(start + batch.num_rows() * n, 0.0);
        let dst = &mut out.latents[start..];
        let bad = || {
            ShardError::format(
                &self.path,
                format!("latent items do not match dtype {}", self.layout.dtype),
            )
        };
        match self.layout.dtype {
            LatentDType::F16 => quant::f16_to_f32(
                values
                    .as_primitive_opt::<Float16Type>()
                    .ok_or_else(bad)?
                    .values(),
                dst,
            ),
            LatentDType::Bf16 => quant::bf16_bits_to_f32(
                values
                    .as_primitive_opt::<UInt16Type>()
                    .ok_or_else(bad)?
                    .values(),
                dst,
            ),
            LatentDType::F32 => dst.copy_from_slice(
                values
                    .as_primitive_opt::<Float32Type>()
                    .ok_or_else(bad)?
                    .values(),
            ),
            LatentDType::Int8 => {
                let q = values.as_primitive_opt::<Int8Type>().ok_or_else(bad)?;
                let scales = self.list_values(batch, COL_SCALE, tokens)?;
                let scales = scales.as_primitive_opt::<Float32Type>().ok_or_else(bad)?;
                quant::int8_to_f32(q.values(), scales.values(), channels, dst);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    fn assert_send_sync<T: Send + Sync>() {}
    #[test]
    fn reader_is_send_sync() {
        assert_send_sync::<super::ShardReader>();
    }
}
