//! `rae-cache train-decoder`: stage-1 training of the RAE pixel decoder
//! from a latent cache. Flags (or a TOML `--config` with the same keys,
//! flags winning) -> DecoderTrainConfig -> DecoderTrainer, with a progress
//! bar (images/s) and a summary.

use std::path::PathBuf;
use std::process::ExitCode;

use rae_cache::stage1::train_config::DecoderTrainConfig;
use rae_cache::stage1::trainer::DecoderTrainer;
use rae_cache::train::checkpoint::latest;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Cache directories (manifest.json + shards); with --online-encoder
    /// only where the images are (without --images).
    #[arg(long, num_args = 1..)]
    data: Vec<PathBuf>,
    /// The image folder (or tar / Parquet source) the cache was built from
    /// (default: the manifest's); with --online-encoder, the images to
    /// train on.
    #[arg(long)]
    images: Option<PathBuf>,
    /// The reference's data recipe instead of the cache: every image
    /// resized (shorter side 1.5x the crop, bicubic), randomly cropped to
    /// the encoder's crop size (256) and encoded by --encoder every step;
    /// the crop is the target. Images from --images (or the --data cache's
    /// source).
    #[arg(long)]
    online_encoder: bool,
    /// The frozen encoder of --online-encoder: a Hugging Face model
    /// directory or a repo id in the local cache
    /// (facebook/dinov2-with-registers-base).
    #[arg(long)]
    encoder: Option<String>,
    /// Decoder preset: ViT-B, ViT-L, ViT-XL (fitted to the tokens and
    /// channels of the cache, or of the --online-encoder).
    #[arg(long, conflicts_with = "decoder_config")]
    preset: Option<String>,
    /// Decoder config (JSON/TOML with the decoder keys).
    #[arg(long)]
    decoder_config: Option<PathBuf>,
    /// Decoder patch size with --preset (16: 256 px from 16x16 tokens).
    #[arg(long)]
    patch_size: Option<usize>,
    #[arg(long)]
    batch_size: Option<usize>,
    /// Total optimizer steps.
    #[arg(long, conflicts_with = "epochs")]
    steps: Option<u64>,
    /// Epochs (default 16).
    #[arg(long)]
    epochs: Option<u64>,
    /// Peak learning rate (2e-4).
    #[arg(long)]
    lr: Option<f64>,
    /// Learning rate at the end of the cosine (2e-5).
    #[arg(long)]
    final_lr: Option<f64>,
    /// Linear warm-up from zero, epochs (1).
    #[arg(long)]
    warmup_epochs: Option<u64>,
    /// Epoch at which the cosine reaches --final-lr (16).
    #[arg(long)]
    decay_end_epoch: Option<u64>,
    /// EMA decay (0.9978).
    #[arg(long)]
    ema: Option<f64>,
    /// Global gradient-norm clip, 0 = off (0).
    #[arg(long)]
    clip_grad: Option<f64>,
    /// Noise augmentation: sigma = tau * U[0,1) per sample (0.8; 0 = off).
    #[arg(long)]
    noise_tau: Option<f64>,
    /// LPIPS weight (1.0).
    #[arg(long)]
    perceptual_weight: Option<f64>,
    /// LPIPS VGG16 weights: file, directory or HF repo id (timm/vgg16.tv_in1k).
    #[arg(long)]
    lpips_vgg: Option<String>,
    /// LPIPS v0.1 linear weights `vgg.pth` (file or directory; default:
    /// next to the VGG weights).
    #[arg(long)]
    lpips_lin: Option<String>,
    /// Adversarial weight (0.75); 0 trains without the discriminator.
    #[arg(long)]
    disc_weight: Option<f64>,
    /// Clamp of the adaptive weight (1e4).
    #[arg(long)]
    max_d_weight: Option<f64>,
    /// DINO ViT-S/8 weights of the discriminator's frozen backbone: file,
    /// directory or HF repo id in the local cache
    /// (timm/vit_small_patch8_224.dino; dino_deitsmall8_pretrain.pth works).
    #[arg(long)]
    dino_weights: Option<String>,
    /// JSON/TOML file with the backbone's shape (depth, key_depths,
    /// patch_size, embed_dim, num_heads, mlp_ratio, norm_eps, img_size);
    /// default ViT-S/8 at 224.
    #[arg(long)]
    dino_config: Option<PathBuf>,
    /// Epoch from which the discriminator trains (6).
    #[arg(long)]
    disc_start_epoch: Option<u64>,
    /// Epoch from which the decoder's loss has the adversarial term (8).
    #[arg(long)]
    gan_start_epoch: Option<u64>,
    /// What indexes the discriminator's lr schedule: global-step (the
    /// decoder's schedule) or disc-updates (the reference's offset clock).
    #[arg(long, value_enum)]
    disc_lr_clock: Option<rae_cache::disc::DiscLrClock>,
    /// Train the sin-cos position table, as the reference does.
    #[arg(long)]
    train_pos_embed: bool,
    #[arg(long)]
    seed: Option<u64>,
    /// Reconstruct a fixed batch with the EMA decoder every N steps:
    /// previews/step-N.png and `psnr` in log.jsonl (0 = never; 1000).
    #[arg(long)]
    preview_every: Option<u64>,
    /// cpu | cuda | cuda:N | auto.
    #[arg(long)]
    device: Option<String>,
    #[command(flatten)]
    run: super::run_dir::RunDirArgs,
}

impl Args {
    /// Flags given on the command line override `c`.
    fn apply(&self, c: &mut DecoderTrainConfig) -> anyhow::Result<()> {
        if !self.data.is_empty() {
            c.data = self.data.clone();
        }
        self.run
            .apply(&mut c.out, &mut c.ckpt_every, &mut c.keep_checkpoints);
        if let Some(v) = &self.preset {
            c.decoder = v.clone();
        }
        if let Some(v) = &self.decoder_config {
            c.decoder = v.display().to_string();
        }
        if self.images.is_some() {
            c.images = self.images.clone();
        }
        if self.lpips_lin.is_some() {
            c.lpips_lin = self.lpips_lin.clone();
        }
        if self.online_encoder {
            c.online_encoder = true;
        }
        if self.encoder.is_some() {
            c.encoder = self.encoder.clone();
        }
        if self.train_pos_embed {
            c.train_pos_embed = true;
        }
        if let Some(p) = &self.dino_config {
            c.dino_config = Some(read_dino_config(p)?);
        }
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = &self.$f { c.$f = v.clone().into(); } )* };
        }
        set!(
            patch_size,
            batch_size,
            epochs,
            lr,
            final_lr,
            warmup_epochs,
            decay_end_epoch,
            ema,
            clip_grad,
            noise_tau,
            perceptual_weight,
            disc_weight,
            max_d_weight,
            dino_weights,
            disc_start_epoch,
            gan_start_epoch,
            disc_lr_clock,
            lpips_vgg,
            seed,
            preview_every,
            device
        );
        if self.steps.is_some() {
            c.steps = self.steps;
        }
        if self.epochs.is_some() {
            c.steps = None;
        }
        Ok(())
    }
}

/// A DINO backbone shape from a JSON or TOML file.
fn read_dino_config(p: &std::path::Path) -> anyhow::Result<rae_cache::disc::DinoConfig> {
    use anyhow::Context;
    let text = std::fs::read_to_string(p).with_context(|| format!("{}", p.display()))?;
    let is_json = p.extension().is_some_and(|e| e == "json");
    if is_json {
        serde_json::from_str(&text).with_context(|| format!("{}: DINO config", p.display()))
    } else {
        toml::from_str(&text).with_context(|| format!("{}: DINO config", p.display()))
    }
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let (cfg, resume_from) = args.run.resolve(
        |p| Ok(DecoderTrainConfig::from_toml_file(p)?),
        |j| Ok(DecoderTrainConfig::from_json(j)?),
        |c| args.apply(c),
        |c| c.out.clone(),
    )?;
    let (device, comm) = super::run_dir::join_job(&cfg.device)?;
    let rank = comm.rank();
    let mut trainer = DecoderTrainer::with_collective(cfg, &device, resume_from.as_deref(), comm)?;
    let total = trainer.total_steps();
    let bar = super::run_dir::step_bar(total, trainer.step(), !args.run.json && rank == 0);
    let last = trainer.run(|s| {
        bar.set_position(s.step);
        let d = s
            .disc
            .map(|d| format!(" D {:.4} lambda {:.3}", d.d_loss, s.adaptive_weight))
            .unwrap_or_default();
        bar.set_message(format!(
            "L1 {:.4} LPIPS {:.4} total {:.4}{d} lr {:.2e} {:.1} img/s",
            s.l1, s.lpips, s.total, s.lr, s.images_per_s
        ));
    })?;
    bar.finish();
    if rank != 0 {
        return Ok(ExitCode::SUCCESS);
    }
    let out = trainer.config().out.clone();
    let ck = latest(&out)?;
    if args.run.json {
        let summary = serde_json::json!({
            "run_dir": out,
            "steps": trainer.step(),
            "last": last,
            "checkpoint": ck,
            "decoder_config": out.join(rae_cache::stage1::trainer::DECODER_CONFIG_FILE),
        });
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else if let Some(s) = last {
        eprintln!(
            "trained to step {} (L1 {:.4}, LPIPS {:.4}); checkpoint {}",
            s.step,
            s.l1,
            s.lpips,
            ck.map(|p| p.display().to_string()).unwrap_or_default()
        );
    } else {
        eprintln!(
            "nothing to do: already at step {} of {total}",
            trainer.step()
        );
    }
    Ok(ExitCode::SUCCESS)
}
