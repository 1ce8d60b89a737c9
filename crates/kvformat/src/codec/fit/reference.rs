//! The one-candidate-at-a-time search: the reference the lane kernels must
//! reproduce bit for bit (`super::tests`).

use super::super::scales::{ExactParams, ScaleDtype};
use super::lanes::{nearest_code, LineSums, BLOCK};
use super::{as_stored, Ranked, Shortlist, CANDIDATES};
use crate::simd::moments;

/// The least-squares asymmetric parameters of a group whose min/max
/// parameters are `start` (`offset = min`, `scale = spread / qmax`).
pub(crate) fn asymmetric(
    values: &[f32],
    qmax: f64,
    start: ExactParams,
    storage: ScaleDtype,
) -> ExactParams {
    if start.scale == 0.0 || values.is_empty() {
        return start;
    }
    let spread = f64::from(start.scale) * qmax;
    let mut ranked = Ranked::default();
    for step in 0..=CANDIDATES {
        let inverse_scale = ((qmax - 1.0 + 2.0 * step as f64 / CANDIDATES as f64) / spread) as f32;
        let sums = line_sums(values, |x| {
            nearest_code((x - start.offset) * inverse_scale, 0.0, qmax as f32)
        });
        let Some((scale, offset)) = sums.least_squares_line() else {
            continue;
        };
        let candidate = ExactParams {
            scale: scale as f32,
            offset: offset as f32,
        };
        if !(candidate.scale > 0.0 && candidate.scale.is_finite() && candidate.offset.is_finite()) {
            continue;
        }
        let stored = as_stored(candidate, storage);
        ranked.push(step, candidate, stored, sums.asymmetric_bound(stored));
    }
    least_error(start, &ranked.shortlist(), |params| {
        let (scale, offset) = as_stored_f32(params, storage);
        f32_squared_error(values, |x| {
            let code = nearest_code((x - offset) * (1.0 / scale), 0.0, qmax as f32);
            (code * scale + offset).clamp(-f32::MAX, f32::MAX)
        })
    })
}

/// The least-squares symmetric scale of a group whose max|x| scale is `start`.
pub(crate) fn symmetric(
    values: &[f32],
    (qmin, qmax): (f64, f64),
    start: ExactParams,
    storage: ScaleDtype,
) -> ExactParams {
    if start.scale == 0.0 || values.is_empty() {
        return start;
    }
    let max_abs = f64::from(start.scale) * qmax;
    let mut ranked = Ranked::default();
    for step in 0..=CANDIDATES {
        let inverse_scale = ((qmax - 1.0 + 2.0 * step as f64 / CANDIDATES as f64) / max_abs) as f32;
        let sums = line_sums(values, |x| {
            nearest_code(x * inverse_scale, qmin as f32, qmax as f32)
        });
        let Some(scale) = sums.least_squares_scale() else {
            continue;
        };
        let scale = scale as f32;
        // The decoder computes code·scale in f32: the most negative code must
        // not overflow it (min/max cannot: its codes stop at -qmax).
        if !(scale > 0.0 && f64::from(scale) * -qmin <= f64::from(f32::MAX)) {
            continue;
        }
        let candidate = ExactParams { scale, offset: 0.0 };
        let stored = as_stored(candidate, storage);
        ranked.push(step, candidate, stored, sums.symmetric_bound(stored.0));
    }
    least_error(start, &ranked.shortlist(), |params| {
        let (scale, _) = as_stored_f32(params, storage);
        f32_squared_error(values, |x| {
            nearest_code(x * (1.0 / scale), qmin as f32, qmax as f32) * scale
        })
    })
}

/// One candidate's sums: codes in f32, summed value by value in f32 per
/// block and the blocks in f64.
fn line_sums(values: &[f32], code_of: impl Fn(f32) -> f32) -> LineSums {
    let (x, x_x) = moments(values, 0.0);
    let mut sums = LineSums {
        n: values.len() as f64,
        x,
        x_x,
        ..LineSums::default()
    };
    for block in values.chunks(BLOCK) {
        let (mut code, mut code_code, mut x_code) = (0f32, 0f32, 0f32);
        for &x in block {
            let q = code_of(x);
            code += q;
            code_code += q * q;
            x_code += x * q;
        }
        sums.code += f64::from(code);
        sums.code_code += f64::from(code_code);
        sums.x_code += f64::from(x_code);
    }
    sums
}

/// `Σ (restored(x) - x)²` in f32 per block, the blocks in f64.
fn f32_squared_error(values: &[f32], restored: impl Fn(f32) -> f32) -> f64 {
    values
        .chunks(BLOCK)
        .map(|block| {
            let error = block.iter().fold(0f32, |sum, &x| {
                let error = restored(x) - x;
                sum + error * error
            });
            f64::from(error)
        })
        .sum()
}

/// The parameters as stored, in f32 (both storages are f32-representable).
fn as_stored_f32(params: ExactParams, storage: ScaleDtype) -> (f32, f32) {
    let (scale, offset) = as_stored(params, storage);
    (scale as f32, offset as f32)
}

/// The start unless a shortlisted candidate, in step order, has a smaller error.
fn least_error(
    start: ExactParams,
    shortlist: &Shortlist,
    error: impl Fn(ExactParams) -> f64,
) -> ExactParams {
    let mut best = (error(start), start);
    for candidate in shortlist.iter() {
        let candidate_error = error(candidate.params);
        if candidate_error < best.0 {
            best = (candidate_error, candidate.params);
        }
    }
    best.1
}

/// Squared error of the nearest-code reconstruction on an asymmetric grid.
pub(super) fn asymmetric_error(
    values: &[f32],
    params: ExactParams,
    qmax: f64,
    storage: ScaleDtype,
) -> f64 {
    let (scale, offset) = as_stored(params, storage);
    values
        .iter()
        .map(|&x| {
            let x = f64::from(x);
            let code = ((x - offset) / scale).round().clamp(0.0, qmax);
            // Clamped to the finite f32 range, as the decoder does.
            let restored = (code * scale + offset).clamp(-f64::from(f32::MAX), f64::from(f32::MAX));
            (restored - x).powi(2)
        })
        .sum()
}

/// Squared error of the nearest-code reconstruction on a symmetric grid.
pub(super) fn symmetric_error(
    values: &[f32],
    params: ExactParams,
    (qmin, qmax): (f64, f64),
    storage: ScaleDtype,
) -> f64 {
    let (scale, _) = as_stored(params, storage);
    values
        .iter()
        .map(|&x| {
            let x = f64::from(x);
            let code = (x / scale).round().clamp(qmin, qmax);
            (code * scale - x).powi(2)
        })
        .sum()
}
