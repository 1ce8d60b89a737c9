//! `kv-validate` measures what a compressed KV cache costs a decoder model
//! (Llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3) in perplexity, by running the model on the reconstructed cache that
//! `kv-compress` (spawned as a subprocess, through the file contract) returns.
//!
//! The binary is thin: [`cli`] holds the command line's types, [`plan`]
//! resolves it into a [`plan::Plan`] with every flag combination checked,
//! and [`run`] carries the plan out, so a test runs a whole validation
//! without spawning a process:
//!
//! ```no_run
//! use clap::Parser;
//! let cli = kv_validate::cli::Cli::parse_from(["kv-validate", "--quick-test"]);
//! let plan = kv_validate::plan::Plan::from_cli(&cli).unwrap();
//! let console = kv_validate::run::Console { report: &|text| print!("{text}"), status: &|_| {} };
//! let passed = kv_validate::run::run(plan, &console).unwrap();
//! ```

pub mod allocation;
pub mod bench;
pub mod bridge;
pub mod capacity;
pub mod cleanup;
pub mod cli;
pub mod conclude;
pub mod data;
pub mod engines;
pub mod evaluate;
pub mod fidelity;
pub mod identity;
pub mod kvio;
pub mod labels;
pub mod long_context;
pub mod long_plot;
pub mod model;
pub mod output;
pub mod passkey;
pub mod perplexity;
pub mod plan;
pub mod plot;
pub mod progress;
pub mod quick_test;
pub mod records;
pub mod report;
pub mod run;
pub mod run_types;
pub mod shard;
pub mod shell;
pub mod sweep;
pub mod workers;
