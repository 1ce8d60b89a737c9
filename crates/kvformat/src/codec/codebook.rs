//! Codebook quantizers (`-grid lloyd`, `-grid kmeans`): a value is
//! `level[code] · scale`, with non-uniform levels and one scale per group.
//!
//! After the randomized Hadamard rotation each coordinate of a head vector
//! is close to Gaussian with the vector's RMS as σ (TurboQuant's argument),
//! and the Lloyd-Max levels of the unit Gaussian are the MSE-optimal 2^b
//! levels for it: MSE/σ² 0.1175, 0.0345, 0.0095 at 2, 3, 4 bits, 8% and 18%
//! below the best uniform grid at 3 and 4 bits. So the scale of a group is
//! its RMS (over kept values), stored like a uniform grid's scale, and:
//! - `lloyd`: the levels are [`GAUSSIAN_LEVELS`], fixed, not stored (the
//!   table's provenance is the test that rederives it by Lloyd's algorithm);
//! - `kmeans`: the levels are fitted to the tensor (Lloyd's algorithm on its
//!   values divided by their group's scale, weighted by scale², so it
//!   minimizes the tensor's squared error; started from the Gaussian levels;
//!   run on a fine histogram of those values, one pass over the tensor)
//!   and stored as 2^b FP16 values in the payload, so non-Gaussian tensors
//!   (no rotation, outlier channels) get levels of their own.
//!
//! Codes are the index of the nearest level (ties to the lower index).
//! With `-fit mse` a group's scale is refined by least squares on its codes,
//! kept only if the stored result errs less.

use half::f16;
use rayon::prelude::*;

use super::groups::GroupGeometry;
use super::quantizer::GroupMapping;
use super::scales::{ExactParams, GroupParams, ScaleDtype};
use super::{CodecError, Fit, Grid};

/// Positive half of the Lloyd-Max levels of N(0, 1) for 2, 3 and 4 bits,
/// ascending (the negative half mirrors it): f32 of the f64 fixed point of
/// Lloyd's algorithm, as
/// `tests::shipped_levels_are_lloyds_fixed_point_with_the_known_mse` recomputes.
pub const GAUSSIAN_LEVELS: [&[f32]; 3] = [
    &[0.45278004, 1.5104176],
    &[0.24509418, 0.7560053, 1.3439093, 2.1519456],
    &[
        0.12839504, 0.3880483, 0.65675914, 0.94234043, 1.2562312, 1.6180464, 2.0690172, 2.7325895,
    ],
];

/// Lloyd iterations of `kmeans` on a tensor, a fixed number so that the
/// encoder's work is bounded; every iteration lowers (or keeps) the error.
const KMEANS_ITERATIONS: usize = 16;

/// Groups per partial histogram: fixed chunks, so the sums (and the levels)
/// do not depend on the thread count.
const GROUP_CHUNK: usize = 4096;

/// Bins of the k-means histogram of `t = x / s`, evenly over
/// `[-HISTOGRAM_RANGE, HISTOGRAM_RANGE)` (values beyond it join the end
/// bins): 2^-11 wide, half an FP16 level's spacing at 1.
const HISTOGRAM_BINS: usize = 1 << 15;
const HISTOGRAM_RANGE: f64 = 8.0;

/// All 2^bits Gaussian levels, ascending.
pub fn gaussian_levels(bits: u8) -> Vec<f32> {
    let half = GAUSSIAN_LEVELS[usize::from(bits) - 2];
    half.iter()
        .rev()
        .map(|&l| -l)
        .chain(half.iter().copied())
        .collect()
}

/// Byte length of the stored levels: `kmeans` only, 2^bits FP16 values.
pub(crate) fn levels_section_len(grid: Grid, bits: u8) -> usize {
    if grid == Grid::Kmeans {
        2 << bits
    } else {
        0
    }
}

/// A codebook: levels ascending and the midpoints between neighbours.
#[derive(Clone, Debug)]
pub(crate) struct Codebook {
    levels: Vec<f32>,
    boundaries: Vec<f32>,
}

impl Codebook {
    fn new(mut levels: Vec<f32>) -> Self {
        levels.sort_by(f32::total_cmp);
        let boundaries = levels
            .windows(2)
            .map(|pair| 0.5 * pair[0] + 0.5 * pair[1])
            .collect();
        Codebook { levels, boundaries }
    }

    /// Index of the nearest level to `t` (ties to the lower): the number of
    /// midpoints strictly below `t`.
    #[inline]
    fn code(&self, t: f32) -> u8 {
        self.boundaries.iter().map(|&b| u8::from(t > b)).sum()
    }

    #[inline]
    fn value(&self, code: u8, scale: f32) -> f32 {
        (self.levels[usize::from(code)] * scale).clamp(-f32::MAX, f32::MAX)
    }
}

/// A codebook and every group's stored scale: a [`GroupMapping`].
pub(crate) struct Scaled<'a> {
    pub codebook: &'a Codebook,
    pub scales: &'a [f32],
}

impl GroupMapping for Scaled<'_> {
    fn codes(&self, group: usize, values: &[f32], kept: Option<&[bool]>, codes: &mut [u8]) {
        let scale = self.scales[group];
        if kept.is_none() {
            nearest_levels(values, scale, &self.codebook.boundaries, codes);
            return;
        }
        for (code, &x) in codes.iter_mut().zip(kept_values(values, kept)) {
            *code = self.codebook.code(x / scale);
        }
    }

    fn values(&self, group: usize, codes: &[u8], kept: Option<&[bool]>, out: &mut [f32]) {
        let scale = self.scales[group];
        if kept.is_none() {
            // Every code's value once, then a lookup per value (a codebook
            // has at most 16 levels, so a code masked to 4 bits is itself).
            let mut table = [0f32; 16];
            debug_assert!(self.codebook.levels.len() <= table.len());
            for (code, value) in table
                .iter_mut()
                .enumerate()
                .take(self.codebook.levels.len())
            {
                *value = self.codebook.value(code as u8, scale);
            }
            look_up(codes, &table, &mut out[..codes.len()]);
            out[codes.len()..].fill(0.0);
            return;
        }
        let mut codes = codes.iter();
        for (i, x) in out.iter_mut().enumerate() {
            *x = match kept {
                Some(kept) if !kept[i] => 0.0,
                _ => codes
                    .next()
                    .map_or(0.0, |&code| self.codebook.value(code, scale)),
            };
        }
    }
}

crate::simd::multiversion!(fn look_up / look_up_at(
    codes: &[u8], table: &[f32; 16], out: &mut [f32]) => look_up_generic);

/// `out[i] = table[codes[i]]` for codes below 16.
#[inline(always)]
fn look_up_generic(codes: &[u8], table: &[f32; 16], out: &mut [f32]) {
    for (x, &code) in out.iter_mut().zip(codes) {
        *x = table[usize::from(code & 15)];
    }
}

crate::simd::multiversion!(fn nearest_levels / nearest_levels_at(
    values: &[f32], scale: f32, boundaries: &[f32], codes: &mut [u8]) => nearest_levels_generic);

/// [`Codebook::code`] of `x / scale` for a run of values, boundary by
/// boundary so that each pass over the run vectorizes.
#[inline(always)]
fn nearest_levels_generic(values: &[f32], scale: f32, boundaries: &[f32], codes: &mut [u8]) {
    const BLOCK: usize = 64;
    let mut scaled = [0f32; BLOCK];
    for (codes, values) in codes[..values.len()]
        .chunks_mut(BLOCK)
        .zip(values.chunks(BLOCK))
    {
        let scaled = &mut scaled[..values.len()];
        for (t, &x) in scaled.iter_mut().zip(values) {
            *t = x / scale;
        }
        codes.fill(0);
        for &boundary in boundaries {
            for (code, &t) in codes.iter_mut().zip(scaled.iter()) {
                *code += u8::from(t > boundary);
            }
        }
    }
}

fn kept_values<'a>(values: &'a [f32], kept: Option<&'a [bool]>) -> impl Iterator<Item = &'a f32> {
    values
        .iter()
        .enumerate()
        .filter(move |(i, _)| kept.is_none_or(|kept| kept[*i]))
        .map(|(_, x)| x)
}

/// The codebook of a tensor: the Gaussian levels, or for `kmeans` levels
/// fitted to `values` (in group order) with the stored `scales`, rounded to FP16.
pub(crate) fn fit_codebook(
    grid: Grid,
    bits: u8,
    values: &[f32],
    kept: Option<&[bool]>,
    geometry: &GroupGeometry,
    scales: &[f32],
) -> Codebook {
    let mut levels = gaussian_levels(bits);
    if grid != Grid::Kmeans {
        return Codebook::new(levels);
    }
    let bins = histogram(values, kept, geometry, scales);
    for _ in 0..KMEANS_ITERATIONS {
        let codebook = Codebook::new(levels.clone());
        // Per level: Σ s²·t = Σ s·x and Σ s², over the bins its codes take.
        // The bins' means ascend, so their codes do: one sweep.
        let mut sums = vec![(0.0f64, 0.0f64); levels.len()];
        let mut code = 0;
        for bin in &bins {
            while code < codebook.boundaries.len() && bin.mean > codebook.boundaries[code] {
                code += 1;
            }
            sums[code].0 += bin.scaled_sum;
            sums[code].1 += bin.weight;
        }
        for (level, &(sx, ss)) in levels.iter_mut().zip(&sums) {
            if ss > 0.0 {
                *level = (sx / ss) as f32;
            }
        }
    }
    Codebook::new(levels.iter().map(|&l| f16::from_f32(l).to_f32()).collect())
}

/// Values per run of [`bin_indices`].
const BIN_RUN: usize = 256;

const _: () = assert!(HISTOGRAM_BINS <= 1 << 16, "bins index as u16");

crate::simd::multiversion!(fn bin_indices / bin_indices_at(
    values: &[f32], per_bin_over_scale: f64, bias: f64, bins: &mut [u16]) => bin_indices_generic);

/// Each value's histogram bin, `x · per_bin / s + bias` truncated and
/// clamped to the bins (NaN to bin 0).
#[inline(always)]
fn bin_indices_generic(values: &[f32], per_bin_over_scale: f64, bias: f64, bins: &mut [u16]) {
    let last = (HISTOGRAM_BINS - 1) as f64;
    for (bin, &x) in bins.iter_mut().zip(values) {
        let position = crate::simd::clamp(f64::from(x) * per_bin_over_scale + bias, 0.0, last);
        let position = if position.is_nan() { 0.0 } else { position };
        // SAFETY: position is finite and within [0, HISTOGRAM_BINS - 1].
        *bin = unsafe { position.to_int_unchecked::<u32>() } as u16;
    }
}

/// One bin of the k-means histogram: `Σ s·x`, `Σ s²` and their ratio, the
/// weighted mean of its `t`, which stands for the bin when codes are chosen.
struct Bin {
    scaled_sum: f64,
    weight: f64,
    mean: f32,
}

/// The weighted histogram of the kept values' `t = x / s` (weight `s²`, so
/// that Lloyd's algorithm on it minimizes the tensor's squared error), its
/// non-empty bins in order. One pass over the values: the k-means
/// iterations then run on at most [`HISTOGRAM_BINS`] bins, each assigned by
/// its mean (a level moves by at most about a bin's width).
fn histogram(
    values: &[f32],
    kept: Option<&[bool]>,
    geometry: &GroupGeometry,
    scales: &[f32],
) -> Vec<Bin> {
    let groups = geometry.group_count();
    let per_bin = HISTOGRAM_BINS as f64 / (2.0 * HISTOGRAM_RANGE);
    let partial: Vec<Vec<(f64, f64)>> = (0..groups.div_ceil(GROUP_CHUNK))
        .into_par_iter()
        .map(|chunk| {
            let mut bins = vec![(0.0f64, 0.0f64); HISTOGRAM_BINS];
            let first = chunk * GROUP_CHUNK;
            let chunk_scales = &scales[first..(first + GROUP_CHUNK).min(groups)];
            for (group, &scale) in (first..).zip(chunk_scales) {
                let s = f64::from(scale);
                if s == 0.0 {
                    continue; // Adds s·x = 0 and s² = 0 to whichever code.
                }
                let span = geometry.range(group);
                let (values, kept) = (&values[span.clone()], kept.map(|kept| &kept[span]));
                // A group's bins in one vectorized pass (a product with
                // per_bin / s: a bin is an approximation, its edges need
                // no exact division), then the (serial) sums.
                for (start, run) in (0..).step_by(BIN_RUN).zip(values.chunks(BIN_RUN)) {
                    let mut bin_of = [0u16; BIN_RUN];
                    bin_indices(run, per_bin / s, HISTOGRAM_RANGE * per_bin, &mut bin_of);
                    for (i, (&x, &bin)) in (start..).zip(run.iter().zip(&bin_of)) {
                        if kept.is_some_and(|kept| !kept[i]) {
                            continue;
                        }
                        let bin = &mut bins[usize::from(bin)];
                        bin.0 += s * f64::from(x);
                        bin.1 += s * s;
                    }
                }
            }
            bins
        })
        .collect();
    (0..HISTOGRAM_BINS)
        .filter_map(|bin| {
            let (scaled_sum, weight) = partial.iter().fold((0.0, 0.0), |(a, b), bins| {
                (a + bins[bin].0, b + bins[bin].1)
            });
            (weight > 0.0).then(|| Bin {
                scaled_sum,
                weight,
                mean: (scaled_sum / weight) as f32,
            })
        })
        .collect()
}

/// Every group's RMS over its kept values (0 when none), the codebook scale
/// before storage.
fn rms_params(values: &[f32], kept: Option<&[bool]>, geometry: &GroupGeometry) -> Vec<ExactParams> {
    (0..geometry.group_count())
        .into_par_iter()
        .map(|group| {
            let span = geometry.range(group);
            let kept = kept.map(|kept| &kept[span.clone()]);
            let (sum, count) = kept_values(&values[span], kept)
                .fold((0.0f64, 0usize), |(sum, count), &x| {
                    (sum + f64::from(x).powi(2), count + 1)
                });
            let scale = if count == 0 {
                0.0
            } else {
                (sum / count as f64).sqrt() as f32
            };
            ExactParams { scale, offset: 0.0 }
        })
        .collect()
}

/// Stored scales of every group: FP16 when all are normal f16, else F32.
fn stored(exact: &[ExactParams]) -> GroupParams {
    let as_f16: Option<Vec<f32>> = exact
        .iter()
        .map(|p| p.stored_f16().map(|(s, _)| s))
        .collect();
    let (dtype, scales) = match as_f16 {
        Some(scales) => (ScaleDtype::F16, scales),
        None => (
            ScaleDtype::F32,
            exact.iter().map(|p| p.stored_f32().0).collect(),
        ),
    };
    GroupParams {
        dtype,
        scales,
        offsets: Vec::new(),
    }
}

/// Scales and codebook of a tensor (values in group order).
pub(crate) fn choose(
    grid: Grid,
    bits: u8,
    fit: Fit,
    values: &[f32],
    kept: Option<&[bool]>,
    geometry: &GroupGeometry,
) -> (GroupParams, Codebook) {
    let exact = rms_params(values, kept, geometry);
    let params = stored(&exact);
    let codebook = fit_codebook(grid, bits, values, kept, geometry, &params.scales);
    if fit != Fit::Mse {
        return (params, codebook);
    }
    // Least-squares scale on each group's codes: s = Σ x·l / Σ l².
    let refined: Vec<ExactParams> = (0..geometry.group_count())
        .into_par_iter()
        .map(|group| {
            let span = geometry.range(group);
            let kept = kept.map(|kept| &kept[span.clone()]);
            let scale = params.scales[group];
            let (xl, ll) =
                kept_values(&values[span.clone()], kept).fold((0.0f64, 0.0f64), |(xl, ll), &x| {
                    let level = f64::from(codebook.levels[usize::from(codebook.code(x / scale))]);
                    (xl + f64::from(x) * level, ll + level * level)
                });
            let candidate = if ll > 0.0 && xl > 0.0 {
                (xl / ll) as f32
            } else {
                exact[group].scale
            };
            let stored_candidate = match params.dtype {
                ScaleDtype::F16 => ExactParams {
                    scale: candidate,
                    offset: 0.0,
                }
                .stored_f16()
                .map(|(s, _)| s),
                ScaleDtype::F32 => Some(
                    ExactParams {
                        scale: candidate,
                        offset: 0.0,
                    }
                    .stored_f32()
                    .0,
                ),
                ScaleDtype::Bf16 | ScaleDtype::E4m3 | ScaleDtype::E8m0 => {
                    unreachable!("codebook scales are f16 or f32")
                }
            };
            let error = |scale: f32| -> f64 {
                kept_values(&values[span.clone()], kept)
                    .map(|&x| {
                        (f64::from(codebook.value(codebook.code(x / scale), scale)) - f64::from(x))
                            .powi(2)
                    })
                    .sum()
            };
            match stored_candidate {
                Some(s) if error(s) < error(scale) => ExactParams {
                    scale: s,
                    offset: 0.0,
                },
                _ => ExactParams { scale, offset: 0.0 },
            }
        })
        .collect();
    (
        GroupParams {
            dtype: params.dtype,
            scales: refined.iter().map(|p| p.scale).collect(),
            offsets: Vec::new(),
        },
        codebook,
    )
}

/// Appends `kmeans` levels as little-endian FP16 (nothing for `lloyd`).
pub(crate) fn write_levels(grid: Grid, codebook: &Codebook, payload: &mut Vec<u8>) {
    if grid == Grid::Kmeans {
        for &level in &codebook.levels {
            payload.extend_from_slice(&f16::from_f32(level).to_le_bytes());
        }
    }
}

/// The codebook a payload decodes with: its stored levels (finite FP16) or
/// the Gaussian ones.
pub(crate) fn read_levels(grid: Grid, bits: u8, bytes: &[u8]) -> Result<Codebook, CodecError> {
    if grid != Grid::Kmeans {
        return Ok(Codebook::new(gaussian_levels(bits)));
    }
    let levels = bytes
        .chunks_exact(2)
        .map(|pair| {
            let level = f16::from_le_bytes([pair[0], pair[1]]).to_f32();
            level
                .is_finite()
                .then_some(level)
                .ok_or(CodecError::CorruptPayload("codebook level is not finite"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if levels.windows(2).any(|pair| pair[0] > pair[1]) {
        return Err(CodecError::CorruptPayload(
            "codebook levels are not ascending",
        ));
    }
    Ok(Codebook::new(levels))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Φ(x) by composite Simpson integration of the density from 0: accurate
    /// to ~1e-13 for |x| <= 8, and nothing beyond `std`.
    fn normal_cdf(x: f64) -> f64 {
        if x.is_infinite() {
            return if x > 0.0 { 1.0 } else { 0.0 };
        }
        let steps = 4000;
        let h = x.abs() / steps as f64;
        let integral: f64 = (0..=steps)
            .map(|i| {
                let weight = if i == 0 || i == steps {
                    1.0
                } else if i % 2 == 1 {
                    4.0
                } else {
                    2.0
                };
                weight * density(i as f64 * h)
            })
            .sum::<f64>()
            * h
            / 3.0;
        0.5 + integral.copysign(x)
    }

    fn density(x: f64) -> f64 {
        if x.is_infinite() {
            0.0
        } else {
            (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt()
        }
    }

    fn cells(levels: &[f64]) -> Vec<(f64, f64)> {
        let mut bounds = vec![f64::NEG_INFINITY];
        bounds.extend(levels.windows(2).map(|p| 0.5 * (p[0] + p[1])));
        bounds.push(f64::INFINITY);
        bounds.windows(2).map(|p| (p[0], p[1])).collect()
    }

    /// Lloyd's algorithm on the N(0, 1) density: each level moves to the
    /// mean of its cell, `(φ(a) - φ(b)) / (Φ(b) - Φ(a))`.
    fn lloyd_max(count: usize) -> Vec<f64> {
        let mut levels: Vec<f64> = (0..count)
            .map(|i| (i as f64 - (count as f64 - 1.0) / 2.0) * 4.0 / count as f64)
            .collect();
        for _ in 0..3000 {
            levels = cells(&levels)
                .iter()
                .map(|&(a, b)| (density(a) - density(b)) / (normal_cdf(b) - normal_cdf(a)))
                .collect();
        }
        levels
    }

    /// E[(X - q(X))²] for X ~ N(0, 1): per cell ∫x²φ - 2l∫xφ + l²∫φ, with
    /// ∫x²φ = [Φ - xφ] and ∫xφ = [-φ].
    fn gaussian_mse(levels: &[f64]) -> f64 {
        let x_density = |x: f64| if x.is_infinite() { 0.0 } else { x * density(x) };
        cells(levels)
            .iter()
            .zip(levels)
            .map(|(&(a, b), &l)| {
                let mass = normal_cdf(b) - normal_cdf(a);
                let second = mass + x_density(a) - x_density(b);
                second - 2.0 * l * (density(a) - density(b)) + l * l * mass
            })
            .sum()
    }

    #[test]
    fn shipped_levels_are_lloyds_fixed_point_with_the_known_mse() {
        for (bits, known_mse) in [(2u8, 0.1175), (3, 0.0345), (4, 0.0095)] {
            let derived = lloyd_max(1 << bits);
            let shipped = gaussian_levels(bits);
            for (d, s) in derived.iter().zip(&shipped) {
                assert!(
                    (d - f64::from(*s)).abs() < 2e-6,
                    "{bits} bits: derived {d}, shipped {s}"
                );
            }
            let shipped: Vec<f64> = shipped.iter().map(|&l| f64::from(l)).collect();
            let mse = gaussian_mse(&shipped);
            assert!(
                (mse - known_mse).abs() < 5e-5,
                "{bits} bits: MSE {mse}, expected {known_mse}"
            );
        }
    }

    #[test]
    fn every_simd_level_finds_the_nearest_level_as_the_codebook_does() {
        let codebook = Codebook::new(gaussian_levels(3));
        // Values on the boundaries (ties go to the lower level), between and beyond.
        let mut values: Vec<f32> = codebook.boundaries.iter().map(|b| b * 0.7).collect();
        values.extend((0..501).map(|i| (i as f32 - 250.0) * 0.0173));
        let scale = 0.7;
        let expected: Vec<u8> = values.iter().map(|&x| codebook.code(x / scale)).collect();
        for level in crate::simd::Level::available() {
            let mut codes = vec![9u8; values.len()];
            nearest_levels_at(level, &values, scale, &codebook.boundaries, &mut codes);
            assert_eq!(codes, expected, "{level:?}");
        }
    }

    #[test]
    fn codes_are_the_nearest_level_ties_to_the_lower() {
        let codebook = Codebook::new(gaussian_levels(2));
        let (l0, l1) = (0.45278004f32, 1.5104176f32);
        assert_eq!(codebook.code(-10.0), 0);
        assert_eq!(codebook.code(-0.1), 1);
        assert_eq!(codebook.code(0.0), 1, "a tie goes to the lower level");
        assert_eq!(codebook.code(0.1), 2);
        assert_eq!(codebook.code(0.5 * l0 + 0.5 * l1), 2);
        assert_eq!(codebook.code(1.0e9), 3);
        assert_eq!(codebook.value(3, 2.0), 2.0 * l1);
    }

    /// Lloyd's algorithm value by value, every sum in f64: the definition
    /// the histogram's fit approximates.
    fn exact_kmeans(
        bits: u8,
        values: &[f32],
        geometry: &GroupGeometry,
        scales: &[f32],
    ) -> Vec<f32> {
        let mut levels = gaussian_levels(bits);
        for _ in 0..KMEANS_ITERATIONS {
            let codebook = Codebook::new(levels.clone());
            let mut sums = vec![(0.0f64, 0.0f64); levels.len()];
            for (group, &scale) in scales.iter().enumerate() {
                for &x in &values[geometry.range(group)] {
                    let s = f64::from(scale);
                    let sum = &mut sums[usize::from(codebook.code(x / scale))];
                    sum.0 += s * f64::from(x);
                    sum.1 += s * s;
                }
            }
            for (level, &(sx, ss)) in levels.iter_mut().zip(&sums) {
                if ss > 0.0 {
                    *level = (sx / ss) as f32;
                }
            }
        }
        levels
    }

    #[test]
    fn histogram_kmeans_levels_are_lloyds_to_within_fp16_rounding() {
        // Skewed groups of differing scales: levels well away from Gaussian.
        let mut rng = crate::codec::SplitMix64(11);
        let mut uniform = || (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        let geometry = GroupGeometry {
            segment_len: 96,
            segment_count: 300,
            group_size: 32,
        };
        let mut values = Vec::new();
        for group in 0..geometry.group_count() {
            let spread = 0.1 + (group % 7) as f64;
            for _ in 0..geometry.group_size {
                let u = uniform();
                values.push((spread * (u * u * 3.0 - 0.8)) as f32);
            }
        }
        let scales: Vec<f32> = rms_params(&values, None, &geometry)
            .iter()
            .map(|p| p.scale)
            .collect();
        for bits in [2u8, 3, 4] {
            let fitted = fit_codebook(Grid::Kmeans, bits, &values, None, &geometry, &scales);
            let exact = exact_kmeans(bits, &values, &geometry, &scales);
            assert!(exact
                .iter()
                .zip(&gaussian_levels(bits))
                .any(|(a, b)| (a - b).abs() > 0.05));
            for (&ours, &reference) in fitted.levels.iter().zip(&exact) {
                // Within a bin's width of the exact level, plus its FP16 rounding.
                let bin_width = (2.0 * HISTOGRAM_RANGE / HISTOGRAM_BINS as f64) as f32;
                let tolerance = bin_width + reference.abs() * 2f32.powi(-11);
                assert!(
                    (ours - reference).abs() <= tolerance,
                    "{bits} bits: {ours} vs {reference} ({:?} vs {exact:?})",
                    fitted.levels
                );
            }
        }
    }
}
