//! Loading from a Hugging Face directory (single file and sharded) and from
//! GGUF, and the error for each way those files can be wrong: every message
//! names the file and says what is wrong with it.

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::{DType, Device, Tensor};
use kv_validate::model::load::{load_model, LoadError, LoadedModel, ModelSource};
use kv_validate::model::tiny::{TinyLlama, TinyModelFiles};

fn tiny_files(dir: &Path) -> TinyModelFiles {
    TinyLlama::default()
        .write(dir)
        .expect("tiny model files are written")
}

fn try_load(source: ModelSource) -> Result<LoadedModel, LoadError> {
    load_model(&source, &Device::Cpu, DType::F32, false)
}

fn load_error(source: ModelSource) -> LoadError {
    match try_load(source) {
        Ok(_) => panic!("loading should fail"),
        Err(e) => e,
    }
}

fn logits(loaded: &LoadedModel) -> Vec<f32> {
    let input = Tensor::new(&[[3u32, 100, 200, 290]], &Device::Cpu).unwrap();
    let (logits, _) = loaded.model.forward(&input, None).unwrap();
    logits.flatten_all().unwrap().to_vec1().unwrap()
}

/// Edits `config.json` of a Hugging Face directory.
fn edit_config(hf_dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = hf_dir.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(&path, config.to_string()).unwrap();
}

/// The error from loading the tiny Hugging Face directory after `edit`
/// changed its `config.json`; the directory lives as long as the `TempDir`.
fn error_with_config(
    edit: impl FnOnce(&mut serde_json::Value),
) -> (LoadError, PathBuf, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let files = tiny_files(dir.path());
    edit_config(&files.hf_dir, edit);
    (
        load_error(ModelSource::LocalDir(files.hf_dir.clone())),
        files.hf_dir,
        dir,
    )
}

#[test]
fn a_sharded_directory_loads_the_same_model() {
    let dir = tempfile::tempdir().unwrap();
    let files = tiny_files(dir.path());
    let single = try_load(ModelSource::LocalDir(files.hf_dir.clone())).unwrap();
    assert_eq!(
        single.description,
        format!("{} (Hugging Face directory, f32)", files.hf_dir.display())
    );

    // Split the weights into two shards with an index, as large models ship.
    let weights =
        candle_core::safetensors::load(files.hf_dir.join("model.safetensors"), &Device::Cpu)
            .unwrap();
    std::fs::remove_file(files.hf_dir.join("model.safetensors")).unwrap();
    let mut shards = [
        std::collections::HashMap::new(),
        std::collections::HashMap::new(),
    ];
    let mut weight_map = serde_json::Map::new();
    for (name, tensor) in weights {
        let shard = usize::from(name.contains("layers.1") || name.contains("layers.2"));
        let file = format!("model-0000{}-of-00002.safetensors", shard + 1);
        weight_map.insert(name.clone(), file.into());
        shards[shard].insert(name, tensor);
    }
    for (i, shard) in shards.iter().enumerate() {
        let path = files
            .hf_dir
            .join(format!("model-0000{}-of-00002.safetensors", i + 1));
        candle_core::safetensors::save(shard, path).unwrap();
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
    std::fs::write(
        files.hf_dir.join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let sharded = try_load(ModelSource::LocalDir(files.hf_dir.clone())).unwrap();
    assert_eq!(logits(&sharded), logits(&single));

    let missing_shard = files.hf_dir.join("model-00002-of-00002.safetensors");
    std::fs::remove_file(&missing_shard).unwrap();
    let err = load_error(ModelSource::LocalDir(files.hf_dir));
    assert!(
        matches!(&err, LoadError::MissingFile { path } if *path == missing_shard),
        "{err}"
    );
}

#[test]
fn missing_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let files = tiny_files(dir.path());

    let nowhere = dir.path().join("nowhere");
    let err = load_error(ModelSource::LocalDir(nowhere.clone()));
    assert_eq!(
        err.to_string(),
        format!("{}: no such file or directory", nowhere.display())
    );
    let err = load_error(ModelSource::Gguf(nowhere.join("model.gguf")));
    assert_eq!(
        err.to_string(),
        format!(
            "{}: no such file or directory",
            nowhere.join("model.gguf").display()
        )
    );

    std::fs::remove_file(files.hf_dir.join("tokenizer.json")).unwrap();
    let err = load_error(ModelSource::LocalDir(files.hf_dir.clone()));
    assert_eq!(
        err.to_string(),
        format!(
            "{}: no such file or directory",
            files.hf_dir.join("tokenizer.json").display()
        )
    );

    std::fs::remove_file(files.hf_dir.join("model.safetensors")).unwrap();
    let err = load_error(ModelSource::LocalDir(files.hf_dir.clone()));
    assert_eq!(
        err.to_string(),
        format!(
            "{}: no weights: neither model.safetensors nor model.safetensors.index.json",
            files.hf_dir.display()
        )
    );
}

#[test]
fn config_with_mismatched_head_counts_is_rejected() {
    let (err, hf_dir, _dir) = error_with_config(|config| config["num_key_value_heads"] = 3.into());
    assert!(matches!(err, LoadError::Config { .. }));
    assert_eq!(
        err.to_string(),
        format!(
            "{}: invalid model config: num_attention_heads (4) is not a multiple of num_key_value_heads (3)",
            hf_dir.join("config.json").display()
        )
    );
}

#[test]
fn config_features_we_do_not_implement_are_rejected_not_ignored() {
    let cases: [(&str, serde_json::Value, &str); 6] = [
        (
            "rope_scaling",
            serde_json::json!({"rope_type": "mrope", "factor": 8.0}),
            "rope_scaling.rope_type is \"mrope\"; implemented: default, linear, dynamic, llama3, yarn, longrope (su)",
        ),
        (
            "rope_scaling",
            serde_json::json!({"rope_type": "linear", "factor": 8.0, "mrope_section": [2, 2]}),
            "rope_scaling.mrope_section is set",
        ),
        (
            "model_type",
            "mixtral".into(),
            "model_type is \"mixtral\": mixture-of-experts MLPs are not implemented \
             (supported: llama, mistral, qwen2, qwen3, gemma2, gemma3_text, phi3)",
        ),
        (
            "layer_types",
            serde_json::json!(["full_attention", "linear_attention", "full_attention"]),
            "layer_types[1] is \"linear_attention\"; only full_attention and sliding_attention",
        ),
        (
            "partial_rotary_factor",
            0.5.into(),
            "partial_rotary_factor is 0.5; only RoPE over the whole head is implemented",
        ),
        (
            "rope_parameters",
            serde_json::json!({"rope_type": "default", "rope_theta": 10000.0}),
            "both rope_parameters and rope_scaling are set",
        ),
    ];
    for (key, value, expected) in cases {
        let (err, _, _dir) = error_with_config(|config| {
            config[key] = value;
            if key == "rope_parameters" {
                config["rope_scaling"] = serde_json::json!({"rope_type": "linear", "factor": 2.0});
            }
        });
        assert!(matches!(err, LoadError::Unsupported { .. }), "{key}: {err}");
        assert!(err.to_string().contains(expected), "{key}: {err}");
    }
    // A scaling that lacks a parameter it needs names it.
    let (err, hf_dir, _dir) = error_with_config(|config| {
        config["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0})
    });
    assert_eq!(
        err.to_string(),
        format!(
            "{}: rope_scaling.low_freq_factor: missing",
            hf_dir.join("config.json").display()
        )
    );
}

#[test]
fn a_checkpoint_tensor_the_config_leaves_unused_is_an_error() {
    // The tiny model has an untied head; a config that ties it would run
    // without lm_head.weight.
    let (err, hf_dir, _dir) =
        error_with_config(|config| config["tie_word_embeddings"] = true.into());
    assert!(matches!(err, LoadError::UnusedTensor { .. }), "{err}");
    assert_eq!(
        err.to_string(),
        format!(
            "{}: the checkpoint's tensor lm_head.weight is not used by a llama model as its \
             config describes it; refusing to run other math than the checkpoint's",
            hf_dir.join("model.safetensors").display()
        )
    );
}

#[test]
fn config_that_disagrees_with_the_weights_names_the_tensor() {
    let (err, hf_dir, _dir) = error_with_config(|config| config["intermediate_size"] = 100.into());
    assert!(matches!(err, LoadError::Weights { .. }), "{err}");
    let message = err.to_string();
    assert!(
        message.starts_with(&format!(
            "{}: cannot load weights",
            hf_dir.join("model.safetensors").display()
        )),
        "{message}"
    );
    assert!(
        message.contains("model.layers.0.mlp.gate_proj.weight"),
        "{message}"
    );

    std::fs::write(hf_dir.join("config.json"), "{\"hidden_size\": 64").unwrap();
    let err = load_error(ModelSource::LocalDir(hf_dir.clone()));
    assert!(matches!(err, LoadError::Json { .. }), "{err}");
}

/// Rewrites a GGUF's metadata (no tensors: loading fails before reading any).
fn gguf_with_metadata(
    path: &Path,
    out: &Path,
    edit: impl FnOnce(&mut Vec<(String, Value)>),
) -> PathBuf {
    let mut file = std::fs::File::open(path).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let mut metadata: Vec<(String, Value)> = content.metadata.into_iter().collect();
    edit(&mut metadata);
    let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut out_file = std::fs::File::create(out).unwrap();
    gguf_file::write(&mut out_file, &metadata, &[]).unwrap();
    out.to_path_buf()
}

#[test]
fn a_gguf_of_an_architecture_not_implemented_is_rejected_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let files = tiny_files(dir.path());
    let mamba = gguf_with_metadata(&files.gguf, &dir.path().join("mamba.gguf"), |metadata| {
        for (key, value) in metadata.iter_mut() {
            if key == "general.architecture" {
                *value = Value::String("mamba".into());
            }
        }
    });
    let err = load_error(ModelSource::Gguf(mamba.clone()));
    assert!(
        matches!(&err, LoadError::UnsupportedGgufArchitecture { architecture, .. } if architecture == "mamba")
    );
    assert_eq!(
        err.to_string(),
        format!(
            "{}: general.architecture is \"mamba\"; the GGUF architectures implemented \
             are llama, qwen2, qwen3, gemma2, gemma3 and phi3",
            mamba.display()
        )
    );
}

#[test]
fn a_gguf_without_required_metadata_or_a_gguf_header_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let files = tiny_files(dir.path());
    let no_blocks = gguf_with_metadata(
        &files.gguf,
        &dir.path().join("no-blocks.gguf"),
        |metadata| metadata.retain(|(key, _)| key != "llama.block_count"),
    );
    let err = load_error(ModelSource::Gguf(no_blocks.clone()));
    assert_eq!(
        err.to_string(),
        format!(
            "{}: GGUF metadata llama.block_count: missing",
            no_blocks.display()
        )
    );

    let text = dir.path().join("notes.gguf");
    std::fs::write(&text, "these are notes, not a model").unwrap();
    let err = load_error(ModelSource::Gguf(text.clone()));
    assert!(matches!(err, LoadError::Gguf { .. }), "{err}");
    assert!(
        err.to_string()
            .starts_with(&format!("{}: not a readable GGUF file", text.display())),
        "{err}"
    );
}

#[test]
fn a_tokenizer_larger_than_the_embedding_is_rejected() {
    let (err, hf_dir, _dir) = error_with_config(|config| config["vocab_size"] = 100.into());
    assert_eq!(
        err.to_string(),
        format!(
            "{}: the tokenizer has 291 tokens but the model only 100 embeddings",
            hf_dir.join("tokenizer.json").display()
        )
    );
}
