//! The entropy-coded uniform quantizer (`-grid ecsq`): every value of a
//! tensor is rounded to one uniform step, `q = round((x - mean) / step)`
//! around its group's mean, and the integer codes are range coded with an
//! adaptive model per group (`range_coder`).
//!
//! Why: a fixed-width code spends the same bits on every value, so its
//! grid must span each group's range and it needs a scale per group. With
//! the codes entropy coded, one step for the whole tensor gives every value
//! the same error (`step^2 / 12`, which at a given total rate is what
//! minimizes the squared error), a rare large value costs a few more bits
//! instead of stretching its group's grid, and no scale is stored per group.
//! At high rate this is within 0.25 bits of the rate-distortion bound of a
//! Gaussian source, where the best fixed-width quantizer is about 0.6 bits
//! short of it at 3 bits. The step is set from the rate `r` (the params'
//! `rate`, else `bits`): a Gaussian of the tensor's RMS quantized with
//! `step = rms * sqrt(2 pi e) * 2^-r` has an entropy of about `r` bits.

use half::f16;

use super::groups::GroupGeometry;
use super::range_coder::{Decoder, Encoder, IntegerModel, MAX_BUCKET};
use super::scales::{GroupParams, ScaleDtype, ZERO_GROUP_SCALE};
use super::CodecError;

/// The levels section: the step, little-endian f32.
pub(crate) const LEVELS_LEN: usize = 4;

/// Largest code magnitude (`2^30 - 1`): values further than this many steps
/// from their group's mean are clipped, which the step's tie to the RMS
/// rules out for tensors under 2^32 values (a value is at most `sqrt(n)`
/// RMS from the mean, and the step at rate 16 is RMS / 15,858).
const MAX_CODE: f64 = ((1u64 << (MAX_BUCKET + 1)) - 1) as f64;

/// `sqrt(2 pi e)`: a Gaussian of deviation `s` has differential entropy `log2(s * this)`.
const GAUSSIAN_ENTROPY_SCALE: f64 = 4.132_731_354_464_69;

/// What the step is chosen for.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Target {
    /// The Gaussian estimate for this many bits per value, in one pass.
    Gaussian(f64),
    /// The largest stored size within this many bits for the whole payload,
    /// of which `fixed_bits` (kept tokens) are not ecsq's.
    PayloadBits { budget: f64, fixed_bits: f64 },
}

/// A tensor's ecsq parameters: every group's stored mean (its offset; no
/// scales), the step, and the codes section coded with that step.
pub(crate) struct Choice {
    pub params: GroupParams,
    pub step: f32,
    pub coded: Vec<u8>,
}

/// Passes of the rate search: each codes the tensor once.
const RATE_PASSES: usize = 8;

/// Chooses a tensor's means and step for `target` from its values in
/// group order, and codes them.
pub(crate) fn choose(target: Target, grouped: &[f32], geometry: &GroupGeometry) -> Choice {
    let means: Vec<f64> = (0..geometry.group_count())
        .map(|group| {
            let span = geometry.range(group);
            let len = span.len();
            let sum: f64 = grouped[span].iter().map(|&x| f64::from(x)).sum();
            if len == 0 {
                0.0
            } else {
                sum / len as f64
            }
        })
        .collect();
    let fits_f16 = means.iter().all(|&mean| f16::from_f64(mean).is_finite());
    let (dtype, offsets): (ScaleDtype, Vec<f32>) = if fits_f16 {
        let offsets = means.iter().map(|&m| f16::from_f64(m).to_f32()).collect();
        (ScaleDtype::F16, offsets)
    } else {
        (ScaleDtype::F32, means.iter().map(|&m| m as f32).collect())
    };
    let squares: f64 = (0..geometry.group_count())
        .map(|group| {
            let offset = f64::from(offsets[group]);
            grouped[geometry.range(group)]
                .iter()
                .map(|&x| (f64::from(x) - offset).powi(2))
                .sum::<f64>()
        })
        .sum();
    let params = GroupParams {
        dtype,
        scales: Vec::new(),
        offsets,
    };
    let count = grouped.len().max(1) as f64;
    let rms = (squares / count).sqrt();
    let gaussian_step = |rate: f64| -> f32 {
        // A zero tensor still needs a positive step; a huge one a finite step.
        if rms == 0.0 {
            ZERO_GROUP_SCALE
        } else {
            ((rms * GAUSSIAN_ENTROPY_SCALE * (-rate).exp2()) as f32)
                .clamp(f32::MIN_POSITIVE, f32::MAX)
        }
    };
    let code = |step: f32| encode_codes(&params, step, grouped, geometry);
    let (budget, fixed_bits) = match target {
        Target::Gaussian(rate) => {
            let step = gaussian_step(rate);
            let coded = code(step);
            return Choice {
                params,
                step,
                coded,
            };
        }
        Target::PayloadBits { budget, fixed_bits } => (budget, fixed_bits),
    };
    // Bits for the codes section; its size falls by about one bit per
    // value for each doubling of the step, so each pass corrects the
    // rate it aims at by the last pass's miss.
    let target_bits =
        budget - fixed_bits - 8.0 * (params.offsets.len() * dtype.size_bytes() + LEVELS_LEN) as f64;
    let mut aim = target_bits / count;
    let mut best: Option<(f32, Vec<u8>)> = None;
    let mut smallest: Option<(f32, Vec<u8>)> = None;
    for _ in 0..RATE_PASSES {
        let step = gaussian_step(aim);
        let coded = code(step);
        let bits = 8.0 * coded.len() as f64;
        if bits <= target_bits {
            let close = target_bits - bits < 0.002 * count;
            if best.as_ref().is_none_or(|(_, b)| coded.len() > b.len()) {
                best = Some((step, coded));
            }
            if close {
                break;
            }
        } else if smallest.as_ref().is_none_or(|(_, s)| coded.len() < s.len()) {
            smallest = Some((step, coded));
        }
        aim -= (bits - target_bits) / count;
    }
    // Unreachable budgets (kept tokens alone over it) take the smallest size tried.
    let (step, coded) = best.or(smallest).expect("at least one pass");
    Choice {
        params,
        step,
        coded,
    }
}

pub(crate) fn write_levels(step: f32, payload: &mut Vec<u8>) {
    payload.extend_from_slice(&step.to_le_bytes());
}

pub(crate) fn read_levels(bytes: &[u8]) -> Result<f32, CodecError> {
    let step =
        f32::from_le_bytes(bytes.try_into().map_err(|_| {
            CodecError::CorruptPayload("the ecsq levels section is not one f32 step")
        })?);
    if step.is_normal() && step > 0.0 {
        Ok(step)
    } else {
        Err(CodecError::CorruptPayload(
            "the ecsq step is not a positive normal number",
        ))
    }
}

/// The coded codes of all values, group by group, each group with its own model.
pub(crate) fn encode_codes(
    params: &GroupParams,
    step: f32,
    grouped: &[f32],
    geometry: &GroupGeometry,
) -> Vec<u8> {
    let mut coder = Encoder::new();
    let mut codes = Vec::new();
    for group in 0..geometry.group_count() {
        let offset = params.offsets[group];
        let mut model = IntegerModel::default();
        group_codes(offset, step, &grouped[geometry.range(group)], &mut codes);
        for &q in &codes {
            model.encode(&mut coder, q);
        }
    }
    coder.finish()
}

/// What [`decode_codes`] makes of [`encode_codes`]'s section, from the
/// values themselves: the same codes' levels, without range coding them
/// back (the encoder's reconstruction).
pub(crate) fn reconstruct(
    params: &GroupParams,
    step: f32,
    grouped: &[f32],
    geometry: &GroupGeometry,
    out: &mut [f32],
) -> Result<(), CodecError> {
    let mut codes = Vec::new();
    for group in 0..geometry.group_count() {
        let offset = params.offsets[group];
        let span = geometry.range(group);
        group_codes(offset, step, &grouped[span.clone()], &mut codes);
        for (value, &q) in out[span].iter_mut().zip(&codes) {
            *value = level(offset, q, step);
            if !value.is_finite() {
                return Err(CodecError::CorruptPayload("an ecsq value overflows f32"));
            }
        }
    }
    Ok(())
}

/// One group's codes as the section holds them: the nearest, stepped back
/// where that level is past f32's range.
fn group_codes(offset: f32, step: f32, values: &[f32], codes: &mut Vec<i32>) {
    codes.resize(values.len(), 0);
    nearest_codes(values, f64::from(offset), f64::from(step), codes);
    finite_level_codes(offset, step, codes);
}

crate::simd::multiversion!(fn nearest_codes / nearest_codes_at(
    values: &[f32], offset: f64, step: f64, codes: &mut [i32]) => nearest_codes_generic);

/// Every value's nearest code `round((x - offset) / step)`, clipped to
/// ±[`MAX_CODE`]: one vectorized pass before the (sequential) range coder.
#[inline(always)]
fn nearest_codes_generic(values: &[f32], offset: f64, step: f64, codes: &mut [i32]) {
    for (code, &x) in codes.iter_mut().zip(values) {
        let q = crate::simd::round((f64::from(x) - offset) / step);
        *code = crate::simd::clamp(q, -MAX_CODE, MAX_CODE) as i32;
    }
}

crate::simd::multiversion!(fn finite_level_codes / finite_level_codes_at(
    offset: f32, step: f32, codes: &mut [i32]) => finite_level_codes_generic);

/// Next to f32's limits a value's nearest level can lie beyond them: its
/// code moves one step towards 0 (that level is within 1.5 steps of the
/// value). A vectorized pass of selects over the run of codes.
#[inline(always)]
fn finite_level_codes_generic(offset: f32, step: f32, codes: &mut [i32]) {
    for q in codes.iter_mut() {
        if !level(offset, *q, step).is_finite() {
            *q -= q.signum();
        }
    }
}

/// The value of code `q`: `offset + q * step` in f64, rounded to f32 (so
/// that a group spanning f32's whole range has no overflow on the way).
#[inline(always)]
fn level(offset: f32, q: i32, step: f32) -> f32 {
    (f64::from(offset) + f64::from(q) * f64::from(step)) as f32
}

/// Decodes `bytes` into every value in group order (see [`level`]).
pub(crate) fn decode_codes(
    params: &GroupParams,
    step: f32,
    bytes: &[u8],
    geometry: &GroupGeometry,
    out: &mut [f32],
) -> Result<(), CodecError> {
    let mut coder = Decoder::new(bytes)?;
    for group in 0..geometry.group_count() {
        let offset = params.offsets[group];
        let mut model = IntegerModel::default();
        for value in &mut out[geometry.range(group)] {
            *value = level(offset, model.decode(&mut coder)?, step);
            if !value.is_finite() {
                return Err(CodecError::CorruptPayload("an ecsq value overflows f32"));
            }
        }
    }
    coder.finish()
}

#[cfg(test)]
mod tests {
    use super::super::{decode, encode, Axis, CodecError, CodecParams, Grid};
    use super::{nearest_codes_at, MAX_CODE};

    /// Gaussian values (Box-Muller over a fixed LCG) with a mean per channel,
    /// `[1, heads, seq, 64]`.
    fn gaussian_cache(heads: usize, seq: usize, seed: u64) -> Vec<f32> {
        let mut state = seed;
        let mut uniform = move || {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((state >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        };
        (0..heads * seq * 64)
            .map(|i| {
                let channel_mean = ((i % 64) as f64 - 32.0) * 0.25;
                let (u, v) = (uniform(), uniform());
                let gaussian = (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos();
                (channel_mean + gaussian) as f32
            })
            .collect()
    }

    fn ecsq(axis: Axis, rate: Option<f64>) -> CodecParams {
        CodecParams {
            bits: 3,
            grid: Grid::Ecsq,
            axis,
            rate,
            ..CodecParams::adr002(1024)
        }
    }

    fn squared_error(a: &[f32], b: &[f32]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(&x, &y)| (f64::from(x) - f64::from(y)).powi(2))
            .sum::<f64>()
            / a.len() as f64
    }

    /// Decodes, checks every value within half the payload's step of its
    /// original and the squared error at `step^2 / 12`; returns the step and
    /// the payload's bits per value.
    fn step_and_bits(values: &[f32], shape: &[usize], params: &CodecParams) -> (f32, f64) {
        let encoded = encode(values, shape, params).unwrap();
        // 128 channel groups: f16 means, then the f32 step.
        let step_at = 128 * 2;
        let step = f32::from_le_bytes(encoded.payload[step_at..step_at + 4].try_into().unwrap());
        let decoded = decode(&encoded.payload, shape, params, &encoded.layout).unwrap();
        for (&x, &y) in values.iter().zip(&decoded) {
            assert!(
                (x - y).abs() <= step / 2.0 * 1.0001 + 1e-6,
                "{x} -> {y}, step {step}"
            );
        }
        let mse = squared_error(values, &decoded);
        let uniform_mse = f64::from(step).powi(2) / 12.0;
        assert!(
            (mse / uniform_mse - 1.0).abs() < 0.05,
            "mse {mse} against {uniform_mse}"
        );
        (
            step,
            8.0 * encoded.payload.len() as f64 / values.len() as f64,
        )
    }

    #[test]
    fn bits_set_the_gaussian_step_and_a_rate_bounds_the_size() {
        let shape = [1, 2, 1024, 64];
        let values = gaussian_cache(2, 1024, 7);
        for bits in [2u8, 3, 4, 6] {
            let params = CodecParams {
                bits,
                ..ecsq(Axis::Channel, None)
            };
            let (step, size) = step_and_bits(&values, &shape, &params);
            // Unit-variance channels: step = sqrt(2 pi e) 2^-bits.
            let expected = 4.132_731_354 * (-f64::from(bits)).exp2();
            assert!(
                (f64::from(step) / expected - 1.0).abs() < 0.01,
                "step {step}"
            );
            // High-rate theory: about `bits` per value (at 2 bits the
            // Gaussian's quantized entropy is 0.04 above it), plus the means.
            let bits = f64::from(bits);
            assert!(
                size > bits - 0.05 && size < bits + 0.1,
                "{bits} bits: {size} stored"
            );
        }
        for rate in [1.0, 2.35, 3.35, 4.35, 7.9] {
            let (_, size) = step_and_bits(&values, &shape, &ecsq(Axis::Channel, Some(rate)));
            assert!(
                size <= rate && size > rate - 0.01,
                "rate {rate}: {size} bits/value"
            );
        }
    }

    #[test]
    fn at_equal_bits_it_errs_less_than_the_best_fixed_width_grid() {
        // KIVI-style asymmetric 3-bit codes, per-channel groups of 64 tokens
        // with least-squares scales: 3.5 bits/value with their scales.
        let shape = [1, 2, 1024, 64];
        let values = gaussian_cache(2, 1024, 11);
        let fixed = CodecParams {
            bits: 3,
            grid: Grid::Asymmetric,
            axis: Axis::Channel,
            fit: super::super::Fit::Mse,
            ..CodecParams::adr002(64)
        };
        let packed = encode(&values, &shape, &fixed).unwrap();
        let fixed_bits = 8.0 * packed.payload.len() as f64 / values.len() as f64;
        let fixed_mse = squared_error(
            &values,
            &decode(&packed.payload, &shape, &fixed, &packed.layout).unwrap(),
        );
        let params = ecsq(Axis::Channel, Some(fixed_bits));
        let coded = encode(&values, &shape, &params).unwrap();
        let coded_bits = 8.0 * coded.payload.len() as f64 / values.len() as f64;
        let coded_mse = squared_error(
            &values,
            &decode(&coded.payload, &shape, &params, &coded.layout).unwrap(),
        );
        assert!(coded_bits <= fixed_bits, "{coded_bits} > {fixed_bits}");
        // Gaussian theory: 1.53 dB from the bound against about 4 dB (3 bits
        // plus the 0.5 bits of scales spent on range, not resolution).
        assert!(
            coded_mse < 0.6 * fixed_mse,
            "{coded_mse} against {fixed_mse}"
        );
    }

    #[test]
    fn nearest_codes_are_roundings_half_away_from_zero_at_every_simd_level() {
        // Ties on both sides, zeros, values past ±MAX_CODE steps, a
        // subnormal step and a length that leaves SIMD remainders.
        let mut values: Vec<f32> = (-40..=40).map(|i| i as f32 * 0.25).collect();
        values.extend([
            0.0, -0.0, 1e30, -1e30, 3.4e38, -3.4e38, 1e-40, 0.49999997, -0.5000001,
        ]);
        values.extend(gaussian_cache(1, 37, 5));
        for (offset, step) in [
            (0.0, 0.5),
            (0.125, 0.25),
            (-1.0, 1e-3),
            (0.0, 1e-45),
            (2.5, 3.0),
        ] {
            let expected: Vec<i32> = values
                .iter()
                .map(|&x| {
                    ((f64::from(x) - offset) / step)
                        .round()
                        .clamp(-MAX_CODE, MAX_CODE) as i32
                })
                .collect();
            for level in crate::simd::Level::available() {
                let mut codes = vec![0; values.len()];
                nearest_codes_at(level, &values, offset, step, &mut codes);
                assert_eq!(codes, expected, "offset {offset}, step {step}, {level:?}");
            }
        }
    }

    #[test]
    fn codes_of_levels_past_f32_move_one_step_in_at_every_simd_level() {
        use super::{finite_level_codes_at, level};
        // A step of 2^127: code ±2 is ±2^128, past f32::MAX; ±1 is not.
        let step = 2f32.powi(127);
        let codes: Vec<i32> = (-5..=5).chain([i32::MAX / 2, -(i32::MAX / 2)]).collect();
        let expected: Vec<i32> = codes
            .iter()
            .map(|&q| {
                if level(0.0, q, step).is_finite() {
                    q
                } else {
                    q - q.signum()
                }
            })
            .collect();
        assert_eq!(&expected[..11], [-4, -3, -2, -1, -1, 0, 1, 1, 2, 3, 4]);
        for simd in crate::simd::Level::available() {
            let mut got = codes.clone();
            finite_level_codes_at(simd, 0.0, step, &mut got);
            assert_eq!(got, expected, "{simd:?}");
        }
    }

    #[test]
    fn params_and_layouts_that_do_not_fit_are_errors() {
        let shape = [1, 1, 8, 4];
        let values: Vec<f32> = (0..32).map(|i| i as f32 * 0.1).collect();
        let params = ecsq(Axis::Token, None);
        let encoded = encode(&values, &shape, &params).unwrap();
        assert_eq!(
            encoded.layout.coded_bytes,
            Some(encoded.payload.len() - 8 * 2 - 4)
        );
        let mut missing = encoded.layout.clone();
        missing.coded_bytes = None;
        assert_eq!(
            decode(&encoded.payload, &shape, &params, &missing),
            Err(CodecError::CodedBytes("missing"))
        );
        let adr002 = CodecParams::adr002(4);
        let symmetric = encode(&values, &shape, &adr002).unwrap();
        let mut given = symmetric.layout.clone();
        given.coded_bytes = Some(3);
        assert_eq!(
            decode(&symmetric.payload, &shape, &adr002, &given),
            Err(CodecError::CodedBytes("given"))
        );
        // A stream cut short, with the layout saying so, is caught by the coder.
        let mut short = encoded.layout.clone();
        short.coded_bytes = Some(encoded.layout.coded_bytes.unwrap() - 1);
        let cut = &encoded.payload[..encoded.payload.len() - 1];
        assert!(matches!(
            decode(cut, &shape, &params, &short),
            Err(CodecError::CorruptPayload(_))
        ));
        for (bad, error) in [
            (
                CodecParams {
                    sparsity: 0.5,
                    ..params.clone()
                },
                CodecError::GridWith {
                    grid: Grid::Ecsq,
                    feature: "sparsity",
                },
            ),
            (
                CodecParams {
                    outliers: 0.01,
                    ..params.clone()
                },
                CodecError::GridWith {
                    grid: Grid::Ecsq,
                    feature: "outliers",
                },
            ),
            (
                CodecParams {
                    rate: Some(2.5),
                    ..adr002.clone()
                },
                CodecError::InvalidRate(2.5),
            ),
            (
                CodecParams {
                    rate: Some(40.0),
                    ..params.clone()
                },
                CodecError::InvalidRate(40.0),
            ),
        ] {
            assert_eq!(encode(&values, &shape, &bad).unwrap_err(), error);
        }
    }
}
