//! DINOv2 (`Dinov2Model`) and DINOv2 with registers
//! (`Dinov2WithRegistersModel`), HF key names.
//!
//! Positions: the stored table (37x37 for image_size 518, p14) is resized
//! once at load to the 16x16 grid of a 224 input, as transformers'
//! `interpolate_pos_encoding` does: bicubic with `size=` given, in f32,
//! antialiased for the registers model, plain for DINOv2.

use candle_core::{DType, Device, Tensor};

use super::EncoderError;
use super::config::{ModelFiles, VitConfig, parse_json};
use super::resample::{bicubic_aa_matrix, bicubic_matrix, widen};
use super::vit::{Keys, Loader, VitEncoder, common};
use super::vit_layers::BlockNames;

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
        ((h as f64 * 2.0 / 3.0) as usize + 7) / 8 * 8
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
    let cfg: VitConfig = parse_json(&files.config_path, &files.config_bytes)?;
    let kind = if registers { "dinov2-reg" } else { "dinov2" };
    let c = common(kind, &cfg, mlp_hidden(&cfg), files, device)?;
    let ld = Loader::open(files, device, dtype)?;
    let hid = cfg.hidden_size;

    // Position table: [1, 1 + G*G, C] -> CLS row + G x G grid.
    let g = c.grid;
    let (cls_pos, grid_pos) =
        ld.position_table("embeddings.position_embeddings", hid, g, |side, g| {
            if registers {
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
    c.assemble(&ld, &cfg, keys, pos, Some(prefix))
}
