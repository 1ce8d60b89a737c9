//! Writes the tests' tiny random Llama (`TinyLlama::default()`, seeded) to
//! DIR: `DIR/hf/` and `DIR/tiny-llama.gguf`. For runs outside the test
//! harness, such as `xtask/house-proof.sh`.
//!
//! `cargo run --release --workspace --example tiny_model -- DIR`

use std::path::PathBuf;
use std::process::ExitCode;

use kv_validate::model::tiny::TinyLlama;

fn main() -> ExitCode {
    let Some(dir) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: tiny_model DIR");
        return ExitCode::from(2);
    };
    match TinyLlama::default().write(&dir) {
        Ok(files) => {
            println!("{}", files.hf_dir.display());
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}
