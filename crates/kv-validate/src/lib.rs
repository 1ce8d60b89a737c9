//! `kv-validate` measures what a compressed KV cache costs a Llama-family
//! model in perplexity, by running the model on the reconstructed cache that
//! `kv-compress` (spawned as a subprocess, through the file contract) returns.

pub mod model;
pub mod hub;
pub mod loader;
pub mod tiny;
pub mod data;
pub mod perplexity;
pub mod bridge;
pub mod kvio;
pub mod evaluate;
pub mod report;
pub mod sweep;
pub mod plot;
pub mod quick_test;
