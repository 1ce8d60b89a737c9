//! Least-squares group parameters (`-fit mse`): the scale and offset that
//! minimize a group's squared reconstruction error, instead of the ones that
//! span its minimum and maximum.
//!
//! At 2 bits a min/max grid spends its four levels on the extremes: for
//! roughly Gaussian values the steps come out ~1.7σ wide, twice the error of
//! the best 4-level uniform grid, which clips the tails. The search here is
//! llama.cpp's `make_qkx2_quants` idea: try a range of inverse scales, round
//! the values to codes with each, solve for the scale (and offset) that best
//! fit those codes, and keep whichever fit reconstructs with the least error.
//!
//! Each candidate's error under its own codes is a quadratic in its stored
//! scale and offset whose coefficients are the sums the solve already has,
//! so ranking the candidates costs no second look at the values. That error
//! bounds the one the encoder will see (it re-rounds every value to the
//! nearest code, which can only be closer), so one more pass measures the
//! true error of the [`SHORTLIST`] best-ranked candidates and of the min/max
//! parameters, all with their scale and offset rounded as they will be
//! stored, and keeps the least: a fit never does worse than min/max.
//!
//! Only the encoder searches: the payload is the same `q·scale + offset`
//! format, so decoding neither knows nor cares how the parameters were found.
//!
//! Both passes are the encoder's hot loop: `lanes` runs the candidates at
//! once, one SIMD lane each, in the same IEEE operations and order as the
//! one-at-a-time search (`reference`, kept for the tests), so the parameters,
//! and the packed bytes, are the same bits.

mod lanes;
#[cfg(test)]
mod reference;

use super::scales::{ExactParams, ScaleDtype};
use crate::simd::{level, Level};
use lanes::{CheckedLanes, Lanes, CHECKED, LANES};

/// Candidate inverse scales per group, spread evenly over
/// `[(qmax - 1) / spread, (qmax + 1) / spread]` (plus the min/max one).
const CANDIDATES: usize = 24;

const _: () = assert!(CANDIDATES < LANES);

/// Candidates, best-ranked by their error bound, whose true error the second
/// pass measures beside the min/max start's (lane [`START_LANE`]). At 2 bits
/// the bound's best is the true best in only some groups: checking 15 loses
/// almost nothing to checking every candidate, 1 or 3 lose up to 1% RMSE.
const SHORTLIST: usize = CHECKED - 1;

/// The lane of the min/max start in the error pass.
const START_LANE: usize = SHORTLIST;

/// The searched inverse scales `(qmax - 1 + 2·step/CANDIDATES) / spread`,
/// one lane per step (the lanes past them are never read).
fn inverse_scales(qmax: f64, spread: f64) -> Lanes {
    let mut lanes = [0.0; LANES];
    for (step, lane) in lanes.iter_mut().enumerate().take(CANDIDATES + 1) {
        *lane = ((qmax - 1.0 + 2.0 * step as f64 / CANDIDATES as f64) / spread) as f32;
    }
    lanes
}

/// The least-squares asymmetric parameters of a group whose min/max
/// parameters are `start` (`offset = min`, `scale = spread / qmax`).
pub(crate) fn asymmetric(
    values: &[f32],
    qmax: f64,
    start: ExactParams,
    storage: ScaleDtype,
) -> ExactParams {
    asymmetric_at(level(), values, qmax, start, storage)
}

pub(crate) fn asymmetric_at(
    level: Level,
    values: &[f32],
    qmax: f64,
    start: ExactParams,
    storage: ScaleDtype,
) -> ExactParams {
    #[cfg(test)]
    if tests::reference_only() {
        return reference::asymmetric(values, qmax, start, storage);
    }
    if start.scale == 0.0 || values.is_empty() {
        return start;
    }
    let spread = f64::from(start.scale) * qmax;
    let inverse_scales = inverse_scales(qmax, spread);
    let sums = lanes::asymmetric_sums_at(level, values, start.offset, &inverse_scales, qmax as f32);
    let mut ranked = Ranked::default();
    for lane in 0..=CANDIDATES {
        let line = sums.lane(lane);
        let Some((scale, offset)) = line.least_squares_line() else {
            continue;
        };
        let candidate = ExactParams {
            scale: scale as f32,
            offset: offset as f32,
        };
        if candidate.scale > 0.0 && candidate.scale.is_finite() && candidate.offset.is_finite() {
            let stored = as_stored(candidate, storage);
            ranked.push(lane, candidate, stored, line.asymmetric_bound(stored));
        }
    }
    let shortlist = ranked.shortlist();
    let checked = checked_lanes(start, &shortlist, storage);
    let errors = lanes::asymmetric_errors_at(level, values, &checked, qmax as f32);
    best_of(start, &shortlist, &errors)
}

/// The least-squares symmetric scale of a group whose max|x| scale is `start`.
pub(crate) fn symmetric(
    values: &[f32],
    codes: (f64, f64),
    start: ExactParams,
    storage: ScaleDtype,
) -> ExactParams {
    symmetric_at(level(), values, codes, start, storage)
}

pub(crate) fn symmetric_at(
    level: Level,
    values: &[f32],
    (qmin, qmax): (f64, f64),
    start: ExactParams,
    storage: ScaleDtype,
) -> ExactParams {
    #[cfg(test)]
    if tests::reference_only() {
        return reference::symmetric(values, (qmin, qmax), start, storage);
    }
    if start.scale == 0.0 || values.is_empty() {
        return start;
    }
    let max_abs = f64::from(start.scale) * qmax;
    let inverse_scales = inverse_scales(qmax, max_abs);
    let sums = lanes::symmetric_sums_at(level, values, &inverse_scales, qmin as f32, qmax as f32);
    let mut ranked = Ranked::default();
    for lane in 0..=CANDIDATES {
        let line = sums.lane(lane);
        let Some(scale) = line.least_squares_scale() else {
            continue;
        };
        let scale = scale as f32;
        // The decoder computes code·scale in f32: the most negative code must
        // not overflow it (min/max cannot: its codes stop at -qmax).
        if scale > 0.0 && f64::from(scale) * -qmin <= f64::from(f32::MAX) {
            let candidate = ExactParams { scale, offset: 0.0 };
            let stored = as_stored(candidate, storage);
            ranked.push(lane, candidate, stored, line.symmetric_bound(stored.0));
        }
    }
    let shortlist = ranked.shortlist();
    let checked = checked_lanes(start, &shortlist, storage);
    let errors = lanes::symmetric_errors_at(level, values, &checked, qmin as f32, qmax as f32);
    best_of(start, &shortlist, &errors)
}

/// A searched candidate: its parameters and the same as stored.
#[derive(Clone, Copy)]
pub(super) struct Candidate {
    pub params: ExactParams,
    pub stored: (f64, f64),
}

/// The valid candidates of a search, in step order, with their error bounds.
#[derive(Default)]
pub(super) struct Ranked {
    candidates: [Option<Candidate>; CANDIDATES + 1],
    /// Per candidate, its rank key: the bound in `f64::total_cmp`'s order
    /// with the step in its last 5 bits (bounds within 2^-47 of each other
    /// tie, and the earlier step wins).
    keys: [u64; CANDIDATES + 1],
    len: usize,
}

impl Ranked {
    /// Adds the candidate of `step`; steps come in increasing order.
    pub(super) fn push(
        &mut self,
        step: usize,
        params: ExactParams,
        stored: (f64, f64),
        bound: f64,
    ) {
        const STEP_BITS: u32 = 5;
        const _: () = assert!(CANDIDATES < 1 << STEP_BITS);
        // f64::total_cmp's order, as an unsigned integer.
        let bits = bound.to_bits() as i64;
        let ordered = (bits ^ ((((bits >> 63) as u64) >> 1) as i64)) as u64 ^ (1 << 63);
        self.keys[self.len] = (ordered >> STEP_BITS << STEP_BITS) | step as u64;
        self.candidates[self.len] = Some(Candidate { params, stored });
        self.len += 1;
    }

    /// The [`SHORTLIST`] smallest bounds (ties to the earlier step; a NaN
    /// bound ranks last), in step order.
    pub(super) fn shortlist(self) -> Shortlist {
        let mut shortlist = Shortlist::default();
        let threshold = if self.len > SHORTLIST {
            let mut keys = self.keys;
            *keys[..self.len].select_nth_unstable(SHORTLIST - 1).1
        } else {
            u64::MAX
        };
        for (key, candidate) in self.keys.iter().zip(&self.candidates).take(self.len) {
            if *key <= threshold {
                shortlist.candidates[shortlist.len] = *candidate;
                shortlist.len += 1;
            }
        }
        shortlist
    }
}

/// The candidates whose true error is measured, in step order.
#[derive(Default)]
pub(super) struct Shortlist {
    candidates: [Option<Candidate>; SHORTLIST],
    len: usize,
}

impl Shortlist {
    pub(super) fn iter(&self) -> impl Iterator<Item = &Candidate> {
        self.candidates[..self.len].iter().flatten()
    }
}

/// The shortlisted candidates' stored scales and offsets, one lane each, the
/// start in [`START_LANE`] and in every lane with no candidate (computed,
/// never read).
fn checked_lanes(start: ExactParams, shortlist: &Shortlist, storage: ScaleDtype) -> CheckedLanes {
    let start = as_stored(start, storage);
    let (mut scales, mut offsets) = ([start.0 as f32; CHECKED], [start.1 as f32; CHECKED]);
    for (lane, candidate) in shortlist.iter().enumerate() {
        (scales[lane], offsets[lane]) = (candidate.stored.0 as f32, candidate.stored.1 as f32);
    }
    CheckedLanes {
        scales,
        offsets,
        inverse_scales: scales.map(|scale| 1.0 / scale),
    }
}

/// The start unless a shortlisted candidate, taken in step order, has a
/// smaller error.
fn best_of(start: ExactParams, shortlist: &Shortlist, errors: &[f64; CHECKED]) -> ExactParams {
    let mut best = (errors[START_LANE], start);
    for (candidate, &error) in shortlist.iter().zip(errors) {
        if error < best.0 {
            best = (error, candidate.params);
        }
    }
    best.1
}

/// The parameters as a payload with `storage` scales stores them (f16 ones
/// that do not fit f16 force the tensor to f32, which is judged again).
fn as_stored(params: ExactParams, storage: ScaleDtype) -> (f64, f64) {
    let (scale, offset) = match storage {
        ScaleDtype::F16 => params.stored_f16().unwrap_or_else(|| params.stored_f32()),
        ScaleDtype::F32 => params.stored_f32(),
        ScaleDtype::Bf16 | ScaleDtype::E4m3 | ScaleDtype::E8m0 => {
            unreachable!("fitted scales are f16 or f32")
        }
    };
    (f64::from(scale), f64::from(offset))
}

#[cfg(test)]
mod tests {
    use super::reference::{asymmetric_error, symmetric_error};
    use super::*;
    use crate::codec::{encode, Axis, CodecParams, Fit, Grid, SplitMix64};
    use std::cell::Cell;
    use ScaleDtype::{F16, F32};

    thread_local! {
        /// Set on the threads of [`with_reference`]'s pool: the fit there is
        /// the one-at-a-time reference.
        static REFERENCE_ONLY: Cell<bool> = const { Cell::new(false) };
    }

    pub(super) fn reference_only() -> bool {
        REFERENCE_ONLY.with(Cell::get)
    }

    /// Runs `work` on a pool whose threads fit with the reference search
    /// (every other thread keeps the lane kernels).
    fn with_reference<R: Send>(work: impl FnOnce() -> R + Send) -> R {
        rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .start_handler(|_| REFERENCE_ONLY.with(|flag| flag.set(true)))
            .build()
            .expect("a test thread pool")
            .install(work)
    }

    /// Groups that probe the lane kernels' corners: seeded bell-shaped and
    /// uniform ones, values exactly halfway between codes (ties of the
    /// rounding), zeros with one non-zero, constant and two-valued groups,
    /// f32 extremes that stay finite through the fit, subnormals, and
    /// lengths that leave SIMD remainders.
    fn probe_groups() -> Vec<Vec<f32>> {
        let mut groups = Vec::new();
        for (seed, n) in [(1u64, 128usize), (2, 256), (3, 64), (4, 7), (5, 1), (6, 33)] {
            groups.push(bell(n, seed));
            let mut rng = SplitMix64(seed ^ 0xfeed);
            groups.push(
                (0..n)
                    .map(|_| (rng.next_u64() >> 40) as f32 / (1u64 << 20) as f32 - 8.0)
                    .collect(),
            );
        }
        // Halves and quarters: (x - min)·inverse_scale lands on .5 for many candidates.
        groups.push((0..64).map(|i| (i % 16) as f32 * 0.5 - 3.75).collect());
        groups.push((0..48).map(|i| (i % 7) as f32 * 0.25).collect());
        groups.push(
            (0..40)
                .map(|i| if i % 2 == 0 { -1.5 } else { 2.5 })
                .collect(),
        );
        let mut one_spike = vec![0.0f32; 64];
        one_spike[17] = 3.0;
        groups.push(one_spike.clone());
        one_spike[17] = -3.0;
        groups.push(one_spike);
        groups.push(vec![0.0; 32]);
        groups.push(vec![-2.5; 9]);
        groups.push(vec![1e30, -1e30, 5e29, 0.0, -2.5e29, 1e30]);
        groups.push(vec![1.0e38, -1.0e38, 3.0e37, -7.0e37, 0.0]);
        groups.push(vec![f32::MAX / 4.0, 0.0, f32::MAX / 8.0, 1.0]);
        groups.push(vec![1e-40, -3e-41, 2e-39, 0.0, 5e-45]);
        groups.push(vec![65504.0, -65504.0, 60000.0, 1.0, -0.5]);
        groups
    }

    fn bit_pair(params: ExactParams) -> (u32, u32) {
        (params.scale.to_bits(), params.offset.to_bits())
    }

    #[test]
    fn lane_search_is_the_reference_bit_for_bit_at_every_simd_level() {
        let mut compared = 0;
        for values in probe_groups() {
            for bits in [2u32, 3, 4, 8] {
                let qmax = f64::from((1u32 << bits) - 1);
                let codes = (
                    -f64::from(1u32 << (bits - 1)),
                    f64::from((1u32 << (bits - 1)) - 1),
                );
                let min_max = min_max_params(&values, qmax);
                let max_abs = values.iter().fold(0f32, |m, x| m.max(x.abs()));
                let max_abs = ExactParams {
                    scale: (f64::from(max_abs) / codes.1) as f32,
                    offset: 0.0,
                };
                for storage in [F16, F32] {
                    let asym = reference::asymmetric(&values, qmax, min_max, storage);
                    let sym = reference::symmetric(&values, codes, max_abs, storage);
                    for level in crate::simd::Level::available() {
                        assert_eq!(
                            bit_pair(asymmetric_at(level, &values, qmax, min_max, storage)),
                            bit_pair(asym),
                            "asymmetric, {bits} bits, {storage:?}, {level:?}, {values:?}"
                        );
                        assert_eq!(
                            bit_pair(symmetric_at(level, &values, codes, max_abs, storage)),
                            bit_pair(sym),
                            "symmetric, {bits} bits, {storage:?}, {level:?}, {values:?}"
                        );
                        compared += 1;
                    }
                }
            }
        }
        assert!(compared >= 8 * probe_groups().len());
    }

    #[test]
    fn packed_bytes_of_mse_fits_are_the_references() {
        // [1, 2, 128, 16]: rotated, sinks kept, keys per channel, values flat.
        let shape = [1, 2, 128, 16];
        let count = shape.iter().product::<usize>();
        let mut tensors: Vec<Vec<f32>> = (0..3)
            .map(|seed| bell(count, 100 + seed).iter().map(|x| x * 3.0).collect())
            .collect();
        let mut adversarial: Vec<f32> = (0..count)
            .map(|i| match i % 11 {
                0 => 0.0,
                1..=4 => (i % 8) as f32 * 0.5,
                // Beyond FP16 only past the 4 kept sink tokens.
                5 if (i / 16) % 128 >= 4 => -1e30,
                _ => 2.5,
            })
            .collect();
        adversarial[..64].fill(0.0);
        tensors.push(adversarial);
        tensors.push(vec![0.75; count]);
        assert!(with_reference(reference_only) && !reference_only());
        let mut compared = 0;
        for (grid, bits, axis, group_size, rotate) in [
            (Grid::Asymmetric, 4u8, Axis::Channel, 128usize, true),
            (Grid::Asymmetric, 2, Axis::Flat, 256, true),
            (Grid::Asymmetric, 3, Axis::Token, 16, false),
            (Grid::Symmetric, 4, Axis::Flat, 64, true),
            (Grid::Symmetric, 2, Axis::Channel, 32, false),
        ] {
            let params = CodecParams {
                bits,
                grid,
                axis,
                group_size,
                rotation_seed: rotate.then_some(7),
                sink_tokens: 4,
                fit: Fit::Mse,
                ..CodecParams::adr002(64)
            };
            for values in &tensors {
                let ours = encode(values, &shape, &params).expect("encodes");
                let reference =
                    with_reference(|| encode(values, &shape, &params)).expect("encodes");
                assert_eq!(ours.layout, reference.layout, "{params:?}");
                assert!(
                    ours.payload == reference.payload,
                    "{params:?}: packed bytes differ"
                );
                compared += 1;
            }
        }
        assert_eq!(compared, 25);
    }

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
