//! transformers' `QuantizedCache` with its default backend, optimum-quanto
//! (`QuantoQuantizedLayer`: `MaxOptimizer`, then `quantize_weight`), int4 or
//! int2, `axis 0`, `q_group_size` 64: each group is [`GROUP`] consecutive
//! values of the tensor in row-major order (along head_dim when head_dim is
//! a multiple of 64), with
//!
//! - `scale = (max - min) / (2^b - 1)` and `shift = -min`, both in the
//!   model's dtype (stored in it: f16, bf16 or f32);
//! - `q = clamp(round_half_even((x + shift) / scale), 0, 2^b - 1)`, 0 where
//!   that is NaN (a constant group: `0 / 0`, which torch's uint8 cast on CPU
//!   makes 0);
//! - value `scale * q - shift`;
//!
//! every torch operation computed in f32 and rounded to the model's dtype,
//! as torch's half-precision kernels do. The cache quantizes the whole
//! prefill this way; decoded tokens stay in full precision until 128 have
//! gathered (`residual_length`), then everything is quantized again.

use half::{bf16, f16};
use rayon::prelude::*;

use super::groups::GroupGeometry;
use super::scales::{GroupParams, ScaleDtype};

/// Values per group, transformers' default `q_group_size`.
pub const GROUP: usize = 64;

/// The model dtypes quanto computes in (and stores its scales in).
pub const MODEL_DTYPES: [ScaleDtype; 3] = [ScaleDtype::F16, ScaleDtype::Bf16, ScaleDtype::F32];

/// `x` rounded to `dtype`, as a torch op's f32 result is stored.
fn rounded(x: f32, dtype: ScaleDtype) -> f32 {
    match dtype {
        ScaleDtype::F16 => f16::from_f32(x).to_f32(),
        ScaleDtype::Bf16 => bf16::from_f32(x).to_f32(),
        _ => x,
    }
}

fn top_code(bits: u8) -> f32 {
    f32::from((1u16 << bits) as u8 - 1)
}

/// Every group's scale and shift (stored as the offsets).
pub(super) fn group_params(
    bits: u8,
    grouped: &[f32],
    geometry: &GroupGeometry,
    dtype: ScaleDtype,
) -> GroupParams {
    let (scales, shifts) = (0..geometry.group_count())
        .into_par_iter()
        .map(|group| {
            let values = &grouped[geometry.range(group)];
            let min = values.iter().copied().fold(f32::INFINITY, f32::min);
            let max = values.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let scale = rounded(rounded(max - min, dtype) / top_code(bits), dtype);
            (scale, -min)
        })
        .unzip();
    GroupParams {
        dtype,
        scales,
        offsets: shifts,
    }
}

/// One group's codes.
pub(super) fn codes(
    bits: u8,
    values: &[f32],
    scale: f32,
    shift: f32,
    dtype: ScaleDtype,
    codes: &mut [u8],
) {
    for (code, &x) in codes.iter_mut().zip(values) {
        let scaled = rounded(rounded(x + shift, dtype) / scale, dtype);
        // NaN (0 / 0) becomes 0, as `as u8` saturates and maps NaN to 0.
        *code = scaled.round_ties_even().clamp(0.0, top_code(bits)) as u8;
    }
}

/// One group's values.
pub(super) fn values(codes: &[u8], scale: f32, shift: f32, dtype: ScaleDtype, out: &mut [f32]) {
    for (x, &code) in out.iter_mut().zip(codes) {
        *x = rounded(rounded(scale * f32::from(code), dtype) - shift, dtype);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_by_hand_and_a_constant_one() {
        // min -1, max 2: scale 3/15 = 0.2 (f32), shift 1; x = 0 -> 1/0.2 = 5.
        let mut got = [0u8; 3];
        let scale = 3.0f32 / 15.0;
        codes(4, &[-1.0, 0.0, 2.0], scale, 1.0, ScaleDtype::F32, &mut got);
        assert_eq!(got, [0, 5, 15]);
        // A constant group: scale 0, every code 0, decoded exactly.
        codes(4, &[7.0, 7.0], 0.0, -7.0, ScaleDtype::F32, &mut got[..2]);
        assert_eq!(&got[..2], &[0, 0]);
        let mut back = [0f32; 2];
        values(&got[..2], 0.0, -7.0, ScaleDtype::F32, &mut back);
        assert_eq!(back, [7.0, 7.0]);
        // Ties round to even: (x + shift) / scale = 2.5 -> 2.
        codes(2, &[2.5], 1.0, 0.0, ScaleDtype::F32, &mut got[..1]);
        assert_eq!(got[0], 2);
    }
}
