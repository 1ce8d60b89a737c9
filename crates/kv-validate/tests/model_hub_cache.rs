//! The hub source with `HF_HUB_OFFLINE` set: models come from the standard
//! Hugging Face cache layout (`models--org--name/refs/main` naming a
//! snapshot) under `HF_HUB_CACHE`, and a model that is not there is a clear
//! error rather than a network attempt.
//!
//! One test function, because it sets process-wide environment variables.

use std::path::Path;

use candle_core::{DType, Device};
use kv_validate::model::hub::HubError;
use kv_validate::model::load::{fetch_hub_model, load_model, LoadError, ModelSource};
use kv_validate::model::tiny::TinyLlama;

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// Lays out `hf_dir` as hf-hub / huggingface_hub cache it: blobs, a
/// snapshot of symlinks, and a ref naming the snapshot.
fn cache_model(cache: &Path, repo_folder: &str, hf_dir: &Path) {
    let repo = cache.join(repo_folder);
    let snapshot = repo.join("snapshots").join(COMMIT);
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    for name in ["config.json", "tokenizer.json", "model.safetensors"] {
        let blob = repo.join("blobs").join(format!("blob-of-{name}"));
        std::fs::copy(hf_dir.join(name), &blob).unwrap();
        std::os::unix::fs::symlink(&blob, snapshot.join(name)).unwrap();
    }
    std::fs::write(repo.join("refs").join("main"), COMMIT).unwrap();
}

#[test]
fn offline_hub_loads_from_the_cache_and_names_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let files = TinyLlama::default()
        .write(&dir.path().join("tiny"))
        .unwrap();
    let cache = dir.path().join("hub-cache");
    cache_model(&cache, "models--tiny-org--tiny-llama", &files.hf_dir);
    std::env::set_var("HF_HUB_CACHE", &cache);
    std::env::set_var("HF_HUB_OFFLINE", "1");
    // Would fail the test if anything tried the network.
    std::env::set_var("HF_ENDPOINT", "http://127.0.0.1:9");

    let fetched = fetch_hub_model("tiny-org/tiny-llama", "main", false).unwrap();
    let snapshot = cache
        .join("models--tiny-org--tiny-llama/snapshots")
        .join(COMMIT);
    assert_eq!(fetched.config, snapshot.join("config.json"));
    assert_eq!(fetched.tokenizer, snapshot.join("tokenizer.json"));
    assert_eq!(fetched.weights, vec![snapshot.join("model.safetensors")]);

    let source = ModelSource::Hub {
        repo: "tiny-org/tiny-llama".into(),
        revision: "main".into(),
    };
    let loaded = load_model(&source, &Device::Cpu, DType::F32, false).unwrap();
    assert_eq!(
        loaded.description,
        "tiny-org/tiny-llama@main (Hugging Face hub, f32)"
    );
    assert_eq!(loaded.model.config(), &TinyLlama::default().config);

    let err = match fetch_hub_model("tiny-org/absent", "main", false) {
        Ok(files) => panic!("absent model found: {files:?}"),
        Err(err) => err,
    };
    assert!(
        matches!(err, LoadError::Hub(HubError::NotCached { .. })),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        format!(
            "config.json of tiny-org/absent@main is not in the Hugging Face cache at {} \
             and HF_HUB_OFFLINE is set (unset it to download, or use local files instead: \
             --model-dir DIR or --gguf FILE for the model, --text-file FILE for the text)",
            cache.display()
        )
    );

    // Online, the same cached files are used without asking the endpoint
    // (which is unreachable here); a file not cached is a fetch error naming it.
    std::env::set_var("HF_HUB_OFFLINE", "0");
    assert_eq!(
        fetch_hub_model("tiny-org/tiny-llama", "main", false).unwrap(),
        fetched
    );
    let err = fetch_hub_model("tiny-org/absent", "main", false).unwrap_err();
    assert!(
        matches!(err, LoadError::Hub(HubError::Download { .. })),
        "{err}"
    );
    assert!(
        err.to_string().starts_with(
            "cannot fetch config.json of tiny-org/absent@main from http://127.0.0.1:9: "
        ),
        "{err}"
    );
}
