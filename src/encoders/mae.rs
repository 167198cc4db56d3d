//! ViT-MAE encoder (`ViTMAEForPreTraining` / `ViTMAEModel`, keys `vit.*`)
//! with masking off: every patch kept, in natural order.
//!
//! Positions: the stored (sin-cos) table for `image_size` is resized to the
//! 16x16 grid of a 256 input as transformers' ViTMAE
//! `interpolate_pos_encoding` does: bicubic, `size=` given, no antialias;
//! the CLS row is kept as stored.

use candle_core::{DType, Device};

use super::EncoderError;
use super::config::{ModelFiles, VitConfig, parse_json};
use super::resample::{bicubic_matrix, widen};
use super::vit::{Keys, Loader, VitEncoder, common};
use super::vit_layers::BlockNames;

const NAMES: BlockNames = BlockNames {
    norm1: "layernorm_before",
    norm2: "layernorm_after",
    query: "attention.attention.query",
    key: "attention.attention.key",
    value: "attention.attention.value",
    out: "attention.output.dense",
    fc1: "intermediate.dense",
    fc2: "output.dense",
    swiglu_in: "",
    swiglu_out: "",
    scale1: None,
    scale2: None,
};

pub(super) fn load(
    files: &ModelFiles,
    device: &Device,
    dtype: DType,
) -> Result<VitEncoder, EncoderError> {
    let cfg: VitConfig = parse_json(&files.config_path, &files.config_bytes)?;
    let mlp = cfg.intermediate_size.ok_or_else(|| {
        super::config::config_err(&files.config_path, "intermediate_size missing")
    })?;
    if cfg.use_swiglu_ffn {
        return Err(super::config::config_err(
            &files.config_path,
            "ViT-MAE has no SwiGLU variant",
        ));
    }
    let c = common("mae", &cfg, mlp, files, device)?;
    let ld = Loader::open(files, device, dtype)?;
    // ViTMAEForPreTraining nests the encoder under `vit.`; ViTMAEModel does not.
    let root = if ld.vb.contains_tensor("vit.embeddings.cls_token") {
        "vit."
    } else {
        ""
    };
    let hid = cfg.hidden_size;

    let g = c.grid;
    let (cls_pos, grid_pos) = ld.position_table(
        &format!("{root}embeddings.position_embeddings"),
        hid,
        g,
        |side, g| widen(&bicubic_matrix(side, g)),
    )?;
    let pos = ld.upload(grid_pos, g * g, hid)?;
    let prefix = ld.token_with_position(&format!("{root}embeddings.cls_token"), hid, &cls_pos)?;

    let keys = Keys {
        patch: &format!("{root}embeddings.patch_embeddings.projection"),
        layers: &format!("{root}encoder.layer"),
        names: &NAMES,
    };
    c.assemble(&ld, &cfg, keys, pos, Some(prefix))
}
