//! The float8 KV caches of vLLM and SGLang (`fp8_e4m3`, `fp8_e5m2`): each
//! value is `x / scale` saturated to the format's largest finite value (as
//! vLLM clamps before its cast) and rounded to nearest even, as torch's
//! `.to(torch.float8_e4m3fn)` / `.to(torch.float8_e5m2)` round; a value is
//! `fp8 * scale`. One f32 scale per group: 1.0 (vLLM's default), or the
//! group's `max|x| / max_finite` (llm-compressor's static per-tensor scale
//! when the group is the tensor; per token and head when it is dynamic).

use rayon::prelude::*;

use super::groups::GroupGeometry;
use super::quantizer::max_abs;
use super::scales::{GroupParams, ScaleDtype};
use super::Grid;

/// One float8 format's bit layout.
#[derive(Clone, Copy, Debug)]
pub struct Fp8Format {
    mantissa_bits: u32,
    bias: i32,
    /// Largest finite value.
    pub max: f32,
    /// Whether all-ones exponents are infinities and NaNs (e5m2) rather than
    /// ordinary numbers with only `0x7f` NaN (e4m3fn).
    ieee_specials: bool,
}

pub const E4M3: Fp8Format = Fp8Format {
    mantissa_bits: 3,
    bias: 7,
    max: 448.0,
    ieee_specials: false,
};

pub const E5M2: Fp8Format = Fp8Format {
    mantissa_bits: 2,
    bias: 15,
    max: 57344.0,
    ieee_specials: true,
};

/// The format of a float8 grid.
pub fn format(grid: Grid) -> Fp8Format {
    match grid {
        Grid::Fp8E4m3 => E4M3,
        Grid::Fp8E5m2 => E5M2,
        _ => unreachable!("{grid} is not a float8 grid"),
    }
}

impl Fp8Format {
    /// `x` saturated to `+-max` and rounded to nearest even; NaN stays NaN (`0x7f`, signed).
    pub fn encode(self, x: f32) -> u8 {
        let sign = if x.is_sign_negative() { 0x80 } else { 0 };
        if x.is_nan() {
            return 0x7f | sign;
        }
        let a = x.abs().min(self.max);
        let man = self.mantissa_bits as i32;
        let min_normal_exp = 1 - self.bias;
        let exp = ((a.to_bits() >> 23) & 0xff) as i32 - 127;
        // Codes count quanta: below the normal range the quantum is fixed
        // (subnormals); above it a binade holds 2^man quanta. Scaling by a
        // power of two is exact, so one rounding happens, to nearest even.
        let code = if exp < min_normal_exp {
            (a * pow2(self.bias - 1 + man)).round_ties_even() as i32
        } else {
            let m = (a * pow2(man - exp)).round_ties_even() as i32;
            ((exp + self.bias) << man) + m - (1 << man)
        };
        code as u8 | sign
    }

    /// The value of a float8 byte (NaN and infinities as the format has them).
    pub fn decode(self, byte: u8) -> f32 {
        let man = self.mantissa_bits as i32;
        let sign = if byte & 0x80 != 0 { -1.0 } else { 1.0 };
        let exp = i32::from((byte & 0x7f) >> man);
        let m = i32::from(byte) & ((1 << man) - 1);
        let top = 0x7f >> man;
        let magnitude = if self.ieee_specials && exp == top {
            if m == 0 {
                f32::INFINITY
            } else {
                f32::NAN
            }
        } else if !self.ieee_specials && byte & 0x7f == 0x7f {
            f32::NAN
        } else if exp == 0 {
            m as f32 * pow2(1 - self.bias - man)
        } else {
            ((1 << man) + m) as f32 * pow2(exp - self.bias - man)
        };
        sign * magnitude
    }
}

fn pow2(exp: i32) -> f32 {
    f32::from_bits(((exp + 127) as u32) << 23)
}

/// A group's scale: 1 (`unit`), else `max|x| / max_finite`, which is 1 where
/// that is below f32's normal range (an all-zero group).
pub fn scale_of(format: Fp8Format, values: &[f32], unit: bool) -> f32 {
    let scale = max_abs(values) / format.max;
    if unit || scale < f32::MIN_POSITIVE {
        1.0
    } else {
        scale
    }
}

/// Every group's f32 scale.
pub(super) fn group_params(
    grid: Grid,
    grouped: &[f32],
    geometry: &GroupGeometry,
    unit: bool,
) -> GroupParams {
    let format = format(grid);
    GroupParams {
        dtype: ScaleDtype::F32,
        scales: (0..geometry.group_count())
            .into_par_iter()
            .map(|group| scale_of(format, &grouped[geometry.range(group)], unit))
            .collect(),
        offsets: Vec::new(),
    }
}

/// One group's codes.
pub(super) fn codes(grid: Grid, values: &[f32], scale: f32, codes: &mut [u8]) {
    let format = format(grid);
    for (code, &x) in codes.iter_mut().zip(values) {
        *code = format.encode(x / scale);
    }
}

/// One group's values.
pub(super) fn values(grid: Grid, codes: &[u8], scale: f32, out: &mut [f32]) {
    let format = format(grid);
    for (x, &code) in out.iter_mut().zip(codes) {
        *x = format.decode(code) * scale;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_byte_decodes_and_encodes_back() {
        for format in [E4M3, E5M2] {
            for byte in 0..=255u8 {
                let x = format.decode(byte);
                if x.is_finite() {
                    assert_eq!(format.encode(x), byte, "{format:?} {byte:#x} {x}");
                } else if x.is_nan() {
                    assert!(format.decode(format.encode(x)).is_nan());
                }
            }
        }
    }

    #[test]
    fn saturates_and_rounds_ties_to_even() {
        assert_eq!(E4M3.decode(E4M3.encode(1e6)), 448.0);
        assert_eq!(E4M3.decode(E4M3.encode(-460.0)), -448.0);
        assert_eq!(E5M2.decode(E5M2.encode(f32::INFINITY)), 57344.0);
        // Between 1.0 and 1.125 (e4m3's step at 1), the tie goes to the even 1.0.
        assert_eq!(E4M3.decode(E4M3.encode(1.0625)), 1.0);
        assert_eq!(E4M3.decode(E4M3.encode(1.1875)), 1.25);
        // Smallest subnormal 2^-9: half of it is a tie to 0.
        assert_eq!(E4M3.decode(E4M3.encode(2f32.powi(-10))), 0.0);
        assert_eq!(E4M3.encode(f32::NAN), 0x7f);
    }
}
