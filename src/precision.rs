//! Inference precision (`--precision auto|f32|bf16|f16`) and the opt-in
//! TF32 switch for f32 matrix products (`--tf32`).
//!
//! A half precision only changes the weights and the activations between
//! layers: the models keep the numerically sensitive pieces in f32 (norm
//! statistics, softmax, time and position embeddings, the sampler state,
//! encoder latents and decoder pixels), and cuBLAS accumulates half
//! products in f32 unless told otherwise.

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device};

/// The compute dtype a user asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// bf16 on a CUDA device (tensor cores, f32 exponent range), f32 on the
    /// CPU (candle's CPU bf16 matmul is slower than f32 and gains nothing).
    #[default]
    Auto,
    /// f32 throughout.
    F32,
    /// bfloat16 weights and activations.
    Bf16,
    /// float16 weights and activations.
    F16,
}

/// A `--precision` value that is not one of the names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown precision {0:?}: expected auto, f32, bf16 or f16")]
pub struct PrecisionError(pub String);

impl Precision {
    /// The dtype to load weights and run activations in on `device`.
    pub fn resolve(self, device: &Device) -> DType {
        match self {
            Self::Auto if device.is_cuda() => DType::BF16,
            Self::Auto | Self::F32 => DType::F32,
            Self::Bf16 => DType::BF16,
            Self::F16 => DType::F16,
        }
    }

    /// The name on the command line and in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::F16 => "f16",
        }
    }
}

impl FromStr for Precision {
    type Err = PrecisionError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "f32" | "float32" | "fp32" => Ok(Self::F32),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            "f16" | "float16" | "fp16" | "half" => Ok(Self::F16),
            _ => Err(PrecisionError(s.to_string())),
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// True for the 16-bit float dtypes, whose sensitive reductions the models
/// upcast to f32.
pub fn is_half(dtype: DType) -> bool {
    matches!(dtype, DType::BF16 | DType::F16)
}

/// Allow (or forbid) TF32 tensor-core math in f32 matrix products on CUDA
/// (cuBLAS `CUBLAS_COMPUTE_32F_FAST_TF32`: 10-bit mantissa inputs, f32
/// accumulation). Process-wide, off by default as in PyTorch. A no-op on the
/// CPU and in builds without the `cuda` feature (candle's stand-in backend
/// has the same function, doing nothing).
pub fn set_tf32(enabled: bool) {
    candle_core::cuda::set_gemm_reduced_precision_f32(enabled);
}

/// Whether TF32 f32 matrix products are currently allowed (always false
/// without the `cuda` feature).
pub fn tf32_enabled() -> bool {
    // candle's stand-in backend answers `true` here; it has no GEMMs at all.
    #[cfg(feature = "cuda")]
    {
        candle_core::cuda::gemm_reduced_precision_f32()
    }
    #[cfg(not(feature = "cuda"))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_resolves() {
        assert_eq!("auto".parse::<Precision>(), Ok(Precision::Auto));
        assert_eq!("BF16".parse::<Precision>(), Ok(Precision::Bf16));
        assert_eq!("fp16".parse::<Precision>(), Ok(Precision::F16));
        assert_eq!("f32".parse::<Precision>(), Ok(Precision::F32));
        assert!("f8".parse::<Precision>().is_err());
        let cpu = Device::Cpu;
        assert_eq!(Precision::Auto.resolve(&cpu), DType::F32);
        assert_eq!(Precision::Bf16.resolve(&cpu), DType::BF16);
        assert_eq!(Precision::F16.resolve(&cpu), DType::F16);
        assert_eq!(Precision::Auto.to_string(), "auto");
    }

    #[test]
    fn tf32_is_a_noop_without_cuda() {
        set_tf32(false);
        assert!(!tf32_enabled());
        #[cfg(not(feature = "cuda"))]
        {
            set_tf32(true);
            assert!(!tf32_enabled());
        }
    }
}
