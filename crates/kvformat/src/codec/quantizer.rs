//! Per-group scales, offsets and codes on a symmetric or asymmetric grid.
//!
//! Works on values already in group order (see [`super::groups`]): group `i`
//! is `geometry.range(i)` of that array. Symmetric math is f32 (ADR-002 as
//! the original did it); asymmetric math is f64 so that `max - min` and
//! `q * scale + offset` cannot overflow f32 on huge magnitudes.

use half::f16;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::groups::GroupGeometry;
use super::Grid;

/// Scale of a group with nothing to scale (all zeros, constant, or all
/// dropped): the smallest positive normal f16, 2^-14, so it is never 0.
pub const ZERO_GROUP_SCALE: f32 = 6.103_515_6e-5;

/// Groups handed to one parallel work item.
const GROUPS_PER_TASK: usize = 1024;

/// How scales and offsets are stored in the payload, chosen per tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScaleDtype {
    /// Little-endian IEEE half: every scale a normal f16, every offset 0 or normal.
    F16,
    /// Little-endian f32, used when some group's scale or offset does not fit f16.
    F32,
}

impl ScaleDtype {
    pub fn size_bytes(self) -> usize {
        match self {
            ScaleDtype::F16 => 2,
            ScaleDtype::F32 => 4,
        }
    }
}

/// The grid's integer code range for a bit width.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CodeRange {
    pub grid: Grid,
    pub bits: u8,
}

impl CodeRange {
    /// Largest symmetric code, `2^(b-1) - 1`.
    fn symmetric_max(self) -> f32 {
        ((1u32 << (self.bits - 1)) - 1) as f32
    }

    /// Added to a symmetric code to store it unsigned, `2^(b-1)`.
    fn symmetric_bias(self) -> i32 {
        1 << (self.bits - 1)
    }

    /// Largest asymmetric code, `2^b - 1`.
    fn asymmetric_max(self) -> f64 {
        f64::from((1u32 << self.bits) - 1)
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

/// Minimum and maximum of a group's kept values; `(0, 0)` when none is kept.
#[derive(Clone, Copy, Debug)]
struct Extremes {
    min: f32,
    max: f32,
}

fn extremes(values: &[f32], kept: Option<&[bool]>) -> Extremes {
    let mut min = f32::INFINITY;
    let mut max = f32::NEG_INFINITY;
    match kept {
        None => {
            for &x in values {
                min = if x < min { x } else { min };
                max = if x > max { x } else { max };
            }
        }
        Some(kept) => {
            for (&x, &keep) in values.iter().zip(kept) {
                if keep {
                    min = if x < min { x } else { min };
                    max = if x > max { x } else { max };
                }
            }
        }
    }
    if min > max {
        Extremes { min: 0.0, max: 0.0 }
    } else {
        Extremes { min, max }
    }
}

/// The f16 a finite f32 rounds to, if that is zero or a normal f16.
fn to_normal_f16(x: f32, allow_zero: bool) -> Option<f32> {
    let half = f16::from_f32(x);
    (half.is_normal() || (allow_zero && half.to_f32() == 0.0)).then(|| half.to_f32())
}

/// Scale and offset before the storage dtype is applied.
#[derive(Clone, Copy, Debug)]
struct ExactParams {
    /// `max|x| / qmax` (symmetric) or `(max - min) / (2^b - 1)` (asymmetric); 0 for a flat group.
    scale: f32,
    /// `min` (asymmetric), 0 (symmetric).
    offset: f32,
}

impl ExactParams {
    fn new(range: CodeRange, extremes: Extremes) -> Self {
        match range.grid {
            Grid::Symmetric => {
                let max_abs = extremes.max.max(-extremes.min);
                ExactParams { scale: max_abs / range.symmetric_max(), offset: 0.0 }
            }
            Grid::Asymmetric => {
                let spread = f64::from(extremes.max) - f64::from(extremes.min);
                let scale = if spread == 0.0 { 0.0 } else { (spread / range.asymmetric_max()) as f32 };
                ExactParams { scale, offset: extremes.min }
            }
        }
    }

    fn stored_f16(self) -> Option<(f32, f32)> {
        let scale = if self.scale == 0.0 { ZERO_GROUP_SCALE } else { to_normal_f16(self.scale, false)? };
        Some((scale, to_normal_f16(self.offset, true)?))
    }

    fn stored_f32(self) -> (f32, f32) {
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

/// Chooses every group's scale (and offset) and the tensor's scale dtype.
pub(crate) fn group_params(
    values: &[f32],
    kept: Option<&[bool]>,
    geometry: &GroupGeometry,
    range: CodeRange,
) -> GroupParams {
    let exact: Vec<ExactParams> = (0..geometry.group_count())
        .into_par_iter()
        .with_min_len(GROUPS_PER_TASK)
        .map(|group| {
            let span = geometry.range(group);
            let kept = kept.map(|kept| &kept[span.clone()]);
            ExactParams::new(range, extremes(&values[span], kept))
        })
        .collect();
    let as_f16: Option<Vec<(f32, f32)>> = exact.par_iter().map(|p| p.stored_f16()).collect();
    let (dtype, stored) = match as_f16 {
        Some(stored) => (ScaleDtype::F16, stored),
        None => (ScaleDtype::F32, exact.par_iter().map(|p| p.stored_f32()).collect()),
    };
    let (scales, offsets): (Vec<f32>, Vec<f32>) = stored.into_iter().unzip();
    let offsets = match range.grid {
        Grid::Symmetric => Vec::new(),
        Grid::Asymmetric => offsets,
    };
    GroupParams { dtype, scales, offsets }
}

/// `round(t)` with ties away from zero, exact for |t| < 2^31 and vectorizable
/// (no libm call): truncate, then step by one if the dropped fraction is >= 1/2.
#[inline(always)]
fn round_half_away_f32(t: f32) -> f32 {
    let truncated = t as i32 as f32;
    let fraction = t - truncated;
    truncated + f32::from(u8::from(fraction >= 0.5)) - f32::from(u8::from(fraction <= -0.5))
}

#[inline(always)]
fn round_half_away_f64(t: f64) -> f64 {
    let truncated = t as i64 as f64;
    let fraction = t - truncated;
    truncated + f64::from(u8::from(fraction >= 0.5)) - f64::from(u8::from(fraction <= -0.5))
}

/// Symmetric code, stored unsigned: `clamp(round(x / scale), -2^(b-1), qmax) + 2^(b-1)`.
#[inline(always)]
fn symmetric_code(x: f32, scale: f32, qmin: f32, qmax: f32, bias: f32) -> u8 {
    // Clamping first keeps the truncation in i32 range; the result is the same.
    let t = (x / scale).clamp(qmin - 1.0, qmax + 1.0);
    (round_half_away_f32(t).clamp(qmin, qmax) + bias) as u8
}

/// Asymmetric code: `clamp(round((x - offset) / scale), 0, 2^b - 1)` in f64.
#[inline(always)]
fn asymmetric_code(x: f32, scale: f32, offset: f32, qmax: f64) -> u8 {
    let t = ((f64::from(x) - f64::from(offset)) / f64::from(scale)).clamp(-1.0, qmax + 1.0);
    round_half_away_f64(t).clamp(0.0, qmax) as u8
}

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
            let qmax = range.symmetric_max();
            let bias = range.symmetric_bias() as f32;
            for (code, &x) in codes.iter_mut().zip(values) {
                *code = symmetric_code(x, scale, -bias, qmax, bias);
            }
        }
        (Grid::Symmetric, Some(kept)) => {
            let qmax = range.symmetric_max();
            let bias = range.symmetric_bias() as f32;
            let kept_values = values.iter().zip(kept).filter(|(_, &k)| k).map(|(x, _)| x);
            for (code, &x) in codes.iter_mut().zip(kept_values) {
                *code = symmetric_code(x, scale, -bias, qmax, bias);
            }
        }
        (Grid::Asymmetric, kept) => {
            let qmax = range.asymmetric_max();
            let kept_values = values
                .iter()
                .enumerate()
                .filter(|&(i, _)| kept.is_none_or(|kept| kept[i]))
                .map(|(_, x)| x);
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
            let bias = range.symmetric_bias();
            for (x, &code) in out.iter_mut().zip(codes) {
                *x = (i32::from(code) - bias) as f32 * scale;
            }
        }
        (grid, kept) => {
            let mut codes = codes.iter();
            for (i, x) in out.iter_mut().enumerate() {
                let code = match kept {
                    Some(kept) if !kept[i] => None,
                    _ => codes.next(),
                };
                *x = match (code, grid) {
                    (None, _) => 0.0,
                    (Some(&code), Grid::Symmetric) => (i32::from(code) - range.symmetric_bias()) as f32 * scale,
                    (Some(&code), Grid::Asymmetric) => asymmetric_value(code, scale, offset),
                };
            }
        }
    }
}

/// `q * scale + offset` in f64, clamped to the finite f32 range.
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

/// Splits `data` at the code offsets of every `GROUPS_PER_TASK`-th group, so
/// tasks can fill disjoint parts in parallel.
fn split_by_task<'a, T>(mut data: &'a mut [T], offsets: &[usize]) -> Vec<&'a mut [T]> {
    let group_count = offsets.len() - 1;
    let mut parts = Vec::with_capacity(group_count.div_ceil(GROUPS_PER_TASK));
    for first in (0..group_count).step_by(GROUPS_PER_TASK) {
        let last = (first + GROUPS_PER_TASK).min(group_count);
        let (part, rest) = data.split_at_mut(offsets[last] - offsets[first]);
        parts.push(part);
        data = rest;
    }
    parts
}

/// Unsigned codes of all kept values, group by group.
pub(crate) fn quantize(
    values: &[f32],
    kept: Option<&[bool]>,
    geometry: &GroupGeometry,
    range: CodeRange,
    params: &GroupParams,
) -> Vec<u8> {
    let offsets = code_offsets(kept, geometry);
    let mut codes = vec![0u8; offsets[offsets.len() - 1]];
    split_by_task(&mut codes, &offsets)
        .into_par_iter()
        .enumerate()
        .for_each(|(task, task_codes)| {
            let first = task * GROUPS_PER_TASK;
            let last = (first + GROUPS_PER_TASK).min(geometry.group_count());
            for group in first..last {
                let span = geometry.range(group);
                let codes = &mut task_codes[offsets[group] - offsets[first]..offsets[group + 1] - offsets[first]];
                let offset = params.offsets.get(group).copied().unwrap_or(0.0);
                let kept = kept.map(|kept| &kept[span.clone()]);
                quantize_group(&values[span], kept, range, params.scales[group], offset, codes);
            }
        });
    codes
}

/// Reconstructs all values in group order; `codes` holds exactly one code per kept value.
pub(crate) fn dequantize(
    codes: &[u8],
    kept: Option<&[bool]>,
    geometry: &GroupGeometry,
    range: CodeRange,
    params: &GroupParams,
    out: &mut [f32],
) {
    let offsets = code_offsets(kept, geometry);
    let value_offsets: Vec<usize> = (0..=geometry.group_count())
        .map(|group| geometry.range_start(group))
        .collect();
    split_by_task(out, &value_offsets)
        .into_par_iter()
        .enumerate()
        .for_each(|(task, task_out)| {
            let first = task * GROUPS_PER_TASK;
            let last = (first + GROUPS_PER_TASK).min(geometry.group_count());
            let base = geometry.range_start(first);
            for group in first..last {
                let span = geometry.range(group);
                let out = &mut task_out[span.start - base..span.end - base];
                let offset = params.offsets.get(group).copied().unwrap_or(0.0);
                let kept = kept.map(|kept| &kept[span.clone()]);
                let codes = &codes[offsets[group]..offsets[group + 1]];
                dequantize_group(codes, kept, range, params.scales[group], offset, out);
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
            assert_eq!(round_half_away_f32(t), expected, "round({t})");
            assert_eq!(round_half_away_f32(t), t.round(), "matches std for {t}");
            assert_eq!(round_half_away_f64(f64::from(t)), f64::from(t).round());
        }
    }

    #[test]
    fn symmetric_4bit_codes_clamp_to_minus_8_and_7() {
        // Biased by 8: code 0 is -8, code 15 is 7.
        assert_eq!(symmetric_code(100.0, 1.0, -8.0, 7.0, 8.0), 15);
        assert_eq!(symmetric_code(-100.0, 1.0, -8.0, 7.0, 8.0), 0);
        assert_eq!(symmetric_code(-7.5, 1.0, -8.0, 7.0, 8.0), 0);
        assert_eq!(symmetric_code(2.5, 1.0, -8.0, 7.0, 8.0), 11);
    }

    #[test]
    fn extremes_ignore_dropped_values_and_default_to_zero() {
        let values = [5.0, -1.0, 3.0];
        let e = extremes(&values, Some(&[false, true, true]));
        assert_eq!((e.min, e.max), (-1.0, 3.0));
        let e = extremes(&values, Some(&[false, false, false]));
        assert_eq!((e.min, e.max), (0.0, 0.0));
    }
}
