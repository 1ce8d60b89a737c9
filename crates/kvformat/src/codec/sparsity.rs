//! Magnitude sparsity: the smallest `floor(s * n)` quantized values are
//! dropped, not stored, and decode to 0.
//!
//! Values are ranked by `(|x|, row-major index)` ascending, so ties break
//! deterministically towards earlier values. Selection is O(n) on average
//! (`select_nth_unstable` on the magnitudes' bit patterns, which order like
//! the magnitudes themselves for non-negative floats).
//!
//! Which values were dropped is stored in one of two [`SparseForm`]s, the
//! smaller per tensor: no exact mask encoding beats plain codes at small
//! sparsity (a mask costs about H(s) bits per value, dropping saves `s * bits`).

use serde::{Deserialize, Serialize};

use super::Grid;

/// How a tensor's payload says which quantized values were dropped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SparseForm {
    /// With `sparsity > 0`: a 1-bit kept mask, then codes of kept values only.
    /// The serde default, because files written before the dense form
    /// existed used this one whenever they dropped anything.
    #[default]
    Bitmap,
    /// No mask: every quantized value has a code, a dropped one the symmetric
    /// code of 0, which decodes to exactly 0 (so the asymmetric grid, which
    /// has no exact 0, never uses it for `sparsity > 0`).
    Dense,
}

/// The smaller form for `count` quantized values, the dense one on a tie
/// (and whenever nothing is dropped) because it decodes faster. `count` is
/// bounded by `groups::element_count`, so the bit counts cannot overflow.
pub fn smaller_form(grid: Grid, bits: u8, sparsity: f64, count: usize) -> SparseForm {
    if sparsity == 0.0 {
        return SparseForm::Dense;
    }
    if !grid.spec().exact_zero {
        return SparseForm::Bitmap;
    }
    let bits = usize::from(bits);
    let kept = count - dropped_count(sparsity, count);
    let bitmap_bytes = count.div_ceil(8) + (kept * bits).div_ceil(8);
    let dense_bytes = (count * bits).div_ceil(8);
    if bitmap_bytes < dense_bytes {
        SparseForm::Bitmap
    } else {
        SparseForm::Dense
    }
}

/// Number of values dropped out of `count` at sparsity `sparsity`.
pub fn dropped_count(sparsity: f64, count: usize) -> usize {
    ((sparsity * count as f64).floor() as usize).min(count)
}

/// Kept mask (true = stored) over `values`, dropping `dropped_count(sparsity, n)`.
pub fn kept_mask(values: &[f32], sparsity: f64) -> Vec<bool> {
    let drop = dropped_count(sparsity, values.len());
    if drop == 0 {
        return vec![true; values.len()];
    }
    let magnitude = |x: f32| x.abs().to_bits();
    let mut magnitudes: Vec<u32> = values.iter().map(|&x| magnitude(x)).collect();
    let threshold = *magnitudes.select_nth_unstable(drop - 1).1;
    let below = magnitudes.iter().filter(|&&m| m < threshold).count();
    let mut ties_to_drop = drop - below;
    values
        .iter()
        .map(|&x| {
            let m = magnitude(x);
            if m < threshold {
                false
            } else if m == threshold && ties_to_drop > 0 {
                ties_to_drop -= 1;
                false
            } else {
                true
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_the_smallest_magnitudes_with_ties_to_the_earliest() {
        let values = [3.0, -0.5, 0.5, 2.0, -0.5, 1.0];
        // floor(0.5 * 6) = 3 dropped: the three 0.5s (indices 1, 2, 4).
        assert_eq!(
            kept_mask(&values, 0.5),
            [true, false, false, true, false, true]
        );
        // floor(0.34 * 6) = 2: the first two 0.5s.
        assert_eq!(
            kept_mask(&values, 0.34),
            [true, false, false, true, true, true]
        );
    }

    #[test]
    fn dropped_count_floors_and_zero_sparsity_keeps_all() {
        assert_eq!(dropped_count(0.0, 10), 0);
        assert_eq!(dropped_count(0.99, 10), 9);
        assert_eq!(dropped_count(0.5, 7), 3);
        assert!(kept_mask(&[1.0, 2.0], 0.4).iter().all(|&k| k));
    }

    /// Bitmap form: `n/8 + (n - floor(s n)) b / 8` bytes against dense `n b / 8`,
    /// so the bitmap wins once `s > 1/b` (ties go to dense).
    #[test]
    fn bitmap_form_only_where_it_is_strictly_smaller() {
        use SparseForm::{Bitmap, Dense};
        let choose = |bits, sparsity| smaller_form(Grid::Symmetric, bits, sparsity, 256);
        // 4 bits, 256 values: dense 128 bytes. s = 0.25 drops 64: 32 + 96 = 128 (tie).
        assert_eq!(choose(4, 0.25), Dense);
        // s = 0.26 drops 66: 32 + ceil(190 / 2) = 127.
        assert_eq!(choose(4, 0.26), Bitmap);
        // s = 0.24 drops 61: 32 + ceil(195 / 2) = 130.
        assert_eq!(choose(4, 0.24), Dense);
        // 8 bits: dense 256; s = 0.13 drops 33: 32 + 223 = 255.
        assert_eq!(choose(8, 0.13), Bitmap);
        assert_eq!(choose(8, 0.12), Dense);
        assert_eq!(smaller_form(Grid::Asymmetric, 4, 0.01, 256), Bitmap);
        assert_eq!(smaller_form(Grid::Asymmetric, 4, 0.0, 256), Dense);
        assert_eq!(smaller_form(Grid::Symmetric, 2, 0.9, 0), Dense);
    }

    #[test]
    fn negative_zero_ranks_with_zero() {
        let values = [1.0, -0.0, 0.0, 2.0];
        assert_eq!(kept_mask(&values, 0.5), [true, false, false, true]);
    }
}
