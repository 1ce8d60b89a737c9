//! The one decoder of every family kv-validate runs (Llama, Mistral, Qwen2,
//! Qwen3, Gemma 2, Gemma 3, Phi-3), with its KV cache explicit: it goes into
//! `forward` and comes back out, so the validator can replace it with what
//! `kv-compress` reconstructed and score the next tokens on that.
//!
//! The math follows Hugging Face's `modeling_llama.py` (the reference the
//! original Python validator ran): RMSNorm, rotary embeddings in the
//! "rotate half" layout, grouped-query attention and a gated MLP. What the
//! other families change is data, an [`Architecture`] read from the config:
//! `(1 + w)` norms and norms around each block (Gemma), biases (Qwen2), q/k
//! norms (Qwen3, Gemma 3), GeGLU, scaled embeddings, soft-capped scores and
//! logits, sliding-window layers and a RoPE setting per layer. Weights are
//! named as in a Hugging Face checkpoint; the GGUF loader renames and
//! un-permutes its tensors into the same layout, so a cache has the same
//! meaning whichever file the weights came from.
//!
//! Device and dtype are parameters: the weights' dtype (f32, f16 or bf16,
//! chosen by the loader's `VarBuilder`) is the activations' and the cache's.
//! As in `transformers`' eager attention, the softmax runs in f32 whatever
//! the dtype, and logits come out in f32 for the perplexity bookkeeping.

use candle_core::{DType, Device, IndexOp, Module, Result, Tensor};
use candle_nn::{Embedding, Linear, RmsNorm, VarBuilder};

use super::architecture::{Activation, Architecture, ArchitectureError, NormWeight, Rope};
use super::kernels;

/// The shape of a model: what `config.json` (or GGUF metadata) says.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    /// The LM head reuses the token embedding matrix (SmolLM2 does).
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    /// The family's math: norms, biases, activation, RoPE and windows per layer.
    pub architecture: Architecture,
}

/// A config that cannot describe a working model.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    #[error("{field} is 0")]
    Zero { field: &'static str },
    #[error(
        "num_attention_heads ({num_attention_heads}) is not a multiple of \
         num_key_value_heads ({num_key_value_heads})"
    )]
    HeadsNotGrouped {
        num_attention_heads: usize,
        num_key_value_heads: usize,
    },
    #[error("head_dim ({0}) is odd; rotary embeddings rotate pairs of channels")]
    OddHeadDim(usize),
    #[error(transparent)]
    Architecture(#[from] ArchitectureError),
}

impl LlamaConfig {
    /// Checks what the forward pass relies on, so a bad config fails at load
    /// time with a message instead of as a shape error deep in a matmul.
    pub fn validate(&self) -> std::result::Result<(), ConfigError> {
        for (field, value) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if value == 0 {
                return Err(ConfigError::Zero { field });
            }
        }
        if self.num_attention_heads % self.num_key_value_heads != 0 {
            return Err(ConfigError::HeadsNotGrouped {
                num_attention_heads: self.num_attention_heads,
                num_key_value_heads: self.num_key_value_heads,
            });
        }
        if self.head_dim % 2 != 0 {
            return Err(ConfigError::OddHeadDim(self.head_dim));
        }
        self.architecture
            .validate(self.num_hidden_layers, self.head_dim)?;
        Ok(())
    }

    /// The RoPE base of the first setting (every layer's, but in Gemma 3,
    /// whose sliding layers have their own).
    pub fn rope_theta(&self) -> f64 {
        self.architecture
            .ropes
            .first()
            .map_or(0.0, |rope| rope.theta)
    }

    /// Query heads that share one key/value head (GQA group size).
    pub fn kv_group_size(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }
}

/// One layer's cache: key and value, each `[1, num_kv_heads, seq, head_dim]`
/// in the model's dtype; keys post-RoPE (Hugging Face `DynamicCache` layout, CONTRACT §1).
#[derive(Debug, Clone)]
pub struct LayerKv {
    pub key: Tensor,
    pub value: Tensor,
}

/// The whole model's cache, one entry per decoder layer.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    pub layers: Vec<LayerKv>,
}

impl KvCache {
    /// Number of cached positions (0 for an empty cache).
    pub fn seq_len(&self) -> usize {
        self.layers
            .first()
            .map_or(0, |layer| layer.key.dims().get(2).copied().unwrap_or(0))
    }
}

/// Rotary-embedding angles for the positions of one forward call.
#[derive(Debug, Clone)]
struct RotaryAngles {
    /// `[T, head_dim / 2]`, times the RoPE's attention factor.
    cos: Tensor,
    sin: Tensor,
}

impl RotaryAngles {
    /// Angles as PyTorch computes them (f32 inverse frequencies times f32
    /// positions), so our keys match a Hugging Face cache to f32 rounding even
    /// at positions in the thousands where the angle is large; then rounded
    /// to the model's dtype, as `transformers` does before applying them.
    /// Dynamic NTK and LongRoPE pick their frequencies from the length this
    /// call reaches, `start + len`, as `transformers` does for one sequence.
    fn new(
        rope: &Rope,
        head_dim: usize,
        positions: std::ops::Range<usize>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let (inv_freq, attention_factor) = rope.frequencies(head_dim, positions.end);
        let half = inv_freq.len();
        let len = positions.len();
        let mut cos = Vec::with_capacity(len * half);
        let mut sin = Vec::with_capacity(len * half);
        for position in positions {
            for &freq in &inv_freq {
                let angle = (position as f32 * freq) as f64;
                let (c, s) = (angle.cos() as f32, angle.sin() as f32);
                if attention_factor == 1.0 {
                    cos.push(c);
                    sin.push(s);
                } else {
                    cos.push(c * attention_factor as f32);
                    sin.push(s * attention_factor as f32);
                }
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(cos, (len, half), device)?.to_dtype(dtype)?,
            sin: Tensor::from_vec(sin, (len, half), device)?.to_dtype(dtype)?,
        })
    }

    /// Rotates `x: [1, heads, T, head_dim]`.
    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        candle_nn::rotary_emb::rope(&x.contiguous()?, &self.cos, &self.sin)
    }
}

/// What every layer reads in one forward call besides its weights and cache.
struct Step<'a> {
    config: &'a LlamaConfig,
    /// One per [`Architecture::ropes`] entry.
    rotary: &'a [RotaryAngles],
}

/// Query rows per attention block. In a long prefill a block only needs the
/// keys up to its own last position, so blocking skips most of the masked
/// upper triangle and bounds the score matrix to `QUERY_BLOCK` × keys.
const QUERY_BLOCK: usize = 256;
/// On a GPU the masked FLOPs a block skips are cheap (the score matmuls
/// are ~2% of a 2048-token TinyLlama pass's FLOPs) and each block costs a
/// dozen kernel launches, so one block covers a 2048-token window: one
/// layer's scores, 32 heads × 2048² in f32, are 512 MiB, freed before the
/// next layer's.
const QUERY_BLOCK_GPU: usize = 2048;

/// An RMSNorm as the family applies its weight: Gemma's `(1 + w)` is folded
/// into the weight at load time, in f32 before rounding to the model's dtype.
fn norm(size: usize, eps: f64, weight: NormWeight, vb: VarBuilder) -> Result<RmsNorm> {
    match weight {
        NormWeight::Plain => candle_nn::rms_norm(size, eps, vb),
        NormWeight::OffsetByOne => {
            let w = vb.get_with_hints_dtype(size, "weight", Default::default(), DType::F32)?;
            Ok(RmsNorm::new((w + 1.0)?.to_dtype(vb.dtype())?, eps))
        }
    }
}

/// `cap · tanh(x / cap)`, in `x`'s dtype as `transformers` computes it.
fn softcap(x: &Tensor, cap: Option<f64>) -> Result<Tensor> {
    match cap {
        Some(cap) => (x / cap)?.tanh()? * cap,
        None => Ok(x.clone()),
    }
}

#[derive(Debug, Clone)]
struct Attention {
    /// `q_proj`, `k_proj` and `v_proj` stacked: one matmul instead of three.
    qkv_proj: TransposedLinear,
    o_proj: TransposedLinear,
    /// Per-head RMSNorms on queries and keys before RoPE (Qwen3, Gemma 3).
    qk_norms: Option<(RmsNorm, RmsNorm)>,
    sliding_window: Option<usize>,
    /// Index of this layer's angles in [`Step::rotary`].
    rope: usize,
}

#[derive(Debug, Clone)]
struct Mlp {
    /// `gate_proj` and `up_proj` stacked: one matmul instead of two.
    gate_up_proj: TransposedLinear,
    down_proj: TransposedLinear,
    activation: Activation,
}

#[derive(Debug, Clone)]
struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    /// Gemma's norm of the attention output (its `post_attention_layernorm`).
    attention_output_norm: Option<RmsNorm>,
    /// The MLP's input norm: Llama's `post_attention_layernorm`, Gemma's
    /// `pre_feedforward_layernorm`.
    mlp_input_norm: RmsNorm,
    mlp: Mlp,
    /// Gemma's `post_feedforward_layernorm`.
    mlp_output_norm: Option<RmsNorm>,
}

/// A decoder with no state of its own.
#[derive(Debug, Clone)]
pub struct Llama {
    config: LlamaConfig,
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: TransposedLinear,
    device: Device,
    dtype: DType,
}

impl Mlp {
    /// `down(act(gate(x)) * up(x))`: SwiGLU through the fused kernel, GeGLU
    /// through candle's tanh-approximated GELU.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate_up = self.gate_up_proj.forward(x)?;
        let hidden = match self.activation {
            Activation::Silu => kernels::swiglu(&gate_up)?,
            Activation::GeluTanh => {
                let width = gate_up.dim(candle_core::D::Minus1)? / 2;
                let gate = gate_up.narrow(candle_core::D::Minus1, 0, width)?;
                let up = gate_up.narrow(candle_core::D::Minus1, width, width)?;
                (gate.gelu()? * up)?
            }
        };
        self.down_proj.forward(&hidden)
    }

    fn load(vb: VarBuilder, config: &LlamaConfig) -> Result<Self> {
        let (hidden, intermediate) = (config.hidden_size, config.intermediate_size);
        let arch = &config.architecture;
        let bias = arch.biases.mlp;
        let gate_up_proj = if arch.fused_projections {
            stacked_linear(&vb, hidden, &[("gate_up_proj", 2 * intermediate)], bias)?
        } else {
            stacked_linear(
                &vb,
                hidden,
                &[("gate_proj", intermediate), ("up_proj", intermediate)],
                bias,
            )?
        };
        Ok(Self {
            gate_up_proj,
            down_proj: stacked_linear(&vb, intermediate, &[("down_proj", hidden)], bias)?,
            activation: arch.activation,
        })
    }
}

impl Attention {
    /// Attends the new positions (`x: [1, T, hidden]`, starting at
    /// `past.seq_len`) to the past and causally among themselves (within the
    /// layer's window, if it slides); returns the output and this layer's
    /// cache `past ++ new`.
    fn forward(
        &self,
        x: &Tensor,
        past: Option<&LayerKv>,
        step: &Step,
    ) -> Result<(Tensor, LayerKv)> {
        let (batch, seq_len, _) = x.dims3()?;
        let config = step.config;
        let arch = &config.architecture;
        let (heads, kv_heads, head_dim) = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        );
        // [1, T, (heads + 2·kv_heads)·head_dim] -> q, k, v as [1, n, T, head_dim].
        let qkv =
            self.qkv_proj
                .forward(x)?
                .reshape((batch, seq_len, heads + 2 * kv_heads, head_dim))?;
        let split_heads = |first: usize, n: usize, norm: Option<&RmsNorm>| {
            let heads = qkv.narrow(2, first, n)?;
            let heads = match norm {
                Some(norm) => norm.forward(&heads.contiguous()?)?,
                None => heads,
            };
            heads.transpose(1, 2)?.contiguous()
        };
        let (q_norm, k_norm) = match &self.qk_norms {
            Some((q, k)) => (Some(q), Some(k)),
            None => (None, None),
        };
        let q = split_heads(0, heads, q_norm)?;
        let k = split_heads(heads, kv_heads, k_norm)?;
        let v = split_heads(heads + kv_heads, kv_heads, None)?;
        let rotary = &step.rotary[self.rope];
        let q = rotary.apply(&q)?;
        let k = rotary.apply(&k)?;

        let (key, value) = match past {
            Some(past) => (
                Tensor::cat(&[&past.key, &k], 2)?,
                Tensor::cat(&[&past.value, &v], 2)?,
            ),
            None => (k, v),
        };

        // GQA without copying K/V: query heads h = g·group + j all read KV
        // head g, so the group sits beside the query rows of that KV head.
        let group = config.kv_group_size();
        let q = (q * (1.0 / arch.query_scale.sqrt()))?
            .reshape((batch, kv_heads, group, seq_len, head_dim))?;
        let past_len = key.dim(2)? - seq_len;
        let block = if x.device().is_cpu() {
            QUERY_BLOCK
        } else {
            QUERY_BLOCK_GPU
        };
        let blocks = (0..seq_len)
            .step_by(block)
            .map(|first| {
                let rows = block.min(seq_len - first);
                let visible = past_len + first + rows;
                // The block's first row sees keys from here on (all, unless
                // the layer slides); later rows see no earlier keys.
                let first_seen = self
                    .sliding_window
                    .map_or(0, |window| (past_len + first + 1).saturating_sub(window));
                let q = q.narrow(3, first, rows)?.contiguous()?.reshape((
                    batch,
                    kv_heads,
                    group * rows,
                    head_dim,
                ))?;
                // Query row r of this block is position past_len + first + r
                // and sees keys up to that position.
                let scores = q
                    .matmul(&key.narrow(2, first_seen, visible - first_seen)?.t()?)?
                    .reshape((batch, kv_heads, group, rows, visible - first_seen))?;
                let scores = softcap(&scores, arch.attention_softcap)?;
                // A window that covers every key of the block masks nothing:
                // leave it out, so the fused kernel (the only one on CUDA) runs.
                let window = self
                    .sliding_window
                    .filter(|&window| window < visible - first_seen);
                kernels::causal_softmax(&scores, past_len + first - first_seen, window)?
                    .reshape((batch, kv_heads, group * rows, visible - first_seen))?
                    .matmul(&value.narrow(2, first_seen, visible - first_seen)?)?
                    .reshape((batch, heads, rows, head_dim))
            })
            .collect::<Result<Vec<_>>>()?;
        let y = Tensor::cat(&blocks, 2)?.transpose(1, 2)?.reshape((
            batch,
            seq_len,
            heads * head_dim,
        ))?;
        Ok((self.o_proj.forward(&y)?, LayerKv { key, value }))
    }

    fn load(vb: VarBuilder, config: &LlamaConfig, layer: usize) -> Result<Self> {
        let arch = &config.architecture;
        let hidden = config.hidden_size;
        let q_size = config.num_attention_heads * config.head_dim;
        let kv_size = config.num_key_value_heads * config.head_dim;
        let qkv_proj = if arch.fused_projections {
            stacked_linear(
                &vb,
                hidden,
                &[("qkv_proj", q_size + 2 * kv_size)],
                arch.biases.qkv,
            )?
        } else {
            stacked_linear(
                &vb,
                hidden,
                &[("q_proj", q_size), ("k_proj", kv_size), ("v_proj", kv_size)],
                arch.biases.qkv,
            )?
        };
        let qk_norms = if arch.qk_norm {
            let head_norm = |name: &str| {
                norm(
                    config.head_dim,
                    config.rms_norm_eps,
                    arch.norm_weight,
                    vb.pp(name),
                )
            };
            Some((head_norm("q_norm")?, head_norm("k_norm")?))
        } else {
            None
        };
        let attention = arch.layers[layer];
        Ok(Self {
            qkv_proj,
            o_proj: stacked_linear(&vb, q_size, &[("o_proj", hidden)], arch.biases.output)?,
            qk_norms,
            sliding_window: attention.sliding_window,
            rope: attention.rope,
        })
    }
}

impl DecoderLayer {
    fn forward(
        &self,
        x: &Tensor,
        past: Option<&LayerKv>,
        step: &Step,
    ) -> Result<(Tensor, LayerKv)> {
        let (attn, kv) = self
            .self_attn
            .forward(&self.input_layernorm.forward(x)?, past, step)?;
        let attn = match &self.attention_output_norm {
            Some(norm) => norm.forward(&attn)?,
            None => attn,
        };
        let x = (x + attn)?;
        let mlp = self.mlp.forward(&self.mlp_input_norm.forward(&x)?)?;
        let mlp = match &self.mlp_output_norm {
            Some(norm) => norm.forward(&mlp)?,
            None => mlp,
        };
        Ok(((x + mlp)?, kv))
    }

    fn load(vb: VarBuilder, config: &LlamaConfig, layer: usize) -> Result<Self> {
        let arch = &config.architecture;
        let layer_norm = |name: &str| {
            norm(
                config.hidden_size,
                config.rms_norm_eps,
                arch.norm_weight,
                vb.pp(name),
            )
        };
        let (attention_output_norm, mlp_input_norm, mlp_output_norm) = if arch.sandwich_norms {
            (
                Some(layer_norm("post_attention_layernorm")?),
                layer_norm("pre_feedforward_layernorm")?,
                Some(layer_norm("post_feedforward_layernorm")?),
            )
        } else {
            (None, layer_norm("post_attention_layernorm")?, None)
        };
        Ok(Self {
            input_layernorm: layer_norm("input_layernorm")?,
            self_attn: Attention::load(vb.pp("self_attn"), config, layer)?,
            attention_output_norm,
            mlp_input_norm,
            mlp: Mlp::load(vb.pp("mlp"), config)?,
            mlp_output_norm,
        })
    }
}

/// A linear layer whose weight is kept transposed, `[in, out]` and
/// contiguous. candle's `Linear` multiplies by a transposed view of the
/// `[out, in]` weight, which gemm must gather column by column when it packs
/// it; a row-major right-hand side packs faster: +8-12% tokens/s on the
/// SmolLM2 prefill here. A tied LM head costs one transposed copy of the
/// embedding matrix.
#[derive(Debug, Clone)]
struct TransposedLinear {
    weight_t: Tensor,
    bias: Option<Tensor>,
}

impl TransposedLinear {
    fn new(linear: Linear) -> Result<Self> {
        Ok(Self {
            weight_t: linear.weight().t()?.contiguous()?,
            bias: linear.bias().cloned(),
        })
    }

    /// `x: [.., in]` -> `[.., out]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let input = x.dim(candle_core::D::Minus1)?;
        let mut dims = x.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = self.weight_t.dim(1)?;
        }
        let y = x
            .reshape((x.elem_count() / input, input))?
            .matmul(&self.weight_t)?;
        let y = match &self.bias {
            Some(bias) => y.broadcast_add(bias)?,
            None => y,
        };
        y.reshape(dims)
    }
}

/// Linear layers that read the same input, as one: their weights
/// (`[out_i, input]` each, checked) and biases (`[out_i]`, where the family
/// has them) stacked along the output dimension.
fn stacked_linear(
    vb: &VarBuilder,
    input: usize,
    parts: &[(&str, usize)],
    bias: bool,
) -> Result<TransposedLinear> {
    let weights = parts
        .iter()
        .map(|&(name, out)| vb.pp(name).get((out, input), "weight"))
        .collect::<Result<Vec<_>>>()?;
    let bias = if bias {
        let biases = parts
            .iter()
            .map(|&(name, out)| vb.pp(name).get(out, "bias"))
            .collect::<Result<Vec<_>>>()?;
        Some(Tensor::cat(&biases, 0)?)
    } else {
        None
    };
    TransposedLinear::new(Linear::new(Tensor::cat(&weights, 0)?, bias))
}

impl Llama {
    /// Builds the model from Hugging Face-named tensors
    /// (`model.layers.{i}.self_attn.q_proj.weight`, ...), checking every shape.
    /// The model runs on `vb`'s device in `vb`'s dtype.
    pub fn load(vb: VarBuilder, config: &LlamaConfig) -> Result<Self> {
        let device = vb.device().clone();
        let dtype = vb.dtype();
        let model = vb.pp("model");
        let arch = &config.architecture;
        let embed_tokens = candle_nn::embedding(
            config.vocab_size,
            config.hidden_size,
            model.pp("embed_tokens"),
        )?;
        let lm_head = TransposedLinear::new(if config.tie_word_embeddings {
            Linear::new(embed_tokens.embeddings().clone(), None)
        } else {
            candle_nn::linear_no_bias(config.hidden_size, config.vocab_size, vb.pp("lm_head"))?
        })?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| DecoderLayer::load(model.pp(format!("layers.{i}")), config, i))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            config: config.clone(),
            embed_tokens,
            layers,
            norm: norm(
                config.hidden_size,
                config.rms_norm_eps,
                arch.norm_weight,
                model.pp("norm"),
            )?,
            lm_head,
            device,
            dtype,
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The weights', activations' and cache's element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// tokens: `[1, T]` u32. Positions start at `past.seq_len()`. New tokens
    /// attend causally among themselves and to all of `past` (within a
    /// sliding layer's window).
    /// Returns logits `[1, T, vocab]` (f32 whatever the model's dtype) and
    /// the cache `past ++ new` (all layers, every position; see
    /// [`Llama::kept_cache`] for what an engine keeps of sliding layers).
    pub fn forward(&self, tokens: &Tensor, past: Option<&KvCache>) -> Result<(Tensor, KvCache)> {
        let (hidden, cache) = self.forward_hidden(tokens, past)?;
        Ok((self.logits(&hidden)?, cache))
    }

    /// Like [`Llama::forward`] but computes logits for the last position only
    /// (`[1, vocab]`): a context prefill needs just its cache, and the LM head
    /// over every position would be ~10% of the work for nothing.
    pub fn forward_last(
        &self,
        tokens: &Tensor,
        past: Option<&KvCache>,
    ) -> Result<(Tensor, KvCache)> {
        let (hidden, cache) = self.forward_hidden(tokens, past)?;
        let last = hidden.i((.., hidden.dim(1)? - 1, ..))?;
        Ok((self.logits(&last)?, cache))
    }

    /// One decoding step: `token` at position `cache.seq_len()` attends to
    /// all of `cache` (an original or a reconstructed prefix, and the tokens
    /// decoded since) through the same layers and kernels as a prefill.
    /// Returns its next-token logits `[vocab]` (f32) and the cache grown by
    /// that one position. Each step copies the cache once (candle's `cat`),
    /// which is fine for the few tokens of an answer.
    pub fn decode_step(&self, token: u32, cache: &KvCache) -> Result<(Tensor, KvCache)> {
        let input = Tensor::new(&[token], &self.device)?.unsqueeze(0)?;
        let past = (!cache.layers.is_empty()).then_some(cache);
        let (logits, grown) = self.forward_last(&input, past)?;
        Ok((logits.squeeze(0)?, grown))
    }

    /// What an engine's cache holds of `cache`: sliding-window layers keep
    /// their last `window - 1` positions (as `transformers`' cache does), the
    /// others all. This is what goes to kv-compress. `forward` keeps every
    /// position of every layer instead, so that every layer spans the same
    /// positions; no later token reads the positions this drops.
    pub fn kept_cache(&self, cache: &KvCache) -> Result<KvCache> {
        let seq_len = cache.seq_len();
        let arch = &self.config.architecture;
        let layers = cache
            .layers
            .iter()
            .enumerate()
            .map(|(i, kv)| {
                let kept = arch.kept_positions(i, seq_len);
                Ok(LayerKv {
                    key: kv.key.narrow(2, seq_len - kept, kept)?,
                    value: kv.value.narrow(2, seq_len - kept, kept)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(KvCache { layers })
    }

    /// `kept` (a [`Llama::kept_cache`], or what kv-compress reconstructed of
    /// one) with each sliding layer's dropped positions put back from `full`,
    /// so it can extend `full`'s sequence. Every later token's window starts
    /// after them, so the scores on the result are the scores on `kept`.
    pub fn with_dropped_positions(&self, full: &KvCache, kept: KvCache) -> Result<KvCache> {
        if full.layers.len() != kept.layers.len() {
            candle_core::bail!(
                "{} layers kept of a cache of {}",
                kept.layers.len(),
                full.layers.len()
            );
        }
        let restore = |full: &Tensor, kept: Tensor| -> Result<Tensor> {
            let (full_len, kept_len) = (full.dim(2)?, kept.dim(2)?);
            if kept_len > full_len {
                candle_core::bail!("{kept_len} positions kept of {full_len}");
            }
            if kept_len == full_len {
                return Ok(kept);
            }
            let dropped = full
                .narrow(2, 0, full_len - kept_len)?
                .to_dtype(kept.dtype())?;
            Tensor::cat(&[&dropped, &kept], 2)
        };
        let layers = full
            .layers
            .iter()
            .zip(kept.layers)
            .map(|(full, kept)| {
                Ok(LayerKv {
                    key: restore(&full.key, kept.key)?,
                    value: restore(&full.value, kept.value)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(KvCache { layers })
    }

    /// The LM head on `[.., hidden]`, soft-capped where the family caps, in f32.
    fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let logits = self.lm_head.forward(hidden)?;
        softcap(&logits, self.config.architecture.final_logit_softcap)?.to_dtype(DType::F32)
    }

    /// The decoder stack up to the final norm: `[1, T, hidden]` and the cache.
    fn forward_hidden(&self, tokens: &Tensor, past: Option<&KvCache>) -> Result<(Tensor, KvCache)> {
        let (batch, seq_len) = tokens.dims2()?;
        if batch != 1 || seq_len == 0 {
            candle_core::bail!("tokens must be [1, T] with T > 0, got {:?}", tokens.dims());
        }
        let past = past.map(|cache| self.check_past(cache)).transpose()?;
        let past_len = past.as_ref().map_or(0, KvCache::seq_len);
        let arch = &self.config.architecture;
        let extends_context = arch.ropes.iter().any(Rope::extends_context);
        if past_len + seq_len > self.config.max_position_embeddings && !extends_context {
            candle_core::bail!(
                "{} cached + {} new positions exceed max_position_embeddings ({})",
                past_len,
                seq_len,
                self.config.max_position_embeddings
            );
        }
        let rotary = arch
            .ropes
            .iter()
            .map(|rope| {
                RotaryAngles::new(
                    rope,
                    self.config.head_dim,
                    past_len..past_len + seq_len,
                    self.dtype,
                    &self.device,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let step = Step {
            config: &self.config,
            rotary: &rotary,
        };
        let mut x = self
            .embed_tokens
            .forward(&tokens.to_device(&self.device)?)?;
        if arch.scale_embeddings {
            // sqrt(hidden) rounded to the model's dtype first, as `transformers` does.
            let scale = Tensor::new((self.config.hidden_size as f32).sqrt(), &self.device)?
                .to_dtype(self.dtype)?;
            x = x.broadcast_mul(&scale)?;
        }
        let mut cache = KvCache {
            layers: Vec::with_capacity(self.layers.len()),
        };
        for (i, layer) in self.layers.iter().enumerate() {
            let layer_past = past.as_ref().map(|p| &p.layers[i]);
            let (out, kv) = layer.forward(&x, layer_past, &step)?;
            x = out;
            cache.layers.push(kv);
        }
        Ok((self.norm.forward(&x)?, cache))
    }

    /// Checks a caller's cache against the model and brings it to the model's
    /// dtype and device (a reconstruction arrives as f32 on the CPU).
    fn check_past(&self, past: &KvCache) -> Result<KvCache> {
        let config = &self.config;
        if past.layers.len() != config.num_hidden_layers {
            candle_core::bail!(
                "past cache has {} layers, the model {}",
                past.layers.len(),
                config.num_hidden_layers
            );
        }
        let past_len = past.seq_len();
        let expected = [1, config.num_key_value_heads, past_len, config.head_dim];
        let to_model = |t: &Tensor| t.to_device(&self.device)?.to_dtype(self.dtype);
        let layers = past
            .layers
            .iter()
            .enumerate()
            .map(|(i, kv)| {
                for (kind, t) in [("key", &kv.key), ("value", &kv.value)] {
                    if t.dims() != expected {
                        candle_core::bail!(
                            "past cache layer {i} {kind} has shape {:?}, expected {:?}",
                            t.dims(),
                            expected
                        );
                    }
                }
                Ok(LayerKv {
                    key: to_model(&kv.key)?,
                    value: to_model(&kv.value)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(KvCache { layers })
    }
}
