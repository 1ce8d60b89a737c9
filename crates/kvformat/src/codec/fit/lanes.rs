//! The fit's two passes over a group, every candidate in a SIMD lane: the
//! sums that solve each candidate's least-squares line, and each candidate's
//! squared error. Per lane, the same f64 operations in the same value order
//! as `reference` (no reassociation, no FMA), so the same bits at every
//! [`crate::simd::Level`]; the lane loops are fixed-length so that the
//! compiler keeps them in registers (4 of AVX-512, 8 of AVX2, per array).

// Lane loops index several lane arrays at once by the lane number: that is
// the shape the compiler turns into whole-register operations.
#![allow(clippy::needless_range_loop)]

use crate::simd::{clamp, multiversion, round};

// The fit passes its level (the tests run each one), so only the `_at`
// forms are called.

/// Lanes per pass: the fit's 25 searched scales and the start, padded to a
/// whole number of AVX-512 registers of f64.
pub(super) const LANES: usize = 32;

pub(super) type Lanes = [f64; LANES];

/// Sums for fitting `x ≈ scale·code + offset` per lane: the count and the
/// sum of `x` are the same in every lane.
pub(super) struct LaneSums {
    pub n: f64,
    pub x: f64,
    pub code: Lanes,
    pub code_code: Lanes,
    pub x_code: Lanes,
}

impl LaneSums {
    /// Lane `lane`'s `(scale, offset)`, or `None` when its codes are all the same.
    pub(super) fn least_squares_line(&self, lane: usize) -> Option<(f64, f64)> {
        let (n, x) = (self.n, self.x);
        let (code, code_code, x_code) = (self.code[lane], self.code_code[lane], self.x_code[lane]);
        let determinant = n * code_code - code * code;
        if determinant <= 0.0 {
            return None;
        }
        let scale = (n * x_code - code * x) / determinant;
        let offset = (code_code * x - code * x_code) / determinant;
        Some((scale, offset))
    }
}

multiversion!(#[allow(dead_code)] pub(super) fn asymmetric_sums / asymmetric_sums_at(
    values: &[f32], min: f64, inverse_scales: &Lanes, qmax: f64) -> LaneSums
    => asymmetric_sums_generic);

/// Codes `clamp(round((x - min)·inverse_scale), 0, qmax)` per lane, summed.
#[inline(always)]
fn asymmetric_sums_generic(
    values: &[f32],
    min: f64,
    inverse_scales: &Lanes,
    qmax: f64,
) -> LaneSums {
    let mut sums = LaneSums {
        n: 0.0,
        x: 0.0,
        code: [0.0; LANES],
        code_code: [0.0; LANES],
        x_code: [0.0; LANES],
    };
    for &x in values {
        let x = f64::from(x);
        let shifted = x - min;
        sums.n += 1.0;
        sums.x += x;
        for lane in 0..LANES {
            let code = clamp(round(shifted * inverse_scales[lane]), 0.0, qmax);
            sums.code[lane] += code;
            sums.code_code[lane] += code * code;
            sums.x_code[lane] += x * code;
        }
    }
    sums
}

multiversion!(#[allow(dead_code)] pub(super) fn asymmetric_errors / asymmetric_errors_at(
    values: &[f32], scales: &Lanes, offsets: &Lanes, qmax: f64) -> Lanes
    => asymmetric_errors_generic);

/// Squared error per lane of the nearest-code reconstruction with the
/// lane's stored scale and offset, clamped to the finite f32 range as the
/// decoder does.
#[inline(always)]
fn asymmetric_errors_generic(values: &[f32], scales: &Lanes, offsets: &Lanes, qmax: f64) -> Lanes {
    let limit = f64::from(f32::MAX);
    let mut errors = [0.0; LANES];
    for &x in values {
        let x = f64::from(x);
        for lane in 0..LANES {
            let code = clamp(round((x - offsets[lane]) / scales[lane]), 0.0, qmax);
            let restored = clamp(code * scales[lane] + offsets[lane], -limit, limit);
            let error = restored - x;
            errors[lane] += error * error;
        }
    }
    errors
}

multiversion!(#[allow(dead_code)] pub(super) fn symmetric_sums / symmetric_sums_at(
    values: &[f32], inverse_scales: &Lanes, qmin: f64, qmax: f64) -> LaneSums
    => symmetric_sums_generic);

/// Codes `clamp(round(x·inverse_scale), qmin, qmax)` per lane, summed (only
/// `code_code` and `x_code` are used: the line goes through 0).
#[inline(always)]
fn symmetric_sums_generic(
    values: &[f32],
    inverse_scales: &Lanes,
    qmin: f64,
    qmax: f64,
) -> LaneSums {
    let mut sums = LaneSums {
        n: 0.0,
        x: 0.0,
        code: [0.0; LANES],
        code_code: [0.0; LANES],
        x_code: [0.0; LANES],
    };
    for &x in values {
        let x = f64::from(x);
        for lane in 0..LANES {
            let code = clamp(round(x * inverse_scales[lane]), qmin, qmax);
            sums.x_code[lane] += x * code;
            sums.code_code[lane] += code * code;
        }
    }
    sums
}

multiversion!(#[allow(dead_code)] pub(super) fn symmetric_errors / symmetric_errors_at(
    values: &[f32], scales: &Lanes, qmin: f64, qmax: f64) -> Lanes
    => symmetric_errors_generic);

/// Squared error per lane of the nearest-code reconstruction with the lane's stored scale.
#[inline(always)]
fn symmetric_errors_generic(values: &[f32], scales: &Lanes, qmin: f64, qmax: f64) -> Lanes {
    let mut errors = [0.0; LANES];
    for &x in values {
        let x = f64::from(x);
        for lane in 0..LANES {
            let code = clamp(round(x / scales[lane]), qmin, qmax);
            let error = code * scales[lane] - x;
            errors[lane] += error * error;
        }
    }
    errors
}
