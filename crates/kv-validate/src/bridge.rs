//! The subprocess bridge to `kv-compress`, the replacement for the original
//! `compression_bridge.py`: it finds the binary where that script looked and
//! runs exactly the command lines it ran, so whatever `kv-compress` a user
//! installed (ours or the original Go CLI) is what gets measured.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use kvformat::Report;

/// Environment variable that names the `kv-compress` binary explicitly.
pub const KV_COMPRESS_PATH_VAR: &str = "KV_COMPRESS_PATH";
const BINARY_NAME: &str = "kv-compress";
const INSTALL_HINT: &str =
    "install it with `cargo install --path crates/kv-compress` or set KV_COMPRESS_PATH to the binary";

/// The flags one compression variant passes to `kv-compress`.
#[derive(Clone, Debug, PartialEq)]
pub struct CompressSettings {
    pub group_size: u32,
    pub sparsity: f64,
    /// Further flags, passed through verbatim after the standard ones.
    pub extra_args: Vec<String>,
}

impl Default for CompressSettings {
    /// What the original bridge passed: group 64, no sparsification.
    fn default() -> Self {
        CompressSettings {
            group_size: 64,
            sparsity: 0.0,
            extra_args: Vec::new(),
        }
    }
}

impl CompressSettings {
    /// A short human name for reports: `-group-size 64 -sparsity 0.0 -bits 8`.
    pub fn label(&self) -> String {
        let mut label = format!(
            "-group-size {} -sparsity {:?}",
            self.group_size, self.sparsity
        );
        for arg in &self.extra_args {
            label.push(' ');
            label.push_str(arg);
        }
        label
    }
}

/// Why `kv-compress` could not be found or did not do its job.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error("kv-compress not found (looked in {}); {INSTALL_HINT}", searched.join(", "))]
    NotFound { searched: Vec<String> },
    #[error("KV_COMPRESS_PATH is {}, which is not a file; {INSTALL_HINT}", path.display())]
    EnvPathNotAFile { path: PathBuf },
    #[error("cannot run {}: {source}", program.display())]
    Spawn {
        program: PathBuf,
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("`{command}` printed no valid metrics JSON on stdout ({source}): {stdout:?}")]
    BadJson {
        command: String,
        source: serde_json::Error,
        stdout: String,
    },
}

/// A located `kv-compress` binary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvCompress {
    program: PathBuf,
}

impl KvCompress {
    /// Uses the binary at `program` as is.
    pub fn at(program: impl Into<PathBuf>) -> Self {
        KvCompress {
            program: program.into(),
        }
    }

    /// Finds `kv-compress` as the original bridge did: `KV_COMPRESS_PATH`,
    /// then beside the running executable, then `bin/kv-compress` under the
    /// working directory, then every directory of `PATH`.
    pub fn locate() -> Result<Self, BridgeError> {
        if let Some(path) = std::env::var_os(KV_COMPRESS_PATH_VAR).filter(|p| !p.is_empty()) {
            let path = PathBuf::from(path);
            return if path.is_file() {
                Ok(KvCompress::at(path))
            } else {
                Err(BridgeError::EnvPathNotAFile { path })
            };
        }
        let file_name = format!("{BINARY_NAME}{}", std::env::consts::EXE_SUFFIX);
        let mut candidates = Vec::new();
        if let Some(dir) = std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(Path::to_path_buf))
        {
            candidates.push(dir.join(&file_name));
        }
        candidates.push(Path::new("bin").join(&file_name));
        if let Some(path) = std::env::var_os("PATH") {
            candidates.extend(std::env::split_paths(&path).map(|dir| dir.join(&file_name)));
        }
        match candidates.iter().find(|candidate| candidate.is_file()) {
            Some(found) => Ok(KvCompress::at(found.clone())),
            None => Err(BridgeError::NotFound {
                searched: vec![
                    KV_COMPRESS_PATH_VAR.to_string(),
                    "beside kv-validate".to_string(),
                    "bin/".to_string(),
                    "PATH".to_string(),
                ],
            }),
        }
    }

    pub fn program(&self) -> &Path {
        &self.program
    }

    /// `kv-compress -input IN -output OUT -group-size G -sparsity S [extra]`,
    /// returning the metrics JSON it printed (CONTRACT §3, parsed with
    /// kvformat's own type; fields it does not know are ignored, and the
    /// ones the Go original lacks default to zero).
    pub fn compress(
        &self,
        input: &Path,
        output: &Path,
        settings: &CompressSettings,
    ) -> Result<Report, BridgeError> {
        let mut args: Vec<OsString> = vec![
            "-input".into(),
            input.into(),
            "-output".into(),
            output.into(),
            "-group-size".into(),
            settings.group_size.to_string().into(),
            "-sparsity".into(),
            format!("{:?}", settings.sparsity).into(),
        ];
        args.extend(settings.extra_args.iter().map(OsString::from));
        let (command, stdout) = self.run(&args)?;
        serde_json::from_str(&stdout).map_err(|source| BridgeError::BadJson {
            command,
            source,
            stdout,
        })
    }

    /// `kv-compress -decompress -input IN -output OUT`: restores the cache.
    pub fn decompress(&self, input: &Path, output: &Path) -> Result<(), BridgeError> {
        let args: Vec<OsString> = vec![
            "-decompress".into(),
            "-input".into(),
            input.into(),
            "-output".into(),
            output.into(),
        ];
        self.run(&args).map(drop)
    }

    /// Runs the binary; on success returns the command line (for errors) and stdout.
    fn run(&self, args: &[OsString]) -> Result<(String, String), BridgeError> {
        let command = std::iter::once(self.program.as_os_str())
            .chain(args.iter().map(OsString::as_os_str))
            .map(|part| part.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ");
        let output = Command::new(&self.program)
            .args(args)
            .output()
            .map_err(|source| BridgeError::Spawn {
                program: self.program.clone(),
                source,
            })?;
        if !output.status.success() {
            return Err(BridgeError::Failed {
                command,
                status: output.status,
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
            });
        }
        Ok((
            command,
            String::from_utf8_lossy(&output.stdout).into_owned(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_go_originals_metrics_parse_with_unknown_fields_ignored() {
        let json = r#"{
  "compression_ratio": 3.76,
  "original_size_bytes": 1024,
  "compressed_size_bytes": 272,
  "rmse": 0.05,
  "snr_db": 25.5,
  "cosine_similarity": 0.995,
  "max_error": 0.3,
  "quality_level": "ACCEPTABLE",
  "processing_time_ms": 12.5,
  "quality_passed": false,
  "violations": ["CosineSim 0.9847 < 0.9900"],
  "tensor_metrics": {"layer_0_key_rmse": 0.04},
  "something_new": [1, 2]
}"#;
        let metrics: Report = serde_json::from_str(json).unwrap();
        assert_eq!(metrics.compressed_size_bytes, 272);
        assert_eq!(metrics.violations, ["CosineSim 0.9847 < 0.9900"]);
        assert_eq!(metrics.bits_per_value, 0.0, "absent from the Go original");
        assert_eq!(
            metrics.quality_level,
            kvformat::metrics::QualityLevel::Acceptable
        );
    }

    #[test]
    fn default_settings_label_reads_like_the_original_command_line() {
        let mut settings = CompressSettings::default();
        assert_eq!(settings.label(), "-group-size 64 -sparsity 0.0");
        settings.extra_args = vec!["-bits".into(), "8".into()];
        assert_eq!(settings.label(), "-group-size 64 -sparsity 0.0 -bits 8");
    }
}
