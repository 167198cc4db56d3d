//! DINOv2 (`Dinov2Model`) and DINOv2 with registers
//! (`Dinov2WithRegistersModel`), HF key names.
//!
//! Positions: the stored table (37x37 for image_size 518, p14) is resized
//! once at load to the 16x16 grid of a 224 input, as transformers'
//! `interpolate_pos_encoding` does: bicubic with `size=` given, in f32,
//! antialiased for the registers model, plain for DINOv2.
//!
//! [`HubDinov2`] is the same network as facebookresearch/dinov2's torch.hub
//! model runs it (what dgm-eval's FD-DINOv2 uses): the table is resized
//! with `scale_factor = (16 + 0.1) / 37` (the hub's `interpolate_offset`),
//! which moves the sampling positions, and the output is the CLS token
//! after the affine final LayerNorm (`x_norm_clstoken`).

use candle_core::{DType, Device, Module, Tensor};

use super::config::{ModelFiles, VitConfig, parse_json};
use super::resample::{bicubic_aa_matrix, bicubic_matrix, bicubic_matrix_scaled, widen};
use super::vit::{Keys, Loader, VitEncoder, common};
use super::vit_layers::BlockNames;
use super::{EncoderError, EncoderSpec};

const NAMES: BlockNames = BlockNames {
    norm1: "norm1",
    norm2: "norm2",
    query: "attention.attention.query",
    key: "attention.attention.key",
    value: "attention.attention.value",
    out: "attention.output.dense",
    fc1: "mlp.fc1",
    fc2: "mlp.fc2",
    swiglu_in: "mlp.weights_in",
    swiglu_out: "mlp.weights_out",
    scale1: Some("layer_scale1"),
    scale2: Some("layer_scale2"),
};

/// MLP width as `Dinov2MLP` / `Dinov2SwiGLUFFN` compute it.
fn mlp_hidden(cfg: &VitConfig) -> usize {
    let h = (cfg.hidden_size as f64 * cfg.mlp_ratio.unwrap_or(4.0)) as usize;
    if cfg.use_swiglu_ffn {
        ((h as f64 * 2.0 / 3.0) as usize).div_ceil(8) * 8
    } else {
        h
    }
}

pub(super) fn load(
    files: &ModelFiles,
    registers: bool,
    device: &Device,
    dtype: DType,
) -> Result<VitEncoder, EncoderError> {
    Ok(build(files, registers, false, device, dtype)?.0)
}

/// The hub's position-table interpolation offset (`interpolate_offset`).
const HUB_OFFSET: f64 = 0.1;

/// The encoder and its loader (for tensors outside the encoder). `hub`:
/// resize the position table as facebookresearch/dinov2 does.
fn build<'a>(
    files: &'a ModelFiles,
    registers: bool,
    hub: bool,
    device: &Device,
    dtype: DType,
) -> Result<(VitEncoder, Loader<'a>), EncoderError> {
    let cfg: VitConfig = parse_json(&files.config_path, &files.config_bytes)?;
    let kind = if registers { "dinov2-reg" } else { "dinov2" };
    let c = common(kind, &cfg, mlp_hidden(&cfg), files, device)?;
    let ld = Loader::open(files, device, dtype)?;
    let hid = cfg.hidden_size;

    // Position table: [1, 1 + G*G, C] -> CLS row + G x G grid.
    let g = c.grid;
    let (cls_pos, grid_pos) =
        ld.position_table("embeddings.position_embeddings", hid, g, |side, g| {
            if hub {
                // interpolate(scale_factor=(g + 0.1) / side): torch maps
                // coordinates with f32(1 / factor), not side / g.
                let scale = (1.0 / ((g as f64 + HUB_OFFSET) / side as f64)) as f32;
                widen(&bicubic_matrix_scaled(side, g, scale))
            } else if registers {
                bicubic_aa_matrix(side, g)
            } else {
                widen(&bicubic_matrix(side, g))
            }
        })?;
    let pos = ld.upload(grid_pos, g * g, hid)?;

    // Prefix: [CLS + its position, registers...] (registers get no position).
    let cls = ld.token_with_position("embeddings.cls_token", hid, &cls_pos)?;
    let prefix = if registers && cfg.num_register_tokens > 0 {
        let regs = ld.vb.get(
            (1, cfg.num_register_tokens, hid),
            "embeddings.register_tokens",
        )?;
        Tensor::cat(&[&cls, &regs], 1)?
    } else {
        cls
    };

    let keys = Keys {
        patch: "embeddings.patch_embeddings.projection",
        layers: "encoder.layer",
        names: &NAMES,
    };
    let enc = c.assemble(&ld, &cfg, keys, pos, Some(prefix))?;
    Ok((enc, ld))
}

/// DINOv2 (no registers) as facebookresearch/dinov2's torch.hub model:
/// hub position-table resize, CLS token after the affine final LayerNorm.
/// f32. The network of FD-DINOv2 (`crate::features::dinov2_fd`).
pub struct HubDinov2 {
    enc: VitEncoder,
    norm: candle_nn::LayerNorm,
}

impl HubDinov2 {
    /// Load an HF `Dinov2Model` directory (`facebook/dinov2-large` for
    /// FD-DINOv2) found by `weights::resolve_model`.
    pub fn load(
        model: &crate::weights::ResolvedModel,
        device: &Device,
    ) -> Result<Self, EncoderError> {
        let files = ModelFiles::open(&model.dir)?;
        let probe = files.probe()?;
        if probe.model_type.as_deref() != Some("dinov2") {
            return Err(super::config::config_err(
                &files.config_path,
                format!(
                    "model_type {:?}: FD-DINOv2 needs DINOv2 without registers (model_type \"dinov2\", \
                     e.g. facebook/dinov2-large)",
                    probe.model_type
                ),
            ));
        }
        let (mut enc, ld) = build(&files, false, true, device, DType::F32)?;
        enc.set_origin(&model.id, model.revision.clone());
        let cfg: VitConfig = parse_json(&files.config_path, &files.config_bytes)?;
        let hid = cfg.hidden_size;
        let norm = candle_nn::LayerNorm::new(
            ld.vb.get(hid, "layernorm.weight")?,
            ld.vb.get(hid, "layernorm.bias")?,
            cfg.layer_norm_eps,
        );
        Ok(Self { enc, norm })
    }

    /// Input side, hidden size and provenance.
    pub fn spec(&self) -> &EncoderSpec {
        &self.enc.spec
    }

    /// `x`: `[N, 3, input, input]` f32, already normalised. Returns the CLS
    /// token after the final LayerNorm, `[N, hidden]`.
    pub fn cls(&self, x: &Tensor) -> Result<Tensor, EncoderError> {
        let (h, _) = self.enc.hidden_states(x)?;
        let cls = h.narrow(1, 0, 1)?.squeeze(1)?;
        Ok(self.norm.forward(&cls)?)
    }
}
