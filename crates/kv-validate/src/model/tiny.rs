//! A tiny random Llama for tests and fixtures: the same files a real model
//! comes in (a Hugging Face directory and a GGUF), small enough to generate
//! in milliseconds, so every loading and forward path runs without a download.
//!
//! It is shaped like SmolLM2 in miniature: grouped-query attention, a
//! byte-level BPE tokenizer with SmolLM2's pre-tokenization (single digits, no
//! prefix space), and the GGUF conventions llama.cpp's converter uses
//! (renamed tensors, Q/K rows permuted for interleaved RoPE).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use kvformat::codec::SplitMix64;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, Tokenizer};

use super::load::GGUF_LAYER_TENSORS;
use crate::model::architecture::Architecture;
use crate::model::LlamaConfig;

/// Plain RoPE at Llama 2's base.
const TINY_ROPE_THETA: f64 = 10_000.0;

/// Control tokens at the front of the vocabulary, as in SmolLM2.
const SPECIAL_TOKENS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
const BOS_TOKEN_ID: u32 = 1;
const EOS_TOKEN_ID: u32 = 2;
/// GGUF `tokenizer.ggml.token_type` values (llama.cpp's `llama_token_type`).
const TOKEN_TYPE_NORMAL: i32 = 1;
const TOKEN_TYPE_CONTROL: i32 = 3;

/// BPE merges for common English fragments, in priority order; `Ġ` is the
/// byte-level alphabet's space. Each merge's parts exist when it applies.
const MERGES: [(&str, &str); 32] = [
    ("Ġ", "t"),
    ("h", "e"),
    ("Ġt", "he"),
    ("i", "n"),
    ("Ġ", "a"),
    ("e", "r"),
    ("o", "n"),
    ("r", "e"),
    ("Ġ", "s"),
    ("e", "n"),
    ("a", "t"),
    ("Ġ", "c"),
    ("o", "r"),
    ("i", "s"),
    ("Ġ", "w"),
    ("e", "s"),
    ("Ġ", "o"),
    ("in", "g"),
    ("Ġ", "i"),
    ("Ġ", "m"),
    ("a", "n"),
    ("Ġa", "n"),
    ("Ġan", "d"),
    ("Ġ", "k"),
    ("Ġk", "e"),
    ("Ġke", "y"),
    ("Ġ", "v"),
    ("Ġv", "a"),
    ("l", "u"),
    ("lu", "e"),
    ("Ġ", "p"),
    ("Ġc", "a"),
];

/// What can go wrong writing the fixture files.
#[derive(Debug, thiserror::Error)]
pub enum TinyError {
    #[error("cannot write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Candle {
        path: PathBuf,
        source: candle_core::Error,
    },
    #[error("cannot build the tiny tokenizer: {0}")]
    Tokenizer(String),
}

/// Where [`TinyLlama::write`] put the model.
#[derive(Debug, Clone)]
pub struct TinyModelFiles {
    /// `config.json`, `model.safetensors`, `tokenizer.json`.
    pub hf_dir: PathBuf,
    /// The same weights and tokenizer as one GGUF file.
    pub gguf: PathBuf,
}

/// A seeded random Llama; equal seeds and configs give identical files.
#[derive(Debug, Clone)]
pub struct TinyLlama {
    pub config: LlamaConfig,
    pub seed: u64,
    /// Tensor type in the GGUF: F32 keeps it exactly equal to the safetensors.
    pub gguf_dtype: GgmlDType,
}

impl Default for TinyLlama {
    /// 3 layers, 4 query heads sharing 2 KV heads, head_dim 16.
    fn default() -> Self {
        Self {
            config: LlamaConfig {
                hidden_size: 64,
                intermediate_size: 128,
                num_hidden_layers: 3,
                num_attention_heads: 4,
                num_key_value_heads: 2,
                head_dim: 16,
                rms_norm_eps: 1e-5,
                vocab_size: vocab().len(),
                max_position_embeddings: 1024,
                tie_word_embeddings: false,
                bos_token_id: Some(BOS_TOKEN_ID),
                eos_token_id: Some(EOS_TOKEN_ID),
                architecture: Architecture::llama(3, 16, TINY_ROPE_THETA),
            },
            seed: 0x5EED,
            gguf_dtype: GgmlDType::F32,
        }
    }
}

/// GPT-2's byte-to-character map: printable bytes stand for themselves, the
/// rest are shifted above U+0100 so every byte is a visible character.
fn byte_to_char(byte: u8) -> char {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
    if printable(byte) {
        char::from(byte)
    } else {
        let shifted = (0..byte).filter(|&b| !printable(b)).count() as u32;
        char::from_u32(256 + shifted).expect("U+0100..U+0143 are valid chars")
    }
}

/// The vocabulary in id order: control tokens, the 256 byte characters, then
/// one token per merge.
fn vocab() -> Vec<String> {
    SPECIAL_TOKENS
        .iter()
        .map(|s| s.to_string())
        .chain((0..=255u8).map(|b| byte_to_char(b).to_string()))
        .chain(MERGES.iter().map(|(a, b)| format!("{a}{b}")))
        .collect()
}

/// Uniform in `[-1, 1)` from kvformat's seeded SplitMix64, so fixtures need
/// no RNG crate and stay identical across platforms.
fn next_signed_unit(rng: &mut SplitMix64) -> f32 {
    ((rng.next_u64() >> 40) as f32 / (1u64 << 23) as f32) - 1.0
}

/// llama.cpp's converter reorders each Q/K head's rows from Hugging Face's
/// "rotate half" layout (pairs i, i + d/2) to interleaved pairs (2i, 2i + 1):
/// `[heads, 2, d/2, in] -> [heads, d/2, 2, in]`.
fn permute_for_gguf(weight: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (rows, cols) = weight.dims2()?;
    weight
        .reshape((heads, 2, rows / heads / 2, cols))?
        .transpose(1, 2)?
        .reshape((rows, cols))
}

impl TinyLlama {
    /// The weights under their Hugging Face names.
    pub fn weights(&self) -> candle_core::Result<HashMap<String, Tensor>> {
        let c = &self.config;
        let mut rng = SplitMix64(self.seed);
        let device = Device::Cpu;
        // Uniform with variance 1/fan_in keeps activations O(1) through the
        // stack, so logits differ enough between tokens to catch mistakes.
        let mut matrix = |rows: usize, cols: usize| {
            let bound = (3.0 / cols as f32).sqrt();
            let data = (0..rows * cols)
                .map(|_| next_signed_unit(&mut rng) * bound)
                .collect();
            Tensor::from_vec(data, (rows, cols), &device)
        };
        let q_size = c.num_attention_heads * c.head_dim;
        let kv_size = c.num_key_value_heads * c.head_dim;
        let mut weights = HashMap::new();
        weights.insert(
            "model.embed_tokens.weight".into(),
            matrix(c.vocab_size, c.hidden_size)?,
        );
        for i in 0..c.num_hidden_layers {
            let layer = format!("model.layers.{i}");
            for (name, rows, cols) in [
                ("self_attn.q_proj", q_size, c.hidden_size),
                ("self_attn.k_proj", kv_size, c.hidden_size),
                ("self_attn.v_proj", kv_size, c.hidden_size),
                ("self_attn.o_proj", c.hidden_size, q_size),
                ("mlp.gate_proj", c.intermediate_size, c.hidden_size),
                ("mlp.up_proj", c.intermediate_size, c.hidden_size),
                ("mlp.down_proj", c.hidden_size, c.intermediate_size),
            ] {
                weights.insert(format!("{layer}.{name}.weight"), matrix(rows, cols)?);
            }
        }
        if !c.tie_word_embeddings {
            weights.insert(
                "lm_head.weight".into(),
                matrix(c.vocab_size, c.hidden_size)?,
            );
        }
        // Norm scales near 1 but not 1, so a norm applied wrongly shows.
        let mut norm = || {
            let data = (0..c.hidden_size)
                .map(|_| 1.0 + 0.25 * next_signed_unit(&mut rng))
                .collect();
            Tensor::from_vec(data, c.hidden_size, &device)
        };
        for i in 0..c.num_hidden_layers {
            for name in ["input_layernorm", "post_attention_layernorm"] {
                weights.insert(format!("model.layers.{i}.{name}.weight"), norm()?);
            }
        }
        weights.insert("model.norm.weight".into(), norm()?);
        Ok(weights)
    }

    /// The byte-level BPE tokenizer, configured as SmolLM2's `tokenizer.json`.
    pub fn tokenizer() -> Result<Tokenizer, TinyError> {
        let vocab = vocab();
        let ids = vocab
            .iter()
            .enumerate()
            .map(|(id, token)| (token.clone(), id as u32));
        let merges = MERGES
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(ids.collect::<Vocab>(), merges)
            .build()
            .map_err(|e| TinyError::Tokenizer(e.to_string()))?;
        let mut tokenizer = Tokenizer::new(bpe);
        tokenizer.with_pre_tokenizer(Some(Sequence::new(vec![
            Digits::new(true).into(),
            ByteLevel::new(false, true, true).into(),
        ])));
        tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
        tokenizer
            .add_special_tokens(SPECIAL_TOKENS.map(|token| AddedToken::from(token, true)))
            .map_err(|e| TinyError::Tokenizer(e.to_string()))?;
        Ok(tokenizer)
    }

    /// Writes `config.json`, `model.safetensors` and `tokenizer.json` into `dir`.
    pub fn write_hf_dir(&self, dir: &Path) -> Result<(), TinyError> {
        let io_error = |path: &Path| {
            let path = path.to_path_buf();
            move |source| TinyError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io_error(dir))?;
        let c = &self.config;
        let config = serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size,
            "num_hidden_layers": c.num_hidden_layers,
            "num_attention_heads": c.num_attention_heads,
            "num_key_value_heads": c.num_key_value_heads,
            "head_dim": c.head_dim,
            "rope_theta": c.rope_theta(),
            "rope_scaling": null,
            "rms_norm_eps": c.rms_norm_eps,
            "vocab_size": c.vocab_size,
            "max_position_embeddings": c.max_position_embeddings,
            "tie_word_embeddings": c.tie_word_embeddings,
            "bos_token_id": c.bos_token_id,
            "eos_token_id": c.eos_token_id,
            "torch_dtype": "float32",
        });
        let config_path = dir.join("config.json");
        let text = serde_json::to_string_pretty(&config).expect("a json! value serializes");
        std::fs::write(&config_path, text).map_err(io_error(&config_path))?;

        let weights_path = dir.join("model.safetensors");
        let candle_error = |source| TinyError::Candle {
            path: weights_path.clone(),
            source,
        };
        let weights = self.weights().map_err(candle_error)?;
        candle_core::safetensors::save(&weights, &weights_path).map_err(candle_error)?;

        let tokenizer_path = dir.join("tokenizer.json");
        Self::tokenizer()?
            .save(&tokenizer_path, true)
            .map_err(|e| TinyError::Tokenizer(format!("{}: {e}", tokenizer_path.display())))
    }

    /// The weights under llama.cpp's names, Q/K permuted as its converter does.
    fn gguf_tensors(&self) -> candle_core::Result<Vec<(String, QTensor)>> {
        let c = &self.config;
        let mut weights = self.weights()?;
        let mut take = |name: &str| weights.remove(name).expect("weights() names every tensor");
        let mut renamed = vec![
            (
                "token_embd.weight".to_string(),
                take("model.embed_tokens.weight"),
            ),
            ("output_norm.weight".to_string(), take("model.norm.weight")),
        ];
        if !c.tie_word_embeddings {
            renamed.push(("output.weight".to_string(), take("lm_head.weight")));
        }
        for i in 0..c.num_hidden_layers {
            for (gguf_name, hf_name) in GGUF_LAYER_TENSORS {
                let tensor = take(&format!("model.layers.{i}.{hf_name}.weight"));
                let tensor = match gguf_name {
                    "attn_q" => permute_for_gguf(&tensor, c.num_attention_heads)?,
                    "attn_k" => permute_for_gguf(&tensor, c.num_key_value_heads)?,
                    _ => tensor,
                };
                renamed.push((format!("blk.{i}.{gguf_name}.weight"), tensor));
            }
        }
        renamed
            .into_iter()
            .map(|(name, tensor)| Ok((name, QTensor::quantize(&tensor, self.gguf_dtype)?)))
            .collect()
    }

    /// Writes the same model as one GGUF file with llama.* metadata and the
    /// tokenizer in `tokenizer.ggml.*`, as llama.cpp's converter would.
    pub fn write_gguf(&self, path: &Path) -> Result<(), TinyError> {
        let candle_error = |source| TinyError::Candle {
            path: path.to_path_buf(),
            source,
        };
        let c = &self.config;
        let vocab = vocab();
        let u32_value = |n: usize| Value::U32(n as u32);
        let token_types = (0..vocab.len())
            .map(|id| {
                let control = id < SPECIAL_TOKENS.len();
                Value::I32(if control {
                    TOKEN_TYPE_CONTROL
                } else {
                    TOKEN_TYPE_NORMAL
                })
            })
            .collect();
        let strings =
            |items: Vec<String>| Value::Array(items.into_iter().map(Value::String).collect());
        let metadata: Vec<(&str, Value)> = vec![
            ("general.architecture", Value::String("llama".into())),
            ("general.name", Value::String("tiny-llama".into())),
            ("llama.context_length", u32_value(c.max_position_embeddings)),
            ("llama.embedding_length", u32_value(c.hidden_size)),
            ("llama.block_count", u32_value(c.num_hidden_layers)),
            ("llama.feed_forward_length", u32_value(c.intermediate_size)),
            ("llama.rope.dimension_count", u32_value(c.head_dim)),
            (
                "llama.attention.head_count",
                u32_value(c.num_attention_heads),
            ),
            (
                "llama.attention.head_count_kv",
                u32_value(c.num_key_value_heads),
            ),
            (
                "llama.attention.layer_norm_rms_epsilon",
                Value::F32(c.rms_norm_eps as f32),
            ),
            ("llama.rope.freq_base", Value::F32(c.rope_theta() as f32)),
            ("llama.vocab_size", u32_value(c.vocab_size)),
            ("tokenizer.ggml.model", Value::String("gpt2".into())),
            ("tokenizer.ggml.pre", Value::String("smollm".into())),
            ("tokenizer.ggml.tokens", strings(vocab)),
            ("tokenizer.ggml.token_type", Value::Array(token_types)),
            (
                "tokenizer.ggml.merges",
                strings(MERGES.iter().map(|(a, b)| format!("{a} {b}")).collect()),
            ),
            ("tokenizer.ggml.bos_token_id", Value::U32(BOS_TOKEN_ID)),
            ("tokenizer.ggml.eos_token_id", Value::U32(EOS_TOKEN_ID)),
            ("tokenizer.ggml.add_bos_token", Value::Bool(false)),
        ];

        let tensors = self.gguf_tensors().map_err(candle_error)?;
        let mut file = std::fs::File::create(path).map_err(|source| TinyError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
        let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        gguf_file::write(&mut file, &metadata, &tensors).map_err(candle_error)
    }

    /// Writes both forms under `dir`: `dir/hf/` and `dir/tiny-llama.gguf`.
    pub fn write(&self, dir: &Path) -> Result<TinyModelFiles, TinyError> {
        let files = TinyModelFiles {
            hf_dir: dir.join("hf"),
            gguf: dir.join("tiny-llama.gguf"),
        };
        self.write_hf_dir(&files.hf_dir)?;
        self.write_gguf(&files.gguf)?;
        Ok(files)
    }
}
