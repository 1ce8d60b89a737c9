//! Stored scales and offsets, shared by every group quantizer: their
//! storage dtype, the exact values before storage and how they round to it.
//! (Its own module so that `fit`, `quantizer` and `codebook` depend on it,
//! not on each other.)

use half::f16;
use serde::{Deserialize, Serialize};

/// Scale of a group with nothing to scale (all zeros, constant, or all
/// dropped): the smallest positive normal f16, 2^-14, so it is never 0.
pub const ZERO_GROUP_SCALE: f32 = 6.103_515_6e-5;

/// How scales and offsets are stored in the payload, chosen per tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScaleDtype {
    /// Little-endian IEEE half: every scale a normal f16, every offset 0 or normal.
    F16,
    /// Little-endian f32, used when some group's scale or offset does not fit f16.
    F32,
    /// Little-endian bfloat16 (the quanto grids of a bf16 model).
    Bf16,
    /// One float8 e4m3fn byte (NVFP4's block scales).
    E4m3,
    /// One E8M0 byte, the power of two `2^(byte - 127)` (SGLang's fp4 block scales).
    E8m0,
}

impl ScaleDtype {
    pub fn size_bytes(self) -> usize {
        match self {
            ScaleDtype::F16 | ScaleDtype::Bf16 => 2,
            ScaleDtype::F32 => 4,
            ScaleDtype::E4m3 | ScaleDtype::E8m0 => 1,
        }
    }
}

/// Scales (and offsets for the asymmetric grid) of every group, as stored.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct GroupParams {
    pub dtype: ScaleDtype,
    pub scales: Vec<f32>,
    /// Empty for the symmetric grid.
    pub offsets: Vec<f32>,
}

/// The f16 a finite f32 rounds to, if that is zero or a normal f16.
fn to_normal_f16(x: f32, allow_zero: bool) -> Option<f32> {
    let half = f16::from_f32(x);
    (half.is_normal() || (allow_zero && half.to_f32() == 0.0)).then(|| half.to_f32())
}

/// Scale and offset before the storage dtype is applied.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ExactParams {
    /// `max|x| / qmax` (symmetric) or `(max - min) / (2^b - 1)` (asymmetric),
    /// unless fitted; 0 for a flat group.
    pub scale: f32,
    /// `min` (asymmetric) unless fitted, 0 (symmetric).
    pub offset: f32,
}

impl ExactParams {
    pub(crate) fn stored_f16(self) -> Option<(f32, f32)> {
        let scale = if self.scale == 0.0 {
            ZERO_GROUP_SCALE
        } else {
            to_normal_f16(self.scale, false)?
        };
        Some((scale, to_normal_f16(self.offset, true)?))
    }

    pub(crate) fn stored_f32(self) -> (f32, f32) {
        let scale = if self.scale == 0.0 {
            ZERO_GROUP_SCALE
        } else {
            // A non-zero scale below f32's normal range would lose precision
            // (or flush to 0); the smallest normal still meets `|err| <= scale/2`.
            self.scale.max(f32::MIN_POSITIVE)
        };
        (scale, self.offset)
    }
}
