//! The payload layout: which sections a tensor's payload has and how long
//! each is, the layout facts chosen at encode time, and the section codecs
//! shared by encoder and decoder (scales, offsets, bitmap, packed codes).

use half::f16;
use half::slice::HalfFloatSliceExt;
use serde::{Deserialize, Serialize};

use super::ecsq::EntropyCoder;
use super::fp8::E4M3;
use super::group_quantizer::GroupQuantizer;
use super::groups::Plan;
use super::scales::ScaleDtype;
use super::{bitpack, outliers, sparsity};
use super::{CodecError, CodecParams, SparseForm};

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
    /// Length of the codes section when its codes are entropy coded
    /// (`ecsq`), which the shape alone does not give; absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coded_bytes: Option<usize>,
    /// The coder of an entropy-coded codes section: absent in format 1,
    /// whose one coder was `range`; `rans` makes the file format 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coder: Option<EntropyCoder>,
}

impl Layout {
    /// Whether the payload has a kept bitmap (and codes of kept values only).
    pub(crate) fn has_bitmap(&self, params: &CodecParams) -> bool {
        params.sparsity > 0.0 && self.sparse_form == SparseForm::Bitmap
    }
}

/// One tensor's packed payload and the layout needed to decode it.
#[derive(Clone, Debug, PartialEq)]
pub struct Encoded {
    pub payload: Vec<u8>,
    pub layout: Layout,
}

/// Byte length of each payload section, in payload order.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Sections {
    pub scales: usize,
    pub offsets: usize,
    /// Stored codebook levels (`kmeans`).
    pub levels: usize,
    pub kept_tokens: usize,
    pub bitmap: usize,
    pub codes: usize,
    pub outliers: usize,
    /// Number of stored codes (quantized values not dropped).
    pub code_count: usize,
}

impl Sections {
    pub(crate) fn new(
        plan: &Plan,
        params: &CodecParams,
        layout: &Layout,
    ) -> Result<Self, CodecError> {
        if params.sparsity > 0.0
            && !params.grid.spec().exact_zero
            && layout.sparse_form == SparseForm::Dense
        {
            return Err(CodecError::DenseFormNeedsSymmetricGrid);
        }
        if !params
            .grid
            .spec()
            .scale_dtypes
            .contains(&layout.scale_dtype)
        {
            return Err(CodecError::ScaleDtype {
                grid: params.grid,
                dtype: layout.scale_dtype,
            });
        }
        let overflow = || CodecError::ShapeOverflow;
        let quantized = plan.quantized_count();
        let per_group = plan
            .geometry
            .group_count()
            .checked_mul(layout.scale_dtype.size_bytes())
            .ok_or_else(overflow)?;
        let grid = params.grid.spec();
        let section = |stored: bool| if stored { per_group } else { 0 };
        let (scales, offsets) = (section(grid.scales), section(grid.offsets));
        let codes = match (grid.entropy_coded, layout.coded_bytes) {
            (true, Some(coded)) => coded,
            (true, None) => return Err(CodecError::CodedBytes("missing")),
            (false, Some(_)) => return Err(CodecError::CodedBytes("given")),
            (false, None) if layout.coder.is_some() => return Err(CodecError::CoderGiven),
            (false, None) => bitpack::packed_len(code_count_of(plan, params, layout), params.bits)
                .ok_or_else(overflow)?,
        };
        let bitmap = if layout.has_bitmap(params) {
            quantized.div_ceil(8)
        } else {
            0
        };
        Ok(Sections {
            scales,
            offsets,
            levels: GroupQuantizer::levels_len(params),
            kept_tokens: plan
                .kept_token_count()
                .checked_mul(2)
                .ok_or_else(overflow)?,
            bitmap,
            codes,
            outliers: outliers::section_len(params.outliers, quantized).ok_or_else(overflow)?,
            code_count: code_count_of(plan, params, layout),
        })
    }

    pub(crate) fn total(&self) -> Option<usize> {
        [
            self.offsets,
            self.levels,
            self.kept_tokens,
            self.bitmap,
            self.codes,
            self.outliers,
        ]
        .iter()
        .try_fold(self.scales, |total, &len| total.checked_add(len))
    }
}

/// Number of stored codes: the quantized values a bitmap does not drop.
fn code_count_of(plan: &Plan, params: &CodecParams, layout: &Layout) -> usize {
    let quantized = plan.quantized_count();
    if layout.has_bitmap(params) {
        quantized - sparsity::dropped_count(params.sparsity, quantized)
    } else {
        quantized
    }
}

/// Exact payload length of a tensor of `shape` encoded with `params` and
/// `layout` (whose `coded_bytes` gives an entropy-coded codes section's).
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

pub(crate) fn write_scales(values: &[f32], dtype: ScaleDtype, payload: &mut Vec<u8>) {
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
        ScaleDtype::Bf16 => values.iter().for_each(|&value| {
            payload.extend_from_slice(&half::bf16::from_f32(value).to_le_bytes())
        }),
        // The fp4 grids' scales are values of these dtypes already.
        ScaleDtype::E4m3 => payload.extend(values.iter().map(|&value| E4M3.encode(value))),
        ScaleDtype::E8m0 => {
            payload.extend(values.iter().map(|&value| (value.to_bits() >> 23) as u8))
        }
    }
}

fn read_floats(bytes: &[u8], dtype: ScaleDtype) -> impl Iterator<Item = f32> + '_ {
    bytes
        .chunks_exact(dtype.size_bytes())
        .map(move |chunk| match dtype {
            ScaleDtype::F16 => f16::from_le_bytes([chunk[0], chunk[1]]).to_f32(),
            ScaleDtype::F32 => f32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]),
            ScaleDtype::Bf16 => half::bf16::from_le_bytes([chunk[0], chunk[1]]).to_f32(),
            ScaleDtype::E4m3 => E4M3.decode(chunk[0]),
            ScaleDtype::E8m0 => e8m0_value(chunk[0]),
        })
}

/// The power of two an E8M0 byte stands for; 255 is NaN (OCP MX), and
/// byte 0, `2^-127`, is an f32 subnormal.
fn e8m0_value(byte: u8) -> f32 {
    match byte {
        255 => f32::NAN,
        0 => f32::from_bits(1 << 22),
        byte => f32::from_bits(u32::from(byte) << 23),
    }
}

/// Scales must be positive normal numbers of their dtype, as `encode` writes
/// them, or (`any_finite`: engine grids) finite, as the engine computes them.
pub(crate) fn read_scales(
    bytes: &[u8],
    dtype: ScaleDtype,
    any_finite: bool,
) -> Result<Vec<f32>, CodecError> {
    if any_finite {
        return read_offsets(bytes, dtype);
    }
    read_floats(bytes, dtype)
        .map(|scale| {
            let normal = match dtype {
                ScaleDtype::F16 => f16::from_f32(scale).is_normal(),
                ScaleDtype::F32 | ScaleDtype::Bf16 | ScaleDtype::E4m3 | ScaleDtype::E8m0 => {
                    scale.is_normal()
                }
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

pub(crate) fn read_offsets(bytes: &[u8], dtype: ScaleDtype) -> Result<Vec<f32>, CodecError> {
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
pub(crate) fn read_bitmap(
    bytes: &[u8],
    count: usize,
    kept: usize,
) -> Result<Vec<bool>, CodecError> {
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
