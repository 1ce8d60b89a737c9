//! What a run measured, by content rather than by name: SHA-256 and size of
//! the model's files, of its config, of the text and of the token ids the
//! tokenizer made of it. Records and reports carry them, so `merge`,
//! `allocate --records` and `capacity --sweep-json` can refuse inputs that
//! came from different models, texts or tokenizers even when paths, names
//! and token counts agree (two files called `wiki.txt` on two machines).
//!
//! SHA-256 (the `sha2` crate of RustCrypto, already in the lock file through
//! xtask's pinned downloads) rather than a fast non-cryptographic hash: a
//! records file travels between machines, and a digest that cannot collide
//! by accident or on purpose is what "the same bytes" needs. It costs about
//! 0.15 s for SmolLM2's 98 MB GGUF (a shared 2-core AMD EPYC), small beside
//! loading the model.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::model::load::{fetch_hub_model, HfModelFiles, LoadError, ModelSource};

/// Bytes of content: their SHA-256 (lowercase hex) and their count.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContentId {
    pub sha256: String,
    pub bytes: u64,
}

impl ContentId {
    pub fn of_bytes(bytes: &[u8]) -> Self {
        ContentId {
            sha256: hex(&Sha256::digest(bytes)),
            bytes: bytes.len() as u64,
        }
    }

    /// The digest of `paths`' contents, one after the other, read in chunks.
    pub fn of_files(paths: &[PathBuf]) -> Result<Self, IdentityError> {
        let mut hasher = Sha256::new();
        let mut total = 0u64;
        let mut buffer = vec![0u8; 1 << 20];
        for path in paths {
            let error = |source| IdentityError {
                path: path.clone(),
                source,
            };
            let mut file = std::fs::File::open(path).map_err(error)?;
            loop {
                let read = match file.read(&mut buffer) {
                    Ok(0) => break,
                    Ok(read) => read,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(error(e)),
                };
                hasher.update(&buffer[..read]);
                total += read as u64;
            }
        }
        Ok(ContentId {
            sha256: hex(&hasher.finalize()),
            bytes: total,
        })
    }

    /// The digest of token ids, each as 4 little-endian bytes.
    pub fn of_tokens(tokens: &[u32]) -> Self {
        let bytes: Vec<u8> = tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
        Self::of_bytes(&bytes)
    }
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// A file that could not be read for its digest.
#[derive(Debug, thiserror::Error)]
#[error("{}: cannot read it for its digest: {source}", path.display())]
pub struct IdentityError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

/// The content of what a run measured. Two records or reports with any of
/// these different did not measure the same thing.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContentIds {
    /// Every file the model was loaded from: config, tokenizer and weights
    /// of a Hugging Face model (in that order), or the GGUF file.
    pub model_content: ContentId,
    /// The file the model's shape came from (`config.json`, or the GGUF
    /// file): what `capacity` reads, and checks a sweep against.
    pub config_content: ContentId,
    /// The text scored, as read (WikiText-2: its rows joined).
    pub text_content: ContentId,
    /// The token ids the tokenizer made of the text: the tokenizer's identity.
    pub tokens_content: ContentId,
}

impl ContentIds {
    /// Digests the model's files (for the hub, those in its cache after
    /// loading), the text and its tokens.
    pub fn of_run(source: &ModelSource, text: &str, tokens: &[u32]) -> anyhow::Result<Self> {
        let (config, all) = model_files(source)?;
        Ok(ContentIds {
            model_content: ContentId::of_files(&all)?,
            config_content: ContentId::of_files(&[config])?,
            text_content: ContentId::of_bytes(text.as_bytes()),
            tokens_content: ContentId::of_tokens(tokens),
        })
    }
}

/// The file a model's config comes from, and every file it is loaded from.
fn model_files(source: &ModelSource) -> Result<(PathBuf, Vec<PathBuf>), LoadError> {
    let files = match source {
        ModelSource::Gguf(path) => return Ok((path.clone(), vec![path.clone()])),
        ModelSource::LocalDir(dir) => HfModelFiles::in_dir(dir)?,
        ModelSource::Hub { repo, revision } => fetch_hub_model(repo, revision, false)?,
    };
    let mut all = vec![files.config.clone(), files.tokenizer.clone()];
    all.extend(files.weights.iter().cloned());
    Ok((files.config, all))
}

/// The files of `source` a run reads, for the rule that no output may be one
/// of them: the GGUF file, or every file directly in the model directory
/// (whatever the loader of a family reads there). The hub's cache is left
/// to the hub.
pub fn model_inputs(source: &ModelSource) -> Vec<PathBuf> {
    match source {
        ModelSource::Gguf(path) => vec![path.clone()],
        ModelSource::LocalDir(dir) => files_in(dir),
        ModelSource::Hub { .. } => Vec::new(),
    }
}

fn files_in(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| path.is_file())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_match_sha256_of_known_strings() {
        // FIPS 180-2 test vector "abc".
        assert_eq!(
            ContentId::of_bytes(b"abc").sha256,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        // Files are read one after the other, as one stream of bytes.
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, b"a").unwrap();
        std::fs::write(&b, b"bc").unwrap();
        assert_eq!(
            ContentId::of_files(&[a, b]).unwrap(),
            ContentId::of_bytes(b"abc")
        );
        assert_eq!(ContentId::of_tokens(&[1, 2]).bytes, 8);
        assert_ne!(ContentId::of_tokens(&[1, 2]), ContentId::of_tokens(&[2, 1]));
    }
}
