//! A model on the Hugging Face hub, fetched into (or found in) the standard cache.

use super::hf_dir::safetensors_shards;
use super::{HfModelFiles, LoadError, SAFETENSORS_FILE, SAFETENSORS_INDEX_FILE};
use crate::model::hub::hub_file;

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
