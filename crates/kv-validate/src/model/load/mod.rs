//! Loads a [`Llama`] and its tokenizer from wherever the user keeps it: the
//! Hugging Face hub (through the standard cache), a local Hugging Face
//! directory, or a single GGUF file with its embedded tokenizer.
//!
//! Every path ends in the same model, in the dtype asked for, with Hugging
//! Face tensor names, so a
//! KV cache means the same thing whichever file the weights came from: GGUF
//! Q/K rows are un-permuted back from llama.cpp's interleaved-RoPE order.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use tokenizers::Tokenizer;

use super::device::dtype_name;
use super::hub::HubError;
use super::llama::{ConfigError, Llama, LlamaConfig};

mod gguf;
mod hf_config;
mod hf_dir;
mod hf_hub;
mod used_tensors;

pub(crate) use gguf::GGUF_LAYER_TENSORS;
use gguf::{load_gguf, read_gguf_config};
pub use hf_config::read_hf_config;
use hf_dir::load_hf_files;
pub use hf_hub::fetch_hub_model;

/// The original validator's model.
pub const DEFAULT_HUB_REPO: &str = "TinyLlama/TinyLlama-1.1B-Chat-v1.0";
const SAFETENSORS_FILE: &str = "model.safetensors";
const SAFETENSORS_INDEX_FILE: &str = "model.safetensors.index.json";

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
    /// `SmolLM2-135M-Instruct.Q4_1.gguf (GGUF, dequantized to bf16)`.
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
    #[error("{}: {field}: {problem}", path.display())]
    ConfigField {
        path: PathBuf,
        field: String,
        problem: String,
    },
    #[error(
        "{}: {field} = {value} is implausible: more than {} decoder layers",
        path.display(),
        crate::model::architecture::MAX_LAYERS
    )]
    ImplausibleLayerCount {
        path: PathBuf,
        field: &'static str,
        value: usize,
    },
    #[error("{}: unsupported model: {reason}", path.display())]
    Unsupported { path: PathBuf, reason: String },
    #[error(
        "{}: general.architecture is {architecture:?}; the GGUF architectures implemented \
         are llama, qwen2, qwen3, gemma2, gemma3 and phi3",
        path.display()
    )]
    UnsupportedGgufArchitecture { path: PathBuf, architecture: String },
    #[error(
        "{}: the checkpoint's tensor {tensor} {} not used by a {model_type} model as its \
         config describes it; refusing to run other math than the checkpoint's",
        path.display(),
        if *more > 0 { format!("(and {more} more) are") } else { "is".to_string() }
    )]
    UnusedTensor {
        path: PathBuf,
        tensor: String,
        more: usize,
        model_type: &'static str,
    },
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

/// Loads the model and tokenizer from `source` onto `device` in `dtype`,
/// with hf-hub's download progress bars on stderr when `show_progress`.
pub fn load_model(
    source: &ModelSource,
    device: &Device,
    dtype: DType,
    show_progress: bool,
) -> Result<LoadedModel, LoadError> {
    let dtype_name = dtype_name(dtype);
    match source {
        ModelSource::Hub { repo, revision } => {
            let files = fetch_hub_model(repo, revision, show_progress)?;
            let description = format!("{repo}@{revision} (Hugging Face hub, {dtype_name})");
            load_hf_files(&files, device, dtype, description)
        }
        ModelSource::LocalDir(dir) => {
            let files = HfModelFiles::in_dir(dir)?;
            let description = format!("{} (Hugging Face directory, {dtype_name})", dir.display());
            load_hf_files(&files, device, dtype, description)
        }
        ModelSource::Gguf(path) => load_gguf(path, device, dtype),
    }
}

/// The model's config alone, from wherever `source` keeps it: `config.json`
/// (fetched alone from the hub, or in the directory) or the GGUF's metadata;
/// no weights are read. Returns the config and the file it came from.
pub fn read_model_config(source: &ModelSource) -> Result<(LlamaConfig, PathBuf), LoadError> {
    let config_path = match source {
        ModelSource::Hub { repo, revision } => {
            let hub_repo = ::hf_hub::Repo::with_revision(
                repo.clone(),
                ::hf_hub::RepoType::Model,
                revision.clone(),
            );
            super::hub::hub_file(&hub_repo, "config.json", false)?
        }
        ModelSource::LocalDir(dir) => dir.join("config.json"),
        ModelSource::Gguf(path) => return Ok((read_gguf_config(path)?, path.clone())),
    };
    Ok((read_hf_config(&config_path)?, config_path))
}

fn validated(config: LlamaConfig, path: &Path) -> Result<LlamaConfig, LoadError> {
    config.validate().map_err(|source| LoadError::Config {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(config)
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

/// `value` of `field` as a layer count, unless it is beyond [`crate::model::architecture::MAX_LAYERS`].
fn layer_count(path: &Path, field: &'static str, value: usize) -> Result<usize, LoadError> {
    if value > crate::model::architecture::MAX_LAYERS {
        return Err(LoadError::ImplausibleLayerCount {
            path: path.to_path_buf(),
            field,
            value,
        });
    }
    Ok(value)
}
