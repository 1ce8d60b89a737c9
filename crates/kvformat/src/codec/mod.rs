//! Codecs: how one tensor's values become a packed payload and back.
//!
//! A codec is pure: `encode` and `decode` see only values, a shape and
//! [`CodecParams`]; the container (names, dtypes, checksums, LZ4) lives in
//! `crate::packed`. `decode(encode(x))` is, by definition, the reconstruction
//! every metric is computed on, so compressor and decompressor agree bit for bit.

//! - `grid`: the grids and one row of what each supports ([`GRIDS`]), which
//!   everything but the seam and the quantizers asks instead of matching;
//! - `params`: the vocabulary (axes, fits, [`CodecParams`], its two checks, errors);
//! - `layout`: payload sections and their lengths, [`Layout`];
//! - `encode` / `decode`: the orchestration (kept tokens, rotation,
//!   sparsity, group order, quantizer, outliers);
//! - `group_quantizer`: the one dispatch from a [`Grid`] to its group
//!   quantizer (parameter choice, levels section, code <-> value mapping);
//! - one file per group quantizer: `quantizer` (uniform grids; `fit` chooses
//!   least-squares parameters for it; `fused` is ADR-002's one-pass fast
//!   path over it) and `codebook` (non-uniform levels),
//!   both behind `quantizer::GroupMapping`, and `ecsq` (entropy-coded
//!   uniform codes, through `rans`, and `range_coder` for format-1 files); and the formats inference
//!   engines ship (`ggml`: llama.cpp's q8_0/q4_0/q4_1/q5_0/q5_1, `fp8`:
//!   vLLM's and SGLang's float8 caches), bit-exact to the engines' rounding.

mod bitpack;
mod codebook;
mod decode;
mod ecsq;
mod encode;
mod fit;
mod fp4;
mod fp8;
mod fused;
mod ggml;
mod grid;
mod group_quantizer;
mod groups;
mod int8;
mod kept_tokens;
mod layout;
mod outliers;
mod params;
mod quantizer;
mod quanto;
mod range_coder;
mod rans;
mod rotation;
mod scales;
mod sparsity;

pub use bitpack::unpack as unpack_codes;
pub use codebook::{gaussian_levels, GAUSSIAN_LEVELS};
pub use decode::{decode, decode_into};
pub use ecsq::EntropyCoder;
pub use encode::{encode, encode_observed};
pub use fp4::{e2m1_value, E2M1};
pub use fp8::{Fp8Format, E4M3, E5M2};
pub use grid::{spoken_list, EngineFormat, Grid, GridSpec, GRIDS, SUPPORTED_BITS};
pub use layout::{payload_len, Encoded, Layout};
pub use params::{Axis, CodecError, CodecParams, Fit, LlamaRotation, RATE_RANGE};
pub use rotation::SplitMix64;
pub use scales::{ScaleDtype, ZERO_GROUP_SCALE};
pub use sparsity::SparseForm;

/// The one fast-path predicate: a tensor whose groups are on a grid with
/// the fused path (the symmetric one, [`GridSpec::fused_fast_path`]) with every value coded (no kept bitmap) is quantized and packed, or
/// unpacked and scaled, in one fused pass per task (`quantizer`'s
/// `fused.rs`); the encoder also needs min/max scales, which is
/// what the fused pass computes. Rotation, kept tokens, channel order and
/// outliers happen around it, on the grouped values.
fn fused_path(params: &CodecParams, has_bitmap: bool, encoding: bool) -> bool {
    params.grid.spec().fused_fast_path && !has_bitmap && (!encoding || params.fit == Fit::MinMax)
}

#[cfg(test)]
mod tests;
