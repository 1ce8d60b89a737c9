//! Loads a [`Llama`] and its tokenizer from wherever the user keeps it: the
//! Hugging Face hub (through the standard cache), a local Hugging Face
//! directory, or a single GGUF file with its embedded tokenizer.
//!
//! Every path ends in the same f32 model with Hugging Face tensor names, so a
//! KV cache means the same thing whichever file the weights came from: GGUF
//! Q/K rows are un-permuted back from llama.cpp's interleaved-RoPE order.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use candle_core::quantized::tokenizer::TokenizerFromGguf;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::Tokenizer;

use crate::hub::{hub_file, HubError};
use crate::model::{ConfigError, Llama, LlamaConfig};

/// The original validator's model.
pub const DEFAULT_HUB_REPO: &str = "TinyLlama/TinyLlama-1.1B-Chat-v1.0";
const SAFETENSORS_FILE: &str = "model.safetensors";
const SAFETENSORS_INDEX_FILE: &str = "model.safetensors.index.json";

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

/// Where the model comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    Hub { repo: String, revision: String },
    LocalDir(PathBuf),
    Gguf(PathBuf),
}

impl ModelSource {
    /// [`DEFAULT_HUB_REPO`] at `main`.
    pub fn default_hub() -> Self {
        Self::Hub {
            repo: DEFAULT_HUB_REPO.to_string(),
            revision: "main".to_string(),
        }
    }
}

/// A model ready to run, with the tokenizer that goes with it.
pub struct LoadedModel {
    pub model: Llama,
    pub tokenizer: Tokenizer,
    /// What was loaded, for reports: e.g.
    /// `SmolLM2-135M-Instruct.Q4_1.gguf (GGUF, dequantized to f32)`.
    pub description: String,
}

/// The files of a Hugging Face model on local disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HfModelFiles {
    pub config: PathBuf,
    pub tokenizer: PathBuf,
    /// One file, or the shards named by `model.safetensors.index.json`.
    pub weights: Vec<PathBuf>,
}

/// Why a model could not be loaded; each names the file and what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{}: no such file or directory", path.display())]
    MissingFile { path: PathBuf },
    #[error("{}: no weights: neither {SAFETENSORS_FILE} nor {SAFETENSORS_INDEX_FILE}", dir.display())]
    MissingWeights { dir: PathBuf },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: invalid JSON: {source}", path.display())]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{}: invalid model config: {source}", path.display())]
    Config { path: PathBuf, source: ConfigError },
    #[error("{}: unsupported model: {reason}", path.display())]
    Unsupported { path: PathBuf, reason: String },
    #[error(
        "{}: general.architecture is {architecture:?}, not \"llama\"; \
         only Llama-family GGUF models are supported",
        path.display()
    )]
    NotLlama { path: PathBuf, architecture: String },
    #[error("{}: GGUF metadata {key}: {problem}", path.display())]
    Metadata {
        path: PathBuf,
        key: String,
        problem: String,
    },
    #[error("{}: not a readable GGUF file: {source}", path.display())]
    Gguf {
        path: PathBuf,
        source: candle_core::Error,
    },
    #[error("{}: cannot load weights: {source}", path.display())]
    Weights {
        path: PathBuf,
        source: candle_core::Error,
    },
    #[error("{}: cannot load tokenizer: {message}", path.display())]
    Tokenizer { path: PathBuf, message: String },
    #[error(
        "{}: the tokenizer has {tokenizer_vocab} tokens but the model only \
         {model_vocab} embeddings",
        path.display()
    )]
    VocabMismatch {
        path: PathBuf,
        tokenizer_vocab: usize,
        model_vocab: usize,
    },
    #[error(transparent)]
    Hub(#[from] HubError),
}

/// Loads the model and tokenizer from `source` onto `device`, with hf-hub's
/// download progress bars on stderr when `show_progress`.
pub fn load_model(
    source: &ModelSource,
    device: &Device,
    show_progress: bool,
) -> Result<LoadedModel, LoadError> {
    match source {
        ModelSource::Hub { repo, revision } => {
            let files = fetch_hub_model(repo, revision, show_progress)?;
            let description = format!("{repo}@{revision} (Hugging Face hub, f32)");
            load_hf_files(&files, device, description)
        }
        ModelSource::LocalDir(dir) => {
            let files = HfModelFiles::in_dir(dir)?;
            let description = format!("{} (Hugging Face directory, f32)", dir.display());
            load_hf_files(&files, device, description)
        }
        ModelSource::Gguf(path) => load_gguf(path, device),
    }
}

// ---------------------------------------------------------------------------
// Hugging Face config.json

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

fn validated(config: LlamaConfig, path: &Path) -> Result<LlamaConfig, LoadError> {
    config.validate().map_err(|source| LoadError::Config {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(config)
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

fn read_to_string(path: &Path) -> Result<String, LoadError> {
    std::fs::read_to_string(path).map_err(|source| io_error(path, source))
}

fn io_error(path: &Path, source: std::io::Error) -> LoadError {
    if source.kind() == std::io::ErrorKind::NotFound {
        LoadError::MissingFile {
            path: path.to_path_buf(),
        }
    } else {
        LoadError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

// ---------------------------------------------------------------------------
// Hugging Face directory

#[derive(serde::Deserialize)]
struct SafetensorsIndex {
    weight_map: HashMap<String, String>,
}

/// The shard file names an index points at, each once, sorted.
fn safetensors_shards(index_path: &Path) -> Result<Vec<String>, LoadError> {
    let index: SafetensorsIndex =
        serde_json::from_str(&read_to_string(index_path)?).map_err(|source| LoadError::Json {
            path: index_path.to_path_buf(),
            source,
        })?;
    let shards: BTreeSet<String> = index.weight_map.into_values().collect();
    Ok(shards.into_iter().collect())
}

impl HfModelFiles {
    /// Finds the files of a Hugging Face model directory, checking that
    /// each exists.
    pub fn in_dir(dir: &Path) -> Result<Self, LoadError> {
        if !dir.is_dir() {
            return Err(LoadError::MissingFile {
                path: dir.to_path_buf(),
            });
        }
        let existing = |name: &str| {
            let path = dir.join(name);
            if path.is_file() {
                Ok(path)
            } else {
                Err(LoadError::MissingFile { path })
            }
        };
        let weights = if dir.join(SAFETENSORS_FILE).is_file() {
            vec![dir.join(SAFETENSORS_FILE)]
        } else if dir.join(SAFETENSORS_INDEX_FILE).is_file() {
            safetensors_shards(&dir.join(SAFETENSORS_INDEX_FILE))?
                .iter()
                .map(|shard| existing(shard))
                .collect::<Result<_, _>>()?
        } else {
            return Err(LoadError::MissingWeights {
                dir: dir.to_path_buf(),
            });
        };
        Ok(Self {
            config: existing("config.json")?,
            tokenizer: existing("tokenizer.json")?,
            weights,
        })
    }
}

fn check_vocab(tokenizer: &Tokenizer, config: &LlamaConfig, path: &Path) -> Result<(), LoadError> {
    let tokenizer_vocab = tokenizer.get_vocab_size(true);
    if tokenizer_vocab > config.vocab_size {
        return Err(LoadError::VocabMismatch {
            path: path.to_path_buf(),
            tokenizer_vocab,
            model_vocab: config.vocab_size,
        });
    }
    Ok(())
}

fn load_hf_files(
    files: &HfModelFiles,
    device: &Device,
    description: String,
) -> Result<LoadedModel, LoadError> {
    let config = read_hf_config(&files.config)?;
    let tokenizer = Tokenizer::from_file(&files.tokenizer).map_err(|e| LoadError::Tokenizer {
        path: files.tokenizer.clone(),
        message: e.to_string(),
    })?;
    check_vocab(&tokenizer, &config, &files.tokenizer)?;
    let weights_path = files.weights[0].clone();
    let weights_error = |source| LoadError::Weights {
        path: weights_path.clone(),
        source,
    };
    // SAFETY: the files are memory-mapped only while `Llama::load` copies
    // every tensor out (converting to f32); nothing writes them meanwhile.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files.weights, DType::F32, device) }
        .map_err(weights_error)?;
    let model = Llama::load(vb, &config).map_err(weights_error)?;
    Ok(LoadedModel {
        model,
        tokenizer,
        description,
    })
}

// ---------------------------------------------------------------------------
// Hugging Face hub

/// Fetches `config.json`, `tokenizer.json` and the safetensors weights of a
/// hub model into the Hugging Face cache (or, offline, finds them there) and
/// returns their local paths, through [`hub_file`]. Files already cached are
/// not downloaded again.
pub fn fetch_hub_model(
    repo: &str,
    revision: &str,
    show_progress: bool,
) -> Result<HfModelFiles, LoadError> {
    let hub_repo = hf_hub::Repo::with_revision(
        repo.to_string(),
        hf_hub::RepoType::Model,
        revision.to_string(),
    );
    let fetch = |file: &str| hub_file(&hub_repo, file, show_progress);

    let config = fetch("config.json")?;
    let tokenizer = fetch("tokenizer.json")?;
    // Small models ship one file, large ones an index and shards; without a
    // listing of the repo, try the single file first.
    let weights = match fetch(SAFETENSORS_FILE) {
        Ok(path) => vec![path],
        Err(single_file_error) => match fetch(SAFETENSORS_INDEX_FILE) {
            Ok(index) => safetensors_shards(&index)?
                .iter()
                .map(|shard| fetch(shard))
                .collect::<Result<_, _>>()?,
            Err(_) => return Err(single_file_error.into()),
        },
    };
    Ok(HfModelFiles {
        config,
        tokenizer,
        weights,
    })
}

// ---------------------------------------------------------------------------
// GGUF

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

/// The config from `llama.*` metadata, with llama.cpp's defaults.
fn gguf_config(content: &gguf_file::Content, path: &Path) -> Result<LlamaConfig, LoadError> {
    let usize_key = |key: &str| metadata_usize(content, key, path);
    let optional = |key: &str| content.metadata.contains_key(key);
    if let Some(scaling) =
        metadata_string(content, "llama.rope.scaling.type").filter(|s| s != "none")
    {
        return Err(LoadError::Unsupported {
            path: path.to_path_buf(),
            reason: format!(
                "llama.rope.scaling.type is {scaling:?}; only plain RoPE is implemented"
            ),
        });
    }
    let hidden_size = usize_key("llama.embedding_length")?;
    let num_attention_heads = usize_key("llama.attention.head_count")?;
    let head_dim = if optional("llama.rope.dimension_count") {
        usize_key("llama.rope.dimension_count")?
    } else {
        hidden_size / num_attention_heads.max(1)
    };
    let vocab_size = if optional("llama.vocab_size") {
        usize_key("llama.vocab_size")?
    } else {
        let embeddings = content.tensor_infos.get("token_embd.weight");
        embeddings
            .map(|info| info.shape.dims()[0])
            .ok_or_else(|| LoadError::Metadata {
                path: path.to_path_buf(),
                key: "llama.vocab_size".into(),
                problem: "missing, and there is no token_embd.weight to infer it from".into(),
            })?
    };
    let rope_theta = if optional("llama.rope.freq_base") {
        metadata_f64(content, "llama.rope.freq_base", path)?
    } else {
        10_000.0
    };
    let token_id = |key: &str| usize_key(key).ok().map(|id| id as u32);
    let config = LlamaConfig {
        hidden_size,
        intermediate_size: usize_key("llama.feed_forward_length")?,
        num_hidden_layers: usize_key("llama.block_count")?,
        num_attention_heads,
        num_key_value_heads: if optional("llama.attention.head_count_kv") {
            usize_key("llama.attention.head_count_kv")?
        } else {
            num_attention_heads
        },
        head_dim,
        rope_theta,
        rms_norm_eps: metadata_f64(content, "llama.attention.layer_norm_rms_epsilon", path)?,
        vocab_size,
        max_position_embeddings: usize_key("llama.context_length")?,
        tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
        bos_token_id: token_id("tokenizer.ggml.bos_token_id"),
        eos_token_id: token_id("tokenizer.ggml.eos_token_id"),
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

/// Reads every tensor, dequantized to f32 and renamed to Hugging Face names.
fn gguf_weights(
    content: &gguf_file::Content,
    reader: &mut BufReader<File>,
    config: &LlamaConfig,
    device: &Device,
) -> candle_core::Result<HashMap<String, Tensor>> {
    let mut read = |name: &str| {
        content
            .tensor(reader, name, &Device::Cpu)?
            .dequantize(device)
    };
    let mut weights = HashMap::new();
    weights.insert(
        "model.embed_tokens.weight".to_string(),
        read("token_embd.weight")?,
    );
    weights.insert("model.norm.weight".to_string(), read("output_norm.weight")?);
    if !config.tie_word_embeddings {
        weights.insert("lm_head.weight".to_string(), read("output.weight")?);
    }
    for i in 0..config.num_hidden_layers {
        for (gguf_name, hf_name) in GGUF_LAYER_TENSORS {
            let tensor = read(&format!("blk.{i}.{gguf_name}.weight"))?;
            let tensor = match gguf_name {
                "attn_q" => unpermute_from_gguf(&tensor, config.num_attention_heads)?,
                "attn_k" => unpermute_from_gguf(&tensor, config.num_key_value_heads)?,
                _ => tensor,
            };
            weights.insert(format!("model.layers.{i}.{hf_name}.weight"), tensor);
        }
    }
    Ok(weights)
}

fn load_gguf(path: &Path, device: &Device) -> Result<LoadedModel, LoadError> {
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
    if architecture != "llama" {
        return Err(LoadError::NotLlama {
            path: path.to_path_buf(),
            architecture,
        });
    }
    let config = gguf_config(&content, path)?;
    let tokenizer = gguf_tokenizer(&content, path)?;
    check_vocab(&tokenizer, &config, path)?;
    let weights_error = |source| LoadError::Weights {
        path: path.to_path_buf(),
        source,
    };
    let weights = gguf_weights(&content, &mut reader, &config, device).map_err(weights_error)?;
    let vb = VarBuilder::from_tensors(weights, DType::F32, device);
    let model = Llama::load(vb, &config).map_err(weights_error)?;
    let name = path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    Ok(LoadedModel {
        model,
        tokenizer,
        description: format!("{name} (GGUF, dequantized to f32)"),
    })
}
