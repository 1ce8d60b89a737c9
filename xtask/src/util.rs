//! Paths and process helpers shared by the tasks.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The workspace root (xtask lives one level below it).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask has a parent directory")
        .to_path_buf()
}

/// Where fetched models live: `$KV_MODELS_DIR`, else `.cache/models` in the repo (gitignored).
pub fn models_dir() -> PathBuf {
    cache_dir("KV_MODELS_DIR", "models")
}

/// Where fetched evaluation texts live: `$KV_TEXT_DIR`, else `.cache/text` in the repo (gitignored).
pub fn text_dir() -> PathBuf {
    cache_dir("KV_TEXT_DIR", "text")
}

/// `$env_var` if set, else `.cache/<name>` in the repo.
fn cache_dir(env_var: &str, name: &str) -> PathBuf {
    std::env::var_os(env_var)
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".cache").join(name))
}

/// The cargo that runs xtask (`CARGO`), else `cargo` on PATH.
pub fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

/// The Python that has pip: `PYTHON`, else `python3`.
pub fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Runs a command to completion, failing with its rendered command line.
pub fn run_checked(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("could not start {shown}"))?;
    if !status.success() {
        bail!("{shown} failed ({status})");
    }
    Ok(())
}

/// Builds the two binaries in release mode and returns the directory holding them.
pub fn build_release_binaries() -> Result<PathBuf> {
    eprintln!("xtask: building kv-compress and kv-validate (release)...");
    run_checked(Command::new(cargo()).current_dir(repo_root()).args([
        "build",
        "--release",
        "-p",
        "kv-compress",
        "-p",
        "kv-validate",
    ]))?;
    Ok(target_dir().join("release"))
}

/// The cargo target directory (`CARGO_TARGET_DIR` or `target/`).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"))
}
