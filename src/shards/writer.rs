//! [`ShardWriter`]: rows -> one Parquet shard, written under a temporary
//! name and renamed into place by `finish`, so readers never see half a shard.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{
    ArrayRef, BooleanArray, FixedSizeListArray, Int32Array, PrimitiveArray, StringArray,
};
use arrow::buffer::ScalarBuffer;
use arrow::datatypes::{ArrowPrimitiveType, Float32Type, SchemaRef};
use half::f16;
use parquet::arrow::arrow_writer::{ArrowRowGroupWriterFactory, compute_leaves};
use parquet::arrow::{ArrowSchemaConverter, ArrowWriter};
use parquet::basic::{Compression, Encoding, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::{DEFAULT_CREATED_BY, EnabledStatistics, WriterProperties};
use parquet::file::writer::SerializedFileWriter;
use sha2::{Digest, Sha256};

use super::latent_chunk::{self, LeafValues};
use super::schema::{self, COL_LATENT, COL_SCALE, TOOL_VERSION};
use super::{LatentDType, LatentRow, ShardError, ShardInfo, WriterOptions, quant};

/// zstd level of the shards: zstd's own default.
pub const DEFAULT_ZSTD_LEVEL: i32 = 3;
/// Tens of rows: a few MB per row group for 256x768 latents, small enough
/// for a shuffling loader to hold many groups at once.
pub const DEFAULT_ROWS_PER_ROW_GROUP: usize = 32;

/// Fixed `created_by` (no build-specific ids), for byte-identical output.
pub fn created_by() -> String {
    format!("rae-cache version {TOOL_VERSION} ({DEFAULT_CREATED_BY})")
}

/// Hashes and counts bytes on their way to the file, so the shard's sha256
/// needs no second read.
struct HashingWriter {
    inner: BufWriter<File>,
    hasher: Sha256,
    bytes: u64,
}

impl Write for HashingWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Rows accumulated for the row group in progress, already converted.
enum Pending {
    F16(Vec<f16>),
    Bf16(Vec<u16>),
    F32(Vec<f32>),
    Int8 { q: Vec<i8>, scales: Vec<f32> },
}

impl Pending {
    fn empty(dtype: LatentDType) -> Self {
        match dtype {
            LatentDType::F16 => Self::F16(Vec::new()),
            LatentDType::Bf16 => Self::Bf16(Vec::new()),
            LatentDType::F32 => Self::F32(Vec::new()),
            LatentDType::Int8 => Self::Int8 {
                q: Vec::new(),
                scales: Vec::new(),
            },
        }
    }
}

/// Writes one shard to a temp name; `finish` fsyncs and renames it.
/// Dropping an unfinished writer deletes the temp file.
pub struct ShardWriter {
    path: PathBuf,
    tmp: PathBuf,
    opts: WriterOptions,
    schema: SchemaRef,
    /// Row groups are assembled column by column: the small columns through
    /// parquet's Arrow column writers, the latent leaf by [`latent_chunk`].
    writer: Option<SerializedFileWriter<HashingWriter>>,
    factory: ArrowRowGroupWriterFactory,
    row_groups: usize,
    keys: Vec<String>,
    labels: Vec<i32>,
    flips: Vec<bool>,
    pending: Pending,
    rows: u64,
}

impl ShardWriter {
    /// Start a shard at `path` (written under a temporary name until [`Self::finish`]).
    pub fn create(path: &Path, opts: WriterOptions) -> Result<Self, ShardError> {
        if opts.tokens == 0 || opts.channels == 0 {
            return Err(ShardError::format(
                path,
                "tokens and channels must be positive",
            ));
        }
        if opts.tokens * opts.channels > i32::MAX as usize {
            return Err(ShardError::format(
                path,
                "tokens*channels does not fit a FixedSizeList",
            ));
        }
        if opts.rows_per_row_group == 0 {
            return Err(ShardError::format(
                path,
                "rows_per_row_group must be positive",
            ));
        }
        let zstd = ZstdLevel::try_new(opts.zstd_level).map_err(|e| ShardError::parquet(path, e))?;
        let footer =
            schema::footer_metadata(opts.dtype, opts.tokens, opts.channels, &opts.metadata);
        // In the Parquet key-value metadata (DuckDB, parquet-rs) and in the
        // stored Arrow schema (pyarrow's schema.metadata comes from there).
        let schema = Arc::new(
            schema::arrow_schema(opts.dtype, opts.tokens, opts.channels)
                .with_metadata(footer.clone()),
        );

        let mut props = WriterProperties::builder()
            .set_created_by(created_by())
            .set_compression(Compression::ZSTD(zstd))
            .set_max_row_group_row_count(Some(opts.rows_per_row_group))
            .set_key_value_metadata(Some(
                footer
                    .into_iter()
                    .map(|(k, v)| KeyValue::new(k, v))
                    .collect(),
            ));
        // Latent leaves (and int8 scales): byte-stream-split groups the
        // exponent/high bytes so zstd finds them; no dictionary and no
        // min/max statistics, both useless on dense floats and costly.
        let descr = ArrowSchemaConverter::new()
            .convert(&schema)
            .map_err(|e| ShardError::parquet(path, e))?;
        for col in descr.columns() {
            let top = col.path().parts().first().map(String::as_str);
            if top == Some(COL_LATENT) || top == Some(COL_SCALE) {
                props = props
                    .set_column_encoding(col.path().clone(), Encoding::BYTE_STREAM_SPLIT)
                    .set_column_dictionary_enabled(col.path().clone(), false)
                    .set_column_statistics_enabled(col.path().clone(), EnabledStatistics::None);
            }
        }

        let tmp = crate::fsutil::temp_path(path);
        let file = File::create(&tmp).map_err(|e| ShardError::io(&tmp, e))?;
        let sink = HashingWriter {
            inner: BufWriter::with_capacity(1 << 20, file),
            hasher: Sha256::new(),
            bytes: 0,
        };
        // ArrowWriter sets up the file (Arrow schema in the footer, column
        // properties); its lower-level halves then write the row groups.
        let (writer, factory) = ArrowWriter::try_new(sink, schema.clone(), Some(props.build()))
            .and_then(|w| w.into_serialized_writer())
            .map_err(|e| {
                let _ = std::fs::remove_file(&tmp);
                ShardError::parquet(path, e)
            })?;
        let pending = Pending::empty(opts.dtype);
        Ok(ShardWriter {
            path: path.to_path_buf(),
            tmp,
            opts,
            schema,
            writer: Some(writer),
            factory,
            row_groups: 0,
            keys: Vec::new(),
            labels: Vec::new(),
            flips: Vec::new(),
            pending,
            rows: 0,
        })
    }

    /// Rows written so far (including those not yet flushed).
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// The final path of the shard.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Append rows; every latent must hold tokens*C values. Full row groups
    /// are compressed and written as they fill.
    pub fn write_rows(&mut self, rows: &[LatentRow<'_>]) -> Result<(), ShardError> {
        let n = self.opts.tokens * self.opts.channels;
        // Check everything first: a bad row leaves the writer untouched.
        if let Some(bad) = rows.iter().find(|r| r.latent.len() != n) {
            return Err(ShardError::format(
                &self.path,
                format!(
                    "row {:?}: latent has {} values, expected tokens*channels = {}*{} = {n}",
                    bad.key,
                    bad.latent.len(),
                    self.opts.tokens,
                    self.opts.channels
                ),
            ));
        }
        for row in rows {
            self.keys.push(row.key.to_owned());
            self.labels.push(row.label);
            self.flips.push(row.flip);
            match &mut self.pending {
                Pending::F16(v) => quant::push_f16(v, row.latent),
                Pending::Bf16(v) => quant::push_bf16_bits(v, row.latent),
                Pending::F32(v) => v.extend_from_slice(row.latent),
                Pending::Int8 { q, scales } => {
                    quant::push_int8(q, scales, row.latent, self.opts.channels)
                }
            }
            self.rows += 1;
            if self.keys.len() == self.opts.rows_per_row_group {
                self.flush_group()?;
            }
        }
        Ok(())
    }

    /// Write the pending rows as one row group.
    fn flush_group(&mut self) -> Result<(), ShardError> {
        if self.keys.is_empty() {
            return Ok(());
        }
        let rows = self.keys.len();
        let n = self.opts.tokens * self.opts.channels;
        let path = self.path.clone();
        let perr = |e| ShardError::parquet(&path, e);
        let mut small: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from_iter_values(self.keys.drain(..))),
            Arc::new(Int32Array::from(std::mem::take(&mut self.labels))),
            Arc::new(BooleanArray::from(std::mem::take(&mut self.flips))),
        ];
        let pending = std::mem::replace(&mut self.pending, Pending::empty(self.opts.dtype));
        if let Pending::Int8 { scales, .. } = &pending {
            let item = match self
                .schema
                .field_with_name(COL_SCALE)
                .map(|f| f.data_type())
            {
                Ok(arrow::datatypes::DataType::FixedSizeList(f, _)) => f.clone(),
                _ => {
                    return Err(ShardError::format(
                        &path,
                        "internal: schema lacks the scale column",
                    ));
                }
            };
            let a = FixedSizeListArray::try_new(
                item,
                self.opts.tokens as i32,
                prim::<Float32Type>(scales.clone()),
                None,
            )
            .map_err(|e| ShardError::format(&path, format!("internal: scale list: {e}")))?;
            small.push(Arc::new(a));
        }
        let values = match &pending {
            Pending::F16(v) => LeafValues::F16(v),
            Pending::Bf16(v) => LeafValues::U16InI32(v),
            Pending::F32(v) => LeafValues::F32(v),
            Pending::Int8 { q, .. } => LeafValues::I8InI32(q),
        };
        let fw = self
            .writer
            .as_mut()
            .ok_or_else(|| ShardError::format(&path, "writer already closed"))?;
        let descr = fw.schema_descr();
        if descr.num_columns() != self.schema.fields().len() {
            return Err(ShardError::format(
                &path,
                "internal: one Parquet leaf per Arrow column expected",
            ));
        }
        let latent_leaf = self
            .schema
            .index_of(COL_LATENT)
            .map_err(|e| ShardError::format(&path, format!("internal: {e}")))?;
        let (chunk, close) = latent_chunk::encode(
            descr.column(latent_leaf),
            values,
            rows,
            n,
            self.opts.zstd_level,
        )
        .map_err(perr)?;
        let writers = self
            .factory
            .create_column_writers(self.row_groups)
            .map_err(perr)?;
        let mut rg = fw.next_row_group().map_err(perr)?;
        let mut small = small.into_iter();
        let mut chunk = Some((chunk, close));
        for (i, (field, mut cw)) in self.schema.fields().iter().zip(writers).enumerate() {
            if i == latent_leaf {
                if let Some((bytes, close)) = chunk.take() {
                    rg.append_column(&bytes, close).map_err(perr)?;
                }
                continue;
            }
            let array = small
                .next()
                .ok_or_else(|| ShardError::format(&path, "internal: fewer arrays than columns"))?;
            for leaf in compute_leaves(field, &array).map_err(perr)? {
                cw.write(&leaf).map_err(perr)?;
            }
            cw.close()
                .map_err(perr)?
                .append_to_row_group(&mut rg)
                .map_err(perr)?;
        }
        rg.close().map_err(perr)?;
        self.row_groups += 1;
        Ok(())
    }

    /// Write the last row group and the footer, fsync, rename into place;
    /// returns the shard's size and sha256.
    pub fn finish(mut self) -> Result<ShardInfo, ShardError> {
        self.flush_group()?;
        let writer = self
            .writer
            .take()
            .ok_or_else(|| ShardError::format(&self.path, "writer already closed"))?;
        let sink = writer
            .into_inner()
            .map_err(|e| ShardError::parquet(&self.path, e))?;
        let HashingWriter {
            inner,
            hasher,
            bytes,
        } = sink;
        let file = inner
            .into_inner()
            .map_err(|e| ShardError::io(&self.tmp, e.into_error()))?;
        file.sync_all().map_err(|e| ShardError::io(&self.tmp, e))?;
        drop(file);
        crate::fsutil::commit_temp(&self.tmp, &self.path)
            .map_err(|e| ShardError::io(&self.path, e))?;
        let sha256 = crate::fsutil::hex(&hasher.finalize());
        let file = self
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        // Mark as committed so Drop leaves the (renamed) file alone.
        self.tmp = PathBuf::new();
        Ok(ShardInfo {
            file,
            rows: self.rows,
            bytes,
            sha256,
        })
    }
}

impl Drop for ShardWriter {
    fn drop(&mut self) {
        if !self.tmp.as_os_str().is_empty() {
            self.writer.take();
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// A primitive array over a Vec without copying it.
fn prim<T: ArrowPrimitiveType>(v: Vec<T::Native>) -> ArrayRef {
    Arc::new(PrimitiveArray::<T>::new(ScalarBuffer::from(v), None))
}
