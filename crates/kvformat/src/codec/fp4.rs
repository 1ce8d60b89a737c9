//! The 4-bit float (e2m1) KV caches: TensorRT-LLM's NVFP4 and SGLang's
//! `fp4_mx_block16`. Both cut head_dim into blocks of [`BLOCK`] values, each
//! with one 8-bit scale, and store each value as an e2m1 code: a sign bit
//! and a magnitude index into [`E2M1`] (the OCP Microscaling spec's FP4
//! values). They differ in the scale and in how a tie rounds.
//!
//! - NVFP4 (`quantizeAndWriteFP4KVCache` → `cvt_warp_fp16_to_fp4`): a
//!   per-tensor `k_scale` (ModelOpt's `amax / (6 * 448)`, or 1.0 without
//!   checkpoint scales) gives `g = 1 / k_scale`; a block's scale is the
//!   float8 e4m3 (saturating, round to nearest even) of `g * (amax * (1/6))`;
//!   values are `x * (1 / (scale * (1/g)))` rounded to nearest even on the
//!   e2m1 grid (`cvt.rn.satfinite.e2m1x2`), saturated at 6. Value:
//!   `e2m1 * scale * (1/g)`. The kernel's reciprocals are PTX
//!   `rcp.approx.ftz` (within 1 ulp); these are exact.
//! - SGLang `fp4_mx_block16` (`FP4MXBlock16KVQuantizeUtil.batched_quantize`):
//!   the scale is the power of two `2^e`, `e` the least integer with
//!   `max(amax / 6, 1e-10) <= 2^e`, stored as the E8M0 byte `e + 127`;
//!   the magnitude index is the number of the bounds (0.25, 0.75, 1.25,
//!   1.75, 2.5, 3.5, 5) at or below `|x / 2^e|`, so ties round away from
//!   zero. Value: `e2m1 * 2^e`.
//!
//! A code's bit 3 is the sign (set only for a negative value that does not
//! round to 0), bits 0..2 the magnitude index; the engines pack two codes a
//! byte, the even element in the low nibble, as the codec's bit packing does.

use rayon::prelude::*;

use super::fp8::E4M3;
use super::groups::GroupGeometry;
use super::quantizer::max_abs;
use super::scales::{GroupParams, ScaleDtype};
use super::Grid;

/// Values per block (one scale each), both engines' 16.
pub const BLOCK: usize = 16;

/// The e2m1 magnitudes, by index (OCP Microscaling Formats v1.0, §5.3.3).
pub const E2M1: [f32; 8] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];

/// The midpoints between neighbouring magnitudes.
const BOUNDS: [f32; 7] = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0];

/// Largest e2m1 magnitude.
const E2M1_MAX: f32 = 6.0;

/// NVFP4's per-tensor scale for a calibrated tensor: ModelOpt's `amax / (6 * 448)`.
const NVFP4_SCALE_DIVISOR: f32 = 6.0 * 448.0;

/// `x` on the e2m1 grid, saturated at +-6: to nearest, ties to the even
/// index (NVFP4) or away from zero (SGLang). The sign bit is set for a
/// negative `x`, except (NVFP4) where it rounds to 0: SGLang sets it from
/// `x < 0` alone, so -0.1 is its negative zero `0x8`.
fn e2m1_code(x: f32, ties_to_even: bool) -> u8 {
    let magnitude = x.abs();
    let index = BOUNDS
        .iter()
        .enumerate()
        .take_while(|&(index, &bound)| {
            magnitude > bound || (magnitude == bound && !(ties_to_even && index % 2 == 0))
        })
        .count() as u8;
    let signed = x < 0.0 && (index > 0 || !ties_to_even);
    if signed {
        index | 0x8
    } else {
        index
    }
}

/// The value of an e2m1 code.
pub fn e2m1_value(code: u8) -> f32 {
    let magnitude = E2M1[usize::from(code & 0x7)];
    if code & 0x8 != 0 {
        -magnitude
    } else {
        magnitude
    }
}

/// SGLang's block exponent: the least `e` with `max(amax / 6, 1e-10) <= 2^e`.
fn mx_exponent(amax: f32) -> i32 {
    let target = (amax / E2M1_MAX).max(1e-10);
    let bits = target.to_bits();
    let exponent = ((bits >> 23) & 0xff) as i32 - 127;
    // A power of two is its own bound; anything above it needs the next one.
    if bits & 0x7f_ffff == 0 {
        exponent
    } else {
        exponent + 1
    }
}

/// `2^e` for the E8M0 exponents a block can have.
fn pow2(exponent: i32) -> f32 {
    f32::from_bits(((exponent + 127) as u32) << 23)
}

/// NVFP4's `k_scale` for a tensor: 1.0 (`unit`, no checkpoint scales), else
/// `amax / (6 * 448)`, 1.0 where that is not a positive normal f32.
pub fn nvfp4_tensor_scale(values: &[f32], unit: bool) -> f32 {
    let scale = max_abs(values) / NVFP4_SCALE_DIVISOR;
    if unit || scale < f32::MIN_POSITIVE {
        1.0
    } else {
        scale
    }
}

/// The kernel's `(g, 1/g)` from `k_scale`.
fn nvfp4_factors(tensor_scale: f32) -> (f32, f32) {
    let g = 1.0 / tensor_scale;
    (g, 1.0 / g)
}

/// Every block's stored scale (NVFP4: its e4m3 value; SGLang: `2^e`) and,
/// for NVFP4, the tensor's `k_scale` (the levels section).
pub(super) fn group_params(
    grid: Grid,
    grouped: &[f32],
    geometry: &GroupGeometry,
    unit: bool,
) -> (GroupParams, f32) {
    let tensor_scale = if grid == Grid::Nvfp4 {
        nvfp4_tensor_scale(grouped, unit)
    } else {
        1.0
    };
    let (g, _) = nvfp4_factors(tensor_scale);
    let scales = (0..geometry.group_count())
        .into_par_iter()
        .map(|group| {
            let amax = max_abs(&grouped[geometry.range(group)]);
            match grid {
                Grid::Nvfp4 => E4M3.decode(E4M3.encode(g * (amax * (1.0 / E2M1_MAX)))),
                Grid::Fp4Mx16 => pow2(mx_exponent(amax)),
                _ => unreachable!("{grid} is not an fp4 grid"),
            }
        })
        .collect();
    let dtype = match grid {
        Grid::Nvfp4 => ScaleDtype::E4m3,
        _ => ScaleDtype::E8m0,
    };
    let params = GroupParams {
        dtype,
        scales,
        offsets: Vec::new(),
    };
    (params, tensor_scale)
}

/// One block's codes.
pub(super) fn codes(grid: Grid, values: &[f32], scale: f32, tensor_scale: f32, codes: &mut [u8]) {
    match grid {
        Grid::Nvfp4 => {
            let (_, inverse_g) = nvfp4_factors(tensor_scale);
            let output_scale = if scale != 0.0 {
                1.0 / (scale * inverse_g)
            } else {
                0.0
            };
            for (code, &x) in codes.iter_mut().zip(values) {
                *code = e2m1_code(x * output_scale, true);
            }
        }
        Grid::Fp4Mx16 => {
            for (code, &x) in codes.iter_mut().zip(values) {
                *code = e2m1_code(x / scale, false);
            }
        }
        _ => unreachable!("{grid} is not an fp4 grid"),
    }
}

/// One block's values.
pub(super) fn values(grid: Grid, codes: &[u8], scale: f32, tensor_scale: f32, out: &mut [f32]) {
    let (_, inverse_g) = nvfp4_factors(tensor_scale);
    for (x, &code) in out.iter_mut().zip(codes) {
        *x = match grid {
            Grid::Nvfp4 => e2m1_value(code) * scale * inverse_g,
            _ => e2m1_value(code) * scale,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e2m1_rounds_ties_to_even_or_away_and_saturates() {
        // Ties: (x, NVFP4's code, SGLang's code).
        for (x, even, away) in [
            (0.25, 0, 1),
            (0.75, 2, 2),
            (1.25, 2, 3),
            (1.75, 4, 4),
            (2.5, 4, 5),
            (3.5, 6, 6),
            (5.0, 6, 7),
        ] {
            assert_eq!(e2m1_code(x, true), even, "{x}");
            assert_eq!(e2m1_code(x, false), away, "{x}");
            let negative = if even == 0 { 0 } else { even | 0x8 };
            assert_eq!(e2m1_code(-x, true), negative, "-{x}");
            assert_eq!(e2m1_code(-x, false), away | 0x8, "-{x}");
        }
        assert_eq!(e2m1_code(0.26, true), 1);
        assert_eq!(e2m1_code(100.0, true), 7);
        assert_eq!(e2m1_code(-100.0, false), 0xf);
        assert_eq!(
            e2m1_code(-0.1, true),
            0,
            "NVFP4: a negative value rounding to 0 is +0"
        );
        assert_eq!(e2m1_code(-0.1, false), 0x8, "SGLang: its sign bit is x < 0");
        assert_eq!(e2m1_code(-0.0, false), 0);
        for code in 0..16u8 {
            let value = e2m1_value(code);
            if value != 0.0 {
                assert_eq!(e2m1_code(value, true), code);
                assert_eq!(e2m1_code(value, false), code);
            }
        }
    }

    #[test]
    fn mx_exponent_is_the_least_power_of_two_at_or_above_amax_over_6() {
        assert_eq!(mx_exponent(12.0), 1, "12/6 = 2 exactly: its own bound");
        assert_eq!(mx_exponent(12.5), 2);
        assert_eq!(mx_exponent(3.0), -1);
        assert_eq!(mx_exponent(0.0), -33, "1e-10 <= 2^-33");
    }

    #[test]
    fn nvfp4_block_by_hand() {
        // k_scale 1 (g = 1): amax 6 gives the e4m3 scale 1, so values are
        // rounded on the e2m1 grid itself.
        let values = [6.0, -1.25, 2.5, 0.2];
        let mut got = [0u8; 4];
        codes(Grid::Nvfp4, &values, 1.0, 1.0, &mut got);
        assert_eq!(got, [7, 0x8 | 2, 4, 0]);
        let mut back = [0f32; 4];
        self::values(Grid::Nvfp4, &got, 1.0, 1.0, &mut back);
        assert_eq!(back, [6.0, -1.0, 2.0, 0.0]);
    }
}
