//! Codecs: how one tensor's values become a packed payload and back.
//!
//! A codec is pure: `encode` and `decode` see only values, a shape and
//! [`CodecParams`]; the container (names, dtypes, checksums, LZ4) lives in
//! `crate::packed`. `decode(encode(x))` is, by definition, the reconstruction
//! every metric is computed on, so compressor and decompressor agree bit for bit.

use serde::{Deserialize, Serialize};

/// Quantization grid of a group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Grid {
    /// `scale = max|x| / qmax`, codes in `[-2^(b-1), 2^(b-1)-1]` (ADR-002 for b = 4).
    Symmetric,
    /// `scale = (max - min) / (2^b - 1)` plus an offset, codes in `[0, 2^b - 1]`.
    Asymmetric,
}

/// Which consecutive values form a group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Axis {
    /// ADR-002: the tensor flattened row-major, cut into runs of `group_size`.
    Flat,
    /// Per token: runs of `group_size` along head_dim (last axis) of each token.
    Token,
    /// Per channel (KIVI keys): runs of `group_size` tokens (axis 2 of
    /// `[batch, heads, seq, head_dim]`) for each fixed channel.
    Channel,
}

/// Everything that decides how a tensor is encoded. Stored per tensor in the
/// compressed file's manifest, so decoding needs nothing else.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CodecParams {
    /// Bits per code: 2, 3, 4 or 8.
    pub bits: u8,
    pub grid: Grid,
    pub axis: Axis,
    pub group_size: usize,
    /// Seed of the randomized Hadamard rotation of each head vector, if any.
    pub rotation_seed: Option<u64>,
    /// First tokens kept in FP16 (attention sinks).
    pub sink_tokens: usize,
    /// Last tokens kept in FP16.
    pub recent_tokens: usize,
    /// Fraction of smallest-magnitude values dropped (not stored, decode to 0).
    pub sparsity: f64,
}

impl CodecParams {
    /// The original's method (ADR-002): 4-bit symmetric, flat groups, FP16 scales.
    pub fn adr002(group_size: usize) -> Self {
        CodecParams {
            bits: 4,
            grid: Grid::Symmetric,
            axis: Axis::Flat,
            group_size,
            rotation_seed: None,
            sink_tokens: 0,
            recent_tokens: 0,
            sparsity: 0.0,
        }
    }
}
