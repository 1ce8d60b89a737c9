//! ADR-002's hot path, fused: on the symmetric grid with every value coded
//! and FP16 scales, each task (or block) computes its groups' scales, codes
//! and packed bytes (and, for a measuring encoder, the reconstruction) in
//! one pass while the values are in cache; decoding unpacks and scales in
//! one pass too. The grid math is `quantizer`'s, called here; which tensors
//! take this path is `super::fused_path`'s one predicate. Every function
//! gives bit for bit what the general path gives.

use rayon::prelude::*;

use super::bitpack;
use super::groups::GroupGeometry;
use super::quantizer::{
    max_abs, split_at_bounds, symmetric_codes, symmetric_values, task_bounds, CodeRange, Extremes,
    GROUPS_PER_TASK,
};
use super::scales::{ExactParams, GroupParams, ScaleDtype};

/// Work items of the fused symmetric paths: value and packed-byte bounds of
/// every task, or `None` when some task would start mid-byte.
struct PackedTasks {
    values: Vec<usize>,
    bytes: Vec<usize>,
}

impl PackedTasks {
    fn new(geometry: &GroupGeometry, bits: u8, groups_per_task: usize) -> Option<Self> {
        let bits = usize::from(bits);
        let group_starts: Vec<usize> = (0..=geometry.group_count())
            .map(|group| geometry.range_start(group))
            .collect();
        let values = task_bounds(&group_starts, groups_per_task);
        let (_, starts) = values.split_last().expect("bounds hold at least the total");
        if starts.iter().any(|&start| start * bits % 8 != 0) {
            return None;
        }
        let bytes = values
            .iter()
            .map(|&start| (start * bits).div_ceil(8))
            .collect();
        Some(PackedTasks { values, bytes })
    }
}

/// The ADR-002 hot path (symmetric grid, nothing dropped, FP16 scales): each
/// task computes its groups' scales, codes and packed bytes in one pass while
/// the values are in cache, writing the codes into `packed`. Returns `None`
/// when it does not apply (a task would start mid-byte, or some scale does
/// not fit f16); the general path then handles the tensor, F32 scales included.
pub(crate) fn quantize_symmetric_f16_packed(
    values: &[f32],
    geometry: &GroupGeometry,
    range: CodeRange,
    packed: &mut [u8],
) -> Option<GroupParams> {
    let tasks = PackedTasks::new(geometry, range.bits, GROUPS_PER_TASK)?;
    let mut scales = vec![0f32; geometry.group_count()];
    let (qmin, qmax) = range.symmetric_codes();
    let all_fit_f16 = split_at_bounds(packed, &tasks.bytes)
        .into_par_iter()
        .zip(scales.par_chunks_mut(GROUPS_PER_TASK))
        .enumerate()
        .all(|(task, (task_packed, task_scales))| {
            let task_start = tasks.values[task];
            let mut codes = vec![0u8; tasks.values[task + 1] - task_start];
            for (group, scale_slot) in (task * GROUPS_PER_TASK..).zip(task_scales.iter_mut()) {
                let span = geometry.range(group);
                let exact =
                    ExactParams::new(range, Extremes::MaxAbs(max_abs(&values[span.clone()])));
                let Some((scale, _)) = exact.stored_f16() else {
                    return false;
                };
                *scale_slot = scale;
                let group_codes = &mut codes[span.start - task_start..span.end - task_start];
                symmetric_codes(&values[span], scale, qmin, qmax, group_codes);
            }
            bitpack::pack_serial(&codes, range.bits, task_packed);
            true
        });
    all_fit_f16.then_some(GroupParams {
        dtype: ScaleDtype::F16,
        scales,
        offsets: Vec::new(),
    })
}

/// Values per block of [`quantize_symmetric_f16_observed`]: the block's
/// values, codes and reconstruction stay in L1/L2 between the steps.
const BLOCK_VALUES: usize = 4096;

/// The ADR-002 hot path of an encoder that also measures (see
/// `encode::encode_observed`): every group's scale first, so that nothing is
/// observed of a tensor that then needs F32 scales; then, block by block on
/// the calling thread while the block is in cache, the codes, the packed
/// bytes and the reconstruction, which `observe(original, reconstructed)`
/// sees in order. `values` are in group order, the tensor's own. `None`
/// (nothing observed) when some scale does not fit f16 or a block would
/// start mid-byte.
pub(crate) fn quantize_symmetric_f16_observed(
    values: &[f32],
    geometry: &GroupGeometry,
    range: CodeRange,
    packed: &mut [u8],
    observe: &mut dyn FnMut(&[f32], &[f32]),
) -> Option<Vec<f32>> {
    let groups_per_block = (BLOCK_VALUES / geometry.group_size.max(1)).max(1);
    let blocks = PackedTasks::new(geometry, range.bits, groups_per_block)?;
    let mut scales = vec![0f32; geometry.group_count()];
    if !symmetric_f16_scales(values, geometry, range, &mut scales) {
        return None;
    }
    let longest = blocks
        .values
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or(0);
    let mut codes = vec![0u8; longest];
    let mut reconstructed = vec![0f32; longest];
    for (block, (span, bytes)) in blocks
        .values
        .windows(2)
        .zip(blocks.bytes.windows(2))
        .enumerate()
    {
        let len = span[1] - span[0];
        let first_group = block * groups_per_block;
        let block_values = &values[span[0]..span[1]];
        symmetric_block(
            block_values,
            geometry,
            first_group,
            &scales[first_group..],
            range,
            &mut codes[..len],
            &mut packed[bytes[0]..bytes[1]],
            &mut reconstructed[..len],
        );
        observe(block_values, &reconstructed[..len]);
    }
    Some(scales)
}

crate::simd::multiversion!(fn symmetric_f16_scales / symmetric_f16_scales_at(
    values: &[f32], geometry: &GroupGeometry, range: CodeRange, scales: &mut [f32]) -> bool
    => symmetric_f16_scales_generic);

/// Every group's ADR-002 scale as F16 stores it into `scales`; `false` when one does not fit.
#[inline(always)]
fn symmetric_f16_scales_generic(
    values: &[f32],
    geometry: &GroupGeometry,
    range: CodeRange,
    scales: &mut [f32],
) -> bool {
    for (group, slot) in scales.iter_mut().enumerate() {
        let exact = ExactParams::new(
            range,
            Extremes::MaxAbs(max_abs(&values[geometry.range(group)])),
        );
        match exact.stored_f16() {
            Some((scale, _)) => *slot = scale,
            None => return false,
        }
    }
    true
}

crate::simd::multiversion!(fn symmetric_block / symmetric_block_at(
    values: &[f32], geometry: &GroupGeometry, first_group: usize, scales: &[f32], range: CodeRange,
    codes: &mut [u8], packed: &mut [u8], reconstructed: &mut [f32])
    => symmetric_block_generic);

/// One block of [`quantize_symmetric_f16_observed`]: the whole groups from
/// `first_group` that `values` holds (`scales` starts at that group).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn symmetric_block_generic(
    values: &[f32],
    geometry: &GroupGeometry,
    first_group: usize,
    scales: &[f32],
    range: CodeRange,
    codes: &mut [u8],
    packed: &mut [u8],
    reconstructed: &mut [f32],
) {
    let (qmin, qmax) = range.symmetric_codes();
    let bias = range.symmetric_bias();
    let base = geometry.range_start(first_group);
    for (group, &scale) in (first_group..).zip(scales) {
        let span = geometry.range(group);
        if span.start - base >= values.len() {
            break;
        }
        let local = span.start - base..span.end - base;
        symmetric_codes(
            &values[local.clone()],
            scale,
            qmin,
            qmax,
            &mut codes[local.clone()],
        );
        symmetric_values(
            &codes[local.clone()],
            scale,
            bias,
            &mut reconstructed[local],
        );
    }
    bitpack::pack_serial(codes, range.bits, packed);
}

/// Decoding's counterpart of [`quantize_symmetric_f16_packed`] (any scale
/// dtype): unpacks and scales each task's codes straight into `out`, which is
/// in group order. Returns `false`, touching nothing, when tasks would start
/// mid-byte.
pub(crate) fn dequantize_symmetric_packed(
    packed: &[u8],
    geometry: &GroupGeometry,
    range: CodeRange,
    scales: &[f32],
    out: &mut [f32],
) -> bool {
    let Some(tasks) = PackedTasks::new(geometry, range.bits, GROUPS_PER_TASK) else {
        return false;
    };
    let bias = range.symmetric_bias();
    split_at_bounds(out, &tasks.values)
        .into_par_iter()
        .zip(scales.par_chunks(GROUPS_PER_TASK))
        .enumerate()
        .for_each(|(task, (task_out, task_scales))| {
            let mut codes = vec![0u8; task_out.len()];
            symmetric_unpack(
                &packed[tasks.bytes[task]..tasks.bytes[task + 1]],
                geometry,
                task * GROUPS_PER_TASK,
                task_scales,
                range.bits,
                bias,
                &mut codes,
                task_out,
            );
        });
    true
}

crate::simd::multiversion!(fn symmetric_unpack / symmetric_unpack_at(
    packed: &[u8], geometry: &GroupGeometry, first_group: usize, scales: &[f32], bits: u8, bias: i32,
    codes: &mut [u8], out: &mut [f32])
    => symmetric_unpack_generic);

/// One task of [`dequantize_symmetric_packed`]: the whole groups from
/// `first_group` (`scales` holds theirs) that `out` covers.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn symmetric_unpack_generic(
    packed: &[u8],
    geometry: &GroupGeometry,
    first_group: usize,
    scales: &[f32],
    bits: u8,
    bias: i32,
    codes: &mut [u8],
    out: &mut [f32],
) {
    bitpack::unpack_serial(packed, bits, codes);
    let base = geometry.range_start(first_group);
    for (group, &scale) in (first_group..).zip(scales) {
        let span = geometry.range(group);
        let local = span.start - base..span.end - base;
        symmetric_values(&codes[local.clone()], scale, bias, &mut out[local]);
    }
}
