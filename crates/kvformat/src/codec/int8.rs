//! TensorRT-LLM's INT8 KV cache (the TensorRT-engine flow:
//! `convert_checkpoint.py --int8_kv_cache` or ModelOpt's `quantize.py
//! --kv_cache_dtype int8`): one f32 `kv_cache_scaling_factor` per tensor,
//! calibrated as `amax / 127`; a value is stored as `x * (1 / scale)`
//! rounded to nearest even and saturated to [-128, 127] (the kernel's
//! `cvt.rni.sat.s8.f32` after a multiply by the reciprocal, in
//! `store_8bits_kv_cache_vec`), and read back as `q * scale`.
//!
//! TensorRT-LLM calibrates one factor per layer, shared by K and V and taken
//! over the Q, K and V projections' outputs; here each tensor (a layer's K
//! or V, in one window) has its own, which can only be as fine or finer.

use rayon::prelude::*;

use super::groups::GroupGeometry;
use super::quantizer::max_abs;
use super::scales::{GroupParams, ScaleDtype};

/// A group's scale: `amax / 127`, 1 where that is below f32's normal range.
fn scale_of(values: &[f32]) -> f32 {
    let scale = max_abs(values) / 127.0;
    if scale < f32::MIN_POSITIVE {
        1.0
    } else {
        scale
    }
}

/// Every group's f32 scale.
pub(super) fn group_params(grouped: &[f32], geometry: &GroupGeometry) -> GroupParams {
    GroupParams {
        dtype: ScaleDtype::F32,
        scales: (0..geometry.group_count())
            .into_par_iter()
            .map(|group| scale_of(&grouped[geometry.range(group)]))
            .collect(),
        offsets: Vec::new(),
    }
}

/// One group's codes: the int8's byte.
pub(super) fn codes(values: &[f32], scale: f32, codes: &mut [u8]) {
    let inverse = 1.0 / scale;
    for (code, &x) in codes.iter_mut().zip(values) {
        *code = (x * inverse).round_ties_even().clamp(-128.0, 127.0) as i8 as u8;
    }
}

/// One group's values.
pub(super) fn values(codes: &[u8], scale: f32, out: &mut [f32]) {
    for (x, &code) in out.iter_mut().zip(codes) {
        *x = f32::from(code as i8) * scale;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_half_to_even_and_saturates_at_minus_128() {
        let mut got = [0u8; 5];
        codes(&[2.5, 3.5, -2.5, 200.0, -200.0], 1.0, &mut got);
        assert_eq!(got.map(|c| c as i8), [2, 4, -2, 127, -128]);
        let mut back = [0f32; 2];
        values(&[0x80, 0x7f], 0.5, &mut back);
        assert_eq!(back, [-64.0, 63.5]);
    }
}
