//! `kv-compress` as a library: the Go-style flag parser ([`flags`]) and the
//! pipeline ([`pipeline::run`]) that the thin binary wires together, so tests
//! drive every mode without spawning a process.
//!
//! ```no_run
//! let args: Vec<String> = ["-input", "kv.safetensors", "-metrics-only"].map(String::from).to_vec();
//! if let kv_compress::flags::Command::Run(options) = kv_compress::flags::parse(&args).unwrap() {
//!     let report = kv_compress::pipeline::run(&options).unwrap();
//!     println!("{}", report.to_json());
//! }
//! ```

pub mod flags;
pub mod pipeline;
pub mod settings;

pub use flags::{parse, Command, FlagError, Options};
pub use pipeline::{run, Error};
