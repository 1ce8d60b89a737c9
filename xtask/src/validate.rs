//! `cargo xtask validate`: the whole validation, end to end.
//!
//! Builds both binaries in release mode, then runs `kv-validate` against the
//! freshly built `kv-compress` (through `KV_COMPRESS_PATH`, exactly the lookup
//! the Python bridge used). With the Hugging Face hub reachable it uses the
//! defaults (TinyLlama-1.1B-Chat, WikiText-2); offline it uses the SmolLM2
//! GGUF from `fetch-model` and the project's own text fixture, and says so.

use crate::fetch_model::ensure_model;
use crate::util::{build_release_binaries, repo_root};
use anyhow::{Context, Result};
use std::net::{TcpStream, ToSocketAddrs};
use std::process::{Command, ExitCode};
use std::time::Duration;

/// Flags with which the caller already chose the model or the text.
const SOURCE_FLAGS: &[&str] = &[
    "--model",
    "--model-dir",
    "--gguf",
    "--text-file",
    "--quick-test",
];

pub fn run(args: &[String]) -> Result<ExitCode> {
    let bin_dir = build_release_binaries()?;
    let mut cmd = Command::new(bin_dir.join("kv-validate"));
    cmd.env("KV_COMPRESS_PATH", bin_dir.join("kv-compress"))
        .current_dir(repo_root());

    let caller_chose_source = args.iter().any(|a| {
        SOURCE_FLAGS
            .iter()
            .any(|f| a == f || a.starts_with(&format!("{f}=")))
    });
    if caller_chose_source {
        eprintln!("xtask: running kv-validate with the model and text you named");
    } else if hub_reachable() {
        eprintln!("xtask: the Hugging Face hub is reachable: TinyLlama/TinyLlama-1.1B-Chat-v1.0 on WikiText-2 (wikitext-2-raw-v1, test)");
    } else {
        let model = ensure_model()?;
        let text = repo_root().join("testdata").join("prose.txt");
        eprintln!(
            "xtask: the Hugging Face hub is unreachable: using the offline model {} on the text fixture {}",
            model.display(),
            text.display()
        );
        cmd.arg("--gguf").arg(model).arg("--text-file").arg(text);
    }
    cmd.args(args);
    let status = cmd.status().context("could not start kv-validate")?;
    // kv-validate's own exit code is the verdict: 0 passed, 1 failed, 2 error.
    Ok(ExitCode::from(
        status.code().unwrap_or(2).clamp(0, 255) as u8
    ))
}

/// Whether a TCP connection to the hub (or `HF_ENDPOINT`) opens within a few seconds.
fn hub_reachable() -> bool {
    if std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true")) {
        return false;
    }
    let endpoint = std::env::var("HF_ENDPOINT").unwrap_or_else(|_| "https://huggingface.co".into());
    let (default_port, rest) = match endpoint.split_once("://") {
        Some(("http", rest)) => (80, rest),
        Some((_, rest)) => (443, rest),
        None => (443, endpoint.as_str()),
    };
    let authority = rest.split('/').next().unwrap_or(rest);
    let target = if authority.contains(':') {
        authority.to_string()
    } else {
        format!("{authority}:{default_port}")
    };
    let Ok(addrs) = target.to_socket_addrs() else {
        return false;
    };
    addrs
        .into_iter()
        .any(|addr| TcpStream::connect_timeout(&addr, Duration::from_secs(5)).is_ok())
}
