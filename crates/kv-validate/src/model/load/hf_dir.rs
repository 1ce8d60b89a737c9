//! A local Hugging Face model directory: config, tokenizer, one safetensors file or shards.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device};
use tokenizers::Tokenizer;

use super::used_tensors::load_every_tensor;
use super::{check_vocab, read_hf_config, read_to_string, HfModelFiles, LoadError, LoadedModel};
use super::{SAFETENSORS_FILE, SAFETENSORS_INDEX_FILE};

#[derive(serde::Deserialize)]
struct SafetensorsIndex {
    weight_map: HashMap<String, String>,
}

/// The shard file names an index points at, each once, sorted.
pub(super) fn safetensors_shards(index_path: &Path) -> Result<Vec<String>, LoadError> {
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

pub(super) fn load_hf_files(
    files: &HfModelFiles,
    device: &Device,
    dtype: DType,
    description: String,
) -> Result<LoadedModel, LoadError> {
    let config = read_hf_config(&files.config)?;
    let tokenizer = Tokenizer::from_file(&files.tokenizer).map_err(|e| LoadError::Tokenizer {
        path: files.tokenizer.clone(),
        message: e.to_string(),
    })?;
    check_vocab(&tokenizer, &config, &files.tokenizer)?;
    let weights_path = files.weights[0].clone();
    // SAFETY: the files are memory-mapped only while `Llama::load` copies
    // every tensor out; nothing writes them meanwhile. Each tensor goes from
    // the map to `device` in its stored dtype and is converted there, so no
    // f32 copy of the weights is made in host memory.
    let tensors = unsafe { MmapedSafetensors::multi(&files.weights) }.map_err(|source| {
        LoadError::Weights {
            path: weights_path.clone(),
            source,
        }
    })?;
    let names: Vec<String> = tensors
        .tensors()
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    let model = load_every_tensor(
        Box::new(tensors),
        names,
        &config,
        dtype,
        device,
        &weights_path,
    )?;
    Ok(LoadedModel {
        model,
        tokenizer,
        description,
    })
}
