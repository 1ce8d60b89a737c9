//! Fuzz harnesses: one function per kind of untrusted input, each feeding
//! arbitrary bytes through the same public entry points the CLI uses.
//!
//! The harness files are plain Rust over `kvformat` and `kv-compress`, with no
//! libFuzzer in them, so the regression tests of those crates include them
//! (`#[path]`) and replay every saved input through exactly this code.

pub mod checksums;
pub mod cli_inputs;
pub mod format_inputs;
pub mod regressions;
pub mod scratch;
