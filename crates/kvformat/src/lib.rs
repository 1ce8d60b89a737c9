//! `kvformat` is the contract between `kv-compress`, `kv-validate` and the
//! Python scripts that drove the original Go CLI: the KV-cache safetensors
//! layout and its sidecar, the packed (compressed) file format, the codecs
//! that fill it, and the metrics JSON.
//!
//! It has no CLI and no model code; everything here is callable from a test
//! without spawning a process.
//!
//! ```no_run
//! use std::path::Path;
//! use kvformat::{cache::KvCache, codec::CodecParams, packed};
//!
//! let cache = KvCache::open(Path::new("kv_cache.safetensors"))?;
//! let mut tensors = Vec::new();
//! for (entry, dtype) in cache.tensors() {
//!     let values = cache.values(entry, dtype)?;
//!     let (tensor, _reconstruction) =
//!         packed::pack_tensor(&entry.name, dtype, &entry.shape, &values, &CodecParams::adr002(64)).unwrap();
//!     tensors.push(tensor);
//! }
//! packed::write_packed(Path::new("kv_cache.int4.safetensors"), &tensors, cache.file().metadata())?;
//! # Ok::<(), kvformat::Error>(())
//! ```

pub mod atomic;
pub mod cache;
pub mod codec;
pub mod dtype;
pub mod error;
pub mod heap;
pub mod input;
pub mod metrics;
pub mod packed;
pub mod preset;
pub mod sidecar;
pub mod simd;
pub mod sweep_matrix;
pub mod tensor_file;

pub use cache::{write_cache, CacheTensor, KvCache};
pub use dtype::CacheDtype;
pub use error::{Error, Result, TensorProblem};
pub use metrics::{CompressionFigures, Report, TensorMetrics};
pub use packed::{PackedFile, PackedTensor};
pub use sidecar::{sidecar_path, validate_against_sidecar, Sidecar};
pub use tensor_file::{
    stage_tensor_file, stage_tensor_file_streaming, write_scratch_tensor_file, write_tensor_file,
    write_tensor_file_streaming, Emit, OutputTensor, TensorEntry, TensorFile, TensorSpec,
};
