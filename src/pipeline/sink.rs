//! The writer stage: encoded images arrive in key order; each shard is
//! written by its own thread (quantisation, Parquet encoding, zstd, fsync,
//! rename, statistics of the quantised rows, sha256), up to `writers`
//! shards at once, so compression never stalls the encoder while a shard is
//! finishing. Shards are appended to the manifest strictly in order as they
//! complete: a crash leaves a manifest that lists a prefix of finished
//! shards, and anything past it is redone on resume.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender, bounded, unbounded};

use super::build_state::{self, BuildManifest, RunClock, ShardEntry};
use super::config::{BuildPlan, SaveHook};
use super::plan::{self, Inputs};
use super::stages::Encoded;
use super::{PipelineError, state_file};
use crate::images::{ImageEntry, Skipped};
use crate::progress::Progress;
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
    flips: &'static [bool],
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
    clock: RunClock,
    progress: &'a mut dyn Progress,
    /// Told after each save of the build state.
    hook: Option<SaveHook>,
}

impl<'a> ShardSink<'a> {
    /// Write `inputs`' shards as `plan` says, with `opts`, appending each
    /// to `manifest` (saved under `plan.root`) in order as it completes, and
    /// reporting each image to `progress`.
    pub(super) fn new(
        plan: &BuildPlan,
        inputs: &'a Inputs,
        opts: WriterOptions,
        manifest: &'a mut BuildManifest,
        clock: RunClock,
        progress: &'a mut dyn Progress,
    ) -> Self {
        let (done_tx, done_rx) = unbounded();
        Self {
            plan: &inputs.shards,
            entries: inputs.entries(),
            ctx: ShardCtx {
                flips: plan.flips,
                opts,
                shards_dir: plan.shards_dir.clone(),
                root: plan.root.clone(),
            },
            manifest,
            writers: plan.writers.max(1),
            current: None,
            active: Vec::new(),
            in_flight: 0,
            done_tx,
            done_rx,
            finished: BTreeMap::new(),
            clock,
            progress,
            hook: None,
        }
    }

    /// Call `hook` after each save of the build state.
    pub(super) fn with_hook(mut self, hook: Option<SaveHook>) -> Self {
        self.hook = hook;
        self
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
        self.progress.advance(1);
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
            m.build_log.stamp(self.clock);
            m.save(&self.ctx.root)?;
            if let Some(hook) = &self.hook {
                (hook.0)(&self.ctx.root, m)?;
            }
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
    let mut shard = ShardFile::new(index, ctx);
    let mut failed: Option<PipelineError> = None;
    loop {
        match rx.recv().ok()? {
            Job::Finish => {
                return Some(match failed {
                    Some(e) => Err(e),
                    None => shard.finish(ctx),
                });
            }
            // After a failure, drain until the sink finishes the shard.
            _ if failed.is_some() => {}
            Job::Image {
                key,
                label,
                latents,
            } => failed = shard.push_image(ctx, &key, label, &latents).err(),
            Job::Rejected { key, reason } => shard.rejected.push(Skipped { key, reason }),
        }
    }
}

/// One shard while its images arrive. The file is created with the first
/// encoded image: a shard whose images were all rejected has none.
struct ShardFile {
    index: usize,
    name: String,
    path: PathBuf,
    writer: Option<ShardWriter>,
    images: u64,
    rows: u64,
    rejected: Vec<Skipped>,
    /// Statistics of what training will read: each row quantised and
    /// dequantised exactly as the readers do, in row order.
    acc: StatsAccumulator,
}

impl ShardFile {
    fn new(index: usize, ctx: &ShardCtx) -> Self {
        let name = plan::shard_file_name(index);
        Self {
            index,
            path: ctx.shards_dir.join(&name),
            name,
            writer: None,
            images: 0,
            rows: 0,
            rejected: Vec::new(),
            acc: StatsAccumulator::new(ctx.opts.tokens, ctx.opts.channels),
        }
    }

    /// Write one image's rows (one per flip) and add them to the statistics.
    fn push_image(
        &mut self,
        ctx: &ShardCtx,
        key: &str,
        label: i32,
        latents: &[Vec<f32>],
    ) -> Result<(), PipelineError> {
        let writer = match &mut self.writer {
            Some(w) => w,
            None => self
                .writer
                .insert(ShardWriter::create(&self.path, ctx.opts.clone())?),
        };
        let batch: Vec<LatentRow<'_>> = ctx
            .flips
            .iter()
            .zip(latents)
            .map(|(&flip, l)| LatentRow {
                key,
                label,
                flip,
                latent: l,
            })
            .collect();
        writer.write_rows(&batch)?;
        for l in latents {
            let stored = quant::round_trip(ctx.opts.dtype, l, ctx.opts.channels);
            self.acc.push_rows(&stored, 1)?;
        }
        self.rows += batch.len() as u64;
        self.images += 1;
        Ok(())
    }

    /// Finish the file and check it; save the shard's statistics state.
    fn finish(self, ctx: &ShardCtx) -> Result<ShardEntry, PipelineError> {
        let (file, bytes, sha) = match self.writer {
            None => (None, 0, None),
            Some(w) => {
                // The sha256 was taken from the bytes on their way to the file;
                // reopening the footer checks that the renamed file is a
                // complete shard with every row (`rae-cache verify` re-reads
                // and re-hashes all of it).
                let info = w.finish()?;
                let reader = ShardReader::open(&self.path)?;
                if reader.num_rows() != self.rows {
                    return Err(PipelineError::DamagedShard {
                        path: self.path,
                        reason: format!(
                            "{} rows in the footer, {} written",
                            reader.num_rows(),
                            self.rows
                        ),
                    });
                }
                self.acc.save_state(&state_file(&ctx.root, self.index))?;
                (
                    Some(format!("{}/{}", build_state::SHARDS_DIR, self.name)),
                    info.bytes,
                    Some(info.sha256),
                )
            }
        };
        Ok(ShardEntry {
            index: self.index,
            file,
            rows: self.rows,
            bytes,
            sha256: sha,
            images: self.images,
            rejected: self.rejected,
        })
    }
}
