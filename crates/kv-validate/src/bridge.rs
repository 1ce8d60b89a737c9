//! The subprocess bridge to `kv-compress`, the replacement for the original
//! `compression_bridge.py`: it finds the binary where that script looked and
//! runs exactly the command lines it ran, so whatever `kv-compress` a user
//! installed (ours or the original Go CLI) is what gets measured.

use std::ffi::OsString;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kvformat::Report;

use crate::cleanup::{self, GroupChild};
use crate::run_types::CompressSettings;

/// Environment variable that names the `kv-compress` binary explicitly.
pub const KV_COMPRESS_PATH_VAR: &str = "KV_COMPRESS_PATH";
const BINARY_NAME: &str = "kv-compress";
const INSTALL_HINT: &str =
    "install it with `cargo install --path crates/kv-compress` or set KV_COMPRESS_PATH to the binary";

/// Most of `kv-compress`'s stdout that is read: its JSON is a few KiB, so
/// more is a broken compressor, killed rather than buffered without bound.
pub const STDOUT_LIMIT_BYTES: usize = 1 << 20;
/// Most of its stderr kept for an error message; the rest is read and dropped.
pub const STDERR_KEPT_BYTES: usize = 8 << 10;

/// How long one `kv-compress` run (a compress or a decompress) may take
/// before it is killed with everything it started.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum CompressTimeout {
    /// [`CompressTimeout::BASE`] plus [`CompressTimeout::PER_GIB`] per GiB of
    /// the cache file: finite for a hung compressor, ample for a slow one
    /// (our slowest flag, `-fit mse`, took 345 s on a 258 MiB cache on a
    /// loaded 2-core machine, where the limit is 1053 s; the plain codec
    /// takes under 2 s).
    ScaledWithCache,
    /// The same limit whatever the size (`--compress-timeout`).
    Fixed(Duration),
}

impl CompressTimeout {
    pub const BASE: Duration = Duration::from_secs(600);
    pub const PER_GIB: Duration = Duration::from_secs(1800);

    /// The limit for a run on a cache file of `cache_bytes`.
    pub fn limit_for(self, cache_bytes: u64) -> Duration {
        match self {
            CompressTimeout::Fixed(limit) => limit,
            CompressTimeout::ScaledWithCache => {
                Self::BASE + Self::PER_GIB.mul_f64(cache_bytes as f64 / (1u64 << 30) as f64)
            }
        }
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
    #[error(
        "`{command}` did not finish within {} s and was killed; \
         raise the limit with --compress-timeout SECONDS",
        limit.as_secs_f64()
    )]
    TimedOut { command: String, limit: Duration },
    #[error(
        "`{command}` printed more than {} KiB on stdout and was killed; \
         kv-compress prints one JSON object",
        STDOUT_LIMIT_BYTES >> 10
    )]
    StdoutTooLong { command: String },
    #[error("lost track of `{command}`: {source}")]
    Wait {
        command: String,
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("`{command}` reported an implausible size: {problem}")]
    Implausible { command: String, problem: String },
    #[error("`{command}` printed no valid metrics JSON on stdout ({source}): {stdout:?}")]
    BadJson {
        command: String,
        source: serde_json::Error,
        stdout: String,
    },
}

/// A located `kv-compress` binary.
#[derive(Clone, Debug, PartialEq)]
pub struct KvCompress {
    program: PathBuf,
    timeout: CompressTimeout,
}

impl KvCompress {
    /// Uses the binary at `program` as is, with the scaled default timeout.
    pub fn at(program: impl Into<PathBuf>) -> Self {
        KvCompress {
            program: program.into(),
            timeout: CompressTimeout::ScaledWithCache,
        }
    }

    /// The same binary with another time limit per run.
    pub fn with_timeout(self, timeout: CompressTimeout) -> Self {
        KvCompress { timeout, ..self }
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

    /// Compresses `cache` to `packed` with `settings`, then restores it to
    /// `decoded`: the round trip every evaluation makes. Returns the metrics
    /// the compressor printed. Each run gets the time limit for the cache's size.
    pub fn round_trip(
        &self,
        cache: &Path,
        packed: &Path,
        decoded: &Path,
        settings: &CompressSettings,
    ) -> Result<Report, BridgeError> {
        // A cache that cannot be measured fails in kv-compress, named there.
        let cache_bytes = std::fs::metadata(cache).map_or(0, |m| m.len());
        let limit = self.timeout.limit_for(cache_bytes);
        let metrics = self.compress(cache, packed, settings, limit)?;
        self.decompress(packed, decoded, limit)?;
        Ok(metrics)
    }

    /// `kv-compress -input IN -output OUT -group-size G -sparsity S [extra]`,
    /// returning the metrics JSON it printed (CONTRACT §3, parsed with
    /// kvformat's own type; fields it does not know are ignored, and the
    /// ones the Go original lacks default to zero).
    fn compress(
        &self,
        input: &Path,
        output: &Path,
        settings: &CompressSettings,
        limit: Duration,
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
        let (command, stdout) = self.run(&args, limit)?;
        let report: Report =
            serde_json::from_str(&stdout).map_err(|source| BridgeError::BadJson {
                command: command.clone(),
                source,
                stdout,
            })?;
        match crate::run_types::implausible_sizes(&report) {
            Some(problem) => Err(BridgeError::Implausible { command, problem }),
            None => Ok(report),
        }
    }

    /// `kv-compress -decompress -input IN -output OUT`: restores the cache.
    fn decompress(&self, input: &Path, output: &Path, limit: Duration) -> Result<(), BridgeError> {
        let args: Vec<OsString> = vec![
            "-decompress".into(),
            "-input".into(),
            input.into(),
            "-output".into(),
            output.into(),
        ];
        self.run(&args, limit).map(drop)
    }

    /// Runs the binary in a process group of its own, killing the group when
    /// it outlives `limit` or floods stdout; on success returns the command
    /// line (for errors) and stdout.
    fn run(&self, args: &[OsString], limit: Duration) -> Result<(String, String), BridgeError> {
        let command = std::iter::once(self.program.as_os_str())
            .chain(args.iter().map(OsString::as_os_str))
            .map(|part| part.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ");
        let mut child = GroupChild::spawn(
            Command::new(&self.program)
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped()),
        )
        .map_err(|source| BridgeError::Spawn {
            program: self.program.clone(),
            source,
        })?;
        let group = child.group();
        let stdout = child.child_mut().stdout.take().expect("stdout is piped");
        let stderr = child.child_mut().stderr.take().expect("stderr is piped");
        // The leader is reaped only after this thread is joined, so the
        // group id is still its own when a flood kills it.
        let stdout = std::thread::spawn(move || read_stdout(stdout, || cleanup::kill_group(group)));
        let stderr = std::thread::spawn(move || read_stderr(stderr));
        let wait_error = |source| BridgeError::Wait {
            command: command.clone(),
            source,
        };

        let timed_out = wait_until_exit(&child, Instant::now() + limit).map_err(wait_error)?;
        if timed_out {
            child.kill_group();
            child.wait_exited().map_err(wait_error)?;
        }
        // Whatever the leader left running would hold the pipes open.
        child.kill_group();
        let stdout = join(stdout).map_err(wait_error)?;
        let stderr = join(stderr).map_err(wait_error)?;
        let status = child.reap().map_err(wait_error)?;
        if timed_out {
            return Err(BridgeError::TimedOut { command, limit });
        }
        let Some(stdout) = stdout else {
            return Err(BridgeError::StdoutTooLong { command });
        };
        if !status.success() {
            return Err(BridgeError::Failed {
                command,
                status,
                stderr,
            });
        }
        Ok((command, String::from_utf8_lossy(&stdout).into_owned()))
    }
}

/// Polls until `child`'s leader exits (`Ok(false)`) or `deadline` passes
/// (`Ok(true)`), without reaping it.
fn wait_until_exit(child: &GroupChild, deadline: Instant) -> std::io::Result<bool> {
    // Short first pauses: a kv-compress run on a small cache takes milliseconds.
    const LONGEST_PAUSE: Duration = Duration::from_millis(20);
    let mut pause = Duration::from_micros(500);
    loop {
        if child.has_exited()? {
            return Ok(false);
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(true);
        }
        std::thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(LONGEST_PAUSE);
    }
}

/// Reads stdout up to [`STDOUT_LIMIT_BYTES`]; `None` when there was more,
/// after calling `on_overflow` at once (to kill the writer).
fn read_stdout(pipe: impl Read, on_overflow: impl FnOnce()) -> std::io::Result<Option<Vec<u8>>> {
    let mut bytes = Vec::new();
    pipe.take(STDOUT_LIMIT_BYTES as u64 + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() > STDOUT_LIMIT_BYTES {
        on_overflow();
        return Ok(None);
    }
    Ok(Some(bytes))
}

/// All of stderr is read (a full pipe would stall the child), the first
/// [`STDERR_KEPT_BYTES`] kept, trimmed, with a note of what was dropped.
fn read_stderr(mut pipe: impl Read) -> std::io::Result<String> {
    let mut kept = Vec::new();
    (&mut pipe)
        .take(STDERR_KEPT_BYTES as u64)
        .read_to_end(&mut kept)?;
    let dropped = std::io::copy(&mut pipe, &mut std::io::sink())?;
    let mut text = String::from_utf8_lossy(&kept).trim().to_string();
    if dropped > 0 {
        text.push_str(&format!(" [... {dropped} more bytes of stderr not shown]"));
    }
    Ok(text)
}

fn join<T>(reader: std::thread::JoinHandle<std::io::Result<T>>) -> std::io::Result<T> {
    reader
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("the pipe reader panicked")))
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
        assert_eq!(metrics.figures.compressed_size_bytes, 272);
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

    #[test]
    fn the_default_timeout_is_ten_minutes_plus_half_an_hour_per_gib() {
        let scaled = CompressTimeout::ScaledWithCache;
        assert_eq!(scaled.limit_for(0), Duration::from_secs(600));
        assert_eq!(scaled.limit_for(1 << 29), Duration::from_secs(600 + 900));
        assert_eq!(scaled.limit_for(3 << 30), Duration::from_secs(600 + 5400));
        let fixed = CompressTimeout::Fixed(Duration::from_secs(2));
        assert_eq!(fixed.limit_for(3 << 30), Duration::from_secs(2));
    }

    #[test]
    fn stderr_is_read_whole_but_kept_to_its_cap() {
        let mut loud = b"Error: first\n".to_vec();
        loud.resize(STDERR_KEPT_BYTES + 100, b'x');
        let kept = read_stderr(&loud[..]).unwrap();
        assert!(kept.starts_with("Error: first\nxxx"), "{kept}");
        assert!(
            kept.ends_with(" [... 100 more bytes of stderr not shown]"),
            "{kept}"
        );
        assert_eq!(read_stderr(&b"  quiet \n"[..]).unwrap(), "quiet");
    }

    #[test]
    fn stdout_is_read_up_to_its_cap_and_refused_beyond() {
        let mut flood = vec![b' '; STDOUT_LIMIT_BYTES];
        let read = read_stdout(&flood[..], || panic!("not over the cap")).unwrap();
        assert_eq!(read.map(|bytes| bytes.len()), Some(STDOUT_LIMIT_BYTES));
        flood.push(b' ');
        let mut killed = false;
        assert_eq!(read_stdout(&flood[..], || killed = true).unwrap(), None);
        assert!(killed);
    }
}
