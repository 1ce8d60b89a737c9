//! Which values form each group, and the tensor view the codec works on.
//!
//! A tensor is seen as `[heads, seq, head_dim]` where `heads = batch * kv_heads`
//! (a non-4-D tensor is one head of one token). Kept tokens are split off
//! first; the remaining "quantized" values, row-major, are put into group
//! order: a sequence of equal-length segments, each cut into runs of
//! `group_size` with a ragged last run.
//! - Flat: one segment, all quantized values.
//! - Token: one segment per (head, token): its `head_dim` values.
//! - Channel: one segment per (head, channel): its values along the
//!   quantized tokens (the transpose of the last two axes).

use std::ops::Range;

use rayon::prelude::*;

use super::{Axis, CodecError, CodecParams};

/// Groups laid out as `segment_count` segments of `segment_len` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct GroupGeometry {
    pub segment_len: usize,
    pub segment_count: usize,
    pub group_size: usize,
}

impl GroupGeometry {
    fn groups_per_segment(&self) -> usize {
        self.segment_len.div_ceil(self.group_size)
    }

    pub fn group_count(&self) -> usize {
        self.segment_count * self.groups_per_segment()
    }

    /// Index of the first value of `group` (or the total for `group_count()`).
    pub fn range_start(&self, group: usize) -> usize {
        let per_segment = self.groups_per_segment();
        if per_segment == 0 {
            return 0;
        }
        let segment = group / per_segment;
        let run = group % per_segment;
        segment * self.segment_len + run * self.group_size
    }

    /// The values of `group`, in group order.
    pub fn range(&self, group: usize) -> Range<usize> {
        let start = self.range_start(group);
        let run_start = (group % self.groups_per_segment()) * self.group_size;
        start..start + self.group_size.min(self.segment_len - run_start)
    }
}

/// How one tensor splits into kept tokens and quantized values, and how the
/// quantized values are grouped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Plan {
    pub heads: usize,
    pub seq: usize,
    pub head_dim: usize,
    /// Quantized tokens of each head: `[mid_start, mid_start + mid_len)`.
    pub mid_start: usize,
    pub mid_len: usize,
    pub axis: Axis,
    pub geometry: GroupGeometry,
}

/// Product of `shape`, or `ShapeOverflow`. Also bounds it so that bit counts
/// and f32 byte counts of it cannot overflow either.
pub(crate) fn element_count(shape: &[usize]) -> Result<usize, CodecError> {
    shape
        .iter()
        .try_fold(1usize, |total, &dim| total.checked_mul(dim))
        .filter(|&total| total <= usize::MAX / 32)
        .ok_or(CodecError::ShapeOverflow)
}

impl Plan {
    /// Assumes `params.validate(shape)` passed.
    pub fn new(shape: &[usize], params: &CodecParams) -> Result<Self, CodecError> {
        let count = element_count(shape)?;
        // With a zero-length axis the size bounds nothing: a product of the
        // other axes may overflow.
        let product = |a: usize, b: usize| a.checked_mul(b).ok_or(CodecError::ShapeOverflow);
        let (heads, seq, head_dim) = match *shape {
            [batch, kv_heads, seq, head_dim] => (product(batch, kv_heads)?, seq, head_dim),
            _ => (1, 1, count),
        };
        let (mid_start, mid_len) = if params.sink_tokens.saturating_add(params.recent_tokens) >= seq
            && (params.sink_tokens > 0 || params.recent_tokens > 0)
        {
            (seq, 0)
        } else {
            (
                params.sink_tokens,
                seq - params.sink_tokens - params.recent_tokens,
            )
        };
        let quantized = product(product(heads, mid_len)?, head_dim)?;
        let (segment_len, segment_count) = match params.axis {
            Axis::Flat => (quantized, usize::from(quantized > 0)),
            Axis::Token => (head_dim, product(heads, mid_len)?),
            Axis::Channel => (mid_len, product(heads, head_dim)?),
        };
        let geometry = GroupGeometry {
            segment_len,
            segment_count,
            group_size: params.group_size,
        };
        Ok(Plan {
            heads,
            seq,
            head_dim,
            mid_start,
            mid_len,
            axis: params.axis,
            geometry,
        })
    }

    /// Values of the tensor: a product that overflows only before a factor 0.
    pub fn total_count(&self) -> usize {
        self.heads
            .checked_mul(self.seq)
            .map_or(0, |values| values * self.head_dim)
    }

    pub fn quantized_count(&self) -> usize {
        // Checked when the plan was made.
        self.heads * self.mid_len * self.head_dim
    }

    pub fn kept_token_count(&self) -> usize {
        self.total_count() - self.quantized_count()
    }

    /// Whether every token is quantized, so the quantized values are the tensor itself.
    pub fn keeps_no_tokens(&self) -> bool {
        self.mid_len == self.seq
    }

    /// Tokens of one head that are kept as FP16, in token order.
    pub fn kept_tokens(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.mid_start).chain(self.mid_start + self.mid_len..self.seq)
    }

    /// Splits the tensor into (kept-token values in storage order, quantized
    /// values row-major over `[heads, mid_len, head_dim]`).
    pub fn split(&self, values: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let row = self.head_dim;
        let mut kept = Vec::with_capacity(self.kept_token_count());
        let mut quantized = Vec::with_capacity(self.quantized_count());
        // An empty tensor may have dims whose product wraps (`[0, 3, 2^33, 2^33]`).
        if values.is_empty() {
            return (kept, quantized);
        }
        for head in values.chunks_exact(self.seq * row).take(self.heads) {
            for token in self.kept_tokens() {
                kept.extend_from_slice(&head[token * row..(token + 1) * row]);
            }
            quantized.extend_from_slice(
                &head[self.mid_start * row..(self.mid_start + self.mid_len) * row],
            );
        }
        (kept, quantized)
    }

    /// Inverse of [`Plan::split`].
    pub fn join(&self, kept: &[f32], quantized: &[f32], out: &mut [f32]) {
        let row = self.head_dim;
        // As in `split`: an empty tensor's dims may not multiply.
        if out.is_empty() {
            return;
        }
        let kept_per_head = (self.seq - self.mid_len) * row;
        let quantized_per_head = self.mid_len * row;
        for (head_index, head) in out.chunks_exact_mut(self.seq * row).enumerate() {
            let head_kept = &kept[head_index * kept_per_head..(head_index + 1) * kept_per_head];
            for (token, values) in self.kept_tokens().zip(head_kept.chunks_exact(row)) {
                head[token * row..(token + 1) * row].copy_from_slice(values);
            }
            head[self.mid_start * row..(self.mid_start + self.mid_len) * row].copy_from_slice(
                &quantized[head_index * quantized_per_head..(head_index + 1) * quantized_per_head],
            );
        }
    }

    /// Row-major quantized values (or a per-value mask) into group order.
    pub fn in_group_order<T: Copy + Default + Send + Sync>(&self, row_major: &[T]) -> Vec<T> {
        match self.axis {
            Axis::Flat | Axis::Token => row_major.to_vec(),
            Axis::Channel => transpose_heads(row_major, self.mid_len, self.head_dim),
        }
    }

    /// Inverse of [`Plan::in_group_order`].
    pub fn in_row_major_order<T: Copy + Default + Send + Sync>(&self, grouped: Vec<T>) -> Vec<T> {
        match self.axis {
            Axis::Flat | Axis::Token => grouped,
            Axis::Channel => transpose_heads(&grouped, self.head_dim, self.mid_len),
        }
    }
}

/// Transposes each `[rows, cols]` matrix of a stack of them.
fn transpose_heads<T: Copy + Default + Send + Sync>(
    values: &[T],
    rows: usize,
    cols: usize,
) -> Vec<T> {
    let mut out = vec![T::default(); values.len()];
    let per_head = rows * cols;
    if per_head == 0 {
        return out;
    }
    values
        .par_chunks_exact(per_head)
        .zip(out.par_chunks_exact_mut(per_head))
        .for_each(|(source, target)| {
            // Tile by tile, so that both the rows read and the rows written stay
            // in cache (a column walk of a 2048-row head misses on every value).
            // Each tile is read a row at a time and written a column at a time
            // through a local copy, whose transposing stores stay in L1: the
            // strided loads of the direct walk were the transpose's cost.
            for row_start in (0..rows).step_by(TRANSPOSE_TILE) {
                let height = (rows - row_start).min(TRANSPOSE_TILE);
                for col_start in (0..cols).step_by(TRANSPOSE_TILE) {
                    let width = (cols - col_start).min(TRANSPOSE_TILE);
                    let mut tile = [[T::default(); TRANSPOSE_TILE]; TRANSPOSE_TILE];
                    for (r, source_row) in source[row_start * cols + col_start..]
                        .chunks(cols)
                        .take(height)
                        .enumerate()
                    {
                        for (column, &x) in tile.iter_mut().zip(&source_row[..width]) {
                            column[r] = x;
                        }
                    }
                    for (c, column) in tile.iter().take(width).enumerate() {
                        let start = (col_start + c) * rows + row_start;
                        target[start..start + height].copy_from_slice(&column[..height]);
                    }
                }
            }
        });
    out
}

/// The side of [`transpose_heads`]'s square tiles.
const TRANSPOSE_TILE: usize = 16;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_groups_are_consecutive_with_a_ragged_last_group() {
        let geometry = GroupGeometry {
            segment_len: 10,
            segment_count: 1,
            group_size: 4,
        };
        let ranges: Vec<_> = (0..geometry.group_count())
            .map(|g| geometry.range(g))
            .collect();
        assert_eq!(ranges, [0..4, 4..8, 8..10]);
        assert_eq!(
            geometry.range_start(3),
            10,
            "one past the last group is the total"
        );
    }

    #[test]
    fn segments_restart_the_runs() {
        let geometry = GroupGeometry {
            segment_len: 5,
            segment_count: 2,
            group_size: 3,
        };
        let ranges: Vec<_> = (0..geometry.group_count())
            .map(|g| geometry.range(g))
            .collect();
        assert_eq!(ranges, [0..3, 3..5, 5..8, 8..10]);
    }

    #[test]
    fn channel_axis_groups_run_along_tokens() {
        // One head, 3 tokens, 2 channels; value = 10 * token + channel.
        let params = CodecParams {
            axis: Axis::Channel,
            ..CodecParams::adr002(2)
        };
        let plan = Plan::new(&[1, 1, 3, 2], &params).unwrap();
        let row_major = [0.0f32, 1.0, 10.0, 11.0, 20.0, 21.0];
        let grouped = plan.in_group_order(&row_major);
        assert_eq!(grouped, [0.0, 10.0, 20.0, 1.0, 11.0, 21.0]);
        assert_eq!(
            plan.geometry,
            GroupGeometry {
                segment_len: 3,
                segment_count: 2,
                group_size: 2
            }
        );
        assert_eq!(plan.in_row_major_order(grouped), row_major);
    }

    #[test]
    fn empty_tensors_with_huge_other_axes_are_planned_or_refused_not_overflowed() {
        let huge = 1usize << 33;
        for axis in [Axis::Flat, Axis::Token, Axis::Channel] {
            let params = CodecParams {
                axis,
                sink_tokens: 1,
                ..CodecParams::adr002(64)
            };
            for shape in [
                [huge, huge, 0, 1],
                [1, huge, huge, 0],
                [huge, 1, huge, 0],
                [0, huge, huge, huge],
            ] {
                if let Ok(plan) = Plan::new(&shape, &params) {
                    assert_eq!(plan.total_count(), 0, "{shape:?}");
                    assert_eq!(plan.quantized_count(), 0, "{shape:?}");
                }
            }
        }
    }

    #[test]
    fn tiled_transpose_matches_the_definition_on_ragged_tiles() {
        let (heads, rows, cols) = (3, 37, 19);
        let values: Vec<u32> = (0..(heads * rows * cols) as u32).collect();
        let transposed = transpose_heads(&values, rows, cols);
        for head in 0..heads {
            for row in 0..rows {
                for col in 0..cols {
                    let base = head * rows * cols;
                    assert_eq!(
                        transposed[base + col * rows + row],
                        values[base + row * cols + col],
                        "head {head}, row {row}, col {col}"
                    );
                }
            }
        }
        assert_eq!(transpose_heads(&transposed, cols, rows), values);
    }

    #[test]
    fn kept_tokens_split_and_join_back() {
        let params = CodecParams {
            sink_tokens: 1,
            recent_tokens: 1,
            ..CodecParams::adr002(2)
        };
        // 2 heads, 4 tokens, 1 channel.
        let plan = Plan::new(&[1, 2, 4, 1], &params).unwrap();
        let values: Vec<f32> = (0..8).map(|v| v as f32).collect();
        let (kept, quantized) = plan.split(&values);
        assert_eq!(kept, [0.0, 3.0, 4.0, 7.0]);
        assert_eq!(quantized, [1.0, 2.0, 5.0, 6.0]);
        let mut out = vec![0.0; 8];
        plan.join(&kept, &quantized, &mut out);
        assert_eq!(out, values);
    }

    #[test]
    fn sinks_and_recent_covering_the_sequence_keep_everything() {
        let params = CodecParams {
            sink_tokens: 3,
            recent_tokens: 2,
            ..CodecParams::adr002(2)
        };
        let plan = Plan::new(&[1, 1, 4, 2], &params).unwrap();
        assert_eq!(plan.quantized_count(), 0);
        assert_eq!(plan.kept_tokens().collect::<Vec<_>>(), [0, 1, 2, 3]);
        assert_eq!(plan.geometry.group_count(), 0);
    }
}
