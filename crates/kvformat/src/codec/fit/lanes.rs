//! The fit's two passes over a group, candidates in SIMD lanes: the sums
//! that solve and rank each candidate's least-squares line, and the squared
//! error of the shortlisted ones. Codes and errors are f32 (twice the lanes
//! of f64), summed per [`BLOCK`] of values and then in f64. Per lane, the same operations in the same value
//! order as `reference` (no reassociation, no FMA), so the same bits at
//! every [`crate::simd::Level`]; the lane loops are fixed-length so that the
//! compiler keeps them in registers.

// Lane loops index several lane arrays at once by the lane number: that is
// the shape the compiler turns into whole-register operations.
#![allow(clippy::needless_range_loop)]

use crate::simd::{clamp, moments_generic, multiversion};

// The fit passes its level (the tests run each one), so only the `_at`
// forms are called.

/// Lanes of the search pass: the fit's 25 searched scales, padded to a whole
/// number of AVX-512 registers of f32.
pub(super) const LANES: usize = 32;

pub(super) type Lanes = [f32; LANES];

/// Lanes of the error pass: the shortlist and the start, one AVX-512
/// register of f32.
pub(super) const CHECKED: usize = 16;

pub(super) type Checked = [f32; CHECKED];

/// The code of `t`: `t` clamped to `[lo, hi]` and rounded to the nearest
/// integer, ties to even (adding and taking away 1.5·2^23 leaves no fraction
/// bits for codes below 2^22), three operations fewer than rounding half
/// away from zero as the encoder does. Only a tie rounds the other way, and
/// either code of a tie reconstructs equally far from the value. (The error
/// pass takes `t` as a product with the stored scale's f32 reciprocal where
/// the encoder divides, so a value within an ulp or so of a half may take
/// the other neighbour; its error then differs by about as little.)
#[inline(always)]
pub(super) fn nearest_code(t: f32, lo: f32, hi: f32) -> f32 {
    const ROUNDER: f32 = 12_582_912.0;
    (clamp(t, lo, hi) + ROUNDER) - ROUNDER
}

/// Values per block: within one the lanes sum in f32, where the sums of
/// codes and of their squares stay exact integers (256·255² < 2^24) and the
/// others round by about 2^-24 per addition; each block's sums then join
/// f64 totals.
pub(super) const BLOCK: usize = 256;

/// The error pass's lanes: each checked candidate's stored scale and
/// offset, and the scale's f32 reciprocal that finds its codes.
pub(super) struct CheckedLanes {
    pub scales: Checked,
    pub offsets: Checked,
    pub inverse_scales: Checked,
}

/// Sums for fitting `x ≈ scale·code + offset` per lane: the count and the
/// sums of `x` and `x²` are the same in every lane.
#[derive(Default)]
pub(super) struct LaneSums {
    pub n: f64,
    pub x: f64,
    pub x_x: f64,
    pub code: [f64; LANES],
    pub code_code: [f64; LANES],
    pub x_code: [f64; LANES],
}

impl LaneSums {
    /// Sums with the lane-independent ones of `values` and no codes yet.
    #[inline(always)]
    fn of(values: &[f32]) -> Self {
        let (x, x_x) = moments_generic(values, 0.0);
        LaneSums {
            n: values.len() as f64,
            x,
            x_x,
            ..LaneSums::default()
        }
    }

    /// Adds one block's per-lane sums.
    #[inline(always)]
    fn add_block(&mut self, code: &Lanes, code_code: &Lanes, x_code: &Lanes) {
        add_block(&mut self.code, code);
        add_block(&mut self.code_code, code_code);
        add_block(&mut self.x_code, x_code);
    }

    /// Lane `lane`'s sums.
    pub(super) fn lane(&self, lane: usize) -> LineSums {
        LineSums {
            n: self.n,
            x: self.x,
            x_x: self.x_x,
            code: self.code[lane],
            code_code: self.code_code[lane],
            x_code: self.x_code[lane],
        }
    }
}

/// One candidate's sums for fitting `x ≈ scale·code + offset`.
#[derive(Default, Clone, Copy)]
pub(super) struct LineSums {
    pub n: f64,
    pub x: f64,
    pub x_x: f64,
    pub code: f64,
    pub code_code: f64,
    pub x_code: f64,
}

impl LineSums {
    /// The least-squares `(scale, offset)`, or `None` when every code is the same.
    pub(super) fn least_squares_line(&self) -> Option<(f64, f64)> {
        let determinant = self.n * self.code_code - self.code * self.code;
        if determinant <= 0.0 {
            return None;
        }
        let scale = (self.n * self.x_code - self.code * self.x) / determinant;
        let offset = (self.code_code * self.x - self.code * self.x_code) / determinant;
        Some((scale, offset))
    }

    /// The least-squares scale of a line through 0, or `None` when every code is 0.
    pub(super) fn least_squares_scale(&self) -> Option<f64> {
        (self.code_code != 0.0).then(|| self.x_code / self.code_code)
    }

    /// `Σ (scale·code + offset - x)²` over these codes, expanded into the sums.
    pub(super) fn asymmetric_bound(&self, (scale, offset): (f64, f64)) -> f64 {
        self.x_x - 2.0 * scale * self.x_code - 2.0 * offset * self.x
            + scale * scale * self.code_code
            + 2.0 * scale * offset * self.code
            + self.n * offset * offset
    }

    /// `Σ (scale·code - x)²` over these codes.
    pub(super) fn symmetric_bound(&self, scale: f64) -> f64 {
        self.x_x - 2.0 * scale * self.x_code + scale * scale * self.code_code
    }
}

multiversion!(#[allow(dead_code)] pub(super) fn asymmetric_sums / asymmetric_sums_at(
    values: &[f32], min: f32, inverse_scales: &Lanes, qmax: f32) -> LaneSums
    => asymmetric_sums_generic);

/// Codes `clamp(round((x - min)·inverse_scale), 0, qmax)` per lane, summed.
#[inline(always)]
fn asymmetric_sums_generic(
    values: &[f32],
    min: f32,
    inverse_scales: &Lanes,
    qmax: f32,
) -> LaneSums {
    let mut sums = LaneSums::of(values);
    for block in values.chunks(BLOCK) {
        let (mut code, mut code_code, mut x_code) = ([0f32; LANES], [0f32; LANES], [0f32; LANES]);
        for &x in block {
            let shifted = x - min;
            for lane in 0..LANES {
                let q = nearest_code(shifted * inverse_scales[lane], 0.0, qmax);
                code[lane] += q;
                code_code[lane] += q * q;
                x_code[lane] += x * q;
            }
        }
        sums.add_block(&code, &code_code, &x_code);
    }
    sums
}

multiversion!(#[allow(dead_code)] pub(super) fn asymmetric_errors / asymmetric_errors_at(
    values: &[f32], checked: &CheckedLanes, qmax: f32) -> [f64; CHECKED]
    => asymmetric_errors_generic);

/// Squared error per lane of the nearest-code reconstruction with the
/// lane's stored scale and offset, clamped to the finite f32 range as the
/// decoder does. In f32, where the decoder takes `q·scale + offset` in f64
/// and rounds once: a restored value may differ by an ulp, far below any
/// difference between candidates.
#[inline(always)]
fn asymmetric_errors_generic(values: &[f32], checked: &CheckedLanes, qmax: f32) -> [f64; CHECKED] {
    let mut errors = [0.0; CHECKED];
    for block in values.chunks(BLOCK) {
        let mut block_errors = [0f32; CHECKED];
        for &x in block {
            for lane in 0..CHECKED {
                let (scale, offset) = (checked.scales[lane], checked.offsets[lane]);
                let q = nearest_code((x - offset) * checked.inverse_scales[lane], 0.0, qmax);
                let restored = clamp(q * scale + offset, -f32::MAX, f32::MAX);
                let error = restored - x;
                block_errors[lane] += error * error;
            }
        }
        add_block(&mut errors, &block_errors);
    }
    errors
}

multiversion!(#[allow(dead_code)] pub(super) fn symmetric_sums / symmetric_sums_at(
    values: &[f32], inverse_scales: &Lanes, qmin: f32, qmax: f32) -> LaneSums
    => symmetric_sums_generic);

/// Codes `clamp(round(x·inverse_scale), qmin, qmax)` per lane, summed (only
/// `x_x`, `code_code` and `x_code` are used: the line goes through 0).
#[inline(always)]
fn symmetric_sums_generic(
    values: &[f32],
    inverse_scales: &Lanes,
    qmin: f32,
    qmax: f32,
) -> LaneSums {
    let mut sums = LaneSums::of(values);
    for block in values.chunks(BLOCK) {
        let (mut code_code, mut x_code) = ([0f32; LANES], [0f32; LANES]);
        for &x in block {
            for lane in 0..LANES {
                let q = nearest_code(x * inverse_scales[lane], qmin, qmax);
                code_code[lane] += q * q;
                x_code[lane] += x * q;
            }
        }
        sums.add_block(&[0.0; LANES], &code_code, &x_code);
    }
    sums
}

multiversion!(#[allow(dead_code)] pub(super) fn symmetric_errors / symmetric_errors_at(
    values: &[f32], checked: &CheckedLanes, qmin: f32, qmax: f32) -> [f64; CHECKED]
    => symmetric_errors_generic);

/// Squared error per lane of the nearest-code reconstruction with the lane's
/// stored scale, in the decoder's f32 arithmetic.
#[inline(always)]
fn symmetric_errors_generic(
    values: &[f32],
    checked: &CheckedLanes,
    qmin: f32,
    qmax: f32,
) -> [f64; CHECKED] {
    let mut errors = [0.0; CHECKED];
    for block in values.chunks(BLOCK) {
        let mut block_errors = [0f32; CHECKED];
        for &x in block {
            for lane in 0..CHECKED {
                let q = nearest_code(x * checked.inverse_scales[lane], qmin, qmax);
                let error = q * checked.scales[lane] - x;
                block_errors[lane] += error * error;
            }
        }
        add_block(&mut errors, &block_errors);
    }
    errors
}

/// `totals[lane] += block[lane]` in f64.
#[inline(always)]
fn add_block<const N: usize>(totals: &mut [f64; N], block: &[f32; N]) {
    for lane in 0..N {
        totals[lane] += f64::from(block[lane]);
    }
}
