//! Background assembly of host batches: a producer thread walks the epoch
//! plan from the cursor, asks a pool of reader threads for row groups a
//! window ahead (parallel decode), copies rows into batches and hands them
//! over a bounded channel (prefetch). Dropping the receiver stops it all.

use std::collections::HashMap;
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender, bounded, unbounded};

use super::plan::{DataIndex, Loc, Planned, Sharding, epoch_order, sample_id};
use crate::shards::LatentBatch;
use crate::train::checkpoint::LoaderCursor;
use crate::train::{Result, TrainError};

/// Where row groups come from (the shards, or a test double).
pub trait RowGroupSource: Send + Sync + 'static {
    /// Row group `rg` (global id, as in [`Loc`]), latents dequantised to f32.
    fn read(&self, rg: usize) -> Result<LatentBatch>;
}

/// A batch on the host: latents token-major `[B, tokens, C]`.
#[derive(Debug, Clone)]
pub struct HostBatch {
    /// `B * row_len` values, sample-major.
    pub latents: Vec<f32>,
    /// Class labels (-1 where the cache has none).
    pub labels: Vec<i64>,
    /// Image keys, as the shards store them.
    pub keys: Vec<String>,
    /// Whether each sample is the stored horizontally flipped latent.
    pub flips: Vec<bool>,
    /// Layout-independent sample names ([`sample_id`]): seeds of their noise.
    pub sample_ids: Vec<u64>,
    /// Standard normal noise, one row per sample in `[C, H, W]` order (empty
    /// unless the pipeline draws it).
    pub noise: Vec<f32>,
    /// The optimizer step this micro-batch belongs to.
    pub cursor: LoaderCursor,
    /// Which micro-batch of that step (0..accum).
    pub micro: usize,
}

/// Settings of a [`Pipeline`].
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    /// Seed of the epoch order and flip choice.
    pub seed: u64,
    /// Batch layout over ranks and micro-batches.
    pub sharding: Sharding,
    /// Row groups per shuffle window (also the read-ahead depth).
    pub window: usize,
    /// Reader threads.
    pub workers: usize,
    /// Finished batches queued ahead of the consumer.
    pub prefetch: usize,
    /// Values per row (tokens * C).
    pub row_len: usize,
    /// Also draw each sample's training noise (seeded by the sample, see
    /// [`super::sample_seed`]) here, off the training thread.
    pub noise_seed: Option<u64>,
}

/// The running background loader; dropping it stops and joins its threads.
pub struct Pipeline {
    rx: Option<Receiver<Result<HostBatch>>>,
    producer: Option<JoinHandle<()>>,
}

impl Pipeline {
    /// Start the producer at `start`; an error when the data cannot fill one global batch.
    pub fn start(
        index: Arc<DataIndex>,
        source: Arc<dyn RowGroupSource>,
        cfg: PipelineConfig,
        start: LoaderCursor,
    ) -> Result<Self> {
        if cfg.sharding.steps_per_epoch(index.samples.len()) == 0 {
            return Err(TrainError::Config(format!(
                "{} images cannot fill one global batch of {} ({} per micro-batch x {} ranks x {} accumulation steps)",
                index.samples.len(),
                cfg.sharding.global_batch(),
                cfg.sharding.batch,
                cfg.sharding.world_size,
                cfg.sharding.accum
            )));
        }
        let (tx, rx) = bounded(cfg.prefetch.max(1));
        let producer = std::thread::Builder::new()
            .name("loader".into())
            .spawn(move || produce(&index, source, &cfg, start, &tx))
            .map_err(|e| TrainError::Config(format!("cannot start loader thread: {e}")))?;
        Ok(Self {
            rx: Some(rx),
            producer: Some(producer),
        })
    }

    /// The next micro-batch of this rank, waiting for it if needed.
    pub fn next(&self) -> Result<HostBatch> {
        let rx = self
            .rx
            .as_ref()
            .ok_or_else(|| TrainError::State("loader stopped".into()))?;
        rx.recv()
            .map_err(|_| TrainError::State("loader thread ended unexpectedly".into()))?
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        // Closing the channel makes the producer's next send fail; it then
        // drops the job queue and the readers finish.
        self.rx.take();
        if let Some(h) = self.producer.take() {
            let _ = h.join();
        }
    }
}

type Job = usize;
type Done = (usize, Result<LatentBatch>);

fn spawn_readers(source: &Arc<dyn RowGroupSource>, n: usize) -> (Sender<Job>, Receiver<Done>) {
    let (job_tx, job_rx) = unbounded::<Job>();
    let (done_tx, done_rx) = unbounded::<Done>();
    for i in 0..n.max(1) {
        let (job_rx, done_tx, source) = (job_rx.clone(), done_tx.clone(), source.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("loader-read-{i}"))
            .spawn(move || {
                for rg in job_rx.iter() {
                    if done_tx.send((rg, source.read(rg))).is_err() {
                        break;
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!("could not start loader reader thread {i}: {e}");
        }
    }
    (job_tx, done_rx)
}

fn produce(
    index: &DataIndex,
    source: Arc<dyn RowGroupSource>,
    cfg: &PipelineConfig,
    start: LoaderCursor,
    tx: &Sender<Result<HostBatch>>,
) {
    let (jobs, done) = spawn_readers(&source, cfg.workers);
    let mut cursor = start;
    loop {
        match produce_epoch(index, cfg, cursor, &jobs, &done, tx) {
            Ok(true) => {}
            Ok(false) => return, // consumer gone
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        }
        cursor = LoaderCursor {
            epoch: cursor.epoch + 1,
            step_in_epoch: 0,
        };
    }
}

/// Send the batches of one epoch from `cursor.step_in_epoch` on. Ok(false)
/// when the consumer has gone away.
fn produce_epoch(
    index: &DataIndex,
    cfg: &PipelineConfig,
    cursor: LoaderCursor,
    jobs: &Sender<Job>,
    done: &Receiver<Done>,
    tx: &Sender<Result<HostBatch>>,
) -> Result<bool> {
    let order = epoch_order(index, cfg.seed, cursor.epoch, cfg.window);
    let b = cfg.sharding.batch;
    let accum = cfg.sharding.accum.max(1);
    let steps = cfg.sharding.steps_per_epoch(order.len());
    let plan: Vec<Planned> = (cursor.step_in_epoch as usize..steps)
        .flat_map(|k| cfg.sharding.step_samples(&order, k))
        .collect();

    // First-need order of row groups and how often each is still needed.
    let mut uses: HashMap<u32, usize> = HashMap::new();
    let mut need_seq: Vec<u32> = Vec::new();
    let mut first_need: HashMap<u32, usize> = HashMap::new();
    for l in plan.iter().map(|p| &p.loc) {
        let c = uses.entry(l.rg).or_insert(0);
        if *c == 0 {
            first_need.insert(l.rg, need_seq.len());
            need_seq.push(l.rg);
        }
        *c += 1;
    }
    let mut cache: HashMap<u32, LatentBatch> = HashMap::new();
    let mut requested = 0usize; // prefix of need_seq sent to the readers
    let mut in_flight = 0usize;
    let ahead = cfg.window.max(1);

    for (bi, chunk) in plan.chunks(b).enumerate() {
        // Keep `ahead` row groups requested beyond what is cached; always
        // cover what this batch needs.
        let last_needed = chunk
            .iter()
            .map(|p| first_need.get(&p.loc.rg).copied().unwrap_or(0))
            .max()
            .unwrap_or(0);
        while requested < need_seq.len()
            && (requested <= last_needed || cache.len() + in_flight < ahead)
        {
            jobs.send(need_seq[requested] as usize)
                .map_err(|_| TrainError::State("loader readers stopped".into()))?;
            requested += 1;
            in_flight += 1;
        }
        let mut hb = HostBatch {
            latents: Vec::with_capacity(b * cfg.row_len),
            labels: Vec::with_capacity(b),
            keys: Vec::with_capacity(b),
            flips: Vec::with_capacity(b),
            sample_ids: chunk
                .iter()
                .map(|p| sample_id(cursor.epoch, p.pos))
                .collect(),
            noise: Vec::new(),
            cursor: LoaderCursor {
                epoch: cursor.epoch,
                step_in_epoch: cursor.step_in_epoch + (bi / accum) as u64,
            },
            micro: bi % accum,
        };
        for l in chunk.iter().map(|p| &p.loc) {
            while !cache.contains_key(&l.rg) {
                let (rg, res) = done
                    .recv()
                    .map_err(|_| TrainError::State("loader readers stopped".into()))?;
                in_flight -= 1;
                cache.insert(rg as u32, res?);
            }
            if let Some(group) = cache.get(&l.rg) {
                copy_row(group, *l, cfg.row_len, &mut hb)?;
            }
            if let Some(c) = uses.get_mut(&l.rg) {
                *c -= 1;
                if *c == 0 {
                    cache.remove(&l.rg);
                }
            }
        }
        if let Some(seed) = cfg.noise_seed {
            hb.noise = super::sample_noise(seed, &hb.sample_ids, cfg.row_len);
        }
        if tx.send(Ok(hb)).is_err() {
            return Ok(false);
        }
    }
    Ok(true)
}

fn copy_row(group: &LatentBatch, l: Loc, row_len: usize, hb: &mut HostBatch) -> Result<()> {
    let r = l.row as usize;
    let bad = |why: String| TrainError::State(format!("row group {}: {why}", l.rg));
    if r >= group.labels.len()
        || group.keys.len() != group.labels.len()
        || group.flips.len() != group.labels.len()
    {
        return Err(bad(format!(
            "row {r} out of range ({} rows)",
            group.labels.len()
        )));
    }
    let lat = group
        .latents
        .get(r * row_len..(r + 1) * row_len)
        .ok_or_else(|| {
            bad(format!(
                "latents hold {} values, row {r} needs {row_len}",
                group.latents.len()
            ))
        })?;
    hb.latents.extend_from_slice(lat);
    hb.labels.push(group.labels[r] as i64);
    hb.keys.push(group.keys[r].clone());
    hb.flips.push(group.flips[r]);
    Ok(())
}
