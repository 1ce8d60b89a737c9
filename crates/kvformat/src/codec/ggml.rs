//! llama.cpp's KV-cache types `q8_0`, `q4_0`, `q4_1`, `q5_0`, `q5_1` and
//! `iq4_nl`: blocks of [`BLOCK`] values along head_dim, each with an f16
//! scale `d` (and an f16 minimum `m` for the `_1` types), rounded exactly as
//! ggml's `quantize_row_*_ref` and gguf-py's `gguf.quants` do it: f32
//! arithmetic, the codes computed from the unrounded f32 `d`, then `d`
//! stored as f16.
//!
//! Codes are the engine's own (`q8_0`: the int8's byte; `q4_0`: 0..15 with
//! value `(q - 8) * d`; `q5_0`: 0..31 with `(q - 16) * d`; `_1`: `q * d + m`;
//! `iq4_nl`: an index into [`IQ4_NL_LEVELS`], value `d * level`), bit-packed
//! by the codec in its section layout (docs/format.md, "Engine formats");
//! the bytes per value equal llama.cpp's.
//!
//! `iq4_nl` is what the cache stores through `quantize_row_iq4_nl_ref`
//! (ggml-quants.c), which calls `quantize_row_iq4_nl_impl` with `ntry = -1`
//! and no importance weights: no scale search. The indices are the levels
//! nearest `x / d0` with `d0 = x_max / -127` (x_max the value of largest
//! magnitude); the stored `d` is then the least-squares fit
//! `sum(w q x) / sum(w q^2)` with weights `w = x^2`. A block whose largest
//! magnitude is below 1e-15 stores `d = 0`.

use half::f16;
use rayon::prelude::*;

use super::groups::GroupGeometry;
use super::scales::{GroupParams, ScaleDtype};
use super::Grid;

/// Values per block, ggml's `QK8_0`, `QK4_0`, ..., `QK4_NL` (all 32).
pub const BLOCK: usize = 32;

/// `iq4_nl`'s 16 levels, ggml's `kvalues_iq4nl`.
pub const IQ4_NL_LEVELS: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// Below this largest magnitude an `iq4_nl` block stores `d = 0` (ggml's `GROUP_MAX_EPS`).
const IQ4_NL_EPS: f32 = 1e-15;

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

/// ggml's `best_index_int8`: the index of the level nearest `x`, the upper
/// one on ties, by bisection.
fn nearest_level(x: f32) -> u8 {
    let levels = IQ4_NL_LEVELS.map(f32::from);
    if x <= levels[0] {
        return 0;
    }
    if x >= levels[15] {
        return 15;
    }
    let (mut low, mut high) = (0, 15);
    while high - low > 1 {
        let mid = (low + high) / 2;
        if x < levels[mid] {
            high = mid;
        } else {
            low = mid;
        }
    }
    if x - levels[high - 1] < levels[high] - x {
        high as u8 - 1
    } else {
        high as u8
    }
}

/// `iq4_nl`'s block: the indices use `id = 1 / d0`; `d` is the weighted
/// least-squares scale of those indices (`quantize_row_iq4_nl_impl`, `ntry = -1`).
fn iq4_nl_block(values: &[f32]) -> Block {
    let x_max = signed_max(values);
    if x_max.abs() < IQ4_NL_EPS {
        return Block {
            d: 0.0,
            id: 0.0,
            min: 0.0,
        };
    }
    let id = 1.0 / (x_max / f32::from(IQ4_NL_LEVELS[0]));
    let (mut sum_qx, mut sum_q2) = (0.0f32, 0.0f32);
    for &x in values {
        let q = f32::from(IQ4_NL_LEVELS[usize::from(nearest_level(id * x))]);
        let w = x * x;
        sum_qx += w * q * x;
        sum_q2 += w * q * q;
    }
    Block {
        d: sum_qx / sum_q2,
        id,
        min: 0.0,
    }
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
        Grid::Iq4Nl => iq4_nl_block(values),
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
    let Block { d, id, min } = block(grid, values);
    let truncated = |t: f32, top: f32| t.clamp(0.0, top) as u8;
    for (code, &x) in codes.iter_mut().zip(values) {
        *code = match grid {
            // `round`: ties away from zero, C's `roundf`.
            Grid::Q8_0 => (x * id).round() as i8 as u8,
            Grid::Q4_0 => truncated(x * id + 8.5, 15.0),
            Grid::Q5_0 => truncated(x * id + 16.5, 31.0),
            Grid::Q4_1 => truncated((x - min) * id + 0.5, 15.0),
            Grid::Q5_1 => truncated((x - min) * id + 0.5, 31.0),
            // ggml leaves a d = 0 block's indices as its buffer held them
            // (the previous block's); any index decodes to 0 there, and 0
            // is the one ggml's memset means.
            Grid::Iq4Nl if d == 0.0 => 0,
            Grid::Iq4Nl => nearest_level(id * x),
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
            Grid::Iq4Nl => d * f32::from(IQ4_NL_LEVELS[usize::from(code & 0x0f)]),
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

    #[test]
    fn iq4_nl_block_by_hand() {
        // x_max = 127: d0 = -1, id = -1, so x = 127 takes level -127 (index
        // 0) and x = -1 level 1 (index 8); with w = x^2 the fit is
        // d = (127^2 * -127 * 127 + 1 * 1 * -1) / (127^2 * 127^2 + 1 * 1) = -1.
        let mut block = [0.0f32; BLOCK];
        block[0] = 127.0;
        block[1] = -1.0;
        let mut got = [0u8; BLOCK];
        codes(Grid::Iq4Nl, &block, &mut got);
        assert_eq!(&got[..3], &[0, 8, 8], "0 sits between -10 and 1: nearer 1");
        assert_eq!(iq4_nl_block(&block).d, -1.0);
        let mut back = [0f32; BLOCK];
        values(Grid::Iq4Nl, &got, -1.0, 0.0, &mut back);
        assert_eq!(&back[..3], &[127.0, -1.0, -1.0]);
        // Ties between two levels go to the upper one, as ggml's `<` does.
        assert_eq!(nearest_level(-4.5), 8);
        assert_eq!(nearest_level(-4.6), 7);
        assert_eq!(nearest_level(-200.0), 0);
        assert_eq!(nearest_level(200.0), 15);
        assert_eq!(iq4_nl_block(&[1e-16; BLOCK]).d, 0.0);
    }
}
