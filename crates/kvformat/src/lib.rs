//! `kvformat` is the contract between `kv-compress`, `kv-validate` and the
//! Python scripts that drove the original Go CLI: the KV-cache safetensors
//! layout and its sidecar, the packed (compressed) file format, the codecs
//! that fill it, and the metrics JSON.
//!
//! It has no CLI and no model code; everything here is callable from a test
//! without spawning a process.

pub mod codec;
