//! Least-squares group parameters (`-fit mse`): the scale and offset that
//! minimize a group's squared reconstruction error, instead of the ones that
//! span its minimum and maximum.
//!
//! At 2 bits a min/max grid spends its four levels on the extremes: for
//! roughly Gaussian values the steps come out ~1.7σ wide, twice the error of
//! the best 4-level uniform grid, which clips the tails. The search here is
//! llama.cpp's `make_qkx2_quants` idea: try a range of inverse scales, round
//! the values to codes with each, solve for the scale (and offset) that best
//! fit those codes, and keep whichever fit reconstructs with the least error
//! under the codes the encoder will actually emit. The min/max parameters are
//! one of the candidates, and every candidate is judged with its scale and
//! offset rounded as they will be stored, so a fit never does worse than
//! min/max.
//!
//! Only the encoder searches: the payload is the same `q·scale + offset`
//! format, so decoding neither knows nor cares how the parameters were found.

use super::scales::{ExactParams, ScaleDtype};

/// Candidate inverse scales per group, spread evenly over
/// `[(qmax - 1) / spread, (qmax + 1) / spread]` (plus the min/max one).
const CANDIDATES: usize = 24;

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

/// The parameters as a payload with `storage` scales stores them (f16 ones
/// that do not fit f16 force the tensor to f32, which is judged again).
fn as_stored(params: ExactParams, storage: ScaleDtype) -> (f64, f64) {
    let (scale, offset) = match storage {
        ScaleDtype::F16 => params.stored_f16().unwrap_or_else(|| params.stored_f32()),
        ScaleDtype::F32 => params.stored_f32(),
    };
    (f64::from(scale), f64::from(offset))
}

/// Squared error of the nearest-code reconstruction on an asymmetric grid.
fn asymmetric_error(values: &[f32], params: ExactParams, qmax: f64, storage: ScaleDtype) -> f64 {
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
fn symmetric_error(
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

#[cfg(test)]
mod tests {
    use super::*;
    use ScaleDtype::F16;

    /// A deterministic bell-shaped sample: sums of uniforms from SplitMix64.
    fn bell(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = crate::codec::SplitMix64(seed);
        (0..n)
            .map(|_| {
                (0..4)
                    .map(|_| (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64)
                    .sum::<f64>() as f32
                    - 2.0
            })
            .collect()
    }

    fn min_max_params(values: &[f32], qmax: f64) -> ExactParams {
        let min = values.iter().copied().fold(f32::INFINITY, f32::min);
        let max = values.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        ExactParams {
            scale: ((f64::from(max) - f64::from(min)) / qmax) as f32,
            offset: min,
        }
    }

    #[test]
    fn two_bit_fit_roughly_halves_the_error_of_min_max_on_bell_shaped_groups() {
        let (mut fitted_total, mut min_max_total) = (0.0, 0.0);
        for seed in 0..200 {
            let values = bell(128, seed);
            let start = min_max_params(&values, 3.0);
            let fitted = asymmetric(&values, 3.0, start, F16);
            let (fitted_error, min_max_error) = (
                asymmetric_error(&values, fitted, 3.0, F16),
                asymmetric_error(&values, start, 3.0, F16),
            );
            assert!(fitted_error <= min_max_error, "seed {seed}");
            fitted_total += fitted_error;
            min_max_total += min_max_error;
        }
        // Theory for Gaussian values: 0.119σ² (best 4-level uniform grid)
        // against ~0.2-0.25σ² for the min/max grid of 128 samples.
        let ratio = fitted_total / min_max_total;
        assert!((0.4..0.75).contains(&ratio), "error ratio {ratio}");
    }

    #[test]
    fn symmetric_fit_never_loses_to_max_abs_and_gains_at_three_bits() {
        let (mut fitted_total, mut max_abs_total) = (0.0, 0.0);
        for seed in 0..200 {
            let values = bell(64, seed);
            let max_abs = values.iter().fold(0f32, |m, x| m.max(x.abs()));
            let start = ExactParams {
                scale: max_abs / 3.0,
                offset: 0.0,
            };
            let fitted = symmetric(&values, (-4.0, 3.0), start, F16);
            let fitted_error = symmetric_error(&values, fitted, (-4.0, 3.0), F16);
            let max_abs_error = symmetric_error(&values, start, (-4.0, 3.0), F16);
            assert!(fitted_error <= max_abs_error, "seed {seed}");
            fitted_total += fitted_error;
            max_abs_total += max_abs_error;
        }
        assert!(
            fitted_total < 0.9 * max_abs_total,
            "{fitted_total} vs {max_abs_total}"
        );
    }

    #[test]
    fn a_group_that_fits_its_grid_exactly_keeps_its_exact_parameters() {
        // Values on the 2-bit grid 1 + 0.5·q: min/max is already exact.
        let values = [1.0, 1.5, 2.0, 2.5, 2.5, 1.0];
        let fitted = asymmetric(&values, 3.0, min_max_params(&values, 3.0), F16);
        assert_eq!(asymmetric_error(&values, fitted, 3.0, F16), 0.0);
        // Constant and empty groups are left alone.
        let flat = ExactParams {
            scale: 0.0,
            offset: 7.0,
        };
        let same = asymmetric(&[7.0; 4], 3.0, flat, F16);
        assert_eq!((same.scale, same.offset), (0.0, 7.0));
        let same = symmetric(&[], (-2.0, 1.0), flat, F16);
        assert_eq!((same.scale, same.offset), (0.0, 7.0));
    }
}
