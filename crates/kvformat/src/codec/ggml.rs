//! llama.cpp's KV-cache types `q8_0`, `q4_0`, `q4_1`, `q5_0` and `q5_1`:
//! blocks of [`BLOCK`] values along head_dim, each with an f16 scale `d`
//! (and an f16 minimum `m` for the `_1` types), rounded exactly as ggml's
//! `quantize_row_*_ref` and gguf-py's `gguf.quants` do it: f32 arithmetic,
//! the codes computed from the unrounded f32 `d`, then `d` stored as f16.
//!
//! Codes are the engine's own (`q8_0`: the int8's byte; `q4_0`: 0..15 with
//! value `(q - 8) * d`; `q5_0`: 0..31 with `(q - 16) * d`; `_1`: `q * d + m`),
//! bit-packed by the codec in its section layout (docs/format.md, "Engine
//! formats"); the bytes per value equal llama.cpp's.

use half::f16;
use rayon::prelude::*;

use super::groups::GroupGeometry;
use super::scales::{GroupParams, ScaleDtype};
use super::Grid;

/// Values per block, ggml's `QK8_0`, `QK4_0`, ... (all 32).
pub const BLOCK: usize = 32;

/// A block's parameters before the f16 rounding of storage.
#[derive(Clone, Copy, Debug)]
struct Block {
    d: f32,
    /// `1 / d`, or 0 when `d` is 0.
    id: f32,
    /// The block's minimum (`_1` types), else 0.
    min: f32,
}

/// Whether `grid` stores a minimum per block (`q4_1`, `q5_1`).
fn has_min(grid: Grid) -> bool {
    matches!(grid, Grid::Q4_1 | Grid::Q5_1)
}

fn inverse(d: f32) -> f32 {
    if d == 0.0 {
        0.0
    } else {
        1.0 / d
    }
}

/// The value of largest magnitude, the first one on ties (numpy's `argmax`, ggml's `>`).
fn signed_max(values: &[f32]) -> f32 {
    values
        .iter()
        .fold((0.0f32, 0.0f32), |(amax, max), &x| {
            if x.abs() > amax {
                (x.abs(), x)
            } else {
                (amax, max)
            }
        })
        .1
}

fn block(grid: Grid, values: &[f32]) -> Block {
    let symmetric = |d: f32| Block {
        d,
        id: inverse(d),
        min: 0.0,
    };
    let affine = |levels: f32| {
        let min = values.iter().copied().fold(f32::INFINITY, f32::min);
        let max = values.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let d = (max - min) / levels;
        Block {
            d,
            id: inverse(d),
            min,
        }
    };
    match grid {
        Grid::Q8_0 => symmetric(values.iter().fold(0.0f32, |m, x| m.max(x.abs())) / 127.0),
        Grid::Q4_0 => symmetric(signed_max(values) / -8.0),
        Grid::Q5_0 => symmetric(signed_max(values) / -16.0),
        Grid::Q4_1 => affine(15.0),
        Grid::Q5_1 => affine(31.0),
        _ => unreachable!("{grid} is not a llama.cpp cache type"),
    }
}

/// The stored f16 `d` (and `m`) of every block, as f32.
pub(super) fn group_params(grid: Grid, grouped: &[f32], geometry: &GroupGeometry) -> GroupParams {
    let (scales, offsets): (Vec<f32>, Vec<f32>) = (0..geometry.group_count())
        .into_par_iter()
        .map(|group| {
            let block = block(grid, &grouped[geometry.range(group)]);
            (
                f16::from_f32(block.d).to_f32(),
                f16::from_f32(block.min).to_f32(),
            )
        })
        .unzip();
    GroupParams {
        dtype: ScaleDtype::F16,
        scales,
        offsets: if has_min(grid) { offsets } else { Vec::new() },
    }
}

/// One block's codes.
pub(super) fn codes(grid: Grid, values: &[f32], codes: &mut [u8]) {
    let Block { id, min, .. } = block(grid, values);
    let truncated = |t: f32, top: f32| t.clamp(0.0, top) as u8;
    for (code, &x) in codes.iter_mut().zip(values) {
        *code = match grid {
            // `round`: ties away from zero, C's `roundf`.
            Grid::Q8_0 => (x * id).round() as i8 as u8,
            Grid::Q4_0 => truncated(x * id + 8.5, 15.0),
            Grid::Q5_0 => truncated(x * id + 16.5, 31.0),
            Grid::Q4_1 => truncated((x - min) * id + 0.5, 15.0),
            Grid::Q5_1 => truncated((x - min) * id + 0.5, 31.0),
            _ => unreachable!("{grid} is not a llama.cpp cache type"),
        };
    }
}

/// One block's values from its codes, stored `d` and `m`, as ggml dequantizes.
pub(super) fn values(grid: Grid, codes: &[u8], d: f32, m: f32, out: &mut [f32]) {
    for (x, &code) in out.iter_mut().zip(codes) {
        *x = match grid {
            Grid::Q8_0 => f32::from(code as i8) * d,
            Grid::Q4_0 => d * f32::from(code as i8 - 8),
            Grid::Q5_0 => d * f32::from(code as i8 - 16),
            Grid::Q4_1 | Grid::Q5_1 => d * f32::from(code) + m,
            _ => unreachable!("{grid} is not a llama.cpp cache type"),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_0_block_by_hand() {
        // x_max = -8 (largest magnitude, negative): d = 1, id = 1; x + 8.5 truncated.
        let mut block = [0.0f32; BLOCK];
        block[0] = -8.0;
        block[1] = 7.0;
        block[2] = 0.4;
        let mut got = [0u8; BLOCK];
        codes(Grid::Q4_0, &block, &mut got);
        assert_eq!(&got[..3], &[0, 15, 8]);
        let mut back = [0f32; BLOCK];
        values(Grid::Q4_0, &got, 1.0, 0.0, &mut back);
        assert_eq!(&back[..3], &[-8.0, 7.0, 0.0]);
    }
}
