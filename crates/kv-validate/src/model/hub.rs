//! The one way this crate reaches the Hugging Face hub, for model files and
//! datasets alike, so both honour the standard environment the same way the
//! Python tools do: `HF_HUB_CACHE` (else `HF_HOME/hub`, else
//! `~/.cache/huggingface/hub`), `HF_ENDPOINT`, `HF_TOKEN` and
//! `HF_HUB_OFFLINE`. hf-hub 0.4 reads only `HF_HOME` itself, so the rest is
//! resolved here and handed to it.

use std::path::{Path, PathBuf};

use hf_hub::api::sync::{ApiBuilder, ApiError};
use hf_hub::{Cache, Repo};

/// The hub itself, when `HF_ENDPOINT` names no mirror.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// What a user can do instead of reaching the hub, for every error's advice.
const LOCAL_INSTEAD: &str =
    "use local files instead: --model-dir DIR or --gguf FILE for the model, --text-file FILE for the text";

/// Why a hub file could not be had; each names what was asked for and where,
/// and says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error(
        "no Hugging Face cache directory: HF_HUB_CACHE, HF_HOME and HOME are all unset; \
         set HF_HUB_CACHE or HF_HOME, or {LOCAL_INSTEAD}"
    )]
    NoCacheDir,
    /// `repo` is `repo@revision` (datasets prefixed `datasets/`, as in hub
    /// URLs). `cause` is shown, not chained as a source: the advice must
    /// come last, and a chain would repeat hf-hub's message.
    #[error(
        "cannot fetch {file} of {repo} from {endpoint}: {cause} \
         (set HF_ENDPOINT for a mirror, or {LOCAL_INSTEAD})"
    )]
    Download {
        repo: String,
        file: String,
        endpoint: String,
        cause: Box<ApiError>,
    },
    #[error(
        "{file} of {repo} is not in the Hugging Face cache at {} and HF_HUB_OFFLINE is set \
         (unset it to download, or {LOCAL_INSTEAD})",
        cache.display()
    )]
    NotCached {
        repo: String,
        file: String,
        cache: PathBuf,
    },
}

/// How the standard Hugging Face environment variables say to reach the hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubSettings {
    pub cache_dir: PathBuf,
    pub endpoint: String,
    /// Cache only: never a network request.
    pub offline: bool,
    /// `HF_TOKEN`; when unset hf-hub falls back to the token file that
    /// `huggingface-cli login` leaves beside the cache.
    pub token: Option<String>,
}

impl HubSettings {
    /// The settings from this process's environment.
    pub fn from_env() -> Result<Self, HubError> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// The settings that `var` (an environment lookup) gives; an empty value
    /// counts as unset, as in huggingface_hub.
    fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self, HubError> {
        let var = |name: &str| var(name).filter(|value| !value.is_empty());
        let cache_dir = match (var("HF_HUB_CACHE"), var("HF_HOME"), var("HOME")) {
            (Some(cache), _, _) => PathBuf::from(cache),
            (None, Some(hf_home), _) => Path::new(&hf_home).join("hub"),
            (None, None, Some(home)) => Path::new(&home).join(".cache/huggingface/hub"),
            (None, None, None) => return Err(HubError::NoCacheDir),
        };
        Ok(Self {
            cache_dir,
            endpoint: var("HF_ENDPOINT").unwrap_or_else(|| DEFAULT_ENDPOINT.to_string()),
            offline: var("HF_HUB_OFFLINE").is_some_and(|value| is_true(&value)),
            token: var("HF_TOKEN"),
        })
    }

    /// Local path of `file` in `repo`: from the cache when it is there,
    /// else (unless offline) downloaded into it, with hf-hub's progress bar
    /// on stderr when `show_progress`.
    pub fn file(&self, repo: &Repo, file: &str, show_progress: bool) -> Result<PathBuf, HubError> {
        let cache = Cache::new(self.cache_dir.clone());
        if self.offline {
            return cache
                .repo(repo.clone())
                .get(file)
                .ok_or_else(|| HubError::NotCached {
                    repo: repo_name(repo),
                    file: file.to_string(),
                    cache: self.cache_dir.clone(),
                });
        }
        let download_error = |cause: ApiError| HubError::Download {
            repo: repo_name(repo),
            file: file.to_string(),
            endpoint: self.endpoint.clone(),
            cause: Box::new(cause),
        };
        let mut builder = ApiBuilder::from_cache(cache)
            .with_endpoint(self.endpoint.clone())
            .with_progress(show_progress);
        // Passing None would drop the token hf-hub read from the login file.
        if let Some(token) = &self.token {
            builder = builder.with_token(Some(token.clone()));
        }
        let api = builder.build().map_err(download_error)?;
        api.repo(repo.clone()).get(file).map_err(download_error)
    }
}

/// huggingface_hub's true values for a boolean variable, in any case.
fn is_true(value: &str) -> bool {
    matches!(
        value.trim().to_ascii_lowercase().as_str(),
        "1" | "true" | "yes" | "on"
    )
}

/// True when `HF_HUB_OFFLINE` asks for cache-only hub access.
pub fn hub_offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|value| is_true(&value))
}

/// `repo@revision`, datasets and spaces prefixed as in hub URLs.
fn repo_name(repo: &Repo) -> String {
    format!("{}@{}", repo.url(), repo.revision())
}

/// Local path of `file` in a hub repository, with the settings of this
/// process's environment (see [`HubSettings::file`]).
pub fn hub_file(repo: &Repo, file: &str, show_progress: bool) -> Result<PathBuf, HubError> {
    HubSettings::from_env()?.file(repo, file, show_progress)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hf_hub::RepoType;

    const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

    fn settings(vars: &[(&str, &str)]) -> Result<HubSettings, HubError> {
        HubSettings::from_vars(|name| {
            vars.iter()
                .find(|(key, _)| *key == name)
                .map(|(_, value)| value.to_string())
        })
    }

    #[test]
    fn cache_dir_follows_huggingface_hubs_order() {
        let all = [("HF_HUB_CACHE", "/c"), ("HF_HOME", "/h"), ("HOME", "/u")];
        assert_eq!(settings(&all).unwrap().cache_dir, Path::new("/c"));
        assert_eq!(settings(&all[1..]).unwrap().cache_dir, Path::new("/h/hub"));
        assert_eq!(
            settings(&all[2..]).unwrap().cache_dir,
            Path::new("/u/.cache/huggingface/hub")
        );
        let empty_cache = [("HF_HUB_CACHE", ""), ("HF_HOME", "/h")];
        assert_eq!(
            settings(&empty_cache).unwrap().cache_dir,
            Path::new("/h/hub")
        );
        let error = settings(&[("HF_ENDPOINT", "http://mirror")]).unwrap_err();
        assert!(matches!(error, HubError::NoCacheDir), "{error}");
        assert!(
            error.to_string().contains("set HF_HUB_CACHE or HF_HOME"),
            "{error}"
        );
    }

    #[test]
    fn endpoint_token_and_offline_come_from_their_variables() {
        let defaults = settings(&[("HOME", "/u")]).unwrap();
        assert_eq!(defaults.endpoint, "https://huggingface.co");
        assert_eq!(defaults.token, None);
        assert!(!defaults.offline);
        let set = settings(&[
            ("HOME", "/u"),
            ("HF_ENDPOINT", "http://mirror:8080"),
            ("HF_TOKEN", "hf_secret"),
            ("HF_HUB_OFFLINE", "1"),
        ])
        .unwrap();
        assert_eq!(set.endpoint, "http://mirror:8080");
        assert_eq!(set.token.as_deref(), Some("hf_secret"));
        assert!(set.offline);
        for (value, offline) in [
            ("1", true),
            ("TRUE", true),
            (" yes ", true),
            ("On", true),
            ("0", false),
            ("false", false),
            ("off", false),
            ("", false),
        ] {
            let settings = settings(&[("HOME", "/u"), ("HF_HUB_OFFLINE", value)]).unwrap();
            assert_eq!(settings.offline, offline, "HF_HUB_OFFLINE={value:?}");
        }
    }

    /// `file` of a repo in hf-hub's cache layout: a snapshot named by `refs/main`.
    fn cache_with(cache: &Path, folder: &str, file: &str) -> PathBuf {
        let snapshot = cache.join(folder).join("snapshots").join(COMMIT);
        let path = snapshot.join(file);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, b"rows").unwrap();
        std::fs::create_dir_all(cache.join(folder).join("refs")).unwrap();
        std::fs::write(cache.join(folder).join("refs/main"), COMMIT).unwrap();
        path
    }

    /// Settings whose endpoint nothing listens on (port 9): any request fails.
    fn unreachable_hub(cache_dir: &Path, offline: bool) -> HubSettings {
        HubSettings {
            cache_dir: cache_dir.to_path_buf(),
            endpoint: "http://127.0.0.1:9".into(),
            offline,
            token: None,
        }
    }

    #[test]
    fn offline_uses_the_cache_only_and_names_what_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        let cached = cache_with(dir.path(), "datasets--org--text", "split/test.parquet");
        let offline = unreachable_hub(dir.path(), true);
        let dataset = Repo::new("org/text".into(), RepoType::Dataset);
        assert_eq!(
            offline.file(&dataset, "split/test.parquet", false).unwrap(),
            cached
        );

        let error = offline
            .file(&dataset, "split/train.parquet", false)
            .unwrap_err();
        assert!(matches!(error, HubError::NotCached { .. }), "{error}");
        assert_eq!(
            error.to_string(),
            format!(
                "split/train.parquet of datasets/org/text@main is not in the Hugging Face cache \
                 at {} and HF_HUB_OFFLINE is set (unset it to download, or {LOCAL_INSTEAD})",
                dir.path().display()
            )
        );
    }

    #[test]
    fn online_prefers_the_cache_and_names_the_endpoint_when_a_fetch_fails() {
        let dir = tempfile::tempdir().unwrap();
        let cached = cache_with(dir.path(), "models--org--model", "config.json");
        let online = unreachable_hub(dir.path(), false);
        let model = Repo::with_revision("org/model".into(), RepoType::Model, "main".into());
        assert_eq!(online.file(&model, "config.json", false).unwrap(), cached);

        let error = online.file(&model, "tokenizer.json", false).unwrap_err();
        assert!(matches!(error, HubError::Download { .. }), "{error}");
        let message = error.to_string();
        assert!(
            message.starts_with(
                "cannot fetch tokenizer.json of org/model@main from http://127.0.0.1:9: "
            ),
            "{message}"
        );
        assert!(
            message.contains("set HF_ENDPOINT for a mirror"),
            "{message}"
        );
        assert!(message.ends_with(&format!("{LOCAL_INSTEAD})")), "{message}");
    }
}
