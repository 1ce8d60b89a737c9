//! A single GGUF file with its embedded tokenizer.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use candle_core::quantized::gguf_file;
use candle_core::quantized::tokenizer::TokenizerFromGguf;
use candle_core::{DType, Device, Tensor};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::Tokenizer;

use super::used_tensors::load_every_tensor;
use super::{check_vocab, io_error, layer_count, validated, LoadError, LoadedModel};
use crate::model::architecture::{Activation, Architecture, Biases, Family, Rope, RopeScaling};
use crate::model::device::dtype_name;
use crate::model::LlamaConfig;

/// GGUF tensor names inside `blk.{i}` and their Hugging Face names inside
/// `model.layers.{i}` (llama.cpp's `convert_hf_to_gguf.py` mapping).
pub(crate) const GGUF_LAYER_TENSORS: [(&str, &str); 9] = [
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
    ("attn_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
];

/// llama.cpp stores Q/K rows of each head interleaved (pairs 2i, 2i + 1) for
/// its RoPE; Hugging Face keeps halves (pairs i, i + d/2). This undoes the
/// converter's permutation: `[heads, d/2, 2, in] -> [heads, 2, d/2, in]`.
fn unpermute_from_gguf(weight: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (rows, cols) = weight.dims2()?;
    weight
        .reshape((heads, rows / heads / 2, 2, cols))?
        .transpose(1, 2)?
        .reshape((rows, cols))
}

fn metadata_value<'a>(
    content: &'a gguf_file::Content,
    key: &str,
    path: &Path,
) -> Result<&'a gguf_file::Value, LoadError> {
    content
        .metadata
        .get(key)
        .ok_or_else(|| LoadError::Metadata {
            path: path.to_path_buf(),
            key: key.to_string(),
            problem: "missing".into(),
        })
}

/// A numeric metadata value of any integer type (writers differ).
fn metadata_usize(
    content: &gguf_file::Content,
    key: &str,
    path: &Path,
) -> Result<usize, LoadError> {
    use gguf_file::Value::*;
    let value = metadata_value(content, key, path)?;
    let n = match *value {
        U8(v) => Some(v as u64),
        U16(v) => Some(v as u64),
        U32(v) => Some(v as u64),
        U64(v) => Some(v),
        I8(v) => u64::try_from(v).ok(),
        I16(v) => u64::try_from(v).ok(),
        I32(v) => u64::try_from(v).ok(),
        I64(v) => u64::try_from(v).ok(),
        _ => None,
    };
    n.map(|n| n as usize).ok_or_else(|| LoadError::Metadata {
        path: path.to_path_buf(),
        key: key.to_string(),
        problem: format!("expected a non-negative integer, found {value:?}"),
    })
}

fn metadata_f64(content: &gguf_file::Content, key: &str, path: &Path) -> Result<f64, LoadError> {
    match *metadata_value(content, key, path)? {
        // The converter cast a decimal from config.json (1e-5) to f32; its
        // shortest decimal form gives that value back exactly.
        gguf_file::Value::F32(v) => Ok(v.to_string().parse().expect("f32 Display parses as f64")),
        gguf_file::Value::F64(v) => Ok(v),
        ref other => Err(LoadError::Metadata {
            path: path.to_path_buf(),
            key: key.to_string(),
            problem: format!("expected a float, found {other:?}"),
        }),
    }
}

fn metadata_string(content: &gguf_file::Content, key: &str) -> Option<String> {
    content.metadata.get(key)?.to_string().ok().cloned()
}

/// llama.cpp's architecture names the decoder reads, with their families.
const GGUF_ARCHITECTURES: [(&str, Family); 6] = [
    ("llama", Family::Llama),
    ("qwen2", Family::Qwen2),
    ("qwen3", Family::Qwen3),
    ("gemma2", Family::Gemma2),
    ("gemma3", Family::Gemma3Text),
    ("phi3", Family::Phi3),
];

/// GGUF tensor names inside `blk.{i}` and their Hugging Face names inside
/// `model.layers.{i}` for a family: llama.cpp's converter's mapping.
fn layer_tensors(family: Family) -> Vec<(&'static str, &'static str)> {
    let mut names: Vec<(&str, &str)> = match family {
        Family::Phi3 => vec![
            ("attn_qkv", "self_attn.qkv_proj"),
            ("attn_output", "self_attn.o_proj"),
            ("ffn_up", "mlp.gate_up_proj"),
            ("ffn_down", "mlp.down_proj"),
            ("attn_norm", "input_layernorm"),
            ("ffn_norm", "post_attention_layernorm"),
        ],
        _ => GGUF_LAYER_TENSORS.to_vec(),
    };
    if matches!(family, Family::Gemma2 | Family::Gemma3Text) {
        names.retain(|(gguf, _)| *gguf != "ffn_norm");
        names.extend([
            ("post_attention_norm", "post_attention_layernorm"),
            ("ffn_norm", "pre_feedforward_layernorm"),
            ("post_ffw_norm", "post_feedforward_layernorm"),
        ]);
    }
    if matches!(family, Family::Qwen3 | Family::Gemma3Text) {
        names.extend([
            ("attn_q_norm", "self_attn.q_norm"),
            ("attn_k_norm", "self_attn.k_norm"),
        ]);
    }
    names
}

fn optional_tensor(content: &gguf_file::Content, name: &str) -> bool {
    content.tensor_infos.contains_key(name)
}

/// The config from `{arch}.*` metadata, with llama.cpp's defaults. What a
/// GGUF cannot say is what llama.cpp assumes: Gemma's query scale is
/// `head_dim` (no `query_pre_attn_scalar`), Gemma 2 alternates sliding and
/// global layers, Gemma 3 has five sliding layers per global one, and the
/// converter stores Gemma's norm weights as `1 + w`.
fn gguf_config(
    content: &gguf_file::Content,
    path: &Path,
    arch: &str,
    family: Family,
) -> Result<LlamaConfig, LoadError> {
    let key = |name: &str| format!("{arch}.{name}");
    let usize_key = |name: &str| metadata_usize(content, &key(name), path);
    let optional = |name: &str| content.metadata.contains_key(&key(name));
    let unsupported = |reason: String| LoadError::Unsupported {
        path: path.to_path_buf(),
        reason,
    };
    let scaling = match metadata_string(content, &key("rope.scaling.type")).as_deref() {
        None | Some("none") => RopeScaling::None,
        Some("linear") => RopeScaling::Linear {
            factor: metadata_f64(content, &key("rope.scaling.factor"), path)?,
        },
        Some(other) => {
            return Err(unsupported(format!(
                "{} is {other:?}; implemented in GGUF: none, linear \
                 (and Llama 3's rope_freqs.weight)",
                key("rope.scaling.type")
            )))
        }
    };
    if optional("expert_count") || optional_tensor(content, "blk.0.ffn_gate_inp.weight") {
        return Err(unsupported(format!(
            "{} is set; mixture-of-experts MLPs are not implemented",
            key("expert_count")
        )));
    }
    let hidden_size = usize_key("embedding_length")?;
    let num_attention_heads = usize_key("attention.head_count")?;
    let head_dim = if optional("attention.key_length") {
        usize_key("attention.key_length")?
    } else if optional("rope.dimension_count") {
        usize_key("rope.dimension_count")?
    } else {
        hidden_size / num_attention_heads.max(1)
    };
    if optional("rope.dimension_count") && usize_key("rope.dimension_count")? != head_dim {
        return Err(unsupported(format!(
            "{} is {} of head_dim {head_dim}; only RoPE over the whole head is implemented",
            key("rope.dimension_count"),
            usize_key("rope.dimension_count")?
        )));
    }
    let vocab_size = if optional("vocab_size") {
        usize_key("vocab_size")?
    } else {
        let embeddings = content.tensor_infos.get("token_embd.weight");
        embeddings
            .map(|info| info.shape.dims()[0])
            .ok_or_else(|| LoadError::Metadata {
                path: path.to_path_buf(),
                key: key("vocab_size"),
                problem: "missing, and there is no token_embd.weight to infer it from".into(),
            })?
    };
    let float_or = |name: &str, default: f64| -> Result<f64, LoadError> {
        if optional(name) {
            metadata_f64(content, &key(name), path)
        } else {
            Ok(default)
        }
    };
    let rope_theta = float_or("rope.freq_base", 10_000.0)?;
    let token_id = |key: &str| metadata_usize(content, key, path).ok().map(|id| id as u32);
    let num_hidden_layers = layer_count(path, "block_count", usize_key("block_count")?)?;
    let mut architecture = Architecture::llama(num_hidden_layers, head_dim, rope_theta);
    architecture.family = family;
    architecture.ropes[0].scaling = scaling;
    // Biases are tensors, not metadata: layer 0 says which the model has
    // (a layer without them then fails to load, naming the tensor).
    let has_bias = |name: &str| optional_tensor(content, &format!("blk.0.{name}.bias"));
    architecture.biases = Biases {
        qkv: has_bias(if family == Family::Phi3 {
            "attn_qkv"
        } else {
            "attn_q"
        }),
        output: has_bias("attn_output"),
        mlp: has_bias("ffn_down"),
    };
    architecture.qk_norm = matches!(family, Family::Qwen3 | Family::Gemma3Text);
    architecture.fused_projections = family == Family::Phi3;
    let window = if optional("attention.sliding_window") {
        Some(usize_key("attention.sliding_window")?).filter(|w| *w > 0)
    } else {
        None
    };
    let slides = |layer: usize| match family {
        Family::Gemma2 => (layer + 1) % 2 != 0,
        Family::Gemma3Text => (layer + 1) % 6 != 0,
        _ => true,
    };
    if matches!(family, Family::Gemma2 | Family::Gemma3Text) {
        architecture.activation = Activation::GeluTanh;
        architecture.sandwich_norms = true;
        architecture.scale_embeddings = true;
        let softcap = |name: &str| -> Result<Option<f64>, LoadError> {
            optional(name)
                .then(|| metadata_f64(content, &key(name), path))
                .transpose()
        };
        if family == Family::Gemma2 {
            architecture.attention_softcap = softcap("attn_logit_softcapping")?;
            architecture.final_logit_softcap = softcap("final_logit_softcapping")?;
        } else {
            architecture.final_logit_softcap = softcap("final_logit_softcapping")?;
            architecture
                .ropes
                .push(Rope::plain(float_or("rope.freq_base_swa", 10_000.0)?));
        }
    }
    if family != Family::Llama {
        for (layer, attention) in architecture.layers.iter_mut().enumerate() {
            if slides(layer) {
                attention.sliding_window = window;
                attention.rope = architecture.ropes.len() - 1;
            }
        }
    }
    let config = LlamaConfig {
        hidden_size,
        intermediate_size: usize_key("feed_forward_length")?,
        num_hidden_layers,
        num_attention_heads,
        num_key_value_heads: if optional("attention.head_count_kv") {
            usize_key("attention.head_count_kv")?
        } else {
            num_attention_heads
        },
        head_dim,
        rms_norm_eps: metadata_f64(content, &key("attention.layer_norm_rms_epsilon"), path)?,
        vocab_size,
        max_position_embeddings: usize_key("context_length")?,
        tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
        bos_token_id: token_id("tokenizer.ggml.bos_token_id"),
        eos_token_id: token_id("tokenizer.ggml.eos_token_id"),
        architecture,
    };
    validated(config, path)
}

/// The tokenizer from `tokenizer.ggml.*`. candle builds the BPE model; for
/// pre-tokenizers it does not know (SmolLM2's `smollm`, plain `gpt2`) it
/// falls back to a byte-level split that adds a prefix space, which llama.cpp
/// and the Hugging Face tokenizers of these models do not, so we set the
/// pre-tokenizer those use.
fn gguf_tokenizer(content: &gguf_file::Content, path: &Path) -> Result<Tokenizer, LoadError> {
    let mut tokenizer = Tokenizer::from_gguf(content).map_err(|e| LoadError::Tokenizer {
        path: path.to_path_buf(),
        message: format!("{e} (only byte-level BPE \"gpt2\" vocabularies are supported)"),
    })?;
    let add_prefix_space = content
        .metadata
        .get("tokenizer.ggml.add_space_prefix")
        .and_then(|v| v.to_bool().ok())
        .unwrap_or(false);
    let byte_level = ByteLevel::new(add_prefix_space, true, true);
    match metadata_string(content, "tokenizer.ggml.pre").as_deref() {
        Some("qwen2" | "smaug-bpe" | "lfm2" | "llama3") => {}
        Some("smollm") => {
            tokenizer.with_pre_tokenizer(Some(Sequence::new(vec![
                Digits::new(true).into(),
                byte_level.into(),
            ])));
        }
        _ => {
            tokenizer.with_pre_tokenizer(Some(byte_level));
        }
    }
    Ok(tokenizer)
}

/// llama.cpp's Llama 3.x RoPE scaling: one divisor per frequency.
const ROPE_FREQS: &str = "rope_freqs.weight";
/// Phi-3's LongRoPE factors.
const ROPE_FACTORS: [&str; 2] = ["rope_factors_short.weight", "rope_factors_long.weight"];
/// The tensors that are RoPE settings, read with the header.
const ROPE_TENSORS: [&str; 3] = [ROPE_FREQS, ROPE_FACTORS[0], ROPE_FACTORS[1]];

/// Reads every tensor the model uses, dequantized to `dtype` (through f32,
/// one tensor at a time) and renamed to Hugging Face names; a GGUF tensor
/// left unread is an error, as in a Hugging Face checkpoint.
fn gguf_weights(
    content: &gguf_file::Content,
    reader: &mut BufReader<File>,
    config: &LlamaConfig,
    device: &Device,
    dtype: DType,
    path: &Path,
) -> Result<HashMap<String, Tensor>, LoadError> {
    let mut names_read = std::collections::BTreeSet::new();
    let mut read = |name: &str| {
        names_read.insert(name.to_string());
        content
            .tensor(reader, name, &Device::Cpu)?
            .dequantize(device)?
            .to_dtype(dtype)
    };
    let mut weights = HashMap::new();
    let mut read_all = || -> candle_core::Result<()> {
        weights.insert(
            "model.embed_tokens.weight".to_string(),
            read("token_embd.weight")?,
        );
        weights.insert("model.norm.weight".to_string(), read("output_norm.weight")?);
        if !config.tie_word_embeddings {
            weights.insert("lm_head.weight".to_string(), read("output.weight")?);
        }
        let family = config.architecture.family;
        // Only the Llama converter interleaves Q/K rows for its RoPE.
        let permuted = family == Family::Llama;
        for i in 0..config.num_hidden_layers {
            for (gguf_name, hf_name) in layer_tensors(family) {
                let unpermute = |tensor: Tensor| match gguf_name {
                    "attn_q" if permuted => {
                        unpermute_from_gguf(&tensor, config.num_attention_heads)
                    }
                    "attn_k" if permuted => {
                        unpermute_from_gguf(&tensor, config.num_key_value_heads)
                    }
                    _ => Ok(tensor),
                };
                let tensor = unpermute(read(&format!("blk.{i}.{gguf_name}.weight"))?)?;
                weights.insert(format!("model.layers.{i}.{hf_name}.weight"), tensor);
                let bias = format!("blk.{i}.{gguf_name}.bias");
                if content.tensor_infos.contains_key(&bias) {
                    // A bias is a one-column matrix to the Q/K permutation.
                    let bias = read(&bias)?;
                    let rows = bias.elem_count();
                    let bias = unpermute(bias.reshape((rows, 1))?)?.reshape(rows)?;
                    weights.insert(format!("model.layers.{i}.{hf_name}.bias"), bias);
                }
            }
        }
        Ok(())
    };
    read_all().map_err(|source| LoadError::Weights {
        path: path.to_path_buf(),
        source,
    })?;
    // Read with the header.
    names_read.extend(ROPE_TENSORS.iter().map(|name| name.to_string()));
    let mut unread: Vec<&String> = content
        .tensor_infos
        .keys()
        .filter(|name| !names_read.contains(*name))
        .collect();
    unread.sort();
    if let Some(tensor) = unread.first() {
        return Err(LoadError::UnusedTensor {
            path: path.to_path_buf(),
            tensor: tensor.to_string(),
            more: unread.len() - 1,
            model_type: config.architecture.family.model_type(),
        });
    }
    Ok(weights)
}

/// Opens a GGUF file and reads its header (metadata and tensor infos, no
/// tensor data): the reader positioned for the data, the content, the config.
fn read_gguf_header(
    path: &Path,
) -> Result<(BufReader<File>, gguf_file::Content, LlamaConfig), LoadError> {
    let file = File::open(path).map_err(|source| io_error(path, source))?;
    let mut reader = BufReader::new(file);
    let content = gguf_file::Content::read(&mut reader).map_err(|source| LoadError::Gguf {
        path: path.to_path_buf(),
        source,
    })?;
    let architecture =
        metadata_string(&content, "general.architecture").ok_or_else(|| LoadError::Metadata {
            path: path.to_path_buf(),
            key: "general.architecture".into(),
            problem: "missing or not a string".into(),
        })?;
    let Some(&(arch, family)) = GGUF_ARCHITECTURES.iter().find(|(a, _)| *a == architecture) else {
        return Err(LoadError::UnsupportedGgufArchitecture {
            path: path.to_path_buf(),
            architecture,
        });
    };
    let mut config = gguf_config(&content, path, arch, family)?;
    let mut read_f32s = |name: &str| {
        content
            .tensor(&mut reader, name, &Device::Cpu)
            .and_then(|t| t.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>())
            .map_err(|source| LoadError::Weights {
                path: path.to_path_buf(),
                source,
            })
    };
    let rope_scaling = if content.tensor_infos.contains_key(ROPE_FREQS) {
        Some(RopeScaling::FrequencyDivisors(read_f32s(ROPE_FREQS)?))
    } else if ROPE_FACTORS
        .iter()
        .all(|name| content.tensor_infos.contains_key(*name))
    {
        let [short_factor, long_factor] =
            [read_f32s(ROPE_FACTORS[0])?, read_f32s(ROPE_FACTORS[1])?]
                .map(|factors| factors.into_iter().map(f64::from).collect());
        Some(RopeScaling::LongRope {
            short_factor,
            long_factor,
            original_max_position_embeddings: metadata_usize(
                &content,
                &format!("{arch}.rope.scaling.original_context_length"),
                path,
            )?,
            attention_factor: metadata_f64(
                &content,
                &format!("{arch}.rope.scaling.attn_factor"),
                path,
            )?,
        })
    } else {
        None
    };
    if let Some(scaling) = rope_scaling {
        if config.architecture.ropes[0].scaling != RopeScaling::None {
            return Err(LoadError::Unsupported {
                path: path.to_path_buf(),
                reason: format!("both {arch}.rope.scaling.type and RoPE tensors scale RoPE"),
            });
        }
        config.architecture.ropes[0].scaling = scaling;
        config = validated(config, path)?;
    }
    Ok((reader, content, config))
}

/// The model config of a GGUF file, from its metadata alone.
pub(super) fn read_gguf_config(path: &Path) -> Result<LlamaConfig, LoadError> {
    read_gguf_header(path).map(|(_, _, config)| config)
}

pub(super) fn load_gguf(
    path: &Path,
    device: &Device,
    dtype: DType,
) -> Result<LoadedModel, LoadError> {
    let (mut reader, content, config) = read_gguf_header(path)?;
    let tokenizer = gguf_tokenizer(&content, path)?;
    check_vocab(&tokenizer, &config, path)?;
    let weights = gguf_weights(&content, &mut reader, &config, device, dtype, path)?;
    let names: Vec<String> = weights.keys().cloned().collect();
    let model = load_every_tensor(Box::new(weights), names, &config, dtype, device, path)?;
    let name = path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    Ok(LoadedModel {
        model,
        tokenizer,
        description: format!("{name} (GGUF, dequantized to {})", dtype_name(dtype)),
    })
}
