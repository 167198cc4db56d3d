//! The MLP activation a Hugging Face `config.json` names in `hidden_act`,
//! as a type (like candle-nn's `Activation`): configs deserialise straight
//! into it, and an unsupported name is refused while the config is read.
//! A leaf module: the encoders' layers, their fused CPU kernel and the RAE
//! decoder all use it.

use candle_core::{Result, Tensor};

/// `hidden_act`. HF names: `gelu` is [`Activation::GeluErf`];
/// `gelu_pytorch_tanh`, `gelu_new` and `gelu_fast` are
/// [`Activation::GeluTanh`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "String")]
pub enum Activation {
    /// Exact, erf-based GELU.
    GeluErf,
    /// GELU's tanh approximation.
    GeluTanh,
}

impl Activation {
    /// The activation HF calls `name`, if it is one of these.
    pub fn from_hf(name: &str) -> Option<Self> {
        match name {
            "gelu" => Some(Self::GeluErf),
            "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" => Some(Self::GeluTanh),
            _ => None,
        }
    }

    /// Apply it element-wise.
    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::GeluErf => x.gelu_erf(),
            Self::GeluTanh => x.gelu(),
        }
    }
}

impl TryFrom<String> for Activation {
    type Error = String;
    fn try_from(name: String) -> std::result::Result<Self, String> {
        Self::from_hf(&name).ok_or_else(|| format!("unsupported hidden_act {name:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize)]
    struct Cfg {
        hidden_act: Activation,
    }

    fn parse(name: &str) -> std::result::Result<Activation, String> {
        serde_json::from_str::<Cfg>(&format!(r#"{{"hidden_act": "{name}"}}"#))
            .map(|c| c.hidden_act)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn hf_names() {
        assert_eq!(parse("gelu"), Ok(Activation::GeluErf));
        for name in ["gelu_pytorch_tanh", "gelu_new", "gelu_fast"] {
            assert_eq!(parse(name), Ok(Activation::GeluTanh), "{name}");
        }
        let err = parse("relu").unwrap_err();
        assert!(err.contains("unsupported hidden_act \"relu\""), "{err}");
    }
}
