//! What differs between the decoder families kv-validate runs, as data: one
//! [`Architecture`] per model, built by the loaders from `config.json` or GGUF
//! metadata, read by the one decoder in `llama.rs`. A family is a choice of
//! values here (which norms, biases, activation, RoPE, windows, soft-caps),
//! never a copy of the model; ExLlamaV3's `architecture/*.py` habit.
//!
//! The RoPE math follows `transformers`' `modeling_rope_utils.py` for every
//! `rope_type` it names here, so a cache means what the model's own code
//! would have stored.

/// The `model_type`s (Hugging Face names) the decoder runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    Gemma2,
    Gemma3Text,
    Phi3,
}

impl Family {
    pub const ALL: [Family; 7] = [
        Family::Llama,
        Family::Mistral,
        Family::Qwen2,
        Family::Qwen3,
        Family::Gemma2,
        Family::Gemma3Text,
        Family::Phi3,
    ];

    /// `config.json`'s `model_type`.
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
            Family::Gemma2 => "gemma2",
            Family::Gemma3Text => "gemma3_text",
            Family::Phi3 => "phi3",
        }
    }

    pub fn from_model_type(model_type: &str) -> Option<Family> {
        Family::ALL
            .into_iter()
            .find(|f| f.model_type() == model_type)
    }
}

/// How an RMSNorm applies its weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormWeight {
    /// `x̂ · w` (Llama, Mistral, Qwen, Phi-3).
    Plain,
    /// `x̂ · (1 + w)`, in f32 (Gemma): the checkpoint stores `w` around 0.
    OffsetByOne,
}

/// The gate's activation in the gated MLP `down(act(gate(x)) · up(x))`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// SwiGLU (`hidden_act: silu`).
    Silu,
    /// GeGLU with the tanh approximation (`gelu_pytorch_tanh`, Gemma).
    GeluTanh,
}

/// Which linear layers carry a bias.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Biases {
    /// `q_proj`, `k_proj`, `v_proj` (Qwen2 always; Llama/Qwen3/Gemma with `attention_bias`).
    pub qkv: bool,
    /// `o_proj` (with `attention_bias`; never in Qwen2).
    pub output: bool,
    /// The MLP's three projections (Llama's `mlp_bias`).
    pub mlp: bool,
}

/// How RoPE's inverse frequencies are derived from the plain ones
/// `θ^(-2i/d)`, and the factor on cos/sin (`attention_factor`).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// `rope_type: default`.
    None,
    /// Frequencies divided by `factor`.
    Linear { factor: f64 },
    /// Dynamic NTK: past `max_position_embeddings` positions the base grows
    /// with the sequence length the call reaches.
    Dynamic {
        factor: f64,
        max_position_embeddings: usize,
    },
    /// Llama 3.x: low frequencies divided by `factor`, high ones kept, a
    /// smooth ramp between.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
    /// YaRN: interpolation blended with extrapolation per frequency.
    Yarn {
        factor: f64,
        original_max_position_embeddings: usize,
        beta_fast: f64,
        beta_slow: f64,
        truncate: bool,
        attention_factor: f64,
    },
    /// Phi-3's LongRoPE (`longrope`, early checkpoints `su`): a factor per
    /// frequency, the long set once a call reaches past
    /// `original_max_position_embeddings` positions.
    LongRope {
        short_factor: Vec<f64>,
        long_factor: Vec<f64>,
        original_max_position_embeddings: usize,
        attention_factor: f64,
    },
    /// A divisor per frequency, as llama.cpp stores Llama 3.x's scaling
    /// (the GGUF tensor `rope_freqs.weight`).
    FrequencyDivisors(Vec<f32>),
}

/// One RoPE setting: base and scaling. Gemma 3 has two (local and global).
#[derive(Debug, Clone, PartialEq)]
pub struct Rope {
    pub theta: f64,
    pub scaling: RopeScaling,
}

impl Rope {
    pub fn plain(theta: f64) -> Self {
        Self {
            theta,
            scaling: RopeScaling::None,
        }
    }

    /// Inverse frequencies (`head_dim / 2` of them, f32 as PyTorch keeps
    /// them) and the factor on cos/sin, for a call whose last position is
    /// `seq_len - 1`: only dynamic NTK and LongRoPE depend on it.
    pub fn frequencies(&self, head_dim: usize, seq_len: usize) -> (Vec<f32>, f64) {
        let half = head_dim / 2;
        let dim = head_dim as f64;
        let plain_with_base = |base: f64| -> Vec<f64> {
            (0..half)
                .map(|i| 1.0 / base.powf(2.0 * i as f64 / dim))
                .collect()
        };
        let to_f32 = |freqs: Vec<f64>| freqs.into_iter().map(|f| f as f32).collect();
        let plain = plain_with_base(self.theta);
        match &self.scaling {
            RopeScaling::None => (to_f32(plain), 1.0),
            RopeScaling::Linear { factor } => {
                (to_f32(plain.iter().map(|f| f / factor).collect()), 1.0)
            }
            RopeScaling::Dynamic {
                factor,
                max_position_embeddings,
            } => {
                let max = *max_position_embeddings as f64;
                let seq = (seq_len as f64).max(max);
                let base =
                    self.theta * ((factor * seq / max) - (factor - 1.0)).powf(dim / (dim - 2.0));
                (to_f32(plain_with_base(base)), 1.0)
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let old_context = *original_max_position_embeddings as f64;
                let low_freq_wavelen = old_context / low_freq_factor;
                let high_freq_wavelen = old_context / high_freq_factor;
                let scaled = plain
                    .iter()
                    .map(|&freq| {
                        let wavelen = 2.0 * std::f64::consts::PI / freq;
                        if wavelen < high_freq_wavelen {
                            freq
                        } else if wavelen > low_freq_wavelen {
                            freq / factor
                        } else {
                            let smooth = (old_context / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * freq / factor + smooth * freq
                        }
                    })
                    .collect();
                (to_f32(scaled), 1.0)
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                truncate,
                attention_factor,
            } => {
                let original = *original_max_position_embeddings as f64;
                let correction_dim = |rotations: f64| {
                    dim * (original / (rotations * 2.0 * std::f64::consts::PI)).ln()
                        / (2.0 * self.theta.ln())
                };
                let (mut low, mut high) = (correction_dim(*beta_fast), correction_dim(*beta_slow));
                if *truncate {
                    (low, high) = (low.floor(), high.ceil());
                }
                let (low, mut high) = (low.max(0.0), high.min(dim - 1.0));
                if low == high {
                    high += 0.001;
                }
                let blended = plain
                    .iter()
                    .enumerate()
                    .map(|(i, &extrapolation)| {
                        let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                        let keep = 1.0 - ramp;
                        extrapolation / factor * (1.0 - keep) + extrapolation * keep
                    })
                    .collect();
                (to_f32(blended), *attention_factor)
            }
            RopeScaling::LongRope {
                short_factor,
                long_factor,
                original_max_position_embeddings,
                attention_factor,
            } => {
                let factors = if seq_len > *original_max_position_embeddings {
                    long_factor
                } else {
                    short_factor
                };
                let scaled = plain.iter().zip(factors).map(|(f, s)| f / s).collect();
                (to_f32(scaled), *attention_factor)
            }
            RopeScaling::FrequencyDivisors(divisors) => {
                let scaled = plain
                    .iter()
                    .zip(divisors)
                    .map(|(f, &d)| f / d as f64)
                    .collect();
                (to_f32(scaled), 1.0)
            }
        }
    }

    /// Whether positions past `max_position_embeddings` are meant (dynamic
    /// NTK grows its base for them).
    pub fn extends_context(&self) -> bool {
        matches!(self.scaling, RopeScaling::Dynamic { .. })
    }

    /// Per-frequency lists must have one entry per frequency.
    fn frequency_list_len(&self) -> Option<(&'static str, usize)> {
        match &self.scaling {
            RopeScaling::LongRope {
                short_factor,
                long_factor,
                ..
            } if short_factor.len() != long_factor.len() => {
                Some(("long_factor", long_factor.len()))
            }
            RopeScaling::LongRope { short_factor, .. } => {
                Some(("short_factor", short_factor.len()))
            }
            RopeScaling::FrequencyDivisors(d) => Some(("rope_freqs", d.len())),
            _ => None,
        }
    }
}

/// What one decoder layer's attention sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerAttention {
    /// A query sees itself and the `window - 1` positions before it; the
    /// engine keeps only those. `None`: every earlier position.
    pub sliding_window: Option<usize>,
    /// Index into [`Architecture::ropes`].
    pub rope: usize,
}

/// Everything about a model's math that is not a tensor shape.
#[derive(Debug, Clone, PartialEq)]
pub struct Architecture {
    pub family: Family,
    pub norm_weight: NormWeight,
    pub activation: Activation,
    pub biases: Biases,
    /// An RMSNorm over each head's queries and keys before RoPE (Qwen3, Gemma 3).
    pub qk_norm: bool,
    /// Norms on the attention's and the MLP's outputs too, before each
    /// residual add (Gemma 2/3: `post_attention_layernorm` is then the
    /// attention output's norm and `pre_feedforward_layernorm` the MLP's input's).
    pub sandwich_norms: bool,
    /// Embeddings multiplied by `sqrt(hidden_size)`, rounded to the model's dtype (Gemma).
    pub scale_embeddings: bool,
    /// Scores are `q·k / sqrt(query_scale)`: `head_dim`, or Gemma's `query_pre_attn_scalar`.
    pub query_scale: f64,
    /// `cap · tanh(score / cap)` on attention scores (Gemma 2).
    pub attention_softcap: Option<f64>,
    /// `cap · tanh(logit / cap)` on the output logits (Gemma 2).
    pub final_logit_softcap: Option<f64>,
    /// The checkpoint stores `qkv_proj` and `gate_up_proj` fused (Phi-3).
    pub fused_projections: bool,
    pub ropes: Vec<Rope>,
    /// One entry per decoder layer.
    pub layers: Vec<LayerAttention>,
}

/// Two orders of magnitude more decoder layers than any published model has:
/// a count beyond it is a corrupt or hostile header, refused before a table
/// with one entry per layer is allocated.
pub const MAX_LAYERS: usize = 16_384;

/// An architecture the decoder cannot run as described.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ArchitectureError {
    #[error("{layers} layer descriptions for num_hidden_layers {expected}")]
    LayerCount { layers: usize, expected: usize },
    #[error("layer {layer} names RoPE setting {rope} of {ropes}")]
    MissingRope {
        layer: usize,
        rope: usize,
        ropes: usize,
    },
    #[error("layer {layer} has sliding_window 0")]
    ZeroWindow { layer: usize },
    #[error("{field} has {found} entries, head_dim / 2 = {expected} frequencies")]
    FrequencyCount {
        field: &'static str,
        found: usize,
        expected: usize,
    },
    #[error("{field} is {value}; it must be finite and positive")]
    NotPositive { field: &'static str, value: f64 },
}

impl Architecture {
    /// Plain Llama: SwiGLU, RMSNorm, no biases, plain RoPE, every layer global.
    pub fn llama(num_layers: usize, head_dim: usize, rope_theta: f64) -> Self {
        Self {
            family: Family::Llama,
            norm_weight: NormWeight::Plain,
            activation: Activation::Silu,
            biases: Biases::default(),
            qk_norm: false,
            sandwich_norms: false,
            scale_embeddings: false,
            query_scale: head_dim as f64,
            attention_softcap: None,
            final_logit_softcap: None,
            fused_projections: false,
            ropes: vec![Rope::plain(rope_theta)],
            layers: vec![
                LayerAttention {
                    sliding_window: None,
                    rope: 0,
                };
                num_layers
            ],
        }
    }

    pub(crate) fn validate(
        &self,
        num_layers: usize,
        head_dim: usize,
    ) -> Result<(), ArchitectureError> {
        if self.layers.len() != num_layers {
            return Err(ArchitectureError::LayerCount {
                layers: self.layers.len(),
                expected: num_layers,
            });
        }
        for (layer, attention) in self.layers.iter().enumerate() {
            if attention.rope >= self.ropes.len() {
                return Err(ArchitectureError::MissingRope {
                    layer,
                    rope: attention.rope,
                    ropes: self.ropes.len(),
                });
            }
            if attention.sliding_window == Some(0) {
                return Err(ArchitectureError::ZeroWindow { layer });
            }
        }
        let positive = |field, value: f64| {
            if value.is_finite() && value > 0.0 {
                Ok(())
            } else {
                Err(ArchitectureError::NotPositive { field, value })
            }
        };
        positive("query scale", self.query_scale)?;
        for cap in [self.attention_softcap, self.final_logit_softcap]
            .into_iter()
            .flatten()
        {
            positive("soft-cap", cap)?;
        }
        for rope in &self.ropes {
            positive("rope_theta", rope.theta)?;
            if let Some((field, found)) = rope.frequency_list_len() {
                if found != head_dim / 2 {
                    return Err(ArchitectureError::FrequencyCount {
                        field,
                        found,
                        expected: head_dim / 2,
                    });
                }
            }
        }
        Ok(())
    }

    /// Positions a layer's cache holds after `seq_len` tokens: a sliding
    /// layer keeps its last `window - 1` (what `transformers`' cache keeps;
    /// the next token's window adds itself).
    pub fn kept_positions(&self, layer: usize, seq_len: usize) -> usize {
        match self.layers.get(layer).and_then(|l| l.sliding_window) {
            Some(window) => seq_len.min(window - 1),
            None => seq_len,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_scaling_keeps_high_divides_low_and_ramps_between() {
        // head_dim 16, theta 1e4, original context 64 (the llama3 fixture):
        // wavelengths 2π·10^(i/2): i = 0 (6.3) is < 64/4 = 16 and kept;
        // i = 1 (19.9) and 2 (62.8) lie in [16, 64] and are ramped;
        // i >= 3 (199 and up) are > 64 and divided by 8.
        let rope = Rope {
            theta: 1e4,
            scaling: RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 64,
            },
        };
        let (scaled, attention_factor) = rope.frequencies(16, 1);
        let (plain, _) = Rope::plain(1e4).frequencies(16, 1);
        assert_eq!(attention_factor, 1.0);
        assert_eq!(scaled[0], plain[0]);
        for i in 3..8 {
            assert!((scaled[i] / plain[i] - 0.125).abs() < 1e-6, "{i}");
        }
        // i = 1: smooth = (64 / 19.87 - 1) / 3 = 0.7402; scale = 0.2598/8 + 0.7402.
        let smooth = (64.0 / (2.0 * std::f64::consts::PI * 10f64.powf(0.5)) - 1.0) / 3.0;
        let expected = (1.0 - smooth) / 8.0 + smooth;
        assert!(((scaled[1] / plain[1]) as f64 - expected).abs() < 1e-6);
    }

    #[test]
    fn dynamic_ntk_grows_the_base_only_past_the_trained_context() {
        let rope = Rope {
            theta: 1e4,
            scaling: RopeScaling::Dynamic {
                factor: 4.0,
                max_position_embeddings: 32,
            },
        };
        assert_eq!(
            rope.frequencies(8, 32).0,
            Rope::plain(1e4).frequencies(8, 32).0
        );
        // T = 48: base 1e4 · (4·48/32 - 3)^(8/6) = 1e4 · 3^(4/3).
        let base = 1e4 * 3f64.powf(4.0 / 3.0);
        assert_eq!(
            rope.frequencies(8, 48).0,
            Rope::plain(base).frequencies(8, 48).0
        );
    }

    #[test]
    fn longrope_switches_factor_sets_at_the_original_context() {
        let rope = Rope {
            theta: 1e4,
            scaling: RopeScaling::LongRope {
                short_factor: vec![1.0, 2.0],
                long_factor: vec![4.0, 8.0],
                original_max_position_embeddings: 32,
                attention_factor: 1.5,
            },
        };
        let (short, factor) = rope.frequencies(4, 32);
        let (long, _) = rope.frequencies(4, 33);
        assert_eq!(factor, 1.5);
        assert_eq!(short, vec![1.0, 0.005]);
        assert_eq!(long, vec![0.25, 0.00125]);
    }

    #[test]
    fn sliding_layers_keep_window_minus_one_positions() {
        let mut arch = Architecture::llama(2, 8, 1e4);
        arch.layers[1].sliding_window = Some(16);
        assert_eq!(arch.kept_positions(0, 40), 40);
        assert_eq!(arch.kept_positions(1, 40), 15);
        assert_eq!(arch.kept_positions(1, 10), 10);
    }
}
