//! `cargo xtask wheel`: the Python wheel of kv-compress (the binary in the
//! environment's `bin/` plus the numpy `kvformat` reader), built by maturin
//! from `crates/kv-compress/pyproject.toml` into `target/wheels/`.
//!
//! maturin tags it with the oldest manylinux policy the binary's glibc
//! symbols allow on this machine (it audits the binary, as auditwheel does);
//! older policies need an older glibc to build on. The build reuses
//! `target/release`, so after `cargo build --release` it only packages.

use crate::util::{python, repo_root, run_checked, target_dir};
use anyhow::Result;
use std::process::Command;

/// The maturin versions `pyproject.toml`'s build-system accepts.
const MATURIN_REQUIREMENT: &str = "maturin>=1.5,<2";

pub fn run(args: &[String]) -> Result<()> {
    if let Some(arg) = args.first() {
        anyhow::bail!("wheel takes no arguments, got `{arg}`");
    }
    let has_maturin = Command::new(python())
        .args(["-m", "maturin", "--version"])
        .output()
        .is_ok_and(|out| out.status.success());
    if !has_maturin {
        eprintln!("xtask: maturin is not installed: pip install {MATURIN_REQUIREMENT}");
        run_checked(Command::new(python()).args([
            "-m",
            "pip",
            "install",
            "--quiet",
            MATURIN_REQUIREMENT,
        ]))?;
    }
    let out_dir = target_dir().join("wheels");
    eprintln!(
        "xtask: building the kv-compress wheel into {}",
        out_dir.display()
    );
    run_checked(
        Command::new(python())
            .current_dir(repo_root())
            .env("CARGO_TARGET_DIR", target_dir())
            .args([
                "-m",
                "maturin",
                "build",
                "--release",
                "--manifest-path",
                "crates/kv-compress/Cargo.toml",
                "--out",
            ])
            .arg(&out_dir),
    )
}
