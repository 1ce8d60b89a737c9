//! The model half of kv-validate: a decoder of every supported family (its
//! differences as data in `architecture`) with its KV cache explicit, the
//! CPU kernels it uses where candle's are slow, the loaders for every place a
//! model comes from, the Hugging Face hub, and a tiny generated model for tests.
//!
//! Nothing here knows about compression, windows or reports: the evaluation
//! half (`evaluate`, `perplexity`, `report`, ...) drives it through [`Llama`].

pub mod architecture;
pub mod device;
pub mod hub;
mod kernels;
mod llama;
pub mod load;
pub mod tiny;

pub use llama::*;
