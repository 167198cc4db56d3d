//! Latent shards -> images with the RAE decoder, in three overlapping
//! stages joined by bounded channels: a reader thread (Parquet row groups,
//! dequantised), the caller's thread (decoder forward, in batches), and a
//! writer thread (bytes conversion + PNG encoding on rayon, or streaming
//! `.npz` / `.safetensors`).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor};
use crossbeam_channel::{Receiver, Sender, bounded};
use rayon::prelude::*;

use super::GenerateError;
use super::npz::NpzWriter;
use super::pixels::{Rounding, chw_to_hwc_u8, grid, image_stem};
use super::sample_run::STATS_EPS;
use crate::models::{DecoderConfig, RaeDecoder};
use crate::progress::Progress;
use crate::shards::manifest::{MANIFEST_FILE, SHARDS_DIR};
use crate::shards::{LatentBatch, LatentStats, ShardReader};

/// What `decode` writes (`--format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
#[value(rename_all = "lowercase")]
pub enum DecodeFormat {
    /// One PNG per row, named by key.
    Png,
    /// `images.npz`: uint8 `[N,H,W,3]` under `arr_0` (ADM evaluator).
    Npz,
    /// `pixels.safetensors`: f32 `[N,3,H,W]` (decoder output, unclamped)
    /// and `labels` i32 `[N]`.
    Safetensors,
}

/// `--format npz`: the ADM evaluator's file.
pub const NPZ_FILE: &str = "images.npz";
/// `--format safetensors`: the pixels and labels.
pub const SAFETENSORS_FILE: &str = "pixels.safetensors";
/// Row keys in output order (npz / safetensors), `_flip` marking flipped rows.
pub const KEYS_FILE: &str = "keys.txt";
/// `--grid N`: the contact sheet.
pub const GRID_FILE: &str = "grid.png";

/// Everything `decode_shards` needs besides the decoder.
#[derive(Debug, Clone)]
pub struct DecodeOptions {
    /// Where the images go.
    pub out_dir: PathBuf,
    /// What to write.
    pub format: DecodeFormat,
    /// Rows per decoder forward.
    pub batch_size: usize,
    /// Decode only the first N rows.
    pub limit: Option<usize>,
    /// Contact sheet of the first `grid` images (0: none).
    pub grid: usize,
    /// How floats become bytes (PNG, npz and the grid).
    pub rounding: Rounding,
}

/// What a decode did, for the CLI's report and `--json`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DecodeSummary {
    /// The output directory.
    pub out_dir: PathBuf,
    /// What was written.
    pub format: DecodeFormat,
    /// Images decoded.
    pub images: usize,
    /// Image height in pixels.
    pub height: usize,
    /// Image width in pixels.
    pub width: usize,
    /// Shard files read.
    pub shards: usize,
    /// The contact sheet, if one was written.
    pub grid: Option<PathBuf>,
    /// Wall time.
    pub seconds: f64,
    /// Throughput.
    pub images_per_second: f64,
}

/// The shard files of a shard file, a directory of shards, or a cache /
/// sample directory (its manifest's shard list, else `shards/*.parquet`).
pub fn resolve_shards(input: &Path) -> Result<Vec<PathBuf>, GenerateError> {
    if input.is_file() {
        return Ok(vec![input.to_path_buf()]);
    }
    if !input.is_dir() {
        return Err(GenerateError::Invalid(format!(
            "{}: no such file or directory",
            input.display()
        )));
    }
    let manifest = input.join(MANIFEST_FILE);
    if manifest.is_file() {
        // Only `shards[].file` is read, so either manifest layout works.
        let text =
            std::fs::read_to_string(&manifest).map_err(|e| GenerateError::io(&manifest, e))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| GenerateError::Invalid(format!("{}: {e}", manifest.display())))?;
        if let Some(list) = v.get("shards").and_then(|s| s.as_array()) {
            let mut out = Vec::new();
            for f in list
                .iter()
                .filter_map(|s| s.get("file").and_then(|f| f.as_str()))
            {
                let direct = input.join(f);
                let nested = input.join(SHARDS_DIR).join(f);
                match (direct.is_file(), nested.is_file()) {
                    (true, _) => out.push(direct),
                    (false, true) => out.push(nested),
                    _ => {
                        return Err(GenerateError::Invalid(format!(
                            "{}: lists shard {f:?}, which is missing",
                            manifest.display()
                        )));
                    }
                }
            }
            return Ok(out);
        }
    }
    for dir in [input.join(SHARDS_DIR), input.to_path_buf()] {
        if !dir.is_dir() {
            continue;
        }
        let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map_err(|e| GenerateError::io(&dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "parquet"))
            .collect();
        if !v.is_empty() {
            v.sort();
            return Ok(v);
        }
    }
    Err(GenerateError::Invalid(format!(
        "{}: no shards found",
        input.display()
    )))
}

/// Rows going from the reader to the decoder.
type Chunk = Result<LatentBatch, GenerateError>;

/// Decoded pixels going to the writer: `[b,3,H,W]` f32 in row order.
#[derive(Default)]
struct Decoded {
    keys: Vec<String>,
    labels: Vec<i32>,
    flips: Vec<bool>,
    pixels: Vec<f32>,
}

/// Whether `sample` wrote this shard's latents normalised (no `--stats`).
fn is_normalised(r: &ShardReader) -> bool {
    r.metadata()
        .get(super::sample_run::META_DENORMALISED)
        .map(String::as_str)
        == Some("false")
}

/// `x * sqrt(var + eps) + mean` per element of token-major rows
/// `[rows, tokens, channels]`, statistics laid out `[C, H, W]`: what
/// `sample --stats` applies to the model's normalised output.
pub fn denormalise(latents: &mut [f32], stats: &LatentStats, tokens: usize, channels: usize) {
    let per = tokens * channels;
    let scale: Vec<(f32, f32)> = (0..per)
        .map(|e| {
            let i = (e % channels) * tokens + e / channels;
            (
                ((stats.var[i] as f64) + STATS_EPS).sqrt() as f32,
                stats.mean[i],
            )
        })
        .collect();
    for row in latents.chunks_exact_mut(per) {
        row.iter_mut()
            .zip(&scale)
            .for_each(|(x, (s, m))| *x = *x * s + m);
    }
}

/// Reads up to `limit` rows into `tx`; with `stats`, the rows of shards
/// written normalised are de-normalised on the way.
fn reader_loop(
    readers: &[ShardReader],
    limit: usize,
    stats: Option<&LatentStats>,
    tx: Sender<Chunk>,
) {
    let mut left = limit;
    for r in readers {
        let denorm = stats.filter(|_| is_normalised(r));
        for g in 0..r.num_row_groups() {
            if left == 0 {
                return;
            }
            let mut b = match r.read_row_group(g) {
                Ok(b) => b,
                Err(e) => {
                    let _ = tx.send(Err(e.into()));
                    return;
                }
            };
            if b.len() > left {
                let n = b.tokens * b.channels;
                b.keys.truncate(left);
                b.labels.truncate(left);
                b.flips.truncate(left);
                b.latents.truncate(left * n);
            }
            left -= b.len();
            if let Some(st) = denorm {
                denormalise(&mut b.latents, st, b.tokens, b.channels);
            }
            if tx.send(Ok(b)).is_err() {
                return; // the consumer stopped (an error downstream)
            }
        }
    }
}

/// The output side: owns the files, runs on its own thread.
struct Sink {
    opts: DecodeOptions,
    h: usize,
    w: usize,
    npz: Option<NpzWriter>,
    st: Option<(BufWriter<File>, PathBuf, PathBuf)>,
    keys: Vec<String>,
    labels: Vec<i32>,
    grid: Vec<Vec<u8>>,
}

impl Sink {
    fn new(opts: &DecodeOptions, n: usize, h: usize, w: usize) -> Result<Self, GenerateError> {
        let dir = &opts.out_dir;
        let mut sink = Sink {
            opts: opts.clone(),
            h,
            w,
            npz: None,
            st: None,
            keys: Vec::new(),
            labels: Vec::new(),
            grid: Vec::new(),
        };
        match opts.format {
            DecodeFormat::Png => {}
            DecodeFormat::Npz => sink.npz = Some(NpzWriter::create(&dir.join(NPZ_FILE), n, h, w)?),
            DecodeFormat::Safetensors => {
                let path = dir.join(SAFETENSORS_FILE);
                let tmp = crate::fsutil::temp_path(&path);
                let f = File::create(&tmp).map_err(|e| GenerateError::io(&tmp, e))?;
                let mut bw = BufWriter::with_capacity(1 << 20, f);
                bw.write_all(&safetensors_header(n, h, w))
                    .map_err(|e| GenerateError::io(&tmp, e))?;
                sink.st = Some((bw, tmp, path));
            }
        }
        Ok(sink)
    }

    fn push(&mut self, d: Decoded) -> Result<(), GenerateError> {
        let (h, w, r) = (self.h, self.w, self.opts.rounding);
        let need_u8 =
            self.opts.format != DecodeFormat::Safetensors || self.grid.len() < self.opts.grid;
        let bytes: Vec<Vec<u8>> = if need_u8 {
            to_bytes(&d.pixels, h, w, r)
        } else {
            Vec::new()
        };
        for img in &bytes {
            if self.grid.len() < self.opts.grid {
                self.grid.push(img.clone());
            }
        }
        let names: Vec<String> = d
            .keys
            .iter()
            .zip(&d.flips)
            .map(|(k, &f)| if f { format!("{k}_flip") } else { k.clone() })
            .collect();
        match self.opts.format {
            DecodeFormat::Png => {
                let out = &self.opts.out_dir;
                bytes
                    .par_iter()
                    .zip(d.keys.par_iter().zip(d.flips.par_iter()))
                    .try_for_each(|(img, (k, &f))| {
                        write_png(&image_stem(out, k, f).with_extension("png"), img, w, h)
                    })?;
            }
            DecodeFormat::Npz => {
                if let Some(z) = self.npz.as_mut() {
                    for img in &bytes {
                        z.push(img)?;
                    }
                }
            }
            DecodeFormat::Safetensors => {
                if let Some((bw, tmp, _)) = self.st.as_mut() {
                    bw.write_all(bytemuck::cast_slice(&d.pixels))
                        .map_err(|e| GenerateError::io(tmp, e))?;
                }
            }
        }
        self.keys.extend(names);
        self.labels.extend(d.labels);
        Ok(())
    }

    /// Close the files; returns the grid path if one was written.
    fn finish(self) -> Result<Option<PathBuf>, GenerateError> {
        let dir = &self.opts.out_dir;
        if let Some(z) = self.npz {
            z.finish()?;
        }
        if let Some((mut bw, tmp, path)) = self.st {
            let labels: Vec<u8> = self.labels.iter().flat_map(|l| l.to_le_bytes()).collect();
            bw.write_all(&labels)
                .map_err(|e| GenerateError::io(&tmp, e))?;
            let f = bw
                .into_inner()
                .map_err(|e| GenerateError::io(&tmp, e.into_error()))?;
            f.sync_all().map_err(|e| GenerateError::io(&tmp, e))?;
            crate::fsutil::commit_temp(&tmp, &path).map_err(|e| GenerateError::io(&path, e))?;
        }
        if self.opts.format != DecodeFormat::Png {
            let p = dir.join(KEYS_FILE);
            let mut text = self.keys.join("\n");
            text.push('\n');
            crate::fsutil::write_atomic(&p, text.as_bytes())
                .map_err(|e| GenerateError::io(&p, e))?;
        }
        if self.opts.grid > 0 && !self.grid.is_empty() {
            let (g, gw, gh) = grid(&self.grid, self.h, self.w);
            let p = dir.join(GRID_FILE);
            write_png(&p, &g, gw, gh)?;
            return Ok(Some(p));
        }
        Ok(None)
    }
}

/// Decoder output `[b, 3, H, W]` -> one `[H, W, 3]` byte image per row:
/// the one float -> byte path of `decode` and `eval`.
pub(crate) fn to_bytes(pixels: &[f32], h: usize, w: usize, r: Rounding) -> Vec<Vec<u8>> {
    pixels
        .par_chunks(3 * h * w)
        .map(|chw| chw_to_hwc_u8(chw, h, w, r))
        .collect()
}

/// safetensors header: `pixels` f32 `[N,3,H,W]` then `labels` i32 `[N]`,
/// JSON padded with spaces to 8 bytes.
fn safetensors_header(n: usize, h: usize, w: usize) -> Vec<u8> {
    let pix = n * 3 * h * w * 4;
    let json = serde_json::json!({
        "__metadata__": {"format": "pt", "producer": "rae-cache decode", "keys": KEYS_FILE},
        "pixels": {"dtype": "F32", "shape": [n, 3, h, w], "data_offsets": [0, pix]},
        "labels": {"dtype": "I32", "shape": [n], "data_offsets": [pix, pix + 4 * n]},
    });
    let mut s = json.to_string().into_bytes();
    while !s.len().is_multiple_of(8) {
        s.push(b' ');
    }
    let mut out = (s.len() as u64).to_le_bytes().to_vec();
    out.extend(s);
    out
}

fn write_png(path: &Path, hwc: &[u8], w: usize, h: usize) -> Result<(), GenerateError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| GenerateError::io(dir, e))?;
    }
    image::save_buffer_with_format(
        path,
        hwc,
        w as u32,
        h as u32,
        image::ColorType::Rgb8,
        image::ImageFormat::Png,
    )
    .map_err(|e| GenerateError::Invalid(format!("{}: {e}", path.display())))
}

fn writer_loop(mut sink: Sink, rx: Receiver<Decoded>) -> Result<Option<PathBuf>, GenerateError> {
    for d in rx {
        sink.push(d)?;
    }
    sink.finish()
}

/// Decode every row of `shards` (in order, up to `opts.limit`), reporting
/// images decoded to `progress`.
pub fn decode_shards(
    decoder: &RaeDecoder,
    shards: &[PathBuf],
    opts: &DecodeOptions,
    device: &Device,
    progress: &mut dyn Progress,
) -> Result<DecodeSummary, GenerateError> {
    let cfg = decoder.config();
    let readers = open_readers(shards, cfg)?;
    if opts.batch_size == 0 {
        return Err(GenerateError::Invalid("batch size must be positive".into()));
    }
    let total: usize = readers.iter().map(|r| r.num_rows() as usize).sum();
    let n = opts.limit.map_or(total, |l| l.min(total));
    let (h, w) = (cfg.image_size(), cfg.image_size());
    std::fs::create_dir_all(&opts.out_dir).map_err(|e| GenerateError::io(&opts.out_dir, e))?;
    let sink = Sink::new(opts, n, h, w)?;

    progress.start(n as u64);
    let start = Instant::now();
    let (tx_in, rx_in) = bounded::<Chunk>(2);
    let (tx_out, rx_out) = bounded::<Decoded>(2);
    let stage = DecodeStage::new(decoder, device, opts.batch_size, &mut *progress);
    let (main_res, grid_res) = std::thread::scope(|s| {
        let readers = &readers;
        s.spawn(move || reader_loop(readers, n, None, tx_in));
        let writer = s.spawn(move || writer_loop(sink, rx_out));
        // `run` drops the sender when it returns, even on an error, which
        // ends the writer's input.
        let main_res = stage.run(rx_in, move |d| Ok(tx_out.send(d).is_ok()));
        let grid_res = writer
            .join()
            .unwrap_or_else(|_| Err(GenerateError::Invalid("writer thread panicked".into())));
        (main_res, grid_res)
    });
    main_res?;
    let grid_path = grid_res?;
    progress.finish();
    let seconds = start.elapsed().as_secs_f64();
    Ok(DecodeSummary {
        out_dir: opts.out_dir.clone(),
        format: opts.format,
        images: n,
        height: h,
        width: w,
        shards: readers.len(),
        grid: grid_path,
        seconds,
        images_per_second: n as f64 / seconds.max(1e-9),
    })
}

/// Open `shards`, checking that their latents fit the decoder (and warning
/// about samples that were never de-normalised).
fn open_readers(
    shards: &[PathBuf],
    cfg: &DecoderConfig,
) -> Result<Vec<ShardReader>, GenerateError> {
    let readers: Vec<ShardReader> = shards
        .iter()
        .map(|p| ShardReader::open(p))
        .collect::<Result<_, _>>()?;
    for r in &readers {
        if r.tokens() != cfg.num_patches || r.channels() != cfg.latent_dim {
            return Err(GenerateError::Invalid(format!(
                "{}: latents are [{}, {}], the decoder takes [{}, {}] (num_patches, latent_dim)",
                r.path().display(),
                r.tokens(),
                r.channels(),
                cfg.num_patches,
                cfg.latent_dim
            )));
        }
        if is_normalised(r) {
            tracing::warn!(shard = %r.path().display(), "latents were sampled without --stats (normalised): images will be wrong");
        }
    }
    Ok(readers)
}

/// The middle stage, on the caller's thread: rows from the reader into
/// batches of `batch_size`, each decoded and handed to an `emit` callback
/// (the writer's channel for `decode`, the caller's function for
/// [`decode_stream`]).
struct DecodeStage<'a> {
    decoder: &'a RaeDecoder,
    device: &'a Device,
    batch_size: usize,
    progress: &'a mut dyn Progress,
    /// The rows of the batch being gathered (`pixels` unused).
    pending: Decoded,
    /// Their latents, `[rows, tokens, channels]` flat.
    latents: Vec<f32>,
}

/// Where decoded batches go; `Ok(false)` stops decoding without an error.
type Emit<'e> = dyn FnMut(Decoded) -> Result<bool, GenerateError> + 'e;

impl<'a> DecodeStage<'a> {
    fn new(
        decoder: &'a RaeDecoder,
        device: &'a Device,
        batch_size: usize,
        progress: &'a mut dyn Progress,
    ) -> Self {
        DecodeStage {
            decoder,
            device,
            batch_size,
            progress,
            pending: Decoded::default(),
            latents: Vec::new(),
        }
    }

    /// Decode every chunk of `rx`. Stops early, without an error, when
    /// `emit` says so (for `decode`: the writer has gone, and its own error
    /// is the one to report).
    fn run(
        mut self,
        rx: Receiver<Chunk>,
        mut emit: impl FnMut(Decoded) -> Result<bool, GenerateError>,
    ) -> Result<(), GenerateError> {
        for chunk in rx {
            let chunk = chunk?;
            let per = chunk.tokens * chunk.channels;
            for i in 0..chunk.len() {
                self.pending.keys.push(chunk.keys[i].clone());
                self.pending.labels.push(chunk.labels[i]);
                self.pending.flips.push(chunk.flips[i]);
                self.latents
                    .extend_from_slice(&chunk.latents[i * per..(i + 1) * per]);
                if self.pending.keys.len() == self.batch_size && !self.flush(&mut emit)? {
                    return Ok(());
                }
            }
        }
        self.flush(&mut emit)?;
        Ok(())
    }

    /// Decode the pending rows and emit them; false when `emit` says stop.
    fn flush(&mut self, emit: &mut Emit<'_>) -> Result<bool, GenerateError> {
        let b = self.pending.keys.len();
        if b == 0 {
            return Ok(true);
        }
        let cfg = self.decoder.config();
        let z = Tensor::from_slice(
            self.latents.as_slice(),
            (b, cfg.num_patches, cfg.latent_dim),
            self.device,
        )?;
        let px = self
            .decoder
            .forward(&z)?
            .to_dtype(candle_core::DType::F32)?;
        let pixels: Vec<f32> = px.flatten_all()?.to_device(&Device::Cpu)?.to_vec1()?;
        self.latents.clear();
        let d = Decoded {
            pixels,
            ..std::mem::take(&mut self.pending)
        };
        self.progress.advance(b as u64);
        emit(d)
    }
}

/// Options of [`decode_stream`].
#[derive(Debug, Clone)]
pub struct StreamOptions {
    /// Rows per decoder forward (and per callback).
    pub batch_size: usize,
    /// Decode only the first N rows.
    pub limit: Option<usize>,
    /// How floats become bytes.
    pub rounding: Rounding,
    /// De-normalises shards that `sample` wrote normalised (without
    /// `--stats`); without it such shards are an error.
    pub stats: Option<LatentStats>,
}

/// A batch of decoded images, the bytes `decode` would write.
#[derive(Debug, Clone, Copy)]
pub struct DecodedImages<'a> {
    /// Row keys.
    pub keys: &'a [String],
    /// Row labels.
    pub labels: &'a [i32],
    /// Row flips.
    pub flips: &'a [bool],
    /// `[n, height, width, 3]` bytes.
    pub pixels: &'a [u8],
    /// Image height.
    pub height: usize,
    /// Image width.
    pub width: usize,
}

/// Rows `decode_stream` would decode from `shards` (at most `limit`).
pub fn stream_rows(shards: &[PathBuf], limit: Option<usize>) -> Result<usize, GenerateError> {
    let mut total = 0usize;
    for p in shards {
        total += ShardReader::open(p)?.num_rows() as usize;
    }
    Ok(limit.map_or(total, |l| l.min(total)))
}

/// Decode `shards` in order through the pixel path of `decode` (decoder
/// forward, clamp, `* 255`, `opts.rounding`) and hand each batch of bytes
/// to `f` instead of writing files; returns the rows decoded. An error of
/// `f` stops decoding and is returned.
pub fn decode_stream<E: From<GenerateError>>(
    decoder: &RaeDecoder,
    shards: &[PathBuf],
    opts: &StreamOptions,
    device: &Device,
    mut f: impl FnMut(&DecodedImages<'_>) -> Result<(), E>,
) -> Result<usize, E> {
    let cfg = decoder.config();
    let readers = open_readers(shards, cfg)?;
    if opts.batch_size == 0 {
        return Err(GenerateError::Invalid("batch size must be positive".into()).into());
    }
    if let (None, Some(r)) = (&opts.stats, readers.iter().find(|r| is_normalised(r))) {
        return Err(GenerateError::Invalid(format!(
            "{}: holds normalised latents (sampled without --stats); the latent statistics \
             (stats.safetensors of the training cache) are needed to decode them",
            r.path().display()
        ))
        .into());
    }
    let total: usize = readers.iter().map(|r| r.num_rows() as usize).sum();
    let n = opts.limit.map_or(total, |l| l.min(total));
    let (h, w, rounding) = (cfg.image_size(), cfg.image_size(), opts.rounding);
    let (mut failure, mut done) = (None, 0usize);
    let mut quiet = crate::progress::NoProgress;
    let stage = DecodeStage::new(decoder, device, opts.batch_size, &mut quiet);
    let (tx_in, rx_in) = bounded::<Chunk>(2);
    let res = std::thread::scope(|s| {
        let readers = &readers;
        let stats = opts.stats.as_ref();
        s.spawn(move || reader_loop(readers, n, stats, tx_in));
        // returning drops the receiver, which stops the reader
        stage.run(rx_in, |d| {
            let pixels = to_bytes(&d.pixels, h, w, rounding).concat();
            let batch = DecodedImages {
                keys: &d.keys,
                labels: &d.labels,
                flips: &d.flips,
                pixels: &pixels,
                height: h,
                width: w,
            };
            match f(&batch) {
                Ok(()) => {
                    done += d.keys.len();
                    Ok(true)
                }
                Err(e) => {
                    failure = Some(e);
                    Ok(false)
                }
            }
        })
    });
    res?;
    match failure {
        Some(e) => Err(e),
        None => Ok(done),
    }
}
