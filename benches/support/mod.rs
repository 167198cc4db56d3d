//! Random-weight models and timing helpers shared by the criterion benches
//! (`benches/`) and the `rae-cache bench` subcommand, so both measure the
//! same models built the same way. Nothing here is used by the build,
//! train, sample or decode paths.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use image::{ImageEncoder, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use rae_cache::models::state_dict::{sorted_vars, trainable_vars};
use rae_cache::models::{DecoderConfig, DitConfig, DitModel, RaeDecoder};
use rae_cache::train::init::SeededVarMap;
use rae_cache::train::{FlowBatch, TrainConfig, TrainState, TrainStateConfig};

/// Errors of the benchmark helpers.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// Building or stepping the training state failed.
    #[error(transparent)]
    Train(#[from] rae_cache::train::TrainError),
    /// Writing random weights failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Anything else.
    #[error("{0}")]
    Other(String),
}

/// Results of this module.
pub type Result<T> = std::result::Result<T, BenchError>;

/// The shape of a DINOv2-with-registers encoder (HF config keys).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dinov2Shape {
    /// Channels per token.
    pub hidden: usize,
    /// Transformer blocks.
    pub layers: usize,
    /// Attention heads.
    pub heads: usize,
    /// Register tokens.
    pub registers: usize,
    /// Patch side in pixels.
    pub patch: usize,
    /// The position table's training size (518 for the released models);
    /// inputs are 224 and the table is interpolated, as for real weights.
    pub image_size: usize,
}

impl Dinov2Shape {
    /// `facebook/dinov2-with-registers-base`.
    pub const BASE: Self = Self {
        hidden: 768,
        layers: 12,
        heads: 12,
        registers: 4,
        patch: 14,
        image_size: 518,
    };

    /// A two-layer, 48-wide model for smoke tests (seconds on a CPU).
    pub const TINY: Self = Self {
        hidden: 48,
        layers: 2,
        heads: 4,
        registers: 4,
        patch: 14,
        image_size: 518,
    };

    /// Number of weights the encoder's forward uses: what
    /// [`write_random_dinov2`] writes less the final LayerNorm's affine
    /// (written for HF compatibility, unused: RAE's latent is the LayerNorm
    /// output without affine).
    pub fn param_count(&self) -> usize {
        let c = self.hidden;
        let grid = self.image_size / self.patch;
        let embed =
            c + c + self.registers * c + (1 + grid * grid) * c + c * 3 * self.patch.pow(2) + c;
        let layer =
            4 * c + 3 * (c * c + c) + (c * c + c) + 2 * c + (4 * c * c + 4 * c) + (4 * c * c + c);
        embed + self.layers * layer
    }
}

/// Deterministic, roughly normal values: a sum of three uniforms (cheap, no
/// denormals; good enough for timing and for models that must not blow up).
pub fn randn_cpu(rng: &mut ChaCha8Rng, shape: &[usize], std: f32) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| {
            (rng.random::<f32>() + rng.random::<f32>() + rng.random::<f32>() - 1.5) * 2.0 * std
        })
        .collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

fn filled(shape: &[usize], v: f32) -> Result<Tensor> {
    Ok(Tensor::full(v, shape, &Device::Cpu)?)
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).map_err(|source| BenchError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Write a DINOv2-with-registers model directory (`config.json`,
/// `model.safetensors` in f32, `preprocessor_config.json`) with random
/// weights in HF layout, loadable by `encoders::load_encoder` and
/// `rae-cache build --encoder DIR`.
pub fn write_random_dinov2(dir: &Path, shape: &Dinov2Shape, seed: u64) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| BenchError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let c = shape.hidden;
    let grid = shape.image_size / shape.patch;
    let mut t: HashMap<String, Tensor> = HashMap::new();
    t.insert(
        "embeddings.cls_token".into(),
        randn_cpu(&mut rng, &[1, 1, c], 0.02)?,
    );
    t.insert("embeddings.mask_token".into(), filled(&[1, c], 0.0)?);
    t.insert(
        "embeddings.register_tokens".into(),
        randn_cpu(&mut rng, &[1, shape.registers, c], 0.02)?,
    );
    t.insert(
        "embeddings.position_embeddings".into(),
        randn_cpu(&mut rng, &[1, 1 + grid * grid, c], 0.02)?,
    );
    t.insert(
        "embeddings.patch_embeddings.projection.weight".into(),
        randn_cpu(&mut rng, &[c, 3, shape.patch, shape.patch], 0.02)?,
    );
    t.insert(
        "embeddings.patch_embeddings.projection.bias".into(),
        filled(&[c], 0.0)?,
    );
    for i in 0..shape.layers {
        let p = format!("encoder.layer.{i}");
        for n in ["norm1", "norm2"] {
            t.insert(format!("{p}.{n}.weight"), filled(&[c], 1.0)?);
            t.insert(format!("{p}.{n}.bias"), filled(&[c], 0.0)?);
        }
        for n in ["query", "key", "value"] {
            t.insert(
                format!("{p}.attention.attention.{n}.weight"),
                randn_cpu(&mut rng, &[c, c], 0.02)?,
            );
            t.insert(
                format!("{p}.attention.attention.{n}.bias"),
                filled(&[c], 0.0)?,
            );
        }
        t.insert(
            format!("{p}.attention.output.dense.weight"),
            randn_cpu(&mut rng, &[c, c], 0.02)?,
        );
        t.insert(
            format!("{p}.attention.output.dense.bias"),
            filled(&[c], 0.0)?,
        );
        t.insert(format!("{p}.layer_scale1.lambda1"), filled(&[c], 0.1)?);
        t.insert(format!("{p}.layer_scale2.lambda1"), filled(&[c], 0.1)?);
        t.insert(
            format!("{p}.mlp.fc1.weight"),
            randn_cpu(&mut rng, &[4 * c, c], 0.02)?,
        );
        t.insert(format!("{p}.mlp.fc1.bias"), filled(&[4 * c], 0.0)?);
        t.insert(
            format!("{p}.mlp.fc2.weight"),
            randn_cpu(&mut rng, &[c, 4 * c], 0.02)?,
        );
        t.insert(format!("{p}.mlp.fc2.bias"), filled(&[c], 0.0)?);
    }
    t.insert("layernorm.weight".into(), filled(&[c], 1.0)?);
    t.insert("layernorm.bias".into(), filled(&[c], 0.0)?);
    candle_core::safetensors::save(&t, dir.join("model.safetensors"))?;
    let config = serde_json::json!({
        "architectures": ["Dinov2WithRegistersModel"],
        "model_type": "dinov2_with_registers",
        "hidden_size": shape.hidden, "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads, "mlp_ratio": 4, "image_size": shape.image_size,
        "patch_size": shape.patch, "num_channels": 3, "num_register_tokens": shape.registers,
        "layer_norm_eps": 1e-6, "hidden_act": "gelu", "qkv_bias": true,
        "use_swiglu_ffn": false, "layerscale_value": 1.0
    });
    write_file(&dir.join("config.json"), config.to_string().as_bytes())?;
    let pre = serde_json::json!({"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]});
    write_file(
        &dir.join("preprocessor_config.json"),
        pre.to_string().as_bytes(),
    )
}

/// `[batch, 3, size, size]` uniform [0,1) crops, as `build` feeds the encoder.
pub fn random_crops(batch: usize, size: usize, seed: u64, device: &Device) -> Result<Tensor> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n = batch * 3 * size * size;
    let v: Vec<f32> = (0..n).map(|_| rng.random::<f32>()).collect();
    Ok(Tensor::from_vec(v, (batch, 3, size, size), &Device::Cpu)?.to_device(device)?)
}

/// An RAE decoder with freshly initialised (random) weights, loaded from
/// plain tensors as `rae-cache decode` loads a checkpoint: weights held as
/// variables would make every forward record its autograd graph (all
/// activations alive until the output is dropped).
pub fn random_decoder(cfg: &DecoderConfig, dtype: DType, device: &Device) -> Result<RaeDecoder> {
    let vm = VarMap::new();
    RaeDecoder::new(cfg, VarBuilder::from_varmap(&vm, dtype, device))?;
    let tensors: HashMap<String, Tensor> = sorted_vars(&vm)
        .into_iter()
        .map(|(k, v)| (k, v.as_tensor().detach()))
        .collect();
    Ok(RaeDecoder::new(
        cfg,
        VarBuilder::from_tensors(tensors, dtype, device),
    )?)
}

/// A DiT for inference with every weight random (std 0.05; seeded), loaded
/// from plain tensors as `rae-cache sample` loads a checkpoint, fused
/// inference kernels on. The reference's zero-initialised adaLN and output
/// layers would make the blocks trivial; random values give a trained
/// model's work.
pub fn random_sampling_model(
    cfg: &DitConfig,
    seed: u64,
    dtype: DType,
    device: &Device,
) -> Result<DitModel> {
    let vm = VarMap::new();
    DitModel::new(
        cfg,
        SeededVarMap::var_builder(&vm, seed, DType::F32, &Device::Cpu),
    )?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed.wrapping_add(1));
    let mut vars = sorted_vars(&vm);
    let mut tensors = HashMap::new();
    for (k, v) in vars.drain(..) {
        let t = if k.ends_with("weight") || k.ends_with("bias") {
            randn_cpu(&mut rng, v.dims(), 0.05)?
        } else {
            v.as_tensor().detach()
        };
        tensors.insert(k, t.to_device(device)?);
    }
    let mut model = DitModel::new(cfg, VarBuilder::from_tensors(tensors, dtype, device))?;
    model.set_fused(true);
    Ok(model)
}

/// Parameter count of a decoder as built by [`random_decoder`] (frozen
/// position table excluded).
pub fn decoder_param_count(cfg: &DecoderConfig) -> Result<usize> {
    let vm = VarMap::new();
    // Shapes only: build on the CPU in f32 to let the VarMap record them.
    RaeDecoder::new(cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))?;
    Ok(trainable_vars(&vm)
        .iter()
        .map(|(_, v)| v.elem_count())
        .sum())
}

/// Trainable parameter count of a DiT / DiT-DH (built once on the CPU in
/// bf16 to halve the memory this needs; frozen tables excluded).
pub fn dit_param_count(cfg: &DitConfig) -> Result<usize> {
    let vm = VarMap::new();
    DitModel::new(cfg, VarBuilder::from_varmap(&vm, DType::BF16, &Device::Cpu))?;
    Ok(trainable_vars(&vm)
        .iter()
        .map(|(_, v)| v.elem_count())
        .sum())
}

/// One training step of a DiT / DiT-DH: the trainer's own [`TrainState`]
/// (flow-matching forward, MSE, backward, clipping, AdamW, EMA) with the
/// trainer's defaults, fed fixed random tensors drawn once per batch size:
/// data loading and noise sampling are not measured.
pub struct TrainStep {
    state: TrainState,
    lr: f64,
    inputs: Option<(usize, FlowBatch)>,
}

impl TrainStep {
    /// Build the model with seeded random f32 weights, computing in `dtype`
    /// as the trainer does (bf16: autocast from f32 master weights). The
    /// optimizer, clipping and EMA settings are `TrainConfig`'s defaults.
    pub fn new(
        cfg: &DitConfig,
        seed: u64,
        dtype: DType,
        device: &Device,
        ema: bool,
    ) -> Result<Self> {
        let train = TrainConfig::default();
        let scfg = TrainStateConfig {
            seed,
            optimizer: train.optimizer(),
            ema: ema.then_some(train.ema),
            clip_grad: train.clip_grad,
            compute: dtype,
        };
        Ok(Self {
            state: TrainState::new(cfg, &scfg, device)?,
            lr: train.lr,
            inputs: None,
        })
    }

    /// Elements of the trainable weights.
    pub fn trainable_params(&self) -> usize {
        self.state.trainable_params()
    }

    /// The state being trained (weights, optimizer, EMA).
    pub fn state(&self) -> &TrainState {
        &self.state
    }

    /// Draw the step's inputs for `batch` images (replacing earlier ones).
    pub fn set_batch(&mut self, batch: usize) -> Result<()> {
        // Free the old inputs first: near the memory limit both sets may not fit.
        self.inputs = None;
        let cfg = self.state.model_config();
        let (c, s, classes) = (cfg.in_channels(), cfg.input_size(), cfg.num_classes());
        let dev = self.state.device();
        let labels: Vec<u32> = (0..batch).map(|i| (i % (classes + 1)) as u32).collect();
        let b = FlowBatch {
            x: Tensor::randn(0f32, 1.0, (batch, c, s, s), dev)?,
            eps: Tensor::randn(0f32, 1.0, (batch, c, s, s), dev)?,
            t: Tensor::rand(0f32, 1.0, batch, dev)?,
            y: Tensor::from_vec(labels, batch, dev)?,
        };
        self.inputs = Some((batch, b));
        Ok(())
    }

    /// The batch size of the current inputs, if drawn.
    pub fn batch(&self) -> Option<usize> {
        self.inputs.as_ref().map(|i| i.0)
    }

    /// One full step; returns the loss. Reading the loss and the gradient
    /// norm to the host synchronises the device, as in the trainer.
    pub fn step(&mut self) -> Result<f64> {
        let (_, inp) = self
            .inputs
            .as_ref()
            .ok_or_else(|| BenchError::Other("TrainStep::step before set_batch".into()))?;
        Ok(self.state.step(inp, self.lr)?.loss)
    }
}

/// Timings of `iters` calls after `warmup` untimed ones.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Timing {
    /// Untimed calls first.
    pub warmup: usize,
    /// Timed calls.
    pub iters: usize,
    /// Wall seconds of each timed iteration.
    pub seconds: Vec<f64>,
    /// Mean of `seconds`.
    pub mean_s: f64,
    /// Minimum of `seconds`.
    pub min_s: f64,
}

/// Run `f` `warmup` times, then `iters` times, synchronising the device
/// before each clock read (CUDA work is asynchronous: without it the clock
/// would measure only the kernel launches).
pub fn time_iters(
    device: &Device,
    warmup: usize,
    iters: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<Timing> {
    for _ in 0..warmup {
        f()?;
    }
    device.synchronize()?;
    let mut seconds = Vec::with_capacity(iters);
    for _ in 0..iters.max(1) {
        let start = Instant::now();
        f()?;
        device.synchronize()?;
        seconds.push(start.elapsed().as_secs_f64());
    }
    let mean_s = seconds.iter().sum::<f64>() / seconds.len() as f64;
    let min_s = seconds.iter().cloned().fold(f64::INFINITY, f64::min);
    Ok(Timing {
        warmup,
        iters: seconds.len(),
        seconds,
        mean_s,
        min_s,
    })
}

/// Smooth colour field plus pseudo-random noise, JPEG quality 90: about the
/// entropy of a natural photo at ImageNet's typical 500x375.
pub fn synthetic_jpeg(seed: u64, w: u32, h: u32) -> Vec<u8> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let img = RgbImage::from_fn(w, h, |x, y| {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        let n = (s % 41) as f32 - 20.0;
        let (fx, fy) = (x as f32 / w as f32, y as f32 / h as f32);
        let k = seed as f32 * 0.7;
        let r = 128.0 + 90.0 * (6.0 * fx + k).sin() * (4.0 * fy).cos();
        let g = 128.0 + 80.0 * (5.0 * fy - k).sin();
        let b = 128.0 + 70.0 * (9.0 * (fx + fy) + k).cos();
        let c = |v: f32| (v + n).clamp(0.0, 255.0) as u8;
        image::Rgb([c(r), c(g), c(b)])
    });
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90)
        .write_image(img.as_raw(), w, h, image::ExtendedColorType::Rgb8)
        .expect("encode a synthetic JPEG");
    out
}

/// Whether an error reads like a device allocation failure (CUDA reports
/// `CUDA_ERROR_OUT_OF_MEMORY`; the CPU allocator aborts instead, so on the
/// CPU this never matches).
pub fn is_out_of_memory(msg: &str) -> bool {
    let m = msg.to_ascii_lowercase();
    m.contains("out_of_memory") || m.contains("out of memory")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dinov2_param_count_matches_written_file() {
        let dir = std::env::temp_dir().join(format!("rae-bench-models-{}", std::process::id()));
        write_random_dinov2(&dir, &Dinov2Shape::TINY, 0).unwrap();
        let t =
            candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
        let n: usize = t.values().map(|v| v.elem_count()).sum();
        assert_eq!(
            n,
            Dinov2Shape::TINY.param_count() + 2 * Dinov2Shape::TINY.hidden
        );
        std::fs::remove_dir_all(&dir).unwrap();
        // The released DINOv2-B-reg has ~86.6M weights (with the 518 position table).
        let base = Dinov2Shape::BASE.param_count();
        assert!((86_000_000..87_500_000).contains(&base), "{base}");
    }

    #[test]
    fn train_step_runs_and_times() {
        let cfg = DitConfig::DitDh(rae_cache::models::DitDhConfig {
            input_size: 4,
            in_channels: 8,
            hidden_size: [16, 24],
            depth: [1, 1],
            num_heads: rae_cache::models::config::OneOrPair::Pair([2, 2]),
            num_classes: 3,
            ..rae_cache::models::DitDhConfig::preset("ditdh-s").unwrap()
        });
        let dev = Device::Cpu;
        let mut s = TrainStep::new(&cfg, 0, DType::F32, &dev, true).unwrap();
        s.set_batch(2).unwrap();
        let t = time_iters(&dev, 1, 2, || s.step().map(|_| ())).unwrap();
        assert_eq!(t.iters, 2);
        assert!(t.mean_s > 0.0 && s.trainable_params() > 0);
    }

    #[test]
    fn oom_messages() {
        assert!(is_out_of_memory(
            "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")"
        ));
        assert!(!is_out_of_memory("shape mismatch"));
    }
}
