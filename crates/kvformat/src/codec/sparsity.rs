//! Magnitude sparsity: the smallest `floor(s * n)` quantized values are
//! dropped, not stored, and decode to 0.
//!
//! Values are ranked by `(|x|, row-major index)` ascending, so ties break
//! deterministically towards earlier values. Selection is O(n) on average
//! (`select_nth_unstable` on the magnitudes' bit patterns, which order like
//! the magnitudes themselves for non-negative floats).

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

    #[test]
    fn negative_zero_ranks_with_zero() {
        let values = [1.0, -0.0, 0.0, 2.0];
        assert_eq!(kept_mask(&values, 0.5), [true, false, false, true]);
    }
}
