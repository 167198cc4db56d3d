//! The encoder every family loads into: patch embedding + positions,
//! optional prefix tokens (CLS, registers), pre-LN blocks, final LayerNorm
//! without affine, prefix dropped.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use super::config::{ModelFiles, VitConfig, config_err};
use super::preprocess::Preprocessor;
use super::vit_layers::{Block, BlockConfig, BlockNames, PatchEmbed, PlainLayerNorm};
use super::{CROP_SIZE, Encoder, EncoderError, EncoderSpec, LATENT_GRID};

pub struct VitEncoder {
    pub(super) spec: EncoderSpec,
    pub(super) pre: Preprocessor,
    pub(super) patch: PatchEmbed,
    /// `[1, tokens, C]` in the compute dtype: positions of the patch tokens.
    pub(super) pos: Tensor,
    /// `[1, P, C]`: tokens put before the patches (with their positions).
    pub(super) prefix: Option<Tensor>,
    pub(super) blocks: Vec<Block>,
    pub(super) norm: PlainLayerNorm,
    pub(super) dtype: DType,
}

impl VitEncoder {
    pub(super) fn set_origin(&mut self, id: &str, revision: Option<String>) {
        self.spec.id = id.to_string();
        self.spec.revision = revision;
    }
}

impl Encoder for VitEncoder {
    fn spec(&self) -> &EncoderSpec {
        &self.spec
    }

    fn dtype(&self) -> DType {
        self.dtype
    }

    fn encode(&self, crops: &Tensor) -> Result<Tensor, EncoderError> {
        let x = self.pre.apply(crops)?.to_dtype(self.dtype)?;
        let (h, n_prefix) = self.hidden_states(&x)?;
        let h = h.narrow(1, n_prefix, self.spec.tokens)?;
        Ok(self.norm.forward(&h)?)
    }
}

impl VitEncoder {
    /// Every token after the last block, before any final norm, prefix
    /// tokens first, and how many prefix tokens there are. `x`: the input
    /// at `input_size`, normalised, in the compute dtype.
    pub(super) fn hidden_states(&self, x: &Tensor) -> Result<(Tensor, usize), EncoderError> {
        let b = x.dim(0)?;
        let mut h = self.patch.forward(x)?.broadcast_add(&self.pos)?;
        let n_prefix = match &self.prefix {
            Some(p) => {
                let (_, n, c) = p.dims3()?;
                h = Tensor::cat(&[&p.broadcast_as((b, n, c))?, &h], 1)?;
                n
            }
            None => 0,
        };
        for block in &self.blocks {
            h = block.forward(&h)?;
        }
        Ok((h, n_prefix))
    }
}

/// The loader's view of one model directory.
pub(super) struct Loader<'a> {
    pub files: &'a ModelFiles,
    pub vb: VarBuilder<'static>,
    pub device: Device,
    pub dtype: DType,
}

impl<'a> Loader<'a> {
    pub fn open(
        files: &'a ModelFiles,
        device: &Device,
        dtype: DType,
    ) -> Result<Self, EncoderError> {
        let bytes = super::config::read_bytes(&files.weights_path)?;
        let vb = VarBuilder::from_buffered_safetensors(bytes, dtype, device)
            .map_err(|e| config_err(&files.weights_path, e.to_string()))?;
        Ok(Self {
            files,
            vb,
            device: device.clone(),
            dtype,
        })
    }

    /// A tensor as f32 on the host (for load-time position-table work).
    pub fn host_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>), EncoderError> {
        let t = self
            .vb
            .clone()
            .set_device(Device::Cpu)
            .set_dtype(DType::F32)
            .get_unchecked(name)?;
        Ok((t.dims().to_vec(), t.flatten_all()?.to_vec1::<f32>()?))
    }

    /// The position table `name` (`[1, 1 + S*S, hid]`) split into its CLS
    /// row and its S x S grid resized to `g x g` with `matrix(S, g)` (only
    /// built when the sizes differ). Host f32, computed once at load.
    pub fn position_table(
        &self,
        name: &str,
        hid: usize,
        g: usize,
        matrix: impl Fn(usize, usize) -> Vec<f64>,
    ) -> Result<(Vec<f32>, Vec<f32>), EncoderError> {
        let (dims, table) = self.host_f32(name)?;
        if dims.len() != 3 || dims[0] != 1 || dims[2] != hid || dims[1] < 2 {
            return Err(self.err(format!("{name} has shape {dims:?}, want [1, 1+G*G, {hid}]")));
        }
        let side = square_side(dims[1] - 1, &self.files.weights_path)?;
        let (cls_pos, grid_pos) = table.split_at(hid);
        let grid = if side == g {
            grid_pos.to_vec()
        } else {
            let m = matrix(side, g);
            super::resample::resize_grid(grid_pos, (side, side), hid, (g, g), &m, &m)
        };
        Ok((cls_pos.to_vec(), grid))
    }

    pub fn err(&self, reason: impl Into<String>) -> EncoderError {
        config_err(&self.files.config_path, reason)
    }

    /// Blocks `prefix.{i}` for `i < num_hidden_layers`.
    pub fn blocks(
        &self,
        prefix: &str,
        cfg: &BlockConfig,
        names: &BlockNames,
        n: usize,
    ) -> Result<Vec<Block>, EncoderError> {
        (0..n)
            .map(|i| {
                Ok(Block::load(
                    self.vb.pp(format!("{prefix}.{i}")),
                    cfg,
                    names,
                )?)
            })
            .collect()
    }

    /// The `[1, 1, c]` token `name` plus its position row `pos`, summed in
    /// f32 and rounded to the compute dtype once.
    pub fn token_with_position(
        &self,
        name: &str,
        c: usize,
        pos: &[f32],
    ) -> Result<Tensor, EncoderError> {
        let (dims, tok) = self.host_f32(name)?;
        if dims != [1, 1, c] || pos.len() != c {
            return Err(self.err(format!("{name} has shape {dims:?}, want [1, 1, {c}]")));
        }
        let sum = tok.iter().zip(pos).map(|(a, b)| a + b).collect();
        self.upload(sum, 1, c)
    }

    /// A host f32 buffer as a `[1, n, c]` tensor in the compute dtype.
    pub fn upload(&self, data: Vec<f32>, n: usize, c: usize) -> Result<Tensor, EncoderError> {
        Ok(Tensor::from_vec(data, (1, n, c), &self.device)?.to_dtype(self.dtype)?)
    }
}

/// Geometry and spec shared by the families.
pub(super) struct Common {
    pub block: BlockConfig,
    pub grid: usize,
    pub input_size: usize,
    pub spec: EncoderSpec,
    pub pre: Preprocessor,
    pub norm: PlainLayerNorm,
}

/// Where a family's checkpoint keeps the patch embedding and the blocks.
pub(super) struct Keys<'a> {
    /// The patch projection (a strided conv).
    pub patch: &'a str,
    /// The blocks, `{layers}.{i}`.
    pub layers: &'a str,
    /// The tensor names inside a block.
    pub names: &'a BlockNames,
}

impl Common {
    /// The encoder: the patch embedding and blocks loaded from `ld` under
    /// `keys`, with the family's patch positions `pos` (`[1, tokens, C]`)
    /// and prefix tokens.
    pub fn assemble(
        self,
        ld: &Loader,
        cfg: &VitConfig,
        keys: Keys,
        pos: Tensor,
        prefix: Option<Tensor>,
    ) -> Result<VitEncoder, EncoderError> {
        let patch = PatchEmbed::load(
            ld.vb.pp(keys.patch),
            cfg.num_channels,
            cfg.hidden_size,
            cfg.patch_size,
        )?;
        let blocks = ld.blocks(keys.layers, &self.block, keys.names, cfg.num_hidden_layers)?;
        Ok(VitEncoder {
            spec: self.spec,
            pre: self.pre,
            patch,
            pos,
            prefix,
            blocks,
            norm: self.norm,
            dtype: ld.dtype,
        })
    }
}

pub(super) fn common(
    kind: &str,
    cfg: &VitConfig,
    mlp_hidden: usize,
    files: &ModelFiles,
    device: &Device,
) -> Result<Common, EncoderError> {
    cfg.validate(&files.config_path)?;
    let (mean, std) = files.preprocessor.mean_std(&files.preprocessor_path)?;
    let grid = LATENT_GRID;
    let input_size = grid * cfg.patch_size;
    let spec = EncoderSpec {
        kind: kind.to_string(),
        id: files.dir.display().to_string(),
        revision: None,
        config_hash: files.config_hash(),
        crop_size: CROP_SIZE,
        input_size,
        patch_size: cfg.patch_size,
        tokens: grid * grid,
        channels: cfg.hidden_size,
        image_mean: mean,
        image_std: std,
    };
    Ok(Common {
        block: BlockConfig {
            hidden: cfg.hidden_size,
            heads: cfg.num_attention_heads,
            mlp_hidden,
            eps: cfg.layer_norm_eps,
            act: cfg.hidden_act,
            qkv_bias: cfg.qkv_bias,
            swiglu: cfg.use_swiglu_ffn,
        },
        grid,
        input_size,
        pre: Preprocessor::new(CROP_SIZE, input_size, mean, std, device)?,
        norm: PlainLayerNorm::new(cfg.hidden_size, cfg.layer_norm_eps, device)?,
        spec,
    })
}

/// Side of a square position grid with `n` entries.
fn square_side(n: usize, path: &Path) -> Result<usize, EncoderError> {
    let s = (n as f64).sqrt().round() as usize;
    if s * s != n {
        return Err(config_err(
            path,
            format!("position table with {n} patch entries is not a square grid"),
        ));
    }
    Ok(s)
}
