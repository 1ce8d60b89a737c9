//! The codec's vocabulary: grids, axes, fits, the parameters stored per
//! tensor in the manifest, their validation, and the codec's errors.

use serde::{Deserialize, Serialize};

use super::grid::{spoken_list, Grid, SUPPORTED_BITS};
use super::groups;
use super::scales::ScaleDtype;

/// The bits per value an `ecsq` step may aim at (`CodecParams::rate`).
pub const RATE_RANGE: std::ops::RangeInclusive<f64> = 0.5..=16.0;

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

/// How the encoder chooses a group's scale (and offset). Decoding does not
/// depend on it: either way a value is `code·scale + offset`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fit {
    /// The grid spans the group's extremes (ADR-002, KIVI): `|error| <= scale / 2`.
    #[default]
    MinMax,
    /// Least squares: the parameters that minimize the group's squared error,
    /// clipping outliers where that pays (see `fit.rs`).
    Mse,
}

impl Fit {
    fn is_min_max(&self) -> bool {
        *self == Fit::MinMax
    }
}

/// Everything that decides how a tensor is encoded. Stored per tensor in the
/// compressed file's manifest, so decoding needs nothing else.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CodecParams {
    /// Bits per code: one of [`SUPPORTED_BITS`].
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
    /// Fraction of smallest-magnitude values dropped (decode to 0; stored as
    /// the layout's [`SparseForm`] says).
    pub sparsity: f64,
    /// Absent from manifests (and so from files) that use the default.
    #[serde(default, skip_serializing_if = "Fit::is_min_max")]
    pub fit: Fit,
    /// Fraction of quantized values kept in FP16 beside the codes, the ones
    /// whose codes err most (see `outliers.rs`); absent when 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub outliers: f64,
    /// `ecsq` only: the payload's size in bits per value (kept tokens
    /// included), a fraction such as 2.35; the encoder searches the largest
    /// step that fits it. Without it the step is the Gaussian estimate for
    /// `bits`. Decoding does not need it: the step is in the payload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<f64>,
    /// Float8 grids only: every scale is 1.0 (vLLM's default), not the
    /// group's `max|x| / max_finite`. Decoding does not need it.
    #[serde(default, skip_serializing_if = "is_false")]
    pub unit_scale: bool,
    /// llama.cpp grids only: the cache is stored rotated as llama.cpp does
    /// by default since PR #21038, with this tensor's block rule; decoding
    /// rotates back (the rotation is its own inverse). Absent: unrotated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub llama_rotation: Option<LlamaRotation>,
    /// quanto grids only: the model's dtype (`f16`, `bf16` or `f32`; the
    /// input tensor's), in which transformers computes and stores scales,
    /// shifts and values; absent: f32.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_dtype: Option<ScaleDtype>,
}

/// llama.cpp's attention rotation of quantized caches (PR #21038,
/// `llama_kv_cache::build_input_{k,v}_rot`): the orthonormal Walsh–Hadamard
/// transform over consecutive blocks along head_dim, no signs, the same for
/// every layer and head. Which block a tensor gets depends on its kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LlamaRotation {
    /// K (Q is rotated alike): the largest power of two, at least 64, that divides head_dim.
    Key,
    /// V (the attention output is rotated back alike): blocks of 64.
    Value,
}

impl LlamaRotation {
    /// The rotation's block for `head_dim`, or `None` where llama.cpp does
    /// not rotate (head_dim not a multiple of 64).
    pub fn block(self, head_dim: usize) -> Option<usize> {
        if head_dim == 0 || head_dim % 64 != 0 {
            return None;
        }
        Some(match self {
            LlamaRotation::Key => 1 << head_dim.trailing_zeros(),
            LlamaRotation::Value => 64,
        })
    }
}

fn is_false(value: &bool) -> bool {
    !*value
}

fn is_zero(value: &f64) -> bool {
    *value == 0.0
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
            fit: Fit::MinMax,
            outliers: 0.0,
            rate: None,
            unit_scale: false,
            llama_rotation: None,
            model_dtype: None,
        }
    }

    /// The block of llama.cpp's rotation for tensors of `head_dim`, if they are rotated.
    pub fn llama_rotation_block(&self, head_dim: usize) -> Option<usize> {
        self.llama_rotation
            .and_then(|rotation| rotation.block(head_dim))
    }
}

/// What is wrong with a tensor, its parameters or its payload. The caller
/// adds the tensor's name.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CodecError {
    #[error("unsupported bit width {0} (expected 2, 3, 4, 5, 6 or 8)")]
    UnsupportedBits(u8),
    #[error("the {grid} grid takes {} bits, not {bits}", spoken_list(grid.spec().bits))]
    GridBits { grid: Grid, bits: u8 },
    #[error("group size must be at least 1")]
    ZeroGroupSize,
    #[error("sparsity {0} is outside [0, 1)")]
    InvalidSparsity(f64),
    #[error("outlier fraction {0} is outside [0, 1)")]
    InvalidOutliers(f64),
    #[error("a rate ({0}) is for the ecsq grid only, from {min} to {max} bits", min = RATE_RANGE.start(), max = RATE_RANGE.end())]
    InvalidRate(f64),
    #[error("the {grid} grid does not combine with {feature}")]
    GridWith { grid: Grid, feature: &'static str },
    #[error("the layout's coded_bytes is {0}: the ecsq grid needs it, no other grid has it")]
    CodedBytes(&'static str),
    #[error("the layout names an entropy coder: only the ecsq grid has one")]
    CoderGiven,
    #[error("outliers cannot be combined with sparsity")]
    OutliersWithSparsity,
    #[error(
        "too few values near grouped index {index} fit in FP16 to keep as outliers; \
         use a smaller outlier fraction"
    )]
    OutlierOverflow { index: usize },
    #[error("the dense sparse form needs the symmetric grid, which has an exact 0")]
    DenseFormNeedsSymmetricGrid,
    #[error("{feature} needs a 4-D [batch, heads, seq, head_dim] tensor, got {rank}-D")]
    NeedsFourDims { feature: &'static str, rank: usize },
    #[error("rotation needs head_dim to be a power of two, got {0}")]
    HeadDimNotPowerOfTwo(usize),
    #[error("the {grid} grid is an engine's cache type: blocks of {block} along head_dim (per-token groups of {block})")]
    EngineBlocks { grid: Grid, block: usize },
    #[error("the {grid} grid needs head_dim to be a multiple of {block} (the engine's block), got {head_dim}")]
    EngineHeadDim {
        grid: Grid,
        block: usize,
        head_dim: usize,
    },
    #[error("a unit scale is for the float8 and nvfp4 grids only, not {grid}")]
    UnitScale { grid: Grid },
    #[error(
        "the {grid} grid is transformers' cache type: flat groups of {group} consecutive values"
    )]
    EngineFlatGroups { grid: Grid, group: usize },
    #[error("the {grid} grid needs a multiple of {group} values per batch entry (quanto's groups), got {values}")]
    EngineFlatValues {
        grid: Grid,
        group: usize,
        values: usize,
    },
    #[error("the {grid} grid does not store its scales as {dtype:?}")]
    ScaleDtype { grid: Grid, dtype: ScaleDtype },
    #[error("shape has too many elements")]
    ShapeOverflow,
    #[error("{actual} values given for a shape of {expected} elements")]
    ValueCount { expected: usize, actual: usize },
    #[error("value {value} at flat index {index} is not finite")]
    NonFinite { index: usize, value: f32 },
    #[error("kept-token value {value} does not fit in FP16")]
    KeptTokenOverflow { value: f32 },
    #[error("values too large to rotate: the Hadamard rotation overflows f32")]
    RotationOverflow,
    #[error("payload is {actual} bytes, expected {expected}")]
    PayloadSize { expected: usize, actual: usize },
    #[error("corrupt payload: {0}")]
    CorruptPayload(&'static str),
}

impl CodecParams {
    /// Checks that these params can encode a tensor of `shape`: the
    /// settings ([`CodecParams::check_settings`]), then the shape
    /// ([`CodecParams::check_shape`]).
    pub fn validate(&self, shape: &[usize]) -> Result<(), CodecError> {
        self.check_settings()?;
        self.check_shape(shape)
    }

    /// The rules between the settings themselves, whatever the tensor: the
    /// one rule set, which `kv-compress` applies once per run to every
    /// combination its flags can give a tensor and reports as flag errors.
    pub fn check_settings(&self) -> Result<(), CodecError> {
        if !SUPPORTED_BITS.contains(&self.bits) {
            return Err(CodecError::UnsupportedBits(self.bits));
        }
        let grid = self.grid.spec();
        if !grid.bits.contains(&self.bits) {
            return Err(CodecError::GridBits {
                grid: self.grid,
                bits: self.bits,
            });
        }
        if self.group_size == 0 {
            return Err(CodecError::ZeroGroupSize);
        }
        if !(0.0..1.0).contains(&self.sparsity) {
            return Err(CodecError::InvalidSparsity(self.sparsity));
        }
        if !(0.0..1.0).contains(&self.outliers) {
            return Err(CodecError::InvalidOutliers(self.outliers));
        }
        if self.outliers > 0.0 && self.sparsity > 0.0 {
            return Err(CodecError::OutliersWithSparsity);
        }
        if let Some(rate) = self.rate {
            if !grid.rate || !RATE_RANGE.contains(&rate) {
                return Err(CodecError::InvalidRate(rate));
            }
        }
        // An engine's cache has no rotation and no tokens kept aside.
        if grid.engine.is_some() {
            let extras = [
                (self.rotation_seed.is_some(), "rotation"),
                (
                    self.sink_tokens > 0 || self.recent_tokens > 0,
                    "keeping tokens in FP16",
                ),
            ];
            if let Some((_, feature)) = extras.iter().find(|(asked, _)| *asked) {
                return Err(CodecError::GridWith {
                    grid: self.grid,
                    feature,
                });
            }
        }
        if let Some(block) = self.grid.engine_block() {
            if self.axis != Axis::Token || self.group_size != block {
                return Err(CodecError::EngineBlocks {
                    grid: self.grid,
                    block,
                });
            }
        }
        if self.unit_scale && !grid.engine.as_ref().is_some_and(|e| e.unit_scale) {
            return Err(CodecError::UnitScale { grid: self.grid });
        }
        let model_dtype_fits = self.model_dtype.is_none_or(|dtype| {
            self.grid.is_quanto() && super::quanto::MODEL_DTYPES.contains(&dtype)
        });
        if !model_dtype_fits {
            return Err(CodecError::GridWith {
                grid: self.grid,
                feature: "a model dtype",
            });
        }
        if let Some(group) = self.grid.engine_flat_group() {
            if self.axis != Axis::Flat || self.group_size != group {
                return Err(CodecError::EngineFlatGroups {
                    grid: self.grid,
                    group,
                });
            }
        }
        let llama_rotates = grid.engine.as_ref().is_some_and(|e| e.llama_rotation);
        if self.llama_rotation.is_some() && !llama_rotates {
            return Err(CodecError::GridWith {
                grid: self.grid,
                feature: "llama.cpp's rotation",
            });
        }
        // A grid that never clips (ecsq) needs nothing kept beside its
        // codes; dropping values would need a mask it does not have.
        let unsupported = [
            (self.sparsity > 0.0 && !grid.sparsity, "sparsity"),
            (self.outliers > 0.0 && !grid.outliers, "outliers"),
        ];
        if let Some((_, feature)) = unsupported.iter().find(|(refused, _)| *refused) {
            return Err(CodecError::GridWith {
                grid: self.grid,
                feature,
            });
        }
        Ok(())
    }

    /// The rules between the settings and a tensor's shape: the only check
    /// left per tensor once the settings are checked.
    pub fn check_shape(&self, shape: &[usize]) -> Result<(), CodecError> {
        groups::element_count(shape)?;
        let needs_heads = [
            (self.axis == Axis::Token, "per-token grouping"),
            (self.axis == Axis::Channel, "per-channel grouping"),
            (self.rotation_seed.is_some(), "rotation"),
            (
                self.sink_tokens > 0 || self.recent_tokens > 0,
                "keeping tokens in FP16",
            ),
            (self.llama_rotation.is_some(), "llama.cpp's rotation"),
        ];
        if let Some((_, feature)) = needs_heads.iter().find(|(needed, _)| *needed) {
            if shape.len() != 4 {
                return Err(CodecError::NeedsFourDims {
                    feature,
                    rank: shape.len(),
                });
            }
        }
        if let Some(group) = self.grid.engine_flat_group() {
            // quanto groups each batch entry's values (`axis_numel`).
            let per_entry: usize = shape.iter().skip(1).product();
            if per_entry % group != 0 {
                return Err(CodecError::EngineFlatValues {
                    grid: self.grid,
                    group,
                    values: per_entry,
                });
            }
        }
        if let Some(block) = self.grid.engine_block() {
            if shape[3] % block != 0 {
                return Err(CodecError::EngineHeadDim {
                    grid: self.grid,
                    block,
                    head_dim: shape[3],
                });
            }
        }
        if self.rotation_seed.is_some() {
            let head_dim = shape[3];
            if head_dim != 0 && !head_dim.is_power_of_two() {
                return Err(CodecError::HeadDimNotPowerOfTwo(head_dim));
            }
        }
        Ok(())
    }
}
