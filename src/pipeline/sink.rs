//! The writer stage: encoded images arrive in key order; each shard is
//! written by its own thread (quantisation, Parquet encoding, zstd, fsync,
//! rename, read-back statistics, sha256), up to `writers` shards at once, so
//! compression never stalls the encoder while a shard is finishing. Shards
//! are appended to the manifest strictly in order as they complete: a crash
//! leaves a manifest that lists a prefix of finished shards, and anything
//! past it is redone on resume.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender, bounded, unbounded};

use super::manifest::{self, BuildManifest, ShardEntry};
use super::stages::Encoded;
use super::{PipelineError, plan, state_file};
use crate::images::{ImageEntry, Skipped};
use crate::shards::{LatentRow, ShardReader, ShardWriter, StatsAccumulator, WriterOptions, quant};

/// Images queued per shard writer (backpressure on the encoder beyond it).
const QUEUE: usize = 32;

/// What the sink sends one shard's thread.
enum Job {
    Image {
        key: String,
        label: i32,
        latents: Vec<Vec<f32>>,
    },
    Rejected {
        key: String,
        reason: String,
    },
    /// The shard's last image has been sent: finish the file.
    Finish,
}

/// The fixed context of every shard thread.
#[derive(Clone)]
struct ShardCtx {
    flips: Vec<bool>,
    opts: WriterOptions,
    shards_dir: PathBuf,
    root: PathBuf,
}

pub(super) struct ShardSink<'a> {
    plan: &'a plan::ShardPlan,
    entries: &'a [ImageEntry],
    ctx: ShardCtx,
    manifest: &'a mut BuildManifest,
    writers: usize,
    current: Option<(usize, Sender<Job>)>,
    active: Vec<JoinHandle<()>>,
    in_flight: usize,
    done_tx: Sender<Result<ShardEntry, PipelineError>>,
    done_rx: Receiver<Result<ShardEntry, PipelineError>>,
    /// Finished shards waiting for their predecessors.
    finished: BTreeMap<usize, ShardEntry>,
    seconds_before: f64,
    run_start: Instant,
    bar: &'a indicatif::ProgressBar,
}

impl<'a> ShardSink<'a> {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        plan: &'a plan::ShardPlan,
        entries: &'a [ImageEntry],
        flips: &[bool],
        opts: WriterOptions,
        shards_dir: &Path,
        root: &Path,
        manifest: &'a mut BuildManifest,
        writers: usize,
        seconds_before: f64,
        run_start: Instant,
        bar: &'a indicatif::ProgressBar,
    ) -> Self {
        let (done_tx, done_rx) = unbounded();
        Self {
            plan,
            entries,
            ctx: ShardCtx {
                flips: flips.to_vec(),
                opts,
                shards_dir: shards_dir.to_path_buf(),
                root: root.to_path_buf(),
            },
            manifest,
            writers: writers.max(1),
            current: None,
            active: Vec::new(),
            in_flight: 0,
            done_tx,
            done_rx,
            finished: BTreeMap::new(),
            seconds_before,
            run_start,
            bar,
        }
    }

    pub(super) fn accept(&mut self, msg: Encoded) -> Result<(), PipelineError> {
        // Surface a failed shard, and record finished ones, as early as we can.
        while let Ok(done) = self.done_rx.try_recv() {
            self.complete(done)?;
        }
        let idx = match &msg {
            Encoded::Image { idx, .. } | Encoded::Rejected { idx, .. } => *idx,
        };
        let shard = self.plan.shard_of(idx);
        if self.current.as_ref().map(|c| c.0) != Some(shard) {
            if let Some((open, _)) = &self.current {
                return Err(PipelineError::Invalid(format!(
                    "image {idx} arrived before shard {open} was complete"
                )));
            }
            self.open(shard)?;
        }
        let entry = &self.entries[idx];
        let job = match msg {
            Encoded::Image { latents, .. } => Job::Image {
                key: entry.key.clone(),
                label: entry.label,
                latents,
            },
            Encoded::Rejected { reason, .. } => {
                tracing::warn!("skipping {}: {reason}", entry.key);
                Job::Rejected {
                    key: entry.key.clone(),
                    reason,
                }
            }
        };
        self.send(job)?;
        self.bar.inc(1);
        if idx + 1 == self.plan.images_of(shard).end {
            self.send(Job::Finish)?;
            self.current = None; // the thread finishes the file on its own
        }
        Ok(())
    }

    /// Wait for every shard thread and record the remaining shards.
    pub(super) fn finish(mut self) -> Result<(), PipelineError> {
        if let Some((open, _)) = self.current.take() {
            return Err(PipelineError::Invalid(format!(
                "the build ended inside shard {open}"
            )));
        }
        while self.in_flight > 0 {
            let done = self.wait()?;
            self.complete(done)?;
        }
        Ok(())
    }

    fn send(&mut self, job: Job) -> Result<(), PipelineError> {
        let Some((shard, tx)) = &self.current else {
            return Err(PipelineError::Invalid("no open shard".into()));
        };
        if tx.send(job).is_err() {
            // The thread stopped early: its error is on the done channel.
            let shard = *shard;
            while self.in_flight > 0 {
                let done = self.wait()?;
                self.complete(done)?;
            }
            return Err(PipelineError::Invalid(format!(
                "the writer of shard {shard} stopped"
            )));
        }
        Ok(())
    }

    fn wait(&self) -> Result<Result<ShardEntry, PipelineError>, PipelineError> {
        self.done_rx
            .recv()
            .map_err(|_| PipelineError::Invalid("shard writers vanished".into()))
    }

    /// Start shard `index`'s thread, first waiting for a free writer.
    fn open(&mut self, index: usize) -> Result<(), PipelineError> {
        while self.in_flight >= self.writers {
            let done = self.wait()?;
            self.complete(done)?;
        }
        self.active.retain(|h| !h.is_finished());
        let (tx, rx) = bounded(QUEUE);
        let (ctx, done) = (self.ctx.clone(), self.done_tx.clone());
        let h = std::thread::Builder::new()
            .name(format!("shard-{index}"))
            .spawn(move || {
                // A shard abandoned (sink gone, no Finish) sends nothing: its
                // writer's drop removes the temp file. A panic is reported
                // like an error, so the sink never waits for it forever.
                let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    write_shard(index, &ctx, &rx)
                }))
                .unwrap_or_else(|_| {
                    Some(Err(PipelineError::Invalid(format!(
                        "the writer of shard {index} panicked"
                    ))))
                });
                if let Some(res) = res {
                    let _ = done.send(res);
                }
            })
            .map_err(|e| PipelineError::Invalid(format!("cannot start a shard writer: {e}")))?;
        self.active.push(h);
        self.in_flight += 1;
        self.current = Some((index, tx));
        Ok(())
    }

    /// Record a finished shard; append every shard now in order.
    fn complete(&mut self, done: Result<ShardEntry, PipelineError>) -> Result<(), PipelineError> {
        self.in_flight = self.in_flight.saturating_sub(1);
        let entry = done?;
        self.finished.insert(entry.index, entry);
        let mut appended = false;
        while let Some(entry) = self.finished.remove(&self.manifest.next_shard()) {
            tracing::debug!(shard = entry.index, rows = entry.rows, "shard complete");
            self.manifest.shards.push(entry);
            appended = true;
        }
        if appended {
            let m = &mut *self.manifest;
            m.refresh_totals();
            m.build_log.updated_unix = manifest::unix_now();
            m.build_log.seconds = self.seconds_before + self.run_start.elapsed().as_secs_f64();
            m.save(&self.ctx.root)?;
        }
        Ok(())
    }
}

impl Drop for ShardSink<'_> {
    fn drop(&mut self) {
        // On an error path: abandon the open shard (its thread removes the
        // temp file) and let finishing shards end before the caller goes on
        // (a resume in the same process must not race them).
        self.current.take();
        for h in self.active.drain(..) {
            let _ = h.join();
        }
    }
}

/// One shard's thread: rows into a `ShardWriter` until `Finish`, then the
/// file is finished and checked. `None` when the sink went away first.
fn write_shard(
    index: usize,
    ctx: &ShardCtx,
    rx: &Receiver<Job>,
) -> Option<Result<ShardEntry, PipelineError>> {
    let mut writer: Option<ShardWriter> = None;
    let mut images = 0u64;
    let mut rejected: Vec<Skipped> = Vec::new();
    let mut rows = 0u64;
    // Statistics of what training will read: each row quantised and
    // dequantised exactly as the readers do, in row order.
    let mut acc = StatsAccumulator::new(ctx.opts.tokens, ctx.opts.channels);
    let name = plan::shard_file_name(index);
    let path = ctx.shards_dir.join(&name);
    let mut failed: Option<PipelineError> = None;
    loop {
        let job = rx.recv().ok()?;
        if failed.is_some() && !matches!(job, Job::Finish) {
            continue; // drain until the sink finishes the shard
        }
        match job {
            Job::Image {
                key,
                label,
                latents,
            } => {
                if writer.is_none() {
                    match ShardWriter::create(&path, ctx.opts.clone()) {
                        Ok(w) => writer = Some(w),
                        Err(e) => {
                            failed = Some(e.into());
                            continue;
                        }
                    }
                }
                let batch: Vec<LatentRow<'_>> = ctx
                    .flips
                    .iter()
                    .zip(&latents)
                    .map(|(&flip, l)| LatentRow {
                        key: &key,
                        label,
                        flip,
                        latent: l,
                    })
                    .collect();
                if let Some(Err(e)) = writer.as_mut().map(|w| w.write_rows(&batch)) {
                    failed = Some(e.into());
                    continue;
                }
                for l in &latents {
                    let stored = quant::round_trip(ctx.opts.dtype, l, ctx.opts.channels);
                    if let Err(e) = acc.push_rows(&stored, 1) {
                        failed = Some(e.into());
                        break;
                    }
                }
                rows += batch.len() as u64;
                images += 1;
            }
            Job::Rejected { key, reason } => rejected.push(Skipped { key, reason }),
            Job::Finish => {
                if let Some(e) = failed {
                    return Some(Err(e));
                }
                return Some(finish_shard(
                    index, ctx, writer, &path, &name, images, rows, rejected, &acc,
                ));
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn finish_shard(
    index: usize,
    ctx: &ShardCtx,
    writer: Option<ShardWriter>,
    path: &Path,
    name: &str,
    images: u64,
    rows: u64,
    rejected: Vec<Skipped>,
    acc: &StatsAccumulator,
) -> Result<ShardEntry, PipelineError> {
    let (file, bytes, sha) = match writer {
        None => (None, 0, None),
        Some(w) => {
            // The sha256 was taken from the bytes on their way to the file;
            // reopening the footer checks that the renamed file is a
            // complete shard with every row (`rae-cache verify` re-reads
            // and re-hashes all of it).
            let info = w.finish()?;
            let reader = ShardReader::open(path)?;
            if reader.num_rows() != rows {
                return Err(PipelineError::DamagedShard {
                    path: path.to_path_buf(),
                    reason: format!("{} rows in the footer, {rows} written", reader.num_rows()),
                });
            }
            acc.save_state(&state_file(&ctx.root, index))?;
            (
                Some(format!("{}/{name}", manifest::SHARDS_DIR)),
                info.bytes,
                Some(info.sha256),
            )
        }
    };
    Ok(ShardEntry {
        index,
        file,
        rows,
        bytes,
        sha256: sha,
        images,
        rejected,
    })
}
