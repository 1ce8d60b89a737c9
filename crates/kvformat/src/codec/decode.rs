//! `decode`: payload to values, checking every byte it reads.

use super::fused;
use super::group_quantizer::GroupQuantizer;
use super::groups::Plan;
use super::layout::{read_bitmap, read_offsets, read_scales, Sections};
use super::quantizer::CodeRange;
use super::scales::GroupParams;
use super::{fused_path, Axis, CodecError, CodecParams, Layout};
use super::{kept_tokens, outliers, rotation};

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
pub(crate) fn checked_sections(
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
    let (level_bytes, rest) = rest.split_at(sections.levels);
    let (kept_bytes, rest) = rest.split_at(sections.kept_tokens);
    let (bitmap_bytes, rest) = rest.split_at(sections.bitmap);
    let (code_bytes, outlier_bytes) = rest.split_at(sections.codes);
    let stored = Stored {
        group_params: GroupParams {
            dtype: layout.scale_dtype,
            scales: read_scales(
                scale_bytes,
                layout.scale_dtype,
                params.grid.spec().any_finite_scales,
            )?,
            offsets: read_offsets(offset_bytes, layout.scale_dtype)?,
        },
        level_bytes,
        bitmap_bytes,
        code_bytes,
        outlier_bytes,
    };
    let kept_values = kept_tokens::read(kept_bytes)?;

    // Grouped order is the output's own when nothing is kept, rotated or transposed.
    let llama_block = params.llama_rotation_block(plan.head_dim);
    if params.rotation_seed.is_none()
        && llama_block.is_none()
        && plan.keeps_no_tokens()
        && plan.axis != Axis::Channel
    {
        return dequantize_grouped(&stored, plan, sections, params, layout, out);
    }
    let mut grouped = vec![0f32; plan.quantized_count()];
    dequantize_grouped(&stored, plan, sections, params, layout, &mut grouped)?;
    let quantized = row_major_unrotated(grouped, plan, params);
    if plan.keeps_no_tokens() {
        out.copy_from_slice(&quantized);
    } else {
        plan.join(&kept_values, &quantized, out);
    }
    Ok(())
}

/// The quantized values, row-major and unrotated, from their dequantized
/// values in group order. The encoder's reconstruction (`encode_observed`)
/// ends the same way.
pub(crate) fn row_major_unrotated(
    grouped: Vec<f32>,
    plan: &Plan,
    params: &CodecParams,
) -> Vec<f32> {
    let mut quantized = plan.in_row_major_order(grouped);
    if let Some(seed) = params.rotation_seed {
        rotation::unrotate(&mut quantized, seed, plan.head_dim);
    }
    if let Some(block) = params.llama_rotation_block(plan.head_dim) {
        rotation::llama_hadamard(&mut quantized, block);
    }
    quantized
}

/// The payload sections the quantizer reads.
struct Stored<'a> {
    group_params: GroupParams,
    level_bytes: &'a [u8],
    bitmap_bytes: &'a [u8],
    code_bytes: &'a [u8],
    outlier_bytes: &'a [u8],
}

/// The quantized values in group order, outliers applied.
fn dequantize_grouped(
    stored: &Stored<'_>,
    plan: &Plan,
    sections: &Sections,
    params: &CodecParams,
    layout: &Layout,
    grouped: &mut [f32],
) -> Result<(), CodecError> {
    let geometry = &plan.geometry;
    let range = CodeRange::of(params);
    let has_bitmap = layout.has_bitmap(params);
    let fused = fused_path(params, has_bitmap, false)
        && fused::dequantize_symmetric_packed(
            stored.code_bytes,
            geometry,
            range,
            &stored.group_params.scales,
            grouped,
        );
    if !fused {
        let kept_mask = has_bitmap
            .then(|| {
                read_bitmap(
                    stored.bitmap_bytes,
                    plan.quantized_count(),
                    sections.code_count,
                )
            })
            .transpose()?;
        let grouped_mask = kept_mask.as_ref().map(|mask| plan.in_group_order(mask));
        let mask = grouped_mask.as_deref();
        GroupQuantizer::read(params, stored.level_bytes, layout.coder)?.dequantize_section(
            &stored.group_params,
            stored.code_bytes,
            sections.code_count,
            mask,
            geometry,
            grouped,
        )?;
    }
    if params.outliers > 0.0 {
        outliers::apply(stored.outlier_bytes, params.outliers, grouped)?;
    }
    Ok(())
}
