//! Per-group scales, offsets and codes on a symmetric or asymmetric grid.
//!
//! Works on values already in group order (see [`super::groups`]): group `i`
//! is `geometry.range(i)` of that array. Symmetric math is f32 (ADR-002 as
//! the original did it); asymmetric math is f64 so that `max - min` and
//! `q * scale + offset` cannot overflow f32 on huge magnitudes.

use rayon::prelude::*;

use super::fit;
use super::groups::GroupGeometry;
use super::scales::{ExactParams, GroupParams, ScaleDtype};
use super::{CodecParams, Fit, Grid};

/// Groups handed to one parallel work item.
pub(super) const GROUPS_PER_TASK: usize = 1024;

/// The grid's integer code range for a bit width.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CodeRange {
    pub grid: Grid,
    pub bits: u8,
}

impl CodeRange {
    /// The code range of a uniform grid's `params`.
    pub(crate) fn of(params: &CodecParams) -> Self {
        CodeRange {
            grid: params.grid,
            bits: params.bits,
        }
    }

    /// Largest symmetric code, `2^(b-1) - 1`.
    fn symmetric_max(self) -> f32 {
        ((1u32 << (self.bits - 1)) - 1) as f32
    }

    /// Smallest and largest symmetric code, `-2^(b-1)` and `2^(b-1) - 1`.
    pub(super) fn symmetric_codes(self) -> (i32, i32) {
        (-self.symmetric_bias(), self.symmetric_bias() - 1)
    }

    /// Added to a symmetric code to store it unsigned, `2^(b-1)`.
    pub(super) fn symmetric_bias(self) -> i32 {
        1 << (self.bits - 1)
    }

    /// Largest asymmetric code, `2^b - 1`.
    fn asymmetric_max(self) -> f64 {
        f64::from((1u32 << self.bits) - 1)
    }
}

/// What a group's scale is computed from, over its kept values: `max|x|`
/// (symmetric) or the minimum and maximum (asymmetric); 0 when none is kept.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Extremes {
    MaxAbs(f32),
    MinMax { min: f32, max: f32 },
}

fn extremes(values: &[f32], kept: Option<&[bool]>, grid: Grid) -> Extremes {
    match (grid, kept) {
        (Grid::Symmetric, None) => Extremes::MaxAbs(max_abs_dispatched(values)),
        (Grid::Symmetric, Some(kept)) => {
            let kept_values = values.iter().zip(kept).filter(|(_, &keep)| keep);
            Extremes::MaxAbs(kept_values.fold(0.0, |max, (&x, _)| larger(max, x.abs())))
        }
        // Asymmetric (codebook grids never reach the uniform quantizer).
        (_, kept) => {
            let (min, max) = match kept {
                None => min_max_dispatched(values),
                Some(kept) => values
                    .iter()
                    .zip(kept)
                    .filter(|(_, &keep)| keep)
                    .fold((f32::INFINITY, f32::NEG_INFINITY), |(min, max), (&x, _)| {
                        (smaller(min, x), larger(max, x))
                    }),
            };
            if min > max {
                Extremes::MinMax { min: 0.0, max: 0.0 }
            } else {
                Extremes::MinMax { min, max }
            }
        }
    }
}

/// `if a < b { a } else { b }`: exactly x86's `minps`.
#[inline(always)]
fn smaller(a: f32, b: f32) -> f32 {
    if a < b {
        a
    } else {
        b
    }
}

crate::simd::multiversion!(fn min_max_dispatched / min_max_at(values: &[f32]) -> (f32, f32) => min_max);
crate::simd::multiversion!(fn max_abs_dispatched / max_abs_at(values: &[f32]) -> f32 => max_abs);

/// Minimum and maximum (`(inf, -inf)` when empty), in eight lanes like [`max_abs`].
#[inline(always)]
fn min_max(values: &[f32]) -> (f32, f32) {
    const LANES: usize = 8;
    let mut min = [f32::INFINITY; LANES];
    let mut max = [f32::NEG_INFINITY; LANES];
    let chunks = values.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        let chunk: &[f32; LANES] = chunk.try_into().expect("chunks_exact yields LANES values");
        for lane in 0..LANES {
            min[lane] = smaller(chunk[lane], min[lane]);
            max[lane] = larger(chunk[lane], max[lane]);
        }
    }
    let min = min
        .iter()
        .chain(tail)
        .fold(f32::INFINITY, |m, &x| smaller(x, m));
    let max = max
        .iter()
        .chain(tail)
        .fold(f32::NEG_INFINITY, |m, &x| larger(x, m));
    (min, max)
}

/// `if a > b { a } else { b }`: exactly x86's `maxps`, so no NaN fix-ups
/// (values are checked finite before they get here).
#[inline(always)]
fn larger(a: f32, b: f32) -> f32 {
    if a > b {
        a
    } else {
        b
    }
}

/// `max|x|` (0 when empty) in eight independent lanes so that the loop
/// vectorizes without reassociating anything.
#[inline(always)]
pub(super) fn max_abs(values: &[f32]) -> f32 {
    const LANES: usize = 8;
    let mut lanes = [0.0f32; LANES];
    let chunks = values.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        let chunk: &[f32; LANES] = chunk.try_into().expect("chunks_exact yields LANES values");
        for lane in 0..LANES {
            lanes[lane] = larger(chunk[lane].abs(), lanes[lane]);
        }
    }
    lanes
        .iter()
        .chain(tail)
        .fold(0.0, |max, &x| larger(x.abs(), max))
}

impl ExactParams {
    /// The parameters `fit` chooses for one group's values (`kept` of them),
    /// for scales stored as `storage`.
    fn of_group(
        values: &[f32],
        kept: Option<&[bool]>,
        range: CodeRange,
        fit: Fit,
        storage: ScaleDtype,
    ) -> Self {
        let start = ExactParams::new(range, extremes(values, kept, range.grid));
        if fit == Fit::MinMax {
            return start;
        }
        let kept_values: std::borrow::Cow<[f32]> = match kept {
            None => values.into(),
            Some(kept) => values
                .iter()
                .zip(kept)
                .filter(|(_, &k)| k)
                .map(|(&x, _)| x)
                .collect::<Vec<_>>()
                .into(),
        };
        match range.grid {
            Grid::Symmetric => {
                let (qmin, qmax) = range.symmetric_codes();
                fit::symmetric(
                    &kept_values,
                    (f64::from(qmin), f64::from(qmax)),
                    start,
                    storage,
                )
            }
            _ => fit::asymmetric(&kept_values, range.asymmetric_max(), start, storage),
        }
    }

    pub(super) fn new(range: CodeRange, extremes: Extremes) -> Self {
        match extremes {
            Extremes::MaxAbs(max_abs) => ExactParams {
                scale: max_abs / range.symmetric_max(),
                offset: 0.0,
            },
            Extremes::MinMax { min, max } => {
                let spread = f64::from(max) - f64::from(min);
                let scale = if spread == 0.0 {
                    0.0
                } else {
                    (spread / range.asymmetric_max()) as f32
                };
                ExactParams { scale, offset: min }
            }
        }
    }
}

/// Chooses every group's scale (and offset) and the tensor's scale dtype.
pub(crate) fn group_params(
    values: &[f32],
    kept: Option<&[bool]>,
    geometry: &GroupGeometry,
    range: CodeRange,
    fit: Fit,
) -> GroupParams {
    let exact_params = |storage: ScaleDtype| -> Vec<ExactParams> {
        (0..geometry.group_count())
            .into_par_iter()
            .with_min_len(GROUPS_PER_TASK)
            .map(|group| {
                let span = geometry.range(group);
                let kept = kept.map(|kept| &kept[span.clone()]);
                ExactParams::of_group(&values[span], kept, range, fit, storage)
            })
            .collect()
    };
    let exact = exact_params(ScaleDtype::F16);
    let as_f16: Option<Vec<(f32, f32)>> = exact.par_iter().map(|p| p.stored_f16()).collect();
    let (dtype, stored) = match as_f16 {
        Some(stored) => (ScaleDtype::F16, stored),
        None => {
            // A fit judged its candidates as f16 would store them; judge
            // them again as they will be stored.
            let exact = match fit {
                Fit::MinMax => exact,
                Fit::Mse => exact_params(ScaleDtype::F32),
            };
            (
                ScaleDtype::F32,
                exact.par_iter().map(|p| p.stored_f32()).collect(),
            )
        }
    };
    let (scales, offsets): (Vec<f32>, Vec<f32>) = stored.into_iter().unzip();
    let offsets = match range.grid {
        Grid::Symmetric => Vec::new(),
        _ => offsets,
    };
    GroupParams {
        dtype,
        scales,
        offsets,
    }
}

/// `1.5 * 2^23`: adding it to |t| <= 2^22 leaves the f32 with ulp 1, so the
/// addition itself rounds `t` to the nearest integer (ties to even) and the
/// integer sits in the low mantissa bits.
const ROUNDING_MAGIC: f32 = 12_582_912.0;

/// `round(t)` with ties away from zero for |t| <= 2^22, using only float adds,
/// compares and integer ops so that the loop vectorizes (no libm `roundf`,
/// no saturating float-to-int conversion): round to nearest even with the
/// magic constant, then move exact ties that went towards zero one step out.
#[inline(always)]
fn round_half_away_f32(t: f32) -> i32 {
    let shifted = t + ROUNDING_MAGIC;
    let nearest_even = shifted.to_bits() as i32 - ROUNDING_MAGIC.to_bits() as i32;
    let remainder = t - (shifted - ROUNDING_MAGIC);
    nearest_even + i32::from(remainder == 0.5 && t > 0.0) - i32::from(remainder == -0.5 && t < 0.0)
}

/// `1.5 * 2^52`, the f64 counterpart of [`ROUNDING_MAGIC`].
const ROUNDING_MAGIC_F64: f64 = 6_755_399_441_055_744.0;

/// [`round_half_away_f32`] in f64, exact for |t| <= 2^51.
#[inline(always)]
fn round_half_away_f64(t: f64) -> i64 {
    let shifted = t + ROUNDING_MAGIC_F64;
    let nearest_even = shifted.to_bits() as i64 - ROUNDING_MAGIC_F64.to_bits() as i64;
    let remainder = t - (shifted - ROUNDING_MAGIC_F64);
    nearest_even + i64::from(remainder == 0.5 && t > 0.0) - i64::from(remainder == -0.5 && t < 0.0)
}

/// Symmetric code, stored unsigned: `clamp(round(x / scale), qmin, qmax) - qmin`.
#[inline(always)]
fn symmetric_code(x: f32, scale: f32, qmin: i32, qmax: i32) -> u8 {
    // Clamping first keeps the truncation in i32 range; the result is the same.
    let t = x / scale;
    let t = if t < (qmin - 1) as f32 {
        (qmin - 1) as f32
    } else {
        t
    };
    let t = if t > (qmax + 1) as f32 {
        (qmax + 1) as f32
    } else {
        t
    };
    (round_half_away_f32(t).max(qmin).min(qmax) - qmin) as u8
}

/// Symmetric codes of a whole run of values. A separate function with every
/// loop invariant passed by value, so the compiler sees they cannot alias
/// `codes` and vectorizes the loop.
#[inline(always)]
pub(super) fn symmetric_codes(values: &[f32], scale: f32, qmin: i32, qmax: i32, codes: &mut [u8]) {
    for (code, &x) in codes.iter_mut().zip(values) {
        *code = symmetric_code(x, scale, qmin, qmax);
    }
}

/// Asymmetric code: `clamp(round((x - offset) / scale), 0, 2^b - 1)` in f64.
#[inline(always)]
fn asymmetric_code(x: f32, scale: f32, offset: f32, qmax: i64) -> u8 {
    // Clamping first keeps the rounding in its exact range; the result is the same.
    let t = (f64::from(x) - f64::from(offset)) / f64::from(scale);
    let t = if t < -1.0 { -1.0 } else { t };
    let t = if t > (qmax + 1) as f64 {
        (qmax + 1) as f64
    } else {
        t
    };
    round_half_away_f64(t).max(0).min(qmax) as u8
}

/// Asymmetric codes of a whole run; invariants by value so the loop vectorizes.
#[inline(always)]
fn asymmetric_codes(values: &[f32], scale: f32, offset: f32, qmax: i64, codes: &mut [u8]) {
    for (code, &x) in codes.iter_mut().zip(values) {
        *code = asymmetric_code(x, scale, offset, qmax);
    }
}

crate::simd::multiversion!(fn symmetric_codes_dispatched / symmetric_codes_at(
    values: &[f32], scale: f32, qmin: i32, qmax: i32, codes: &mut [u8]) => symmetric_codes);
crate::simd::multiversion!(fn asymmetric_codes_dispatched / asymmetric_codes_at(
    values: &[f32], scale: f32, offset: f32, qmax: i64, codes: &mut [u8]) => asymmetric_codes);
crate::simd::multiversion!(fn symmetric_values_dispatched / symmetric_values_at(
    codes: &[u8], scale: f32, bias: i32, out: &mut [f32]) => symmetric_values);
crate::simd::multiversion!(fn asymmetric_values_dispatched / asymmetric_values_at(
    codes: &[u8], scale: f32, offset: f32, out: &mut [f32]) => asymmetric_values);

/// Codes of one group's kept values, in order, into `codes`.
fn quantize_group(
    values: &[f32],
    kept: Option<&[bool]>,
    range: CodeRange,
    scale: f32,
    offset: f32,
    codes: &mut [u8],
) {
    match (range.grid, kept) {
        (Grid::Symmetric, None) => {
            let (qmin, qmax) = range.symmetric_codes();
            symmetric_codes_dispatched(values, scale, qmin, qmax, codes);
        }
        (Grid::Symmetric, Some(kept)) => {
            let (qmin, qmax) = range.symmetric_codes();
            let kept_values = values.iter().zip(kept).filter(|(_, &k)| k).map(|(x, _)| x);
            for (code, &x) in codes.iter_mut().zip(kept_values) {
                *code = symmetric_code(x, scale, qmin, qmax);
            }
        }
        (_, None) => {
            asymmetric_codes_dispatched(values, scale, offset, range.asymmetric_max() as i64, codes)
        }
        (_, Some(kept)) => {
            let qmax = range.asymmetric_max() as i64;
            let kept_values = values.iter().zip(kept).filter(|(_, &k)| k).map(|(x, _)| x);
            for (code, &x) in codes.iter_mut().zip(kept_values) {
                *code = asymmetric_code(x, scale, offset, qmax);
            }
        }
    }
}

/// Reconstruction of one group; dropped values become exactly 0.
fn dequantize_group(
    codes: &[u8],
    kept: Option<&[bool]>,
    range: CodeRange,
    scale: f32,
    offset: f32,
    out: &mut [f32],
) {
    match (range.grid, kept) {
        (Grid::Symmetric, None) => {
            symmetric_values_dispatched(codes, scale, range.symmetric_bias(), out)
        }
        (_, None) => asymmetric_values_dispatched(codes, scale, offset, out),
        (grid, kept) => {
            let mut codes = codes.iter();
            for (i, x) in out.iter_mut().enumerate() {
                let code = match kept {
                    Some(kept) if !kept[i] => None,
                    _ => codes.next(),
                };
                *x = match (code, grid) {
                    (None, _) => 0.0,
                    (Some(&code), Grid::Symmetric) => {
                        symmetric_value(code, scale, range.symmetric_bias())
                    }
                    (Some(&code), _) => asymmetric_value(code, scale, offset),
                };
            }
        }
    }
}

/// `q * scale + offset` for a run of codes; invariants by value so it vectorizes.
#[inline(always)]
fn asymmetric_values(codes: &[u8], scale: f32, offset: f32, out: &mut [f32]) {
    for (x, &code) in out.iter_mut().zip(codes) {
        *x = asymmetric_value(code, scale, offset);
    }
}

/// `q * scale + offset` in f64, clamped to the finite f32 range.
#[inline(always)]
fn asymmetric_value(code: u8, scale: f32, offset: f32) -> f32 {
    let value = f64::from(code) * f64::from(scale) + f64::from(offset);
    value.clamp(-f64::from(f32::MAX), f64::from(f32::MAX)) as f32
}

/// Where each group's codes start in the code stream (plus the total at the
/// end): without a kept mask that is the group's own start.
pub(crate) fn code_offsets(kept: Option<&[bool]>, geometry: &GroupGeometry) -> Vec<usize> {
    let counts: Vec<usize> = (0..geometry.group_count())
        .into_par_iter()
        .with_min_len(GROUPS_PER_TASK)
        .map(|group| {
            let span = geometry.range(group);
            match kept {
                Some(kept) => kept[span].iter().filter(|&&k| k).count(),
                None => span.len(),
            }
        })
        .collect();
    std::iter::once(0)
        .chain(counts.iter().scan(0usize, |total, &count| {
            *total += count;
            Some(*total)
        }))
        .collect()
}

/// Where each task's part of a per-group array starts (and the total), from
/// that array's per-group offsets: every `groups_per_task`-th entry.
pub(super) fn task_bounds(group_offsets: &[usize], groups_per_task: usize) -> Vec<usize> {
    let group_count = group_offsets.len() - 1;
    (0..group_count)
        .step_by(groups_per_task)
        .map(|group| group_offsets[group])
        .chain([group_offsets[group_count]])
        .collect()
}

/// Splits `data` at `bounds` (as from [`task_bounds`]) so tasks fill
/// disjoint parts in parallel.
pub(super) fn split_at_bounds<'a, T>(mut data: &'a mut [T], bounds: &[usize]) -> Vec<&'a mut [T]> {
    let mut parts = Vec::with_capacity(bounds.len().saturating_sub(1));
    for pair in bounds.windows(2) {
        let (part, rest) = data.split_at_mut(pair[1] - pair[0]);
        parts.push(part);
        data = rest;
    }
    parts
}

/// `(code - bias) * scale` for a run of codes; loop invariants by value so it vectorizes.
#[inline(always)]
pub(super) fn symmetric_values(codes: &[u8], scale: f32, bias: i32, out: &mut [f32]) {
    for (x, &code) in out.iter_mut().zip(codes) {
        *x = symmetric_value(code, scale, bias);
    }
}

/// `(code - bias) * scale`, clamped to the finite f32 range: with `|x|` near
/// f32::MAX, `qmax * (max|x| / qmax)` can round past it to infinity.
#[inline(always)]
fn symmetric_value(code: u8, scale: f32, bias: i32) -> f32 {
    ((i32::from(code) - bias) as f32 * scale).clamp(-f32::MAX, f32::MAX)
}

/// One group quantizer's code <-> value mapping, group by group: the
/// drivers [`quantize`] and [`dequantize`] handle kept masks' code offsets
/// and the parallel split once for every quantizer.
pub(crate) trait GroupMapping: Sync {
    /// Codes of `group`'s kept values, in order, into `codes`.
    fn codes(&self, group: usize, values: &[f32], kept: Option<&[bool]>, codes: &mut [u8]);
    /// Reconstruction of `group`; dropped values become exactly 0.
    fn values(&self, group: usize, codes: &[u8], kept: Option<&[bool]>, out: &mut [f32]);
}

/// The uniform grids (symmetric, asymmetric) with their stored parameters.
pub(crate) struct Uniform<'a> {
    pub range: CodeRange,
    pub params: &'a GroupParams,
}

impl GroupMapping for Uniform<'_> {
    fn codes(&self, group: usize, values: &[f32], kept: Option<&[bool]>, codes: &mut [u8]) {
        let offset = self.params.offsets.get(group).copied().unwrap_or(0.0);
        quantize_group(
            values,
            kept,
            self.range,
            self.params.scales[group],
            offset,
            codes,
        );
    }

    fn values(&self, group: usize, codes: &[u8], kept: Option<&[bool]>, out: &mut [f32]) {
        let offset = self.params.offsets.get(group).copied().unwrap_or(0.0);
        dequantize_group(
            codes,
            kept,
            self.range,
            self.params.scales[group],
            offset,
            out,
        );
    }
}

/// Unsigned codes of all kept values, group by group.
pub(crate) fn quantize(
    values: &[f32],
    kept: Option<&[bool]>,
    geometry: &GroupGeometry,
    mapping: &(impl GroupMapping + ?Sized),
) -> Vec<u8> {
    quantize_groups(values, kept, geometry, mapping, None)
}

/// [`quantize`], each group's reconstruction (as [`dequantize`] makes it
/// from the codes) written into `out`, in group order, while the group is
/// at hand.
pub(crate) fn quantize_reconstructed(
    values: &[f32],
    kept: Option<&[bool]>,
    geometry: &GroupGeometry,
    mapping: &(impl GroupMapping + ?Sized),
    out: &mut [f32],
) -> Vec<u8> {
    quantize_groups(values, kept, geometry, mapping, Some(out))
}

/// The driver of [`quantize`] and [`quantize_reconstructed`]: tasks of
/// [`GROUPS_PER_TASK`] groups, each with its part of the codes (and of `out`).
fn quantize_groups(
    values: &[f32],
    kept: Option<&[bool]>,
    geometry: &GroupGeometry,
    mapping: &(impl GroupMapping + ?Sized),
    out: Option<&mut [f32]>,
) -> Vec<u8> {
    let offsets = code_offsets(kept, geometry);
    let code_bounds = task_bounds(&offsets, GROUPS_PER_TASK);
    let task_outs: Vec<Option<&mut [f32]>> = match out {
        Some(out) => {
            let value_offsets: Vec<usize> = (0..=geometry.group_count())
                .map(|group| geometry.range_start(group))
                .collect();
            split_at_bounds(out, &task_bounds(&value_offsets, GROUPS_PER_TASK))
                .into_iter()
                .map(Some)
                .collect()
        }
        None => code_bounds.windows(2).map(|_| None).collect(),
    };
    let mut codes = vec![0u8; offsets[offsets.len() - 1]];
    split_at_bounds(&mut codes, &code_bounds)
        .into_par_iter()
        .zip(task_outs)
        .enumerate()
        .for_each(|(task, (task_codes, mut task_out))| {
            let first = task * GROUPS_PER_TASK;
            let last = (first + GROUPS_PER_TASK).min(geometry.group_count());
            let base = geometry.range_start(first);
            for group in first..last {
                let span = geometry.range(group);
                let codes = &mut task_codes
                    [offsets[group] - offsets[first]..offsets[group + 1] - offsets[first]];
                let kept = kept.map(|kept| &kept[span.clone()]);
                mapping.codes(group, &values[span.clone()], kept, codes);
                if let Some(task_out) = task_out.as_deref_mut() {
                    let out = &mut task_out[span.start - base..span.end - base];
                    mapping.values(group, codes, kept, out);
                }
            }
        });
    codes
}

/// Reconstructs all values in group order; `codes` holds exactly one code per kept value.
pub(crate) fn dequantize(
    codes: &[u8],
    kept: Option<&[bool]>,
    geometry: &GroupGeometry,
    mapping: &(impl GroupMapping + ?Sized),
    out: &mut [f32],
) {
    let offsets = code_offsets(kept, geometry);
    let value_offsets: Vec<usize> = (0..=geometry.group_count())
        .map(|group| geometry.range_start(group))
        .collect();
    split_at_bounds(out, &task_bounds(&value_offsets, GROUPS_PER_TASK))
        .into_par_iter()
        .enumerate()
        .for_each(|(task, task_out)| {
            let first = task * GROUPS_PER_TASK;
            let last = (first + GROUPS_PER_TASK).min(geometry.group_count());
            let base = geometry.range_start(first);
            for group in first..last {
                let span = geometry.range(group);
                let out = &mut task_out[span.start - base..span.end - base];
                let kept = kept.map(|kept| &kept[span.clone()]);
                let codes = &codes[offsets[group]..offsets[group + 1]];
                mapping.values(group, codes, kept, out);
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_is_half_away_from_zero_and_exact_near_half() {
        for (t, expected) in [
            (0.5f32, 1.0f32),
            (-0.5, -1.0),
            (1.5, 2.0),
            (2.5, 3.0),
            (-2.5, -3.0),
            (0.499_999_97, 0.0),
            (-0.499_999_97, 0.0),
            (7.0, 7.0),
            (-0.0, 0.0),
        ] {
            assert_eq!(round_half_away_f32(t) as f32, expected, "round({t})");
            assert_eq!(
                round_half_away_f32(t) as f32,
                t.round(),
                "matches std for {t}"
            );
            assert_eq!(
                round_half_away_f64(f64::from(t)) as f64,
                f64::from(t).round()
            );
        }
        // Every quarter and near-half in the code range, against std's `round`.
        for step in -600..=600 {
            let t = step as f32 * 0.25;
            for t in [t, t.next_up(), t.next_down()] {
                assert_eq!(round_half_away_f32(t) as f32, t.round(), "round({t})");
            }
        }
    }

    #[test]
    fn every_simd_level_gives_the_scalar_codes_values_and_extremes() {
        use crate::simd::Level;
        // Halves (ties), values beyond the grid, zeros and a ragged tail.
        let mut state = 7u64;
        let values: Vec<f32> = (0..1003)
            .map(|i| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
                match i % 5 {
                    0 => (i % 37) as f32 * 0.25 - 4.0,
                    1 => 0.0,
                    _ => ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 40.0,
                }
            })
            .collect();
        let (scale, offset) = (0.5f32, -3.75f32);
        let mut expected = vec![0u8; values.len()];
        let mut got = expected.clone();
        let mut expected_values = vec![0f32; values.len()];
        let mut got_values = expected_values.clone();
        for level in Level::available() {
            symmetric_codes(&values, scale, -8, 7, &mut expected);
            symmetric_codes_at(level, &values, scale, -8, 7, &mut got);
            assert_eq!(got, expected, "symmetric codes at {level:?}");
            symmetric_values(&expected, scale, 8, &mut expected_values);
            symmetric_values_at(level, &expected, scale, 8, &mut got_values);
            assert_eq!(got_values, expected_values, "symmetric values at {level:?}");
            asymmetric_codes(&values, scale, offset, 15, &mut expected);
            asymmetric_codes_at(level, &values, scale, offset, 15, &mut got);
            assert_eq!(got, expected, "asymmetric codes at {level:?}");
            asymmetric_values(&expected, scale, offset, &mut expected_values);
            asymmetric_values_at(level, &expected, scale, offset, &mut got_values);
            assert_eq!(
                got_values, expected_values,
                "asymmetric values at {level:?}"
            );
            assert_eq!(min_max_at(level, &values), min_max(&values));
            assert_eq!(max_abs_at(level, &values), max_abs(&values));
        }
        // The scalar codes are the definition's.
        for (&x, &code) in values.iter().zip(&expected) {
            let q = ((f64::from(x) - f64::from(offset)) / f64::from(scale)).round();
            assert_eq!(f64::from(code), q.clamp(0.0, 15.0), "{x}");
        }
    }

    #[test]
    fn symmetric_4bit_codes_clamp_to_minus_8_and_7() {
        // Biased by 8: code 0 is -8, code 15 is 7.
        assert_eq!(symmetric_code(100.0, 1.0, -8, 7), 15);
        assert_eq!(symmetric_code(-100.0, 1.0, -8, 7), 0);
        assert_eq!(symmetric_code(-7.5, 1.0, -8, 7), 0);
        assert_eq!(symmetric_code(2.5, 1.0, -8, 7), 11);
        assert_eq!(symmetric_code(f32::MAX, f32::MIN_POSITIVE, -8, 7), 15);
    }

    #[test]
    fn extremes_ignore_dropped_values_and_default_to_zero() {
        let values = [5.0, -1.0, 3.0, -7.0, 0.5, 0.25, 2.0, 1.0, -4.0];
        let all_but_first = [false, true, true, true, true, true, true, true, true];
        assert_eq!(
            extremes(&values, None, Grid::Symmetric),
            Extremes::MaxAbs(7.0)
        );
        let asymmetric = extremes(&values, Some(&all_but_first), Grid::Asymmetric);
        assert_eq!(
            asymmetric,
            Extremes::MinMax {
                min: -7.0,
                max: 3.0
            }
        );
        let mut kept = [false; 9];
        kept[0] = true;
        assert_eq!(
            extremes(&values, Some(&kept), Grid::Symmetric),
            Extremes::MaxAbs(5.0)
        );
        let none = [false; 9];
        assert_eq!(
            extremes(&values, Some(&none), Grid::Symmetric),
            Extremes::MaxAbs(0.0)
        );
        assert_eq!(
            extremes(&values, Some(&none), Grid::Asymmetric),
            Extremes::MinMax { min: 0.0, max: 0.0 }
        );
        assert_eq!(max_abs(&values[1..]), 7.0, "lanes and a tail");
        assert_eq!(min_max(&values), (-7.0, 5.0), "lanes and a tail");
        assert_eq!(min_max(&values[..8]), (-7.0, 5.0), "lanes only");
    }
}
