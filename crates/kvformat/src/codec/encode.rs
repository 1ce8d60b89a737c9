//! `encode`: values to payload.

use std::borrow::Cow;

use rayon::prelude::*;

use super::bitpack::packed;
use super::decode::row_major_unrotated;
use super::fused;
use super::group_quantizer::GroupQuantizer;
use super::groups::Plan;
use super::layout::{write_scales, Sections};
use super::quantizer::CodeRange;
use super::scales::ScaleDtype;
use super::{fused_path, Axis, CodecError, CodecParams, Encoded, Layout, SparseForm};
use super::{kept_tokens, outliers, rotation, sparsity};
use crate::dtype::first_non_finite;

/// Encodes the row-major `values` of a tensor of `shape`, dropped values in
/// whichever [`SparseForm`] is smaller.
pub fn encode(
    values: &[f32],
    shape: &[usize],
    params: &CodecParams,
) -> Result<Encoded, CodecError> {
    params.validate(shape)?;
    let plan = Plan::new(shape, params)?;
    encode_in_form(values, &plan, params, smaller_form(&plan, params))
}

/// The [`SparseForm`] that stores `plan`'s dropped values in fewer bytes.
fn smaller_form(plan: &Plan, params: &CodecParams) -> SparseForm {
    sparsity::smaller_form(
        params.grid,
        params.bits,
        params.sparsity,
        plan.quantized_count(),
    )
}

/// [`encode`], handing the reconstruction, `decode` of the result bit for
/// bit, to `observe(original, reconstructed)` in consecutive row-major runs
/// that cover the tensor once. For ADR-002-like params (symmetric grid,
/// min/max fit, flat or per-token groups, nothing dropped, kept, rotated or
/// kept as outliers) it is one pass on the calling thread: the reconstruction
/// is made beside the codes, block by block, and never decoded back; any
/// other params encode, then decode the whole tensor.
pub fn encode_observed(
    values: &[f32],
    shape: &[usize],
    params: &CodecParams,
    observe: &mut dyn FnMut(&[f32], &[f32]),
) -> Result<Encoded, CodecError> {
    params.validate(shape)?;
    let plan = Plan::new(shape, params)?;
    let in_row_major_order =
        params.rotation_seed.is_none() && plan.keeps_no_tokens() && plan.axis != Axis::Channel;
    if fused_path(params, false, true)
        && params.sparsity == 0.0
        && params.outliers == 0.0
        && in_row_major_order
    {
        check_values(values, &plan)?;
        if let Some(encoded) = encode_fused_observed(values, &plan, params, observe)? {
            return Ok(encoded);
        }
    }
    let (encoded, reconstruction) =
        encode_reconstructed(values, &plan, params, smaller_form(&plan, params), true)?;
    let reconstruction = reconstruction.expect("asked for");
    observe(values, &reconstruction);
    Ok(encoded)
}

/// The one-pass branch of [`encode_observed`]; `None` (nothing observed)
/// where the fused quantizer does not apply.
fn encode_fused_observed(
    values: &[f32],
    plan: &Plan,
    params: &CodecParams,
    observe: &mut dyn FnMut(&[f32], &[f32]),
) -> Result<Option<Encoded>, CodecError> {
    let layout = Layout {
        scale_dtype: ScaleDtype::F16,
        sparse_form: smaller_form(plan, params),
        coded_bytes: None,
        coder: None,
    };
    let sections = Sections::new(plan, params, &layout)?;
    let total = sections.total().ok_or(CodecError::ShapeOverflow)?;
    debug_assert_eq!(
        total,
        sections.scales + sections.codes,
        "only scales and codes"
    );
    let mut payload = vec![0u8; total];
    let (scale_bytes, code_bytes) = payload.split_at_mut(sections.scales);
    let Some(scales) = fused::quantize_symmetric_f16_observed(
        values,
        &plan.geometry,
        CodeRange::of(params),
        code_bytes,
        observe,
    ) else {
        return Ok(None);
    };
    let mut head = Vec::with_capacity(sections.scales);
    write_scales(&scales, ScaleDtype::F16, &mut head);
    scale_bytes.copy_from_slice(&head);
    Ok(Some(Encoded { payload, layout }))
}

/// The value count matches the plan, and every value is finite.
fn check_values(values: &[f32], plan: &Plan) -> Result<(), CodecError> {
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
    Ok(())
}

/// [`encode`] with the sparse form given; `Dense` with `sparsity > 0` needs
/// the symmetric grid.
pub(crate) fn encode_in_form(
    values: &[f32],
    plan: &Plan,
    params: &CodecParams,
    form: SparseForm,
) -> Result<Encoded, CodecError> {
    encode_reconstructed(values, plan, params, form, false).map(|(encoded, _)| encoded)
}

/// An encoding, and (when asked for) the values `decode` makes of it: the
/// tensor's, or the dequantized ones in group order inside the encoder.
type Reconstructed = (Encoded, Option<Vec<f32>>);

/// [`encode_in_form`], and with `reconstruct` what `decode` will make of
/// the payload, bit for bit: each group is dequantized from its codes as
/// they are made, and the rest of decoding (row-major order, unrotation,
/// kept tokens as stored) is decode's own [`row_major_unrotated`] and
/// join, so the payload is never parsed, unpacked or range-decoded again.
fn encode_reconstructed(
    values: &[f32],
    plan: &Plan,
    params: &CodecParams,
    form: SparseForm,
    reconstruct: bool,
) -> Result<Reconstructed, CodecError> {
    check_values(values, plan)?;

    let (kept_values, mut quantized) = if plan.keeps_no_tokens() {
        (Vec::new(), Cow::Borrowed(values))
    } else {
        let (kept, quantized) = plan.split(values);
        (kept, Cow::Owned(quantized))
    };
    let llama_block = params.llama_rotation_block(plan.head_dim);
    if params.rotation_seed.is_some() || llama_block.is_some() {
        let quantized = quantized.to_mut();
        if let Some(seed) = params.rotation_seed {
            rotation::rotate(quantized, seed, plan.head_dim);
        }
        if let Some(block) = llama_block {
            rotation::llama_hadamard(quantized, block);
        }
        if first_non_finite(quantized).is_some() {
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

    if fused_path(params, grouped_mask.is_some(), true) {
        if let Some((encoded, restored)) =
            encode_fused(&grouped, &kept_values, plan, params, form, reconstruct)?
        {
            let reconstruction = restored
                .map(|restored| reconstruction(restored, &encoded, plan, params))
                .transpose()?;
            return Ok((encoded, reconstruction));
        }
    }
    let geometry = &plan.geometry;
    let mask = grouped_mask.as_deref();
    let (group_params, mut quantizer) = GroupQuantizer::choose(params, &grouped, mask, plan);
    // The outliers are chosen against the reconstruction, so it is made for them too.
    let mut restored = (reconstruct || params.outliers > 0.0).then(|| vec![0f32; grouped.len()]);
    let codes = match restored.as_deref_mut() {
        Some(restored) => quantizer.code_section_reconstructed(
            &group_params,
            &grouped,
            mask,
            geometry,
            restored,
        )?,
        None => quantizer.code_section(&group_params, &grouped, mask, geometry),
    };

    let layout = Layout {
        scale_dtype: group_params.dtype,
        sparse_form: form,
        coded_bytes: quantizer.entropy_coder().map(|_| codes.len()),
        coder: quantizer.entropy_coder(),
    };
    let sections = Sections::new(plan, params, &layout)?;
    let mut payload = Vec::with_capacity(sections.total().ok_or(CodecError::ShapeOverflow)?);
    write_scales(&group_params.scales, group_params.dtype, &mut payload);
    write_scales(&group_params.offsets, group_params.dtype, &mut payload);
    quantizer.write_levels(&mut payload);
    kept_tokens::write(&kept_values, &mut payload)?;
    if let Some(mask) = &kept_mask {
        payload.extend_from_slice(&packed(
            &mask.iter().map(|&k| u8::from(k)).collect::<Vec<_>>(),
            1,
        ));
    }
    payload.extend_from_slice(&codes);
    if params.outliers > 0.0 {
        // validate() refuses outliers with sparsity: every value has a code.
        let restored = restored.as_deref_mut().expect("made for the outliers");
        payload.extend(outlier_section(
            &grouped,
            restored,
            params.outliers,
            reconstruct,
        )?);
    }
    debug_assert_eq!(Some(payload.len()), sections.total());
    let encoded = Encoded { payload, layout };
    let reconstruction = restored
        .filter(|_| reconstruct)
        .map(|restored| reconstruction(restored, &encoded, plan, params))
        .transpose()?;
    Ok((encoded, reconstruction))
}

/// The outliers section of `grouped` against its dequantized values
/// `restored`; with `reconstruct`, also applied to `restored` as decode
/// applies it.
fn outlier_section(
    grouped: &[f32],
    restored: &mut [f32],
    fraction: f64,
    reconstruct: bool,
) -> Result<Vec<u8>, CodecError> {
    let bytes = outliers::encode(grouped, restored, fraction)?;
    if reconstruct {
        outliers::apply(&bytes, fraction, restored)?;
    }
    Ok(bytes)
}

/// The row-major reconstruction from the dequantized values in group order
/// (outliers applied) and the kept tokens as the payload stores them.
fn reconstruction(
    restored: Vec<f32>,
    encoded: &Encoded,
    plan: &Plan,
    params: &CodecParams,
) -> Result<Vec<f32>, CodecError> {
    let quantized = row_major_unrotated(restored, plan, params);
    if plan.keeps_no_tokens() {
        return Ok(quantized);
    }
    let sections = Sections::new(plan, params, &encoded.layout)?;
    let start = sections.scales + sections.offsets + sections.levels;
    let kept_values = kept_tokens::read(&encoded.payload[start..start + sections.kept_tokens])?;
    let mut out = vec![0f32; plan.total_count()];
    plan.join(&kept_values, &quantized, &mut out);
    Ok(out)
}

/// The fused symmetric pass (see [`fused_path`]): scales, codes and packed
/// bytes in one pass; `None` when some scale needs F32 or a task would start
/// mid-byte, and the general path takes the tensor.
fn encode_fused(
    grouped: &[f32],
    kept_values: &[f32],
    plan: &Plan,
    params: &CodecParams,
    form: SparseForm,
    reconstruct: bool,
) -> Result<Option<Reconstructed>, CodecError> {
    let layout = Layout {
        scale_dtype: ScaleDtype::F16,
        sparse_form: form,
        coded_bytes: None,
        coder: None,
    };
    let sections = Sections::new(plan, params, &layout)?;
    let mut payload = vec![0u8; sections.total().ok_or(CodecError::ShapeOverflow)?];
    let codes_start = payload.len() - sections.outliers - sections.codes;
    let codes_end = codes_start + sections.codes;
    let range = CodeRange::of(params);
    let Some(group_params) = fused::quantize_symmetric_f16_packed(
        grouped,
        &plan.geometry,
        range,
        &mut payload[codes_start..codes_end],
    ) else {
        return Ok(None);
    };
    let mut head = Vec::with_capacity(codes_start);
    write_scales(&group_params.scales, ScaleDtype::F16, &mut head);
    kept_tokens::write(kept_values, &mut head)?;
    payload[..codes_start].copy_from_slice(&head);
    let mut restored = None;
    if reconstruct || params.outliers > 0.0 {
        let restored = restored.insert(vec![0f32; grouped.len()]);
        let unpacked = fused::dequantize_symmetric_packed(
            &payload[codes_start..codes_end],
            &plan.geometry,
            range,
            &group_params.scales,
            restored,
        );
        debug_assert!(unpacked, "the encoder's tasks are the decoder's");
        if params.outliers > 0.0 {
            payload[codes_end..].copy_from_slice(&outlier_section(
                grouped,
                restored,
                params.outliers,
                reconstruct,
            )?);
        }
    }
    Ok(Some((
        Encoded { payload, layout },
        restored.filter(|_| reconstruct),
    )))
}
