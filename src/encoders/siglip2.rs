//! SigLIP / SigLIP2 (fixed resolution) vision tower from a `SiglipModel`
//! or `SiglipVisionModel` checkpoint (keys `vision_model.*`): all patch
//! tokens after `post_layernorm`; the pooling head is not used. No CLS.

use candle_core::{DType, Device};

use super::EncoderError;
use super::config::{ModelFiles, ModelTypeProbe, VitConfig, config_err, from_value, parse_json};
use super::vit::{Keys, Loader, VitEncoder, common};
use super::vit_layers::BlockNames;

const NAMES: BlockNames = BlockNames {
    norm1: "layer_norm1",
    norm2: "layer_norm2",
    query: "self_attn.q_proj",
    key: "self_attn.k_proj",
    value: "self_attn.v_proj",
    out: "self_attn.out_proj",
    fc1: "mlp.fc1",
    fc2: "mlp.fc2",
    swiglu_in: "",
    swiglu_out: "",
    scale1: None,
    scale2: None,
};

pub(super) fn load(
    files: &ModelFiles,
    probe: &ModelTypeProbe,
    device: &Device,
    dtype: DType,
) -> Result<VitEncoder, EncoderError> {
    // Full SigLIP checkpoints nest the tower's config; vision-only ones don't.
    let cfg: VitConfig = match &probe.vision_config {
        Some(v) => from_value(&files.config_path, v.clone())?,
        None => parse_json(&files.config_path, &files.config_bytes)?,
    };
    let mlp = cfg
        .intermediate_size
        .ok_or_else(|| config_err(&files.config_path, "intermediate_size missing"))?;
    let c = common("siglip2", &cfg, mlp, files, device)?;
    let ld = Loader::open(files, device, dtype)?;
    let hid = cfg.hidden_size;
    let g = c.grid;

    // SigLIP's table has one row per patch of `image_size`; with no
    // interpolation it must match our 16x16 grid exactly.
    let pos = ld
        .vb
        .get_unchecked("vision_model.embeddings.position_embedding.weight")?;
    if pos.dims() != [g * g, hid] {
        return Err(ld.err(format!(
            "SigLIP position table is {:?}, but a {} input with patch {} needs [{}, {hid}] \
             (image_size {} in config); interpolating SigLIP positions is not supported",
            pos.dims(),
            c.input_size,
            cfg.patch_size,
            g * g,
            cfg.image_size
        )));
    }
    let pos = pos.unsqueeze(0)?;
    let keys = Keys {
        patch: "vision_model.embeddings.patch_embedding",
        layers: "vision_model.encoder.layers",
        names: &NAMES,
    };
    c.assemble(&ld, &cfg, keys, pos, None)
}
