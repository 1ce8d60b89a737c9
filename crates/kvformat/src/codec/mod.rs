//! Codecs: how one tensor's values become a packed payload and back.
//!
//! A codec is pure: `encode` and `decode` see only values, a shape and
//! [`CodecParams`]; the container (names, dtypes, checksums, LZ4) lives in
//! `crate::packed`. `decode(encode(x))` is, by definition, the reconstruction
//! every metric is computed on, so compressor and decompressor agree bit for bit.

mod bitpack;
mod fit;
mod groups;
mod kept_tokens;
mod outliers;
mod quantizer;
mod rotation;
mod sparsity;

use std::borrow::Cow;

use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use groups::Plan;
use quantizer::{CodeRange, GroupParams};
pub use quantizer::{ScaleDtype, ZERO_GROUP_SCALE};
pub use rotation::SplitMix64;
pub use sparsity::SparseForm;

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
        }
    }
}

/// What is wrong with a tensor, its parameters or its payload. The caller
/// adds the tensor's name.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CodecError {
    #[error("unsupported bit width {0} (expected 2, 3, 4 or 8)")]
    UnsupportedBits(u8),
    #[error("group size must be at least 1")]
    ZeroGroupSize,
    #[error("sparsity {0} is outside [0, 1)")]
    InvalidSparsity(f64),
    #[error("outlier fraction {0} is outside [0, 1)")]
    InvalidOutliers(f64),
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

/// Codec facts that decoding needs beyond the params and the shape, chosen
/// by `encode` per tensor. Stored in the file manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    /// Storage type of every scale and offset of the tensor.
    pub scale_dtype: ScaleDtype,
    /// How dropped values are marked; absent in manifests written before
    /// the dense form existed, which all used the bitmap.
    #[serde(default)]
    pub sparse_form: SparseForm,
}

impl Layout {
    /// Whether the payload has a kept bitmap (and codes of kept values only).
    fn has_bitmap(&self, params: &CodecParams) -> bool {
        params.sparsity > 0.0 && self.sparse_form == SparseForm::Bitmap
    }
}

/// One tensor's packed payload and the layout needed to decode it.
#[derive(Clone, Debug, PartialEq)]
pub struct Encoded {
    pub payload: Vec<u8>,
    pub layout: Layout,
}

impl CodecParams {
    /// Checks that these params can encode a tensor of `shape`.
    pub fn validate(&self, shape: &[usize]) -> Result<(), CodecError> {
        if !matches!(self.bits, 2 | 3 | 4 | 8) {
            return Err(CodecError::UnsupportedBits(self.bits));
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
        groups::element_count(shape)?;
        let needs_heads = [
            (self.axis == Axis::Token, "per-token grouping"),
            (self.axis == Axis::Channel, "per-channel grouping"),
            (self.rotation_seed.is_some(), "rotation"),
            (
                self.sink_tokens > 0 || self.recent_tokens > 0,
                "keeping tokens in FP16",
            ),
        ];
        if let Some((_, feature)) = needs_heads.iter().find(|(needed, _)| *needed) {
            if shape.len() != 4 {
                return Err(CodecError::NeedsFourDims {
                    feature,
                    rank: shape.len(),
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

    fn code_range(&self) -> CodeRange {
        CodeRange {
            grid: self.grid,
            bits: self.bits,
        }
    }
}

/// Byte length of each payload section, in payload order.
#[derive(Clone, Copy, Debug)]
struct Sections {
    scales: usize,
    offsets: usize,
    kept_tokens: usize,
    bitmap: usize,
    codes: usize,
    outliers: usize,
    /// Number of stored codes (quantized values not dropped).
    code_count: usize,
}

impl Sections {
    fn new(plan: &Plan, params: &CodecParams, layout: &Layout) -> Result<Self, CodecError> {
        if params.sparsity > 0.0
            && params.grid == Grid::Asymmetric
            && layout.sparse_form == SparseForm::Dense
        {
            return Err(CodecError::DenseFormNeedsSymmetricGrid);
        }
        let overflow = || CodecError::ShapeOverflow;
        let quantized = plan.quantized_count();
        let scales = plan
            .geometry
            .group_count()
            .checked_mul(layout.scale_dtype.size_bytes())
            .ok_or_else(overflow)?;
        let offsets = match params.grid {
            Grid::Symmetric => 0,
            Grid::Asymmetric => scales,
        };
        let (bitmap, code_count) = if layout.has_bitmap(params) {
            (
                quantized.div_ceil(8),
                quantized - sparsity::dropped_count(params.sparsity, quantized),
            )
        } else {
            (0, quantized)
        };
        Ok(Sections {
            scales,
            offsets,
            kept_tokens: plan
                .kept_token_count()
                .checked_mul(2)
                .ok_or_else(overflow)?,
            bitmap,
            codes: bitpack::packed_len(code_count, params.bits).ok_or_else(overflow)?,
            outliers: outliers::section_len(params.outliers, quantized).ok_or_else(overflow)?,
            code_count,
        })
    }

    fn total(&self) -> Option<usize> {
        [
            self.offsets,
            self.kept_tokens,
            self.bitmap,
            self.codes,
            self.outliers,
        ]
        .iter()
        .try_fold(self.scales, |total, &len| total.checked_add(len))
    }
}

/// Exact payload length of a tensor of `shape` encoded with `params` and `layout`.
pub fn payload_len(
    shape: &[usize],
    params: &CodecParams,
    layout: &Layout,
) -> Result<usize, CodecError> {
    params.validate(shape)?;
    let plan = Plan::new(shape, params)?;
    Sections::new(&plan, params, layout)?
        .total()
        .ok_or(CodecError::ShapeOverflow)
}

/// Encodes the row-major `values` of a tensor of `shape`, dropped values in
/// whichever [`SparseForm`] is smaller.
pub fn encode(
    values: &[f32],
    shape: &[usize],
    params: &CodecParams,
) -> Result<Encoded, CodecError> {
    params.validate(shape)?;
    let plan = Plan::new(shape, params)?;
    let form = sparsity::smaller_form(
        params.grid,
        params.bits,
        params.sparsity,
        plan.quantized_count(),
    );
    encode_in_form(values, &plan, params, form)
}

/// [`encode`] with the sparse form given; `Dense` with `sparsity > 0` needs
/// the symmetric grid.
fn encode_in_form(
    values: &[f32],
    plan: &Plan,
    params: &CodecParams,
    form: SparseForm,
) -> Result<Encoded, CodecError> {
    if values.len() != plan.total_count() {
        return Err(CodecError::ValueCount {
            expected: plan.total_count(),
            actual: values.len(),
        });
    }
    if let Some(index) = first_non_finite(values) {
        return Err(CodecError::NonFinite {
            index,
            value: values[index],
        });
    }

    let (kept_values, mut quantized) = if plan.keeps_no_tokens() {
        (Vec::new(), Cow::Borrowed(values))
    } else {
        let (kept, quantized) = plan.split(values);
        (kept, Cow::Owned(quantized))
    };
    if let Some(seed) = params.rotation_seed {
        let quantized = quantized.to_mut();
        rotation::rotate(quantized, &rotation::signs(seed, plan.head_dim));
        if quantized.par_iter().any(|x| !x.is_finite()) {
            return Err(CodecError::RotationOverflow);
        }
    }
    let mut kept_mask =
        (params.sparsity > 0.0).then(|| sparsity::kept_mask(&quantized, params.sparsity));
    if form == SparseForm::Dense {
        if let Some(mask) = kept_mask.take() {
            // Zeroing what is dropped gives it the code of exactly 0 and
            // leaves every group's max|x| over kept values as it was, so both
            // forms reconstruct the same bits.
            let zeroed = quantized.to_mut();
            zeroed
                .par_iter_mut()
                .zip(&mask)
                .filter(|(_, &keep)| !keep)
                .for_each(|(x, _)| *x = 0.0);
        }
    }
    let grouped = if plan.axis == Axis::Channel {
        Cow::Owned(plan.in_group_order(&quantized))
    } else {
        quantized
    };
    let grouped_mask = kept_mask.as_ref().map(|mask| plan.in_group_order(mask));

    let range = params.code_range();
    if params.grid == Grid::Symmetric
        && grouped_mask.is_none()
        && params.fit == Fit::MinMax
        && params.outliers == 0.0
    {
        let layout = Layout {
            scale_dtype: ScaleDtype::F16,
            sparse_form: form,
        };
        let sections = Sections::new(plan, params, &layout)?;
        let mut payload = vec![0u8; sections.total().ok_or(CodecError::ShapeOverflow)?];
        let codes_start = payload.len() - sections.codes;
        let hot = quantizer::quantize_symmetric_f16_packed(
            &grouped,
            &plan.geometry,
            range,
            &mut payload[codes_start..],
        );
        if let Some(group_params) = hot {
            let mut head = Vec::with_capacity(codes_start);
            write_scales(&group_params.scales, ScaleDtype::F16, &mut head);
            kept_tokens::write(&kept_values, &mut head)?;
            payload[..codes_start].copy_from_slice(&head);
            return Ok(Encoded { payload, layout });
        }
    }
    let group_params = quantizer::group_params(
        &grouped,
        grouped_mask.as_deref(),
        &plan.geometry,
        range,
        params.fit,
    );
    let codes = quantizer::quantize(
        &grouped,
        grouped_mask.as_deref(),
        &plan.geometry,
        range,
        &group_params,
    );

    let layout = Layout {
        scale_dtype: group_params.dtype,
        sparse_form: form,
    };
    let sections = Sections::new(plan, params, &layout)?;
    let mut payload = Vec::with_capacity(sections.total().ok_or(CodecError::ShapeOverflow)?);
    write_scales(&group_params.scales, group_params.dtype, &mut payload);
    write_scales(&group_params.offsets, group_params.dtype, &mut payload);
    kept_tokens::write(&kept_values, &mut payload)?;
    if let Some(mask) = &kept_mask {
        payload.extend_from_slice(&packed(
            &mask.iter().map(|&k| u8::from(k)).collect::<Vec<_>>(),
            1,
        ));
    }
    payload.extend_from_slice(&packed(&codes, params.bits));
    if params.outliers > 0.0 {
        // validate() refuses outliers with sparsity: every value has a code.
        let mut restored = vec![0f32; grouped.len()];
        quantizer::dequantize(
            &codes,
            None,
            &plan.geometry,
            range,
            &group_params,
            &mut restored,
        );
        payload.extend(outliers::encode(&grouped, &restored, params.outliers)?);
    }
    debug_assert_eq!(Some(payload.len()), sections.total());
    Ok(Encoded { payload, layout })
}

/// Decodes a payload written by [`encode`] back to row-major f32 values.
/// Any payload, shape or layout gives a value or an error, never a panic,
/// and nothing is allocated before the payload length matches the shape.
pub fn decode(
    payload: &[u8],
    shape: &[usize],
    params: &CodecParams,
    layout: &Layout,
) -> Result<Vec<f32>, CodecError> {
    let (plan, sections) = checked_sections(payload, shape, params, layout)?;
    let mut values = vec![0f32; plan.total_count()];
    decode_checked(payload, &plan, &sections, params, layout, &mut values)?;
    Ok(values)
}

/// [`decode`] into a caller's buffer of exactly the shape's element count,
/// so a caller decoding many tensors can reuse one allocation (fresh memory
/// costs a page fault per 4 KiB, a large part of decoding time).
pub fn decode_into(
    payload: &[u8],
    shape: &[usize],
    params: &CodecParams,
    layout: &Layout,
    out: &mut [f32],
) -> Result<(), CodecError> {
    let (plan, sections) = checked_sections(payload, shape, params, layout)?;
    if out.len() != plan.total_count() {
        return Err(CodecError::ValueCount {
            expected: plan.total_count(),
            actual: out.len(),
        });
    }
    decode_checked(payload, &plan, &sections, params, layout, out)
}

/// The plan and payload sections, once the payload length matches them exactly.
fn checked_sections(
    payload: &[u8],
    shape: &[usize],
    params: &CodecParams,
    layout: &Layout,
) -> Result<(Plan, Sections), CodecError> {
    params.validate(shape)?;
    let plan = Plan::new(shape, params)?;
    let sections = Sections::new(&plan, params, layout)?;
    let expected = sections.total().ok_or(CodecError::ShapeOverflow)?;
    if payload.len() != expected {
        return Err(CodecError::PayloadSize {
            expected,
            actual: payload.len(),
        });
    }
    Ok((plan, sections))
}

fn decode_checked(
    payload: &[u8],
    plan: &Plan,
    sections: &Sections,
    params: &CodecParams,
    layout: &Layout,
    out: &mut [f32],
) -> Result<(), CodecError> {
    let (scale_bytes, rest) = payload.split_at(sections.scales);
    let (offset_bytes, rest) = rest.split_at(sections.offsets);
    let (kept_bytes, rest) = rest.split_at(sections.kept_tokens);
    let (bitmap_bytes, rest) = rest.split_at(sections.bitmap);
    let (code_bytes, outlier_bytes) = rest.split_at(sections.codes);

    let group_params = GroupParams {
        dtype: layout.scale_dtype,
        scales: read_scales(scale_bytes, layout.scale_dtype)?,
        offsets: read_offsets(offset_bytes, layout.scale_dtype)?,
    };
    let kept_values = kept_tokens::read(kept_bytes)?;
    let range = params.code_range();

    // ADR-002 and other plain symmetric tensors: codes straight into the output.
    let has_bitmap = layout.has_bitmap(params);
    let plain_symmetric = params.grid == Grid::Symmetric
        && !has_bitmap
        && params.rotation_seed.is_none()
        && plan.keeps_no_tokens()
        && plan.axis != Axis::Channel
        && params.outliers == 0.0;
    if plain_symmetric
        && quantizer::dequantize_symmetric_packed(
            code_bytes,
            &plan.geometry,
            range,
            &group_params.scales,
            out,
        )
    {
        return Ok(());
    }

    let kept_mask = has_bitmap
        .then(|| read_bitmap(bitmap_bytes, plan.quantized_count(), sections.code_count))
        .transpose()?;
    let mut codes = vec![0u8; sections.code_count];
    bitpack::unpack(code_bytes, params.bits, &mut codes);

    let grouped_mask = kept_mask.as_ref().map(|mask| plan.in_group_order(mask));
    let mut grouped = vec![0f32; plan.quantized_count()];
    quantizer::dequantize(
        &codes,
        grouped_mask.as_deref(),
        &plan.geometry,
        range,
        &group_params,
        &mut grouped,
    );
    if params.outliers > 0.0 {
        outliers::apply(outlier_bytes, params.outliers, &mut grouped)?;
    }
    let mut quantized = plan.in_row_major_order(grouped);
    if let Some(seed) = params.rotation_seed {
        rotation::unrotate(&mut quantized, &rotation::signs(seed, plan.head_dim));
    }
    if plan.keeps_no_tokens() {
        out.copy_from_slice(&quantized);
    } else {
        plan.join(&kept_values, &quantized, out);
    }
    Ok(())
}

/// Index of the first NaN or infinity, scanning in vectorizable chunks.
fn first_non_finite(values: &[f32]) -> Option<usize> {
    const CHUNK: usize = 1 << 14;
    let chunk = values
        .par_chunks(CHUNK)
        .position_first(|chunk| chunk.iter().fold(false, |found, x| found | !x.is_finite()))?;
    let start = chunk * CHUNK;
    values[start..]
        .iter()
        .position(|x| !x.is_finite())
        .map(|offset| start + offset)
}

fn write_scales(values: &[f32], dtype: ScaleDtype, payload: &mut Vec<u8>) {
    match dtype {
        ScaleDtype::F16 => {
            let mut halves = vec![f16::ZERO; values.len()];
            halves.convert_from_f32_slice(values);
            halves
                .iter()
                .for_each(|half| payload.extend_from_slice(&half.to_le_bytes()));
        }
        ScaleDtype::F32 => values
            .iter()
            .for_each(|value| payload.extend_from_slice(&value.to_le_bytes())),
    }
}

fn read_floats(bytes: &[u8], dtype: ScaleDtype) -> impl Iterator<Item = f32> + '_ {
    bytes
        .chunks_exact(dtype.size_bytes())
        .map(move |chunk| match dtype {
            ScaleDtype::F16 => f16::from_le_bytes([chunk[0], chunk[1]]).to_f32(),
            ScaleDtype::F32 => f32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]),
        })
}

/// Scales must be positive normal numbers of their dtype, as `encode` writes them.
fn read_scales(bytes: &[u8], dtype: ScaleDtype) -> Result<Vec<f32>, CodecError> {
    read_floats(bytes, dtype)
        .map(|scale| {
            let normal = match dtype {
                ScaleDtype::F16 => f16::from_f32(scale).is_normal(),
                ScaleDtype::F32 => scale.is_normal(),
            };
            if normal && scale > 0.0 {
                Ok(scale)
            } else {
                Err(CodecError::CorruptPayload(
                    "scale is not a positive normal number",
                ))
            }
        })
        .collect()
}

fn read_offsets(bytes: &[u8], dtype: ScaleDtype) -> Result<Vec<f32>, CodecError> {
    read_floats(bytes, dtype)
        .map(|offset| {
            offset
                .is_finite()
                .then_some(offset)
                .ok_or(CodecError::CorruptPayload("offset is not finite"))
        })
        .collect()
}

/// The kept mask, checked to keep exactly `kept` values with zero padding bits.
fn read_bitmap(bytes: &[u8], count: usize, kept: usize) -> Result<Vec<bool>, CodecError> {
    let mut bits = vec![0u8; count];
    bitpack::unpack(bytes, 1, &mut bits);
    if bits.iter().filter(|&&bit| bit == 1).count() != kept {
        return Err(CodecError::CorruptPayload(
            "sparsity bitmap keeps the wrong number of values",
        ));
    }
    let padding_bits = (8 - count % 8) % 8;
    if padding_bits > 0 && bytes[bytes.len() - 1] >> (8 - padding_bits) != 0 {
        return Err(CodecError::CorruptPayload(
            "sparsity bitmap has non-zero padding bits",
        ));
    }
    Ok(bits.into_iter().map(|bit| bit == 1).collect())
}

fn packed(codes: &[u8], bits: u8) -> Vec<u8> {
    let mut packed = vec![
        0u8;
        bitpack::packed_len(codes.len(), bits)
            .expect("length fits: checked by Sections::new")
    ];
    bitpack::pack(codes, bits, &mut packed);
    packed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adr002_hand_computed_groups_zero_group_and_ragged_tail() {
        // g = 4: [1.75, -3.5, 0.25, 0] | [0, 0, 0, 0] | [-0.75]
        let values = [1.75, -3.5, 0.25, 0.0, 0.0, 0.0, 0.0, 0.0, -0.75];
        let encoded = encode(&values, &[9], &CodecParams::adr002(4)).unwrap();
        assert_eq!(
            encoded.layout,
            Layout {
                scale_dtype: ScaleDtype::F16,
                sparse_form: SparseForm::Dense,
            }
        );
        // Scales: 3.5/7 = 0.5 (f16 0x3800); zero group 2^-14 (0x0400);
        // 0.75/7 = 0.10714.. -> f16 0x2EDB = 0.0625 * (1 + 731/1024) = 0.107116699.
        // Codes (q + 8): round(3.5) = 4 -> 12, -7 -> 1, round(0.5) = 1 -> 9, 0 -> 8;
        // four zeros -> 8; -0.75/0.107116699 = -7.0017 -> -7 -> 1.
        let expected = [
            0x00, 0x38, 0x00, 0x04, 0xDB, 0x2E, // scales
            0x1C, 0x89, 0x88, 0x88, 0x01, // codes, first value in the low nibble
        ];
        assert_eq!(encoded.payload, expected);
        let decoded = decode(
            &encoded.payload,
            &[9],
            &CodecParams::adr002(4),
            &encoded.layout,
        )
        .unwrap();
        let last_scale = 0.0625f32 * (1.0 + 731.0 / 1024.0);
        assert_eq!(
            decoded,
            [2.0, -3.5, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0, -7.0 * last_scale]
        );
    }

    /// g = 4, 4 bits: [1.75, -3.5, 0.25, 1.0 | 0.5, -7.0, 3.0, 2.0].
    const SPARSE_EXAMPLE: [f32; 8] = [1.75, -3.5, 0.25, 1.0, 0.5, -7.0, 3.0, 2.0];

    fn sparse_example(sparsity: f64) -> (CodecParams, Encoded, Vec<f32>) {
        let params = CodecParams {
            sparsity,
            ..CodecParams::adr002(4)
        };
        let encoded = encode(&SPARSE_EXAMPLE, &[8], &params).unwrap();
        let decoded = decode(&encoded.payload, &[8], &params, &encoded.layout).unwrap();
        (params, encoded, decoded)
    }

    #[test]
    fn small_sparsity_stores_the_dense_form_hand_computed() {
        // floor(0.2 * 8) = 1 dropped (0.25). Bitmap form: 1 + ceil(7 / 2) = 5
        // code bytes, dense: 4, so dense. Scales over kept values: 3.5/7 = 0.5
        // (0x3800), 7/7 = 1 (0x3C00). Codes (q + 8): 3.5 -> 4 -> 12, -7 -> 1,
        // dropped -> 8, 2 -> 10 | 0.5 -> 1 -> 9, -7 -> 1, 3 -> 11, 2 -> 10.
        let (_, encoded, decoded) = sparse_example(0.2);
        assert_eq!(encoded.layout.sparse_form, SparseForm::Dense);
        assert_eq!(
            encoded.payload,
            [0x00, 0x38, 0x00, 0x3C, 0x1C, 0xA8, 0x19, 0xAB]
        );
        assert_eq!(decoded, [2.0, -3.5, 0.0, 1.0, 1.0, -7.0, 3.0, 2.0]);
        assert_eq!(decoded[2].to_bits(), 0, "a dropped value is +0.0");
    }

    #[test]
    fn large_sparsity_stores_the_bitmap_form_hand_computed() {
        // floor(0.5 * 8) = 4 dropped: 0.25, 0.5, 1.0, 1.75 (indices 2, 4, 3, 0).
        // Bitmap 1 + codes 2 = 3 bytes < dense 4. Kept: -3.5 | -7, 3, 2; scales
        // 0.5 and 1.0. Bitmap bits 0..8 = 0,1,0,0,0,1,1,1 = 0xE2; codes 1, 1, 11, 10.
        let (_, encoded, decoded) = sparse_example(0.5);
        assert_eq!(encoded.layout.sparse_form, SparseForm::Bitmap);
        assert_eq!(encoded.payload, [0x00, 0x38, 0x00, 0x3C, 0xE2, 0x11, 0xAB]);
        assert_eq!(decoded, [0.0, -3.5, 0.0, 0.0, 0.0, -7.0, 3.0, 2.0]);
    }

    /// Whichever form is stored, the reconstruction is the same, bit for bit:
    /// scales come from kept values only in both, dropped values decode to +0.
    #[test]
    fn both_sparse_forms_reconstruct_the_same_bits() {
        let shape = [1, 2, 9, 16];
        let values: Vec<f32> = (0..288)
            .map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 0.01)
            .collect();
        for (bits, axis, rotation_seed, sink_tokens, group_size) in [
            (4, Axis::Flat, None, 0, 64),
            (3, Axis::Token, None, 1, 5),
            (2, Axis::Channel, Some(7), 2, 4),
            (8, Axis::Token, Some(1), 0, 16),
        ] {
            for sparsity in [0.01, 0.2, 0.5, 0.97] {
                let params = CodecParams {
                    bits,
                    axis,
                    rotation_seed,
                    sink_tokens,
                    sparsity,
                    ..CodecParams::adr002(group_size)
                };
                let plan = Plan::new(&shape, &params).unwrap();
                let decoded_bits = |form| {
                    let encoded = encode_in_form(&values, &plan, &params, form).unwrap();
                    assert_eq!(encoded.layout.sparse_form, form);
                    let decoded = decode(&encoded.payload, &shape, &params, &encoded.layout);
                    decoded
                        .unwrap()
                        .iter()
                        .map(|x| x.to_bits())
                        .collect::<Vec<_>>()
                };
                assert_eq!(
                    decoded_bits(SparseForm::Bitmap),
                    decoded_bits(SparseForm::Dense),
                    "{params:?}"
                );
            }
        }
    }

    /// Just below `1/bits` the dense form keeps the `sparsity = 0` size; just
    /// above it the bitmap form is smaller (4096 values, f16 scales).
    #[test]
    fn form_flips_to_the_bitmap_just_above_one_over_bits() {
        let values: Vec<f32> = (0..4096).map(|i| (i as f32 * 0.37).sin()).collect();
        for bits in [2u8, 3, 4, 8] {
            let params = |sparsity| CodecParams {
                bits,
                sparsity,
                ..CodecParams::adr002(64)
            };
            let encoded = |sparsity| encode(&values, &[4096], &params(sparsity)).unwrap();
            let unsparse = encoded(0.0).payload.len();
            assert_eq!(unsparse, 64 * 2 + 4096 * usize::from(bits) / 8);
            let break_even = 1.0 / f64::from(bits);
            let below = encoded(break_even - 0.01);
            assert_eq!(below.layout.sparse_form, SparseForm::Dense, "{bits} bits");
            assert_eq!(below.payload.len(), unsparse, "{bits} bits");
            let above = encoded(break_even + 0.01);
            assert_eq!(above.layout.sparse_form, SparseForm::Bitmap, "{bits} bits");
            assert!(above.payload.len() < unsparse, "{bits} bits");
        }
    }

    #[test]
    fn dense_form_is_refused_for_a_sparse_asymmetric_tensor() {
        let params = CodecParams {
            grid: Grid::Asymmetric,
            sparsity: 0.5,
            ..CodecParams::adr002(4)
        };
        let encoded = encode(&SPARSE_EXAMPLE, &[8], &params).unwrap();
        assert_eq!(encoded.layout.sparse_form, SparseForm::Bitmap);
        let dense = Layout {
            sparse_form: SparseForm::Dense,
            ..encoded.layout
        };
        assert_eq!(
            decode(&encoded.payload, &[8], &params, &dense),
            Err(CodecError::DenseFormNeedsSymmetricGrid)
        );
        assert_eq!(
            payload_len(&[8], &params, &dense),
            Err(CodecError::DenseFormNeedsSymmetricGrid)
        );
    }

    /// Manifests written before the dense form existed have no `sparse_form`
    /// and always stored a bitmap when sparse.
    #[test]
    fn a_layout_without_sparse_form_reads_as_the_bitmap_form() {
        let old: Layout = serde_json::from_str(r#"{"scale_dtype": "f16"}"#).unwrap();
        assert_eq!(old.sparse_form, SparseForm::Bitmap);
        let (params, encoded, decoded) = sparse_example(0.5);
        assert_eq!(
            decode(&encoded.payload, &[8], &params, &old).unwrap(),
            decoded
        );
        assert_eq!(
            serde_json::to_string(&encoded.layout).unwrap(),
            r#"{"scale_dtype":"f16","sparse_form":"bitmap"}"#
        );
    }

    #[test]
    fn adr002_payload_is_17_bytes_per_64_values() {
        let values: Vec<f32> = (0..64 * 100).map(|i| (i as f32 * 0.37).sin()).collect();
        let encoded = encode(&values, &[1, 4, 25, 64], &CodecParams::adr002(64)).unwrap();
        assert_eq!(encoded.payload.len(), 100 * 34);
        assert_eq!(
            payload_len(&[1, 4, 25, 64], &CodecParams::adr002(64), &encoded.layout),
            Ok(3400)
        );
    }

    #[test]
    fn scales_beyond_f16_switch_the_tensor_to_f32_scales() {
        // 1e6 / 7 = 142857 > 65504 (f16 max); 1e-7 / 7 is below f16's normal range.
        for big_or_tiny in [1.0e6f32, 1.0e-7] {
            let values = [1.0, 2.0, big_or_tiny, -big_or_tiny];
            let encoded = encode(&values, &[4], &CodecParams::adr002(2)).unwrap();
            assert_eq!(encoded.layout.scale_dtype, ScaleDtype::F32);
            assert_eq!(encoded.payload.len(), 2 * 4 + 2);
            let scale = f32::from_le_bytes(encoded.payload[4..8].try_into().unwrap());
            assert_eq!(scale, big_or_tiny / 7.0);
            let decoded = decode(
                &encoded.payload,
                &[4],
                &CodecParams::adr002(2),
                &encoded.layout,
            )
            .unwrap();
            assert_eq!(&decoded[2..], [7.0 * scale, -7.0 * scale]);
        }
    }

    /// The fused symmetric paths must produce exactly what the general
    /// group-by-group path does, with many tasks, aligned or not (5-value
    /// tokens in groups of 2 put task starts mid-byte at 3 bits).
    #[test]
    fn fused_symmetric_paths_match_the_general_path() {
        for (bits, axis, head_dim, group_size) in [
            (4, Axis::Flat, 64, 64),
            (3, Axis::Token, 5, 2),
            (2, Axis::Token, 8, 3),
            (8, Axis::Token, 5, 2),
        ] {
            let shape = [1, 2, 700, head_dim];
            let count = 2 * 700 * head_dim;
            let values: Vec<f32> = (0..count)
                .map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 0.01)
                .collect();
            let params = CodecParams {
                bits,
                axis,
                ..CodecParams::adr002(group_size)
            };
            let plan = Plan::new(&shape, &params).unwrap();
            let range = params.code_range();
            let general =
                quantizer::group_params(&values, None, &plan.geometry, range, Fit::MinMax);
            let codes = quantizer::quantize(&values, None, &plan.geometry, range, &general);
            let mut expected = Vec::new();
            write_scales(&general.scales, general.dtype, &mut expected);
            expected.extend_from_slice(&packed(&codes, bits));

            let encoded = encode(&values, &shape, &params).unwrap();
            assert_eq!(
                encoded.payload, expected,
                "{bits} bits, {axis:?}, D {head_dim}, g {group_size}"
            );
            let mut expected_values = vec![0f32; count];
            quantizer::dequantize(
                &codes,
                None,
                &plan.geometry,
                range,
                &general,
                &mut expected_values,
            );
            assert_eq!(
                decode(&encoded.payload, &shape, &params, &encoded.layout).unwrap(),
                expected_values
            );
        }
    }

    #[test]
    fn decode_rejects_wrong_lengths_and_layouts_without_panicking() {
        let values: Vec<f32> = (0..10).map(|i| i as f32 - 4.5).collect();
        let params = CodecParams::adr002(4);
        let encoded = encode(&values, &[10], &params).unwrap();
        let payload = &encoded.payload;
        let short = decode(
            &payload[..payload.len() - 1],
            &[10],
            &params,
            &encoded.layout,
        );
        assert_eq!(
            short,
            Err(CodecError::PayloadSize {
                expected: 11,
                actual: 10
            })
        );
        let mut long = payload.clone();
        long.push(0);
        assert!(matches!(
            decode(&long, &[10], &params, &encoded.layout),
            Err(CodecError::PayloadSize { .. })
        ));
        let f32_layout = Layout {
            scale_dtype: ScaleDtype::F32,
            ..encoded.layout.clone()
        };
        assert!(matches!(
            decode(payload, &[10], &params, &f32_layout),
            Err(CodecError::PayloadSize { .. })
        ));
        let overflowing = [usize::MAX, 2, 1, 1];
        assert_eq!(
            decode(payload, &overflowing, &params, &encoded.layout),
            Err(CodecError::ShapeOverflow)
        );
        let mut zero_scale = payload.clone();
        zero_scale[0..2].copy_from_slice(&[0, 0]);
        assert!(matches!(
            decode(&zero_scale, &[10], &params, &encoded.layout),
            Err(CodecError::CorruptPayload(_))
        ));
    }

    #[test]
    fn encode_rejects_bad_params_and_values() {
        let values = [1.0f32; 8];
        let bad_bits = CodecParams {
            bits: 5,
            ..CodecParams::adr002(4)
        };
        assert_eq!(
            encode(&values, &[8], &bad_bits),
            Err(CodecError::UnsupportedBits(5))
        );
        assert_eq!(
            encode(&values, &[8], &CodecParams::adr002(0)),
            Err(CodecError::ZeroGroupSize)
        );
        let token = CodecParams {
            axis: Axis::Token,
            ..CodecParams::adr002(4)
        };
        assert_eq!(
            encode(&values, &[2, 4], &token),
            Err(CodecError::NeedsFourDims {
                feature: "per-token grouping",
                rank: 2
            })
        );
        let rotated = CodecParams {
            rotation_seed: Some(1),
            ..CodecParams::adr002(4)
        };
        assert_eq!(
            encode(&[0.0; 6], &[1, 1, 2, 3], &rotated),
            Err(CodecError::HeadDimNotPowerOfTwo(3))
        );
        let sparse = CodecParams {
            sparsity: 1.0,
            ..CodecParams::adr002(4)
        };
        assert_eq!(
            encode(&values, &[8], &sparse),
            Err(CodecError::InvalidSparsity(1.0))
        );
        assert_eq!(
            encode(&values, &[9], &CodecParams::adr002(4)),
            Err(CodecError::ValueCount {
                expected: 9,
                actual: 8
            })
        );
        let mut with_nan = values;
        with_nan[3] = f32::NAN;
        assert!(matches!(
            encode(&with_nan, &[8], &CodecParams::adr002(4)),
            Err(CodecError::NonFinite { index: 3, .. })
        ));
    }
}
