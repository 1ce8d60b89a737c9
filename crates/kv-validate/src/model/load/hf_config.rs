//! Hugging Face `config.json`: the fields a Llama needs, with `transformers`' defaults.

use std::path::Path;

use super::{read_to_string, validated, LoadError};
use crate::model::LlamaConfig;

fn default_rope_theta() -> f64 {
    10_000.0
}

fn default_rms_norm_eps() -> f64 {
    1e-6
}

fn default_max_position_embeddings() -> usize {
    2048
}

/// The `config.json` fields a Llama needs, with `transformers`' defaults.
#[derive(Debug, serde::Deserialize)]
struct HfConfigJson {
    model_type: Option<String>,
    hidden_act: Option<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    #[serde(default = "default_rope_theta")]
    rope_theta: f64,
    rope_scaling: Option<serde_json::Value>,
    #[serde(default = "default_rms_norm_eps")]
    rms_norm_eps: f64,
    vocab_size: usize,
    #[serde(default = "default_max_position_embeddings")]
    max_position_embeddings: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    bos_token_id: Option<u32>,
    /// One id or a list (Llama 3 lists several); we keep the first.
    eos_token_id: Option<serde_json::Value>,
}

impl HfConfigJson {
    /// Rejects what our forward pass does not implement rather than running
    /// it wrongly, then checks the shape.
    fn into_config(self, path: &Path) -> Result<LlamaConfig, LoadError> {
        let unsupported = |reason: String| LoadError::Unsupported {
            path: path.to_path_buf(),
            reason,
        };
        if let Some(model_type) = self.model_type.as_deref().filter(|t| *t != "llama") {
            return Err(unsupported(format!(
                "model_type is {model_type:?}, not \"llama\""
            )));
        }
        if let Some(act) = self.hidden_act.as_deref().filter(|a| *a != "silu") {
            return Err(unsupported(format!(
                "hidden_act is {act:?}; only \"silu\" (SwiGLU) is implemented"
            )));
        }
        if self.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(unsupported(
                "rope_scaling is set; only plain RoPE is implemented".into(),
            ));
        }
        if self.attention_bias || self.mlp_bias {
            return Err(unsupported(
                "attention_bias/mlp_bias are set; Llama has no biases".into(),
            ));
        }
        let eos_token_id = match &self.eos_token_id {
            Some(serde_json::Value::Array(ids)) => ids.first().and_then(serde_json::Value::as_u64),
            Some(id) => id.as_u64(),
            None => None,
        };
        let config = LlamaConfig {
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            num_key_value_heads: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            head_dim: self
                .head_dim
                .unwrap_or(self.hidden_size / self.num_attention_heads.max(1)),
            rope_theta: self.rope_theta,
            rms_norm_eps: self.rms_norm_eps,
            vocab_size: self.vocab_size,
            max_position_embeddings: self.max_position_embeddings,
            tie_word_embeddings: self.tie_word_embeddings,
            bos_token_id: self.bos_token_id,
            eos_token_id: eos_token_id.map(|id| id as u32),
        };
        validated(config, path)
    }
}

/// Parses and checks a Hugging Face `config.json`.
pub fn read_hf_config(path: &Path) -> Result<LlamaConfig, LoadError> {
    let text = read_to_string(path)?;
    let json: HfConfigJson = serde_json::from_str(&text).map_err(|source| LoadError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    json.into_config(path)
}
