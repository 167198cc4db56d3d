//! The concurrent stages of a build, connected by bounded channels:
//!
//! ```text
//! feeder ──(index)──▶ decode+crop workers (rayon pool, --threads)
//!        ◀─tickets──┐          │ (index, crop | reason), any order
//!                   │          ▼
//!                   └── encoder thread: reorder buffer -> batches -> encode
//!                                  │ (index, latents per flip | reason), key order
//!                                  ▼
//!                              writer (caller's thread): shards, stats, manifest
//! ```
//!
//! The feeder needs a ticket per image and the encoder hands one back each
//! time the next image in key order leaves the reorder buffer, so at most
//! `window` images are in flight whatever a slow image does: memory stays
//! bounded, and output order never depends on thread timing.

use std::collections::BTreeMap;
use std::ops::Range;
use std::panic::AssertUnwindSafe;

use candle_core::{DType, Device};
use crossbeam_channel::{Receiver, Sender, bounded};

use crate::encoders::{Encoder, crops_to_u8, u8_to_input};
use crate::images::{DecodeOptions, ImageEntry, adm_center_crop, decode_rgb8, decode_rgb8_bytes};
use crate::sources::ItemReader;

use super::PipelineError;

/// What the writer receives, strictly in index order.
pub enum Encoded {
    /// `latents[f]` is the tokens*C latent of flip `flips[f]`.
    Image {
        idx: usize,
        latents: Vec<Vec<f32>>,
    },
    Rejected {
        idx: usize,
        reason: String,
    },
}

pub struct StageOptions<'a> {
    /// Bring latents back as f16 (half the device-to-host bytes): only when
    /// they are stored as f16, where f32 -> f16 on the device rounds exactly
    /// as the writer would.
    pub f16_transfer: bool,
    pub threads: usize,
    pub batch_size: usize,
    pub crop_size: u32,
    pub decode: DecodeOptions,
    pub flips: &'a [bool],
    pub device: &'a Device,
}

type Decoded = (usize, Result<image::RgbImage, String>);

/// What a decode worker gets: an index, and for a tar or Parquet source
/// the image's bytes (or why there are none); `None`: read the file.
type Fetched = (usize, Option<Result<Vec<u8>, String>>);

/// Decode, crop and encode `entries[range]`, handing results to `sink` in
/// index order. `reader` reads the images of a tar or Parquet source (one
/// sequential stream, in the feeder); without it the decode workers read
/// the files by path. Returns the first error of any stage.
pub fn run(
    entries: &[ImageEntry],
    reader: Option<&dyn ItemReader>,
    range: Range<usize>,
    encoder: &dyn Encoder,
    opts: &StageOptions<'_>,
    mut sink: impl FnMut(Encoded) -> Result<(), PipelineError>,
) -> Result<(), PipelineError> {
    if range.is_empty() {
        return Ok(());
    }
    let threads = opts.threads.max(1);
    let window = (2 * opts.batch_size).max(4 * threads).max(8);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("rae-decode-{i}"))
        .build()
        .map_err(|e| {
            PipelineError::Invalid(format!("cannot start {threads} decode threads: {e}"))
        })?;

    let (ticket_tx, ticket_rx) = bounded::<()>(window);
    for _ in 0..window {
        let _ = ticket_tx.send(());
    }
    let (in_tx, in_rx) = bounded::<Fetched>(threads);
    // A source that cannot be read any more stops the build (not a
    // rejection: `--resume` continues once it is readable).
    let source_failed: std::sync::Mutex<Option<crate::sources::SourceError>> = Default::default();
    let (dec_tx, dec_rx) = bounded::<Decoded>(window);
    // Two batches of encoded images between the encoder and the writer.
    let (enc_tx, enc_rx) = bounded::<Encoded>(2 * opts.batch_size);

    std::thread::scope(|s| {
        let feeder = {
            let range = range.clone();
            let source_failed = &source_failed;
            s.spawn(move || feed(reader, range, &ticket_rx, &in_tx, source_failed))
        };

        let decoders = {
            let pool = &pool;
            s.spawn(move || {
                pool.scope(|ps| {
                    for _ in 0..threads {
                        let in_rx = in_rx.clone();
                        let dec_tx = dec_tx.clone();
                        ps.spawn(move |_| decode_worker(entries, &in_rx, &dec_tx, opts));
                    }
                });
            })
        };

        let encoder_thread = {
            let range = range.clone();
            s.spawn(move || encode_stage(range, encoder, opts, dec_rx, ticket_tx, enc_tx))
        };

        // The writer runs here; a sink error drops `enc_rx`, which stops the
        // encoder, which stops the feeder and the decoders.
        let mut sink_result = Ok(());
        for msg in enc_rx.iter() {
            if let Err(e) = sink(msg) {
                sink_result = Err(e);
                break;
            }
        }
        drop(enc_rx);
        let enc_result = encoder_thread
            .join()
            .unwrap_or_else(|_| Err(PipelineError::Invalid("encoder thread panicked".into())));
        let _ = feeder.join();
        let _ = decoders.join();
        sink_result?;
        if let Some(e) = source_failed.lock().ok().and_then(|mut g| g.take()) {
            return Err(e.into());
        }
        enc_result
    })
}

/// Hand out `range` to the decode workers, one ticket per image; with a
/// `reader`, together with the image's bytes read in order.
fn feed(
    reader: Option<&dyn ItemReader>,
    range: Range<usize>,
    tickets: &Receiver<()>,
    out: &Sender<Fetched>,
    failed: &std::sync::Mutex<Option<crate::sources::SourceError>>,
) {
    let Some(reader) = reader else {
        for idx in range {
            if tickets.recv().is_err() || out.send((idx, None)).is_err() {
                return; // downstream stopped
            }
        }
        return;
    };
    for item in reader.stream(range) {
        if tickets.recv().is_err() {
            return;
        }
        match item {
            Ok((idx, bytes)) => {
                if out.send((idx, Some(bytes))).is_err() {
                    return;
                }
            }
            Err(e) => {
                tracing::error!("{e}");
                if let Ok(mut g) = failed.lock() {
                    *g = Some(e);
                }
                return;
            }
        }
    }
}

fn decode_worker(
    entries: &[ImageEntry],
    in_rx: &Receiver<Fetched>,
    out: &Sender<Decoded>,
    opts: &StageOptions<'_>,
) {
    for (idx, fetched) in in_rx.iter() {
        let e = &entries[idx];
        // A decoder bug on a hostile file must not take the build down.
        let res = std::panic::catch_unwind(AssertUnwindSafe(|| {
            let img = match &fetched {
                None => decode_rgb8(&e.path, &opts.decode)?,
                Some(Ok(bytes)) => decode_rgb8_bytes(bytes, &e.path, &opts.decode)?,
                Some(Err(_)) => return Ok(None),
            };
            Ok::<_, crate::images::ImageError>(Some(adm_center_crop(&img, opts.crop_size)))
        }));
        let res = match (res, fetched) {
            (Ok(Ok(Some(crop))), _) => Ok(crop),
            (Ok(Ok(None)), Some(Err(reason))) => Err(reason),
            (Ok(Ok(None)), _) => Err("unreadable image".to_string()),
            (Ok(Err(err)), _) => Err(reason_for(&err.to_string(), e)),
            (Err(_), _) => Err("the image decoder panicked on this file".to_string()),
        };
        if out.send((idx, res)).is_err() {
            return;
        }
    }
}

/// Error text with the machine-specific path replaced by the dataset key.
fn reason_for(msg: &str, e: &ImageEntry) -> String {
    let p = e.path.display().to_string();
    let msg = msg
        .replace(&p, "")
        .trim_start_matches(": ")
        .trim()
        .to_string();
    if msg.is_empty() {
        "unreadable image".into()
    } else {
        msg
    }
}

fn encode_stage(
    range: Range<usize>,
    encoder: &dyn Encoder,
    opts: &StageOptions<'_>,
    dec_rx: Receiver<Decoded>,
    ticket_tx: Sender<()>,
    enc_tx: Sender<Encoded>,
) -> Result<(), PipelineError> {
    let mut reorder: BTreeMap<usize, Result<image::RgbImage, String>> = BTreeMap::new();
    let mut next = range.start;
    let mut pending: Vec<(usize, Result<image::RgbImage, String>)> = Vec::new();
    let mut ok_in_pending = 0usize;
    for (idx, res) in dec_rx.iter() {
        reorder.insert(idx, res);
        while let Some(res) = reorder.remove(&next) {
            let _ = ticket_tx.send(());
            if res.is_ok() {
                ok_in_pending += 1;
            }
            pending.push((next, res));
            next += 1;
            if ok_in_pending == opts.batch_size {
                if !flush(&mut pending, encoder, opts, &enc_tx)? {
                    return Ok(());
                }
                ok_in_pending = 0;
            }
        }
        if next == range.end {
            break;
        }
    }
    if next != range.end {
        return Err(PipelineError::Invalid(format!(
            "decode stage stopped early at image {next}"
        )));
    }
    flush(&mut pending, encoder, opts, &enc_tx)?;
    Ok(())
}

/// The f32 latents `z` on the host, through f16 when `f16` (the writer then
/// stores exactly the same f16 values).
fn download(z: &candle_core::Tensor, f16: bool) -> Result<Vec<f32>, PipelineError> {
    let z = z.flatten_all()?;
    if !f16 {
        return Ok(z.to_vec1::<f32>()?);
    }
    use half::slice::HalfFloatSliceExt;
    let h = z.to_dtype(DType::F16)?.to_vec1::<half::f16>()?;
    let mut out = vec![0f32; h.len()];
    h.convert_to_f32_slice(&mut out);
    Ok(out)
}

/// Encode the decoded crops in `pending` (all flips in one batch) and send
/// everything, rejections included, in order. `Ok(false)`: writer gone.
fn flush(
    pending: &mut Vec<(usize, Result<image::RgbImage, String>)>,
    encoder: &dyn Encoder,
    opts: &StageOptions<'_>,
    out: &Sender<Encoded>,
) -> Result<bool, PipelineError> {
    let crops: Vec<&image::RgbImage> = pending
        .iter()
        .filter_map(|(_, r)| r.as_ref().ok())
        .collect();
    let mut latents: Vec<Vec<Vec<f32>>> = Vec::new();
    if !crops.is_empty() {
        let b = crops.len();
        // One u8 upload for the batch; the f32 conversion and the flips
        // happen on the encoder's device (flip f of image i is row f*b + i).
        let input = u8_to_input(&crops_to_u8(&crops, opts.device)?, opts.flips)?;
        let z = encoder.encode(&input)?.to_dtype(DType::F32)?;
        let dims = z.dims().to_vec();
        let spec = encoder.spec();
        if dims != [b * opts.flips.len(), spec.tokens, spec.channels] {
            return Err(PipelineError::Invalid(format!(
                "encoder returned {dims:?}, expected [{}, {}, {}]",
                b * opts.flips.len(),
                spec.tokens,
                spec.channels
            )));
        }
        let flat = download(&z, opts.f16_transfer)?;
        let per = spec.tokens * spec.channels;
        latents = (0..b)
            .map(|i| {
                (0..opts.flips.len())
                    .map(|f| flat[(f * b + i) * per..(f * b + i + 1) * per].to_vec())
                    .collect()
            })
            .collect();
    }
    let mut lat = latents.into_iter();
    for (idx, res) in pending.drain(..) {
        let msg = match res {
            Ok(_) => Encoded::Image {
                idx,
                latents: lat.next().unwrap_or_default(),
            },
            Err(reason) => Encoded::Rejected { idx, reason },
        };
        if out.send(msg).is_err() {
            return Ok(false);
        }
    }
    Ok(true)
}

#[cfg(test)]
mod transfer_tests {
    use super::*;

    #[test]
    fn f16_transfer_stores_the_same_f16_values() {
        // What the device rounds to f16 and the writer stores must equal
        // what the writer would make of the f32 latents itself.
        let mut v: Vec<f32> = (0..20_000)
            .map(|i| ((i as f32) * 0.7311).sin() * 10f32.powi(i % 9 - 4))
            .collect();
        v.extend([
            0.0, -0.0, 65504.0, 65520.0, 1e-8, -6.1e-5, 5.9e-8, 3.0e-8, 1e6,
        ]);
        let z = candle_core::Tensor::from_vec(v.clone(), v.len(), &Device::Cpu).unwrap();
        let via = download(&z, true).unwrap();
        let (mut a, mut b) = (Vec::new(), Vec::new());
        crate::shards::quant::push_f16(&mut a, &v);
        crate::shards::quant::push_f16(&mut b, &via);
        let bits = |x: &[half::f16]| x.iter().map(|h| h.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&a), bits(&b));
        assert_eq!(download(&z, false).unwrap(), v);
    }
}
