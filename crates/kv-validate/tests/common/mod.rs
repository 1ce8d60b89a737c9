//! Fixtures shared by the integration tests: the tiny generated model, the
//! project's prose fixture, the real `kv-compress` and scripted stand-ins.
#![allow(dead_code)] // each test binary uses its own subset

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kv_validate::model::tiny::{TinyLlama, TinyModelFiles};

/// The tiny random Llama (3 layers, 2 KV heads, head_dim 16) as an HF
/// directory and a GGUF under `dir`.
pub fn tiny_model(dir: &Path) -> TinyModelFiles {
    TinyLlama::default().write(dir).expect("tiny model writes")
}

/// The project's prose fixture, byte for byte.
pub fn prose_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/prose.txt")
}

/// The SmolLM2-135M GGUF that `cargo xtask fetch-model` unpacks, from
/// `KV_MODELS_DIR` or `.cache/models`; `None` (with a message saying how to
/// get it) when absent, so a test can skip.
pub fn smollm2_gguf() -> Option<PathBuf> {
    let dir = std::env::var_os("KV_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.cache/models"));
    let path = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    if !path.is_file() {
        eprintln!(
            "skipped: {} is absent; run `cargo xtask fetch-model`",
            path.display()
        );
        return None;
    }
    Some(path)
}

/// The real `kv-compress`, built beside `kv-validate` in the same target dir.
pub fn kv_compress() -> PathBuf {
    let path = Path::new(env!("CARGO_BIN_EXE_kv-validate")).with_file_name("kv-compress");
    assert!(
        path.is_file(),
        "{} is missing: build it first (cargo build --release -p kv-compress)",
        path.display()
    );
    path
}

/// A `kv-compress` stand-in written as a shell script: it parses
/// `-input`/`-output` like the real one, copies the input to the output
/// (an exact "reconstruction"), prints metrics JSON, then runs `on_decompress`
/// (shell code that sees `$output`) when called with `-decompress`.
pub fn scripted_compressor(dir: &Path, name: &str, on_decompress: &str) -> PathBuf {
    let script = format!(
        r#"#!/bin/sh
decompress=0
while [ $# -gt 0 ]; do
  case "$1" in
    -decompress) decompress=1 ;;
    -input) input=$2; shift ;;
    -output) output=$2; shift ;;
    -group-size|-sparsity) shift ;;
  esac
  shift
done
cp "$input" "$output" || exit 1
size=$(wc -c < "$input")
printf '{{"compression_ratio": 1.0, "original_size_bytes": %d, "compressed_size_bytes": %d, "rmse": 0.0, "snr_db": 100.0, "cosine_similarity": 1.0, "max_error": 0.0, "quality_level": "EXCELLENT", "processing_time_ms": 1.0, "quality_passed": true, "violations": []}}\n' "$size" "$size"
if [ $decompress = 1 ]; then
{on_decompress}
fi
"#
    );
    write_script(dir, name, &script)
}

/// Writes an executable script `dir/name`.
pub fn write_script(dir: &Path, name: &str, script: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// A compressor whose reconstruction is the input itself.
pub fn identity_compressor(dir: &Path) -> PathBuf {
    scripted_compressor(dir, "identity-kv-compress", ":")
}

/// Runs the `kv-validate` binary with `args`, `KV_COMPRESS_PATH` set to `compressor`.
pub fn kv_validate(args: &[&str], compressor: &Path) -> Output {
    kv_validate_with_env(args, &[("KV_COMPRESS_PATH", compressor.as_os_str())])
}

pub fn kv_validate_with_env(args: &[&str], env: &[(&str, &std::ffi::OsStr)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kv-validate"));
    command.args(args).env_remove("KV_COMPRESS_PATH");
    for (key, value) in env {
        command.env(key, value);
    }
    command.output().expect("kv-validate runs")
}

/// Stderr of a `--quiet` run that must have failed with exit 2 and printed
/// exactly one `error: ...` line (no panic, no backtrace).
pub fn expect_error(output: &Output) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(2), "stderr: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "stderr: {stderr}");
    assert!(stderr.starts_with("error: "), "stderr: {stderr}");
    stderr
}

/// The tiny model's short run: `windows` back-to-back windows of 32 context
/// + 16 targets on the prose fixture, quiet.
pub fn short_run_args<'a>(model_dir: &'a str, prose: &'a str, windows: &'a str) -> Vec<&'a str> {
    vec![
        "--model-dir",
        model_dir,
        "--text-file",
        prose,
        "--context",
        "32",
        "--targets",
        "16",
        "--max-windows",
        windows,
        "--quiet",
    ]
}

/// Asserts that a run exited 0, showing its output if not.
pub fn expect_success(output: &Output) {
    assert_eq!(
        output.status.code(),
        Some(0),
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A JSON file a run wrote (`--json`).
pub fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The largest absolute value of a tensor (f32), e.g. of a difference.
pub fn max_abs(tensor: &candle_core::Tensor) -> f32 {
    tensor
        .abs()
        .and_then(|t| t.flatten_all()?.max(0)?.to_scalar())
        .expect("an f32 tensor")
}
