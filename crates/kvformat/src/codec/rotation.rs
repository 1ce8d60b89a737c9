//! Randomized Hadamard rotation of head vectors: `y = H (s ∘ x) / sqrt(D)`.
//!
//! An outlier channel of `x` is spread evenly over all `D` outputs, so one
//! large channel no longer sets the scale of its whole group. `H` is the
//! Sylvester Hadamard matrix (symmetric, `H H = D I`), so the inverse is
//! `x = s ∘ (H y) / sqrt(D)`. The signs `s` come from the seed alone and are
//! the same for every head vector of a tensor.

use rayon::prelude::*;

/// Head vectors per parallel work item.
const VECTORS_PER_TASK: usize = 256;

/// The splitmix64 generator (Steele, Lea, Flood 2014), as in Java's
/// SplittableRandom: the rotation's documented sign source, and a small
/// seeded generator for anything else that must be reproducible everywhere.
#[derive(Clone, Debug)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// Sign of each of `dim` channels: bit `j % 64` of the `j / 64`-th splitmix64
/// output (state starting at `seed`); a set bit means -1.
pub fn signs(seed: u64, dim: usize) -> Vec<f32> {
    let mut generator = SplitMix64(seed);
    let mut word = 0;
    (0..dim)
        .map(|channel| {
            if channel % 64 == 0 {
                word = generator.next_u64();
            }
            if (word >> (channel % 64)) & 1 == 1 {
                -1.0
            } else {
                1.0
            }
        })
        .collect()
}

/// `1 / sqrt(dim)` computed in f64 and rounded once to f32.
fn normalizer(dim: usize) -> f32 {
    (1.0 / (dim as f64).sqrt()) as f32
}

/// In-place unnormalized fast Walsh–Hadamard transform (Sylvester order)
/// of one vector: stages h = 1, 2, 4, ..., each replacing `(a, b)` =
/// `(v[j], v[j+h])` by `(a + b, a - b)` for every `j` whose bit `h` is
/// clear. [`walsh_hadamard_vectors`] does the same to many vectors faster.
#[inline(always)]
fn walsh_hadamard(vector: &mut [f32]) {
    butterflies_from(vector, 1);
}

/// The stages of [`walsh_hadamard`] from h = `half` up, between
/// contiguous halves of each block: plain vector adds and subtracts.
#[inline(always)]
fn butterflies_from(vector: &mut [f32], mut half: usize) {
    let dim = vector.len();
    while half < dim {
        for block in vector.chunks_exact_mut(2 * half) {
            let (low, high) = block.split_at_mut(half);
            for (a, b) in low.iter_mut().zip(high.iter_mut()) {
                let (sum, difference) = (*a + *b, *a - *b);
                *a = sum;
                *b = difference;
            }
        }
        half *= 2;
    }
}

/// [`walsh_hadamard`] of every `dim`-long vector of `vectors`, the same
/// operations in the same order for each value, so the same bits. Where
/// `dim` is a multiple of 16, the stages below 16 ([`stages_below_16`])
/// run over the whole buffer at once, then the rest per vector.
#[inline(always)]
fn walsh_hadamard_vectors(vectors: &mut [f32], dim: usize) {
    if dim % 16 == 0 && dim > 0 {
        let mut other = [0f32; STAGE_BLOCK];
        for block in vectors.chunks_mut(STAGE_BLOCK) {
            stages_below_16(block, &mut other[..block.len()]);
        }
        for vector in vectors.chunks_exact_mut(dim) {
            butterflies_from(vector, 16);
        }
    } else {
        for vector in vectors.chunks_exact_mut(dim) {
            walsh_hadamard(vector);
        }
    }
}

/// Values per [`stages_below_16`] call: its second buffer lives on the stack.
const STAGE_BLOCK: usize = 2048;

/// The stages h = 1, 2, 4, 8 of [`walsh_hadamard`] on `values`, whose
/// length is a multiple of 16 (runs of 16 are independent at these
/// stages), with `other` (as long) to write to. Each stage reads one buffer
/// and writes the other: value `i` becomes `v[i] + v[i + h]` if bit `h` of
/// `i` is clear, else `v[i - h] - v[i]`. Both sides are contiguous loads at fixed offsets, so
/// every level vectorizes the stage as loads, an add, a subtract and a
/// blend; written per run of 16, the compiler gathered and scattered across
/// runs instead (a third of a rotated compress on an AMD EPYC).
#[inline(always)]
fn stages_below_16(values: &mut [f32], other: &mut [f32]) {
    debug_assert!(values.len() % 16 == 0 && values.len() == other.len());
    stage_below_16::<1>(values, other);
    stage_below_16::<2>(other, values);
    stage_below_16::<4>(values, other);
    stage_below_16::<8>(other, values);
}

/// One stage of [`stages_below_16`] from `from` into `to`: the first and
/// last 16 values index by definition; those between, whose partners at
/// `i ± H` are all in bounds, as three shifted slices.
#[inline(always)]
fn stage_below_16<const H: usize>(from: &[f32], to: &mut [f32]) {
    let n = from.len();
    let by_definition = |i: usize| {
        if i & H == 0 {
            from[i] + from[i + H]
        } else {
            from[i - H] - from[i]
        }
    };
    for i in (0..n.min(16)).chain(n.max(32) - 16..n) {
        to[i] = by_definition(i);
    }
    if n <= 32 {
        return;
    }
    let inner = 16..n - 16;
    let below = &from[inner.start - H..inner.end - H];
    let above = &from[inner.start + H..inner.end + H];
    let at = &from[inner.clone()];
    for (k, (((out, &low), &x), &high)) in to[inner]
        .iter_mut()
        .zip(below)
        .zip(at)
        .zip(above)
        .enumerate()
    {
        // 16 is a multiple of 2H: bit H of k is bit H of i = 16 + k.
        *out = if k & H == 0 { x + high } else { low - x };
    }
}

/// Rotates every `dim`-long vector of `values` in place with the signs of
/// `seed`. The signs are made only for values that exist: a hostile shape
/// such as `[0, 1, 1, 2^33]` must not allocate a 32 GiB sign vector.
pub fn rotate(values: &mut [f32], seed: u64, dim: usize) {
    if values.is_empty() {
        return;
    }
    rotate_with(values, &signs(seed, dim));
}

/// Undoes [`rotate`] (up to float rounding); see [`unrotate_with`].
pub fn unrotate(values: &mut [f32], seed: u64, dim: usize) {
    if values.is_empty() {
        return;
    }
    unrotate_with(values, &signs(seed, dim));
}

/// Rotates every `signs.len()`-long vector of `values` in place.
fn rotate_with(values: &mut [f32], signs: &[f32]) {
    let scale = normalizer(signs.len());
    for_each_task(values, signs.len(), |task| {
        rotate_vectors(task, signs, scale)
    });
}

crate::simd::multiversion!(fn rotate_vectors / rotate_vectors_at(
    task: &mut [f32], signs: &[f32], scale: f32) => rotate_vectors_generic);

/// [`rotate_with`] of one task's vectors: `H (s ∘ x)`, then the scale.
#[inline(always)]
fn rotate_vectors_generic(task: &mut [f32], signs: &[f32], scale: f32) {
    let task = whole_vectors(task, signs.len());
    for vector in task.chunks_exact_mut(signs.len()) {
        for (x, sign) in vector.iter_mut().zip(signs) {
            *x *= sign;
        }
    }
    walsh_hadamard_vectors(task, signs.len());
    for x in task.iter_mut() {
        *x *= scale;
    }
}

/// Undoes [`rotate_with`] (up to float rounding). Decoded values are finite:
/// a vector whose butterflies could overflow f32 (some |x| above
/// `f32::MAX / dim`, possible only with stored scales near f32's limit) is
/// transformed in f64 and saturated to the finite f32 range instead.
fn unrotate_with(values: &mut [f32], signs: &[f32]) {
    let scale = normalizer(signs.len());
    for_each_task(values, signs.len(), |task| {
        unrotate_vectors(task, signs, scale)
    });
}

crate::simd::multiversion!(fn unrotate_vectors / unrotate_vectors_at(
    task: &mut [f32], signs: &[f32], scale: f32) => unrotate_vectors_generic);

/// [`unrotate_with`] of one task's vectors: `H y`, then the scale and the signs.
#[inline(always)]
fn unrotate_vectors_generic(task: &mut [f32], signs: &[f32], scale: f32) {
    let task = whole_vectors(task, signs.len());
    let safe = f32::MAX / signs.len().max(1) as f32;
    // Nearly always every vector is safe: then all at once.
    if task.iter().fold(0.0f32, |max, x| max.max(x.abs())) <= safe {
        walsh_hadamard_vectors(task, signs.len());
        for vector in task.chunks_exact_mut(signs.len()) {
            for (x, sign) in vector.iter_mut().zip(signs) {
                *x = *x * scale * sign;
            }
        }
        return;
    }
    for vector in task.chunks_exact_mut(signs.len()) {
        if vector.iter().fold(0.0f32, |max, x| max.max(x.abs())) <= safe {
            walsh_hadamard(vector);
            for (x, sign) in vector.iter_mut().zip(signs) {
                *x = *x * scale * sign;
            }
        } else {
            unrotate_saturating(vector, signs, scale);
        }
    }
}

/// [`unrotate`] of one vector in f64, saturated to finite f32.
fn unrotate_saturating(vector: &mut [f32], signs: &[f32], scale: f32) {
    let mut wide: Vec<f64> = vector.iter().map(|&x| f64::from(x)).collect();
    let mut half = 1;
    while half < wide.len() {
        for block in wide.chunks_exact_mut(2 * half) {
            let (low, high) = block.split_at_mut(half);
            for (a, b) in low.iter_mut().zip(high.iter_mut()) {
                (*a, *b) = (*a + *b, *a - *b);
            }
        }
        half *= 2;
    }
    for ((x, wide), sign) in vector.iter_mut().zip(wide).zip(signs) {
        let value = wide * f64::from(scale) * f64::from(*sign);
        *x = value.clamp(-f64::from(f32::MAX), f64::from(f32::MAX)) as f32;
    }
}

/// llama.cpp's attention rotation (PR #21038) of every `block`-long run of
/// `values`, in place: the orthonormal Walsh–Hadamard transform in the
/// order of ggml's `ggml_compute_forward_fwht_f32` and CUDA's `fwht_cuda`
/// (each value times `1 / sqrtf(block)` first, then the butterflies
/// `(a + b, a - b)` for h = 1, 2, 4, ...), so the f32 results are the
/// engine's bit for bit. The transform is its own inverse.
pub fn llama_hadamard(values: &mut [f32], block: usize) {
    let scale = 1.0 / (block as f32).sqrt();
    for_each_task(values, block, |task| llama_vectors(task, block, scale));
}

crate::simd::multiversion!(fn llama_vectors / llama_vectors_at(
    task: &mut [f32], block: usize, scale: f32) => llama_vectors_generic);

/// [`llama_hadamard`] of one task's blocks: the scale, then the butterflies.
#[inline(always)]
fn llama_vectors_generic(task: &mut [f32], block: usize, scale: f32) {
    let task = whole_vectors(task, block);
    for x in task.iter_mut() {
        *x *= scale;
    }
    walsh_hadamard_vectors(task, block);
}

/// The whole `dim`-long vectors at the start of `task`: a partial one at
/// its end is left as it is.
#[inline(always)]
fn whole_vectors(task: &mut [f32], dim: usize) -> &mut [f32] {
    let whole = task.len().checked_div(dim).unwrap_or(0) * dim;
    &mut task[..whole]
}

/// Hands `transform` runs of whole `dim`-long vectors of `values`, in parallel.
fn for_each_task(values: &mut [f32], dim: usize, transform: impl Fn(&mut [f32]) + Sync) {
    if dim == 0 {
        return;
    }
    values
        .par_chunks_mut(dim * VECTORS_PER_TASK)
        .for_each(&transform);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix64_matches_the_reference_sequence() {
        // First outputs for seed 0 from the reference C implementation.
        let mut generator = SplitMix64(0);
        assert_eq!(generator.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(generator.next_u64(), 0x6E78_9E6A_A1B9_65F4);
    }

    #[test]
    fn signs_follow_the_bits_of_the_generator() {
        let word = SplitMix64(0).next_u64(); // 0x...CDAF: bits 0..4 = 1111, bit 4 = 0
        let signs = signs(0, 70);
        for (channel, &sign) in signs.iter().enumerate().take(64) {
            assert_eq!(sign == -1.0, (word >> channel) & 1 == 1);
        }
        assert_eq!(&signs[..5], [-1.0, -1.0, -1.0, -1.0, 1.0]);
    }

    #[test]
    fn hadamard_of_size_four_matches_the_matrix() {
        // H4 rows: [1 1 1 1], [1 -1 1 -1], [1 1 -1 -1], [1 -1 -1 1].
        let mut vector = [1.0, 2.0, 3.0, 4.0];
        walsh_hadamard(&mut vector);
        assert_eq!(vector, [10.0, -2.0, -4.0, 0.0]);
    }

    #[test]
    fn rotation_is_invertible_to_float_precision() {
        let signs = signs(42, 64);
        let original: Vec<f32> = (0..64 * 5)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013)
            .collect();
        let mut values = original.clone();
        rotate_with(&mut values, &signs);
        assert_ne!(values, original);
        unrotate_with(&mut values, &signs);
        for (x, y) in original.iter().zip(&values) {
            assert!((x - y).abs() <= 1e-6 * (1.0 + x.abs()), "{x} vs {y}");
        }
    }

    /// The transform as its doc defines it, stage by stage from h = 1.
    fn butterflies_by_definition(vector: &mut [f32]) {
        let mut half = 1;
        while half < vector.len() {
            for j in 0..vector.len() {
                if j & half == 0 {
                    let (a, b) = (vector[j], vector[j + half]);
                    vector[j] = a + b;
                    vector[j + half] = a - b;
                }
            }
            half *= 2;
        }
    }

    #[test]
    fn the_runs_of_16_are_the_butterflies_bit_for_bit() {
        for dim in [4, 16, 32, 64, 128, 256] {
            let original: Vec<f32> = (0..dim)
                .map(|i| ((i * 7919 % 101) as f32 - 50.3) * 0.37)
                .collect();
            let mut expected = original.clone();
            butterflies_by_definition(&mut expected);
            let mut got = original;
            walsh_hadamard(&mut got);
            assert_eq!(got, expected, "dim {dim}");
        }
    }

    #[test]
    fn many_vectors_at_once_are_each_vectors_butterflies_bit_for_bit() {
        // Buffers from one run of 16 to several blocks of the stages below 16.
        for (dim, count) in [
            (16, 1),
            (16, 3),
            (32, 1),
            (64, 5),
            (128, 16),
            (64, 33),
            (256, 40),
        ] {
            let original: Vec<f32> = (0..dim * count)
                .map(|i| ((i * 7919 % 1013) as f32 - 506.3) * 0.0137)
                .collect();
            let mut expected = original.clone();
            for vector in expected.chunks_exact_mut(dim) {
                butterflies_by_definition(vector);
            }
            for level in crate::simd::Level::available() {
                let mut got = original.clone();
                llama_vectors_at(level, &mut got, dim, 1.0);
                assert_eq!(got, expected, "dim {dim}, {count} vectors at {level:?}");
            }
        }
        // Not a multiple of 16: one vector at a time, and a partial vector is left alone.
        let original: Vec<f32> = (0..8 * 3 + 5).map(|i| i as f32 * 0.5 - 3.0).collect();
        let mut expected = original.clone();
        for vector in expected.chunks_exact_mut(8) {
            butterflies_by_definition(vector);
        }
        let mut got = original.clone();
        llama_vectors_generic(&mut got, 8, 1.0);
        assert_eq!(got, expected);
    }

    #[test]
    fn every_simd_level_rotates_as_the_scalar_code() {
        use crate::simd::Level;
        let signs = signs(3, 64);
        let original: Vec<f32> = (0..64 * 37)
            .map(|i| ((i * 53 % 211) as f32 - 105.0) * 0.031)
            .collect();
        let scale = normalizer(64);
        let mut expected = original.clone();
        rotate_vectors_generic(&mut expected, &signs, scale);
        let mut expected_back = expected.clone();
        unrotate_vectors_generic(&mut expected_back, &signs, scale);
        let mut expected_llama = original.clone();
        llama_vectors_generic(&mut expected_llama, 64, 0.125);
        // The runs of 16 give the butterflies' definition's bits.
        let one_by_one = |values: &[f32],
                          before: &dyn Fn(usize, f32) -> f32,
                          after: &dyn Fn(usize, f32) -> f32| {
            let mut values = values.to_vec();
            for vector in values.chunks_exact_mut(64) {
                for (j, x) in vector.iter_mut().enumerate() {
                    *x = before(j, *x);
                }
                butterflies_by_definition(vector);
                for (j, x) in vector.iter_mut().enumerate() {
                    *x = after(j, *x);
                }
            }
            values
        };
        assert_eq!(
            expected,
            one_by_one(&original, &|j, x| x * signs[j], &|_, x| x * scale)
        );
        assert_eq!(
            expected_back,
            one_by_one(&expected, &|_, x| x, &|j, x| x * scale * signs[j])
        );
        assert_eq!(
            expected_llama,
            one_by_one(&original, &|_, x| x * 0.125, &|_, x| x)
        );
        for level in Level::available() {
            let mut got = original.clone();
            rotate_vectors_at(level, &mut got, &signs, scale);
            assert_eq!(got, expected, "rotate at {level:?}");
            unrotate_vectors_at(level, &mut got, &signs, scale);
            assert_eq!(got, expected_back, "unrotate at {level:?}");
            let mut got = original.clone();
            llama_vectors_at(level, &mut got, 64, 0.125);
            assert_eq!(got, expected_llama, "llama at {level:?}");
        }
    }

    #[test]
    fn rotation_spreads_a_single_outlier_channel_evenly() {
        let mut vector = vec![0.0f32; 64];
        vector[17] = 8.0;
        rotate(&mut vector, 7, 64);
        // Every output is ±8/sqrt(64) = ±1.
        for y in &vector {
            assert!((y.abs() - 1.0).abs() < 1e-6, "{y}");
        }
    }

    #[test]
    fn llama_hadamard_is_its_own_inverse_and_scales_first() {
        // One block of 64 holding a single 8: every output is 8 * 0.125 = +-1,
        // the signs of row 5 of the Sylvester matrix, (-1)^popcount(5 & j).
        let mut vector = vec![0.0f32; 64];
        vector[5] = 8.0;
        llama_hadamard(&mut vector, 64);
        for (j, y) in vector.iter().enumerate() {
            let sign = if (5 & j).count_ones() % 2 == 0 {
                1.0
            } else {
                -1.0
            };
            assert_eq!(*y, sign, "{j}");
        }
        llama_hadamard(&mut vector, 64);
        assert_eq!(vector[5], 8.0);
        assert_eq!(vector.iter().filter(|y| **y != 0.0).count(), 1);
    }

    #[test]
    fn rotation_preserves_the_norm() {
        let mut vector: Vec<f32> = (0..128).map(|i| (i as f32).sin()).collect();
        let before: f32 = vector.iter().map(|x| x * x).sum();
        rotate(&mut vector, 1, 128);
        let after: f32 = vector.iter().map(|x| x * x).sum();
        assert!((before - after).abs() < 1e-4 * before);
    }
}
