//! `kv-validate` measures what a compressed KV cache costs a decoder model
//! (Llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3) in perplexity, by running the model on the reconstructed cache that
//! `kv-compress` (spawned as a subprocess, through the file contract) returns.

pub mod allocation;
pub mod bench;
pub mod bridge;
pub mod capacity;
pub mod cleanup;
pub mod data;
pub mod evaluate;
pub mod fidelity;
pub mod identity;
pub mod kvio;
pub mod model;
pub mod output;
pub mod perplexity;
pub mod plot;
pub mod quick_test;
pub mod records;
pub mod report;
pub mod shell;
pub mod sweep;
