//! A Llama-family decoder whose KV cache is explicit: it goes into `forward`
//! and comes back out, so the validator can replace it with what
//! `kv-compress` reconstructed and score the next tokens on that.
//!
//! The math follows Hugging Face's `modeling_llama.py` (the reference the
//! original Python validator ran): RMSNorm, rotary embeddings in the
//! "rotate half" layout with theta from the config, grouped-query attention
//! and a SwiGLU MLP. Weights are named as in a Hugging Face checkpoint; the
//! GGUF loader renames and un-permutes its tensors into the same layout, so a
//! cache has the same meaning whichever file the weights came from.
//!
//! Device and dtype are parameters: the weights' dtype (f32, f16 or bf16,
//! chosen by the loader's `VarBuilder`) is the activations' and the cache's.
//! As in `transformers`' eager attention, the softmax runs in f32 whatever
//! the dtype, and logits come out in f32 for the perplexity bookkeeping.

use candle_core::{DType, Device, IndexOp, Module, Result, Tensor};
use candle_nn::{Embedding, Linear, RmsNorm, VarBuilder};

use super::kernels;

/// The shape of a Llama model: what `config.json` (or GGUF metadata) says.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    /// The LM head reuses the token embedding matrix (SmolLM2 does).
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
}

/// A config that cannot describe a working Llama.
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
        Ok(())
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

/// Precomputed rotary-embedding angles for every position the model supports.
#[derive(Debug, Clone)]
struct RotaryEmbedding {
    /// `[max_position_embeddings, head_dim / 2]`
    cos: Tensor,
    sin: Tensor,
}

impl RotaryEmbedding {
    /// Angles as PyTorch computes them (f32 inverse frequencies times f32
    /// positions), so our keys match a Hugging Face cache to f32 rounding even
    /// at positions in the thousands where the angle is large; then rounded
    /// to the model's dtype, as `transformers` does before applying them.
    fn new(config: &LlamaConfig, dtype: DType, device: &Device) -> Result<Self> {
        let half = config.head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| {
                (1.0 / config
                    .rope_theta
                    .powf(2.0 * i as f64 / config.head_dim as f64)) as f32
            })
            .collect();
        let positions = config.max_position_embeddings;
        let mut cos = Vec::with_capacity(positions * half);
        let mut sin = Vec::with_capacity(positions * half);
        for position in 0..positions {
            for &freq in &inv_freq {
                let angle = (position as f32 * freq) as f64;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(cos, (positions, half), device)?.to_dtype(dtype)?,
            sin: Tensor::from_vec(sin, (positions, half), device)?.to_dtype(dtype)?,
        })
    }

    /// Rotates `x: [1, heads, T, head_dim]` for positions `start..start + T`.
    fn apply(&self, x: &Tensor, start: usize) -> Result<Tensor> {
        let seq_len = x.dim(2)?;
        let cos = self.cos.narrow(0, start, seq_len)?;
        let sin = self.sin.narrow(0, start, seq_len)?;
        candle_nn::rotary_emb::rope(&x.contiguous()?, &cos, &sin)
    }
}

/// What every layer reads in one forward call besides its weights and cache.
struct Step<'a> {
    config: &'a LlamaConfig,
    rotary: &'a RotaryEmbedding,
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

#[derive(Debug, Clone)]
struct Attention {
    /// `q_proj`, `k_proj` and `v_proj` stacked: one matmul instead of three.
    qkv_proj: TransposedLinear,
    o_proj: TransposedLinear,
}

#[derive(Debug, Clone)]
struct Mlp {
    /// `gate_proj` and `up_proj` stacked: one matmul instead of two.
    gate_up_proj: TransposedLinear,
    down_proj: TransposedLinear,
}

#[derive(Debug, Clone)]
struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

/// A Llama decoder with no state of its own.
#[derive(Debug, Clone)]
pub struct Llama {
    config: LlamaConfig,
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: TransposedLinear,
    rotary: RotaryEmbedding,
    device: Device,
    dtype: DType,
}

impl Mlp {
    /// SwiGLU: `down(silu(gate(x)) * up(x))`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.down_proj
            .forward(&kernels::swiglu(&self.gate_up_proj.forward(x)?)?)
    }

    fn load(vb: VarBuilder, config: &LlamaConfig) -> Result<Self> {
        let (hidden, intermediate) = (config.hidden_size, config.intermediate_size);
        Ok(Self {
            gate_up_proj: stacked_linear(
                &vb,
                hidden,
                &[("gate_proj", intermediate), ("up_proj", intermediate)],
            )?,
            down_proj: TransposedLinear::new(candle_nn::linear_no_bias(
                intermediate,
                hidden,
                vb.pp("down_proj"),
            )?)?,
        })
    }
}

impl Attention {
    /// Attends the new positions (`x: [1, T, hidden]`, starting at
    /// `past.seq_len`) to the past and causally among themselves; returns the
    /// output and this layer's cache `past ++ new`.
    fn forward(
        &self,
        x: &Tensor,
        past: Option<&LayerKv>,
        step: &Step,
    ) -> Result<(Tensor, LayerKv)> {
        let (batch, seq_len, _) = x.dims3()?;
        let config = step.config;
        let (heads, kv_heads, head_dim) = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        );
        let start = past.map_or(0, |kv| kv.key.dims()[2]);
        // [1, T, (heads + 2·kv_heads)·head_dim] -> q, k, v as [1, n, T, head_dim].
        let qkv =
            self.qkv_proj
                .forward(x)?
                .reshape((batch, seq_len, heads + 2 * kv_heads, head_dim))?;
        let split_heads =
            |first: usize, n: usize| qkv.narrow(2, first, n)?.transpose(1, 2)?.contiguous();
        let q = split_heads(0, heads)?;
        let k = split_heads(heads, kv_heads)?;
        let v = split_heads(heads + kv_heads, kv_heads)?;
        let q = step.rotary.apply(&q, start)?;
        let k = step.rotary.apply(&k, start)?;

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
        let q = (q * (1.0 / (head_dim as f64).sqrt()))?
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
                let q = q.narrow(3, first, rows)?.contiguous()?.reshape((
                    batch,
                    kv_heads,
                    group * rows,
                    head_dim,
                ))?;
                // Query row r of this block is position past_len + first + r
                // and sees keys up to that position.
                let scores = q
                    .matmul(&key.narrow(2, 0, visible)?.t()?)?
                    .reshape((batch, kv_heads, group, rows, visible))?;
                kernels::causal_softmax(&scores, past_len + first)?
                    .reshape((batch, kv_heads, group * rows, visible))?
                    .matmul(&value.narrow(2, 0, visible)?)?
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

    fn load(vb: VarBuilder, config: &LlamaConfig) -> Result<Self> {
        let hidden = config.hidden_size;
        let q_size = config.num_attention_heads * config.head_dim;
        let kv_size = config.num_key_value_heads * config.head_dim;
        Ok(Self {
            qkv_proj: stacked_linear(
                &vb,
                hidden,
                &[("q_proj", q_size), ("k_proj", kv_size), ("v_proj", kv_size)],
            )?,
            o_proj: TransposedLinear::new(candle_nn::linear_no_bias(
                q_size,
                hidden,
                vb.pp("o_proj"),
            )?)?,
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
        let x = (x + attn)?;
        let mlp = self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&x)?)?;
        Ok(((x + mlp)?, kv))
    }

    fn load(vb: VarBuilder, config: &LlamaConfig) -> Result<Self> {
        let (hidden, eps) = (config.hidden_size, config.rms_norm_eps);
        Ok(Self {
            input_layernorm: candle_nn::rms_norm(hidden, eps, vb.pp("input_layernorm"))?,
            self_attn: Attention::load(vb.pp("self_attn"), config)?,
            post_attention_layernorm: candle_nn::rms_norm(
                hidden,
                eps,
                vb.pp("post_attention_layernorm"),
            )?,
            mlp: Mlp::load(vb.pp("mlp"), config)?,
        })
    }
}

/// A bias-free linear layer whose weight is kept transposed, `[in, out]` and
/// contiguous. candle's `Linear` multiplies by a transposed view of the
/// `[out, in]` weight, which gemm must gather column by column when it packs
/// it; a row-major right-hand side packs faster: +8-12% tokens/s on the
/// SmolLM2 prefill here. A tied LM head costs one transposed copy of the
/// embedding matrix.
#[derive(Debug, Clone)]
struct TransposedLinear {
    weight_t: Tensor,
}

impl TransposedLinear {
    fn new(linear: Linear) -> Result<Self> {
        Ok(Self {
            weight_t: linear.weight().t()?.contiguous()?,
        })
    }

    /// `x: [.., in]` -> `[.., out]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let input = x.dim(candle_core::D::Minus1)?;
        let mut dims = x.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = self.weight_t.dim(1)?;
        }
        x.reshape((x.elem_count() / input, input))?
            .matmul(&self.weight_t)?
            .reshape(dims)
    }
}

/// Bias-free linear layers that read the same input, as one: their weights
/// (`[out_i, input]` each, checked) stacked along the output dimension.
fn stacked_linear(
    vb: &VarBuilder,
    input: usize,
    parts: &[(&str, usize)],
) -> Result<TransposedLinear> {
    let weights = parts
        .iter()
        .map(|&(name, out)| vb.pp(name).get((out, input), "weight"))
        .collect::<Result<Vec<_>>>()?;
    TransposedLinear::new(Linear::new(Tensor::cat(&weights, 0)?, None))
}

impl Llama {
    /// Builds the model from Hugging Face-named tensors
    /// (`model.layers.{i}.self_attn.q_proj.weight`, ...), checking every shape.
    /// The model runs on `vb`'s device in `vb`'s dtype.
    pub fn load(vb: VarBuilder, config: &LlamaConfig) -> Result<Self> {
        let device = vb.device().clone();
        let dtype = vb.dtype();
        let model = vb.pp("model");
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
            .map(|i| DecoderLayer::load(model.pp(format!("layers.{i}")), config))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            config: config.clone(),
            embed_tokens,
            layers,
            norm: candle_nn::rms_norm(config.hidden_size, config.rms_norm_eps, model.pp("norm"))?,
            lm_head,
            rotary: RotaryEmbedding::new(config, dtype, &device)?,
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
    /// attend causally among themselves and to all of `past`.
    /// Returns logits `[1, T, vocab]` (f32 whatever the model's dtype) and the cache `past ++ new` (all layers).
    pub fn forward(&self, tokens: &Tensor, past: Option<&KvCache>) -> Result<(Tensor, KvCache)> {
        let (hidden, cache) = self.forward_hidden(tokens, past)?;
        Ok((self.lm_head.forward(&hidden)?.to_dtype(DType::F32)?, cache))
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
        Ok((self.lm_head.forward(&last)?.to_dtype(DType::F32)?, cache))
    }

    /// The decoder stack up to the final norm: `[1, T, hidden]` and the cache.
    fn forward_hidden(&self, tokens: &Tensor, past: Option<&KvCache>) -> Result<(Tensor, KvCache)> {
        let (batch, seq_len) = tokens.dims2()?;
        if batch != 1 || seq_len == 0 {
            candle_core::bail!("tokens must be [1, T] with T > 0, got {:?}", tokens.dims());
        }
        let past = past.map(|cache| self.check_past(cache)).transpose()?;
        let past_len = past.as_ref().map_or(0, KvCache::seq_len);
        if past_len + seq_len > self.config.max_position_embeddings {
            candle_core::bail!(
                "{} cached + {} new positions exceed max_position_embeddings ({})",
                past_len,
                seq_len,
                self.config.max_position_embeddings
            );
        }
        let step = Step {
            config: &self.config,
            rotary: &self.rotary,
        };
        let mut x = self
            .embed_tokens
            .forward(&tokens.to_device(&self.device)?)?;
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
