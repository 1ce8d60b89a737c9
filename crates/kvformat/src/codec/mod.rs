//! Codecs: how one tensor's values become a packed payload and back.
//!
//! A codec is pure: `encode` and `decode` see only values, a shape and
//! [`CodecParams`]; the container (names, dtypes, checksums, LZ4) lives in
//! `crate::packed`. `decode(encode(x))` is, by definition, the reconstruction
//! every metric is computed on, so compressor and decompressor agree bit for bit.

//! - `params`: the vocabulary (grids, axes, fits, [`CodecParams`], errors);
//! - `layout`: payload sections and their lengths, [`Layout`];
//! - `encode` / `decode`: the orchestration (kept tokens, rotation,
//!   sparsity, group order, quantizer, outliers);
//! - `group_quantizer`: the one dispatch from a [`Grid`] to its group
//!   quantizer (parameter choice, levels section, code <-> value mapping);
//! - one file per group quantizer: `quantizer` (uniform grids; `fit` chooses
//!   least-squares parameters for it) and `codebook` (non-uniform levels),
//!   both behind `quantizer::GroupMapping`, and `ecsq` (entropy-coded
//!   uniform codes, through `range_coder`).

mod bitpack;
mod codebook;
mod decode;
mod ecsq;
mod encode;
mod fit;
mod group_quantizer;
mod groups;
mod kept_tokens;
mod layout;
mod outliers;
mod params;
mod quantizer;
mod range_coder;
mod rotation;
mod scales;
mod sparsity;

pub use codebook::{gaussian_levels, GAUSSIAN_LEVELS};
pub use decode::{decode, decode_into};
pub use encode::{encode, encode_observed};
pub use layout::{payload_len, Encoded, Layout};
pub use params::{Axis, CodecError, CodecParams, Fit, Grid, RATE_RANGE, SUPPORTED_BITS};
pub use rotation::SplitMix64;
pub use scales::{ScaleDtype, ZERO_GROUP_SCALE};
pub use sparsity::SparseForm;

/// The one fast-path predicate: a tensor whose groups are on the symmetric
/// grid with every value coded (no kept bitmap) is quantized and packed, or
/// unpacked and scaled, in one fused pass per task (`quantizer`'s
/// `*_symmetric_*packed`); the encoder also needs min/max scales, which is
/// what the fused pass computes. Rotation, kept tokens, channel order and
/// outliers happen around it, on the grouped values.
fn fused_path(params: &CodecParams, has_bitmap: bool, encoding: bool) -> bool {
    params.grid == Grid::Symmetric && !has_bitmap && (!encoding || params.fit == Fit::MinMax)
}

#[cfg(test)]
mod tests;
