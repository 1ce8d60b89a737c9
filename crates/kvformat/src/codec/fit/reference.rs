//! The one-candidate-at-a-time search as it was first written: the
//! reference the lane kernels must reproduce bit for bit (`super::tests`).

use super::super::scales::{ExactParams, ScaleDtype};
use super::{as_stored, CANDIDATES};

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
    let min = f64::from(start.offset);
    let spread = f64::from(start.scale) * qmax;
    let mut best = (asymmetric_error(values, start, qmax, storage), start);
    for step in 0..=CANDIDATES {
        let inverse_scale = (qmax - 1.0 + 2.0 * step as f64 / CANDIDATES as f64) / spread;
        let sums = values.iter().fold(Sums::default(), |sums, &x| {
            let x = f64::from(x);
            sums.add(((x - min) * inverse_scale).round().clamp(0.0, qmax), x)
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
        let error = asymmetric_error(values, candidate, qmax, storage);
        if error < best.0 {
            best = (error, candidate);
        }
    }
    best.1
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
    let mut best = (symmetric_error(values, start, (qmin, qmax), storage), start);
    for step in 0..=CANDIDATES {
        let inverse_scale = (qmax - 1.0 + 2.0 * step as f64 / CANDIDATES as f64) / max_abs;
        let (x_code, code_code) = values.iter().fold((0.0, 0.0), |(xq, qq), &x| {
            let x = f64::from(x);
            let code = (x * inverse_scale).round().clamp(qmin, qmax);
            (xq + x * code, qq + code * code)
        });
        if code_code == 0.0 {
            continue;
        }
        let scale = (x_code / code_code) as f32;
        // The decoder computes code·scale in f32: the most negative code must
        // not overflow it (min/max cannot: its codes stop at -qmax).
        if !(scale > 0.0 && f64::from(scale) * -qmin <= f64::from(f32::MAX)) {
            continue;
        }
        let candidate = ExactParams { scale, offset: 0.0 };
        let error = symmetric_error(values, candidate, (qmin, qmax), storage);
        if error < best.0 {
            best = (error, candidate);
        }
    }
    best.1
}

/// Running sums for fitting `x ≈ scale·code + offset` by least squares.
#[derive(Default, Clone, Copy)]
struct Sums {
    n: f64,
    code: f64,
    code_code: f64,
    x: f64,
    x_code: f64,
}

impl Sums {
    fn add(self, code: f64, x: f64) -> Self {
        Sums {
            n: self.n + 1.0,
            code: self.code + code,
            code_code: self.code_code + code * code,
            x: self.x + x,
            x_code: self.x_code + x * code,
        }
    }

    /// `(scale, offset)`, or `None` when every code is the same.
    fn least_squares_line(&self) -> Option<(f64, f64)> {
        let determinant = self.n * self.code_code - self.code * self.code;
        if determinant <= 0.0 {
            return None;
        }
        let scale = (self.n * self.x_code - self.code * self.x) / determinant;
        let offset = (self.code_code * self.x - self.code * self.x_code) / determinant;
        Some((scale, offset))
    }
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
