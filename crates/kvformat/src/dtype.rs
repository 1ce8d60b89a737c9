//! The three element types a KV cache may hold, and their conversion to and
//! from the `f32` every codec works on, a slice at a time: F16 through
//! `half`'s slice conversions (F16C where the CPU has it), BF16 through
//! kernels of our own at the SIMD level (`half` converts BF16 one value at a
//! time at the build's baseline), with `half`'s bits.

use std::borrow::Cow;

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use rayon::prelude::*;
use safetensors::Dtype;
use serde::{Deserialize, Serialize};

use crate::error::TensorProblem;
use crate::input::try_resize_for_overwrite;

/// Element type of a KV-cache tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheDtype {
    F32,
    F16,
    BF16,
}

impl CacheDtype {
    pub const ALL: [CacheDtype; 3] = [CacheDtype::F32, CacheDtype::F16, CacheDtype::BF16];

    /// The cache dtype of a safetensors dtype, `None` for anything a KV cache may not hold.
    pub fn from_safetensors(dtype: Dtype) -> Option<Self> {
        match dtype {
            Dtype::F32 => Some(CacheDtype::F32),
            Dtype::F16 => Some(CacheDtype::F16),
            Dtype::BF16 => Some(CacheDtype::BF16),
            _ => None,
        }
    }

    pub fn to_safetensors(self) -> Dtype {
        match self {
            CacheDtype::F32 => Dtype::F32,
            CacheDtype::F16 => Dtype::F16,
            CacheDtype::BF16 => Dtype::BF16,
        }
    }

    /// PyTorch's spelling, used by the sidecar and the original's `original_dtype` key.
    pub fn torch_name(self) -> &'static str {
        match self {
            CacheDtype::F32 => "float32",
            CacheDtype::F16 => "float16",
            CacheDtype::BF16 => "bfloat16",
        }
    }

    pub fn from_torch_name(name: &str) -> Option<Self> {
        CacheDtype::ALL.into_iter().find(|d| d.torch_name() == name)
    }

    pub fn size_bytes(self) -> usize {
        match self {
            CacheDtype::F32 => 4,
            CacheDtype::F16 | CacheDtype::BF16 => 2,
        }
    }

    /// Little-endian bytes to `f32`. Borrows when F32 data happens to be
    /// aligned (an unpadded Go header leaves it unaligned, so this copies then).
    /// `bytes.len()` must be a multiple of `size_bytes()`.
    pub fn to_f32(self, bytes: &[u8]) -> Cow<'_, [f32]> {
        match self {
            CacheDtype::F32 => match bytemuck::try_cast_slice::<u8, f32>(bytes) {
                Ok(values) => Cow::Borrowed(values),
                Err(_) => {
                    let mut values = vec![0f32; bytes.len() / 4];
                    bytemuck::cast_slice_mut::<f32, u8>(&mut values).copy_from_slice(bytes);
                    Cow::Owned(values)
                }
            },
            CacheDtype::F16 => Cow::Owned(halves_to_f32::<f16>(bytes)),
            CacheDtype::BF16 => Cow::Owned(halves_to_f32::<bf16>(bytes)),
        }
    }

    /// Little-endian bytes to `f32` into `out` (`bytes.len() / size_bytes()` long).
    pub fn to_f32_into(self, bytes: &[u8], out: &mut [f32]) {
        match self {
            CacheDtype::F32 => bytemuck::cast_slice_mut::<f32, u8>(out).copy_from_slice(bytes),
            CacheDtype::F16 => halves_into_f32::<f16>(bytes, out),
            CacheDtype::BF16 => halves_into_f32::<bf16>(bytes, out),
        }
    }

    /// Index of the first NaN or infinity among the little-endian values in
    /// `bytes` (a multiple of `size_bytes()` long), checked on the stored
    /// bits: a reader that uploads the bytes as they are needs no `f32` copy.
    pub fn first_non_finite(self, bytes: &[u8]) -> Option<usize> {
        let halves = |exponent: u16| {
            let is_special = |bits: u16| bits & exponent == exponent;
            match bytemuck::try_cast_slice::<u8, u16>(bytes) {
                Ok(bits) => first_matching(bits, |&b| is_special(u16::from_le(b))),
                Err(_) => bytes
                    .chunks_exact(2)
                    .position(|pair| is_special(u16::from_le_bytes([pair[0], pair[1]]))),
            }
        };
        match self {
            CacheDtype::F32 => first_non_finite(&self.to_f32(bytes)),
            CacheDtype::F16 => halves(0x7C00),
            CacheDtype::BF16 => halves(0x7F80),
        }
    }

    /// Finite `f32` values to little-endian bytes of this dtype: round to
    /// nearest even, saturating at the dtype's largest finite value (a
    /// reconstruction just beyond F16's 65504 must not be restored as infinity).
    pub fn from_f32(self, values: &[f32]) -> Vec<u8> {
        self.try_from_f32(values).unwrap_or_else(|_| {
            std::alloc::handle_alloc_error(
                std::alloc::Layout::array::<u8>(values.len() * self.size_bytes()).expect("fits"),
            )
        })
    }

    /// [`Self::from_f32`], with the output allocated fallibly.
    pub fn try_from_f32(self, values: &[f32]) -> Result<Vec<u8>, TensorProblem> {
        let mut out = Vec::new();
        self.try_from_f32_into(values, &mut out)?;
        Ok(out)
    }

    /// [`Self::try_from_f32`] into `out`, resized to fit; its old contents
    /// are overwritten, never zeroed first, so one buffer serves tensor after tensor.
    pub fn try_from_f32_into(self, values: &[f32], out: &mut Vec<u8>) -> Result<(), TensorProblem> {
        try_resize_for_overwrite(
            out,
            values.len().saturating_mul(self.size_bytes()),
            "the restored tensor",
        )?;
        let out = out.as_mut_slice();
        match self {
            CacheDtype::F32 => out.copy_from_slice(bytemuck::cast_slice(values)),
            CacheDtype::F16 => f32_to_halves::<f16>(values, out, 0x7C00, f16::MAX.to_bits()),
            CacheDtype::BF16 => f32_to_halves::<bf16>(values, out, 0x7F80, bf16::MAX.to_bits()),
        }
        Ok(())
    }
}

fn halves_to_f32<H: Half>(bytes: &[u8]) -> Vec<f32> {
    let mut out = vec![0f32; bytes.len() / 2];
    halves_into_f32::<H>(bytes, &mut out);
    out
}

fn halves_into_f32<H: Half>(bytes: &[u8], out: &mut [f32]) {
    match bytemuck::try_cast_slice::<u8, H>(bytes) {
        Ok(halves) => H::to_f32s(halves, out),
        Err(_) => {
            let mut halves: Vec<H> = vec![H::zeroed(); bytes.len() / 2];
            bytemuck::cast_slice_mut::<H, u8>(&mut halves).copy_from_slice(bytes);
            H::to_f32s(&halves, out);
        }
    }
}

/// A 16-bit float type's slice conversions, with `half`'s bits.
trait Half: bytemuck::Pod {
    fn to_f32s(halves: &[Self], out: &mut [f32]);
    fn from_f32s(values: &[f32], out: &mut [Self]);
}

impl Half for f16 {
    fn to_f32s(halves: &[Self], out: &mut [f32]) {
        halves.convert_to_f32_slice(out);
    }

    fn from_f32s(values: &[f32], out: &mut [Self]) {
        out.convert_from_f32_slice(values);
    }
}

impl Half for bf16 {
    fn to_f32s(halves: &[Self], out: &mut [f32]) {
        bf16_to_f32s(bytemuck::cast_slice(halves), out);
    }

    fn from_f32s(values: &[f32], out: &mut [Self]) {
        bf16_from_f32s(values, bytemuck::cast_slice_mut(out));
    }
}

crate::simd::multiversion!(fn bf16_to_f32s / bf16_to_f32s_at(
    halves: &[u16], out: &mut [f32]) => bf16_to_f32s_generic);

/// `bf16::to_f32` of each value: the bits shifted up, a NaN made quiet.
#[inline(always)]
fn bf16_to_f32s_generic(halves: &[u16], out: &mut [f32]) {
    assert_eq!(halves.len(), out.len(), "a value per half");
    for (out, &half) in out.iter_mut().zip(halves) {
        let quiet = if half & 0x7FFF > 0x7F80 { 0x0040 } else { 0 };
        *out = f32::from_bits(u32::from(half | quiet) << 16);
    }
}

crate::simd::multiversion!(fn bf16_from_f32s / bf16_from_f32s_at(
    values: &[f32], out: &mut [u16]) => bf16_from_f32s_generic);

/// `bf16::from_f32` of each value: round to nearest even (up when the
/// dropped half is above a tie, or a tie above an odd value), a NaN kept
/// and made quiet. Written as selects so that every level vectorizes it.
#[inline(always)]
fn bf16_from_f32s_generic(values: &[f32], out: &mut [u16]) {
    assert_eq!(values.len(), out.len(), "a half per value");
    for (out, &value) in out.iter_mut().zip(values) {
        let bits = value.to_bits();
        let high = (bits >> 16) as u16;
        let is_nan = bits & 0x7FFF_FFFF > 0x7F80_0000;
        let round_up = bits & 0x8000 != 0 && bits & 0x17FFF != 0;
        let rounded = high.wrapping_add(u16::from(round_up));
        *out = if is_nan { high | 0x0040 } else { rounded };
    }
}

/// Converts into `out` (2 bytes per value), replacing any ±infinity
/// (magnitude bits == `infinity_bits`) with ±`max_bits`. Works a chunk at a
/// time through a stack buffer, with a branch-free count per chunk so the
/// common case (nothing to fix) stays vectorized.
fn f32_to_halves<H: Half>(values: &[f32], out: &mut [u8], infinity_bits: u16, max_bits: u16) {
    const CHUNK: usize = 4096;
    // Straight into `out` when it is aligned for halves (it comes from the
    // allocator, so it is), else through a stack buffer.
    if let Ok(direct) = bytemuck::try_cast_slice_mut::<u8, H>(out) {
        for (values, halves) in values.chunks(CHUNK).zip(direct.chunks_mut(CHUNK)) {
            halves_saturated(values, halves, infinity_bits, max_bits);
        }
        return;
    }
    let mut buffer = [H::zeroed(); CHUNK];
    for (values, out) in values.chunks(CHUNK).zip(out.chunks_mut(2 * CHUNK)) {
        let halves = &mut buffer[..values.len()];
        halves_saturated(values, halves, infinity_bits, max_bits);
        out.copy_from_slice(bytemuck::cast_slice(halves));
    }
}

/// One chunk of [`f32_to_halves`]: convert, then replace any ±infinity.
fn halves_saturated<H: Half>(values: &[f32], halves: &mut [H], infinity_bits: u16, max_bits: u16) {
    const MAGNITUDE_MASK: u16 = 0x7FFF;
    const SIGN: u16 = 0x8000;
    H::from_f32s(values, halves);
    let bits: &mut [u16] = bytemuck::cast_slice_mut(halves);
    let infinities: u32 = bits
        .iter()
        .map(|&b| u32::from(b & MAGNITUDE_MASK == infinity_bits))
        .sum();
    if infinities > 0 {
        for b in bits
            .iter_mut()
            .filter(|b| **b & MAGNITUDE_MASK == infinity_bits)
        {
            *b = (*b & SIGN) | max_bits;
        }
    }
}

/// Index of the first of `values` that `matches`. Chunks are scanned with a
/// branch-free count, which vectorizes where an early-exit search would
/// not; only a chunk that holds one is searched.
/// Index of the first NaN or infinity (all exponent bits set) among `values`:
/// large slices are scanned in parallel chunks, each by [`first_matching`]'s
/// vectorizable scan. The one check of decoded and reconstructed values.
pub(crate) fn first_non_finite(values: &[f32]) -> Option<usize> {
    const EXPONENT_MASK: u32 = 0x7f80_0000;
    const PARALLEL_CHUNK: usize = 1 << 16;
    let is_special = |v: &f32| v.to_bits() & EXPONENT_MASK == EXPONENT_MASK;
    values
        .par_chunks(PARALLEL_CHUNK)
        .enumerate()
        .find_map_first(|(chunk_index, chunk)| {
            first_matching(chunk, is_special).map(|offset| chunk_index * PARALLEL_CHUNK + offset)
        })
}

pub(crate) fn first_matching<T>(values: &[T], matches: impl Fn(&T) -> bool) -> Option<usize> {
    const CHUNK: usize = 4096;
    values
        .chunks(CHUNK)
        .enumerate()
        .find_map(|(chunk_index, chunk)| {
            let found = chunk.iter().map(|v| u32::from(matches(v))).sum::<u32>();
            (found > 0).then(|| {
                chunk_index * CHUNK + chunk.iter().position(&matches).expect("counted one")
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_non_finite_value_is_the_first_across_parallel_chunks() {
        let mut values = vec![-0.0f32; 300_000];
        assert_eq!(first_non_finite(&values), None);
        values[250_000] = f32::NAN;
        values[140_000] = f32::INFINITY;
        assert_eq!(first_non_finite(&values), Some(140_000));
        values[65_535] = f32::NEG_INFINITY;
        assert_eq!(first_non_finite(&values), Some(65_535));
        values[3] = f32::MAX;
        assert_eq!(
            first_non_finite(&values),
            Some(65_535),
            "f32::MAX is finite"
        );
    }

    #[test]
    fn the_first_non_finite_value_is_found_on_the_stored_bits() {
        let mut values = vec![1.5f32; 9000];
        for dtype in CacheDtype::ALL {
            assert_eq!(
                dtype.first_non_finite(&dtype.from_f32(&values)),
                None,
                "{dtype:?}"
            );
        }
        values[8191] = f32::NEG_INFINITY;
        values[8500] = f32::NAN;
        for dtype in CacheDtype::ALL {
            // from_f32 saturates infinities; the raw bits are what a file holds.
            let mut bytes = dtype.from_f32(&values);
            let size = dtype.size_bytes();
            let infinity: &[u8] = match dtype {
                CacheDtype::F32 => &[0x00, 0x00, 0x80, 0xFF],
                CacheDtype::F16 => &[0x00, 0xFC],
                CacheDtype::BF16 => &[0x80, 0xFF],
            };
            bytes[8191 * size..8192 * size].copy_from_slice(infinity);
            assert_eq!(dtype.first_non_finite(&bytes), Some(8191), "{dtype:?}");
            // Unaligned bytes take the bytewise path to the same answer.
            let mut shifted = vec![0u8];
            shifted.extend_from_slice(&bytes);
            assert_eq!(
                dtype.first_non_finite(&shifted[1..]),
                Some(8191),
                "{dtype:?}"
            );
        }
    }

    #[test]
    fn bf16_kernels_give_halfs_bits_at_every_simd_level() {
        // Every bf16, NaNs and infinities among them.
        let halves: Vec<u16> = (0..=u16::MAX).collect();
        let expected: Vec<u32> = halves
            .iter()
            .map(|&h| bf16::from_bits(h).to_f32().to_bits())
            .collect();
        // f32s around every rounding case: ties, just above and below, odd
        // and even kept halves, NaN payloads, both signs, infinities.
        let mut values: Vec<u32> = (0..u32::MAX / 65_537)
            .map(|i| i.wrapping_mul(65_537 * 3 + 2))
            .collect();
        for high in [
            0u32, 1, 2, 0x3F80, 0x3F81, 0x7F7F, 0x7F80, 0x7F81, 0x7FC0, 0xFF80, 0xFFFF,
        ] {
            for low in [0u32, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF] {
                values.push(high << 16 | low);
            }
        }
        let values: Vec<f32> = values.into_iter().map(f32::from_bits).collect();
        let expected_halves: Vec<u16> = values
            .iter()
            .map(|&v| bf16::from_f32(v).to_bits())
            .collect();
        for level in crate::simd::Level::available() {
            let mut got = vec![0f32; halves.len()];
            bf16_to_f32s_at(level, &halves, &mut got);
            let got: Vec<u32> = got.iter().map(|v| v.to_bits()).collect();
            assert!(got == expected, "bf16 to f32 at {level:?}");
            let mut got = vec![0u16; values.len()];
            bf16_from_f32s_at(level, &values, &mut got);
            assert!(got == expected_halves, "f32 to bf16 at {level:?}");
        }
    }

    #[test]
    fn f16_bytes_convert_to_exact_values() {
        // 1.0 = 0x3C00, -2.0 = 0xC000, 0.5 = 0x3800 (IEEE 754 binary16).
        let bytes = [0x00, 0x3C, 0x00, 0xC0, 0x00, 0x38];
        assert_eq!(&*CacheDtype::F16.to_f32(&bytes), &[1.0, -2.0, 0.5]);
        assert_eq!(CacheDtype::F16.from_f32(&[1.0, -2.0, 0.5]), bytes);
    }

    #[test]
    fn bf16_bytes_convert_to_exact_values() {
        // bf16 is the top half of the f32: 1.0 = 0x3F80, -3.0 = 0xC040.
        let bytes = [0x80, 0x3F, 0x40, 0xC0];
        assert_eq!(&*CacheDtype::BF16.to_f32(&bytes), &[1.0, -3.0]);
        assert_eq!(CacheDtype::BF16.from_f32(&[1.0, -3.0]), bytes);
    }

    #[test]
    fn unaligned_f32_bytes_are_copied_not_misread() {
        let mut buffer = [0u8; 9];
        buffer[1..5].copy_from_slice(&1.5f32.to_le_bytes());
        buffer[5..9].copy_from_slice(&(-7.25f32).to_le_bytes());
        assert_eq!(&*CacheDtype::F32.to_f32(&buffer[1..]), &[1.5, -7.25]);
    }

    #[test]
    fn an_unaligned_output_gets_the_same_halves() {
        let values: Vec<f32> = (0..10_000).map(|i| (i as f32 - 5000.0) * 17.25).collect();
        let aligned = CacheDtype::F16.from_f32(&values);
        let mut storage = vec![0u8; aligned.len() + 1];
        let unaligned = &mut storage[1..];
        assert!(
            bytemuck::try_cast_slice_mut::<u8, f16>(unaligned).is_err(),
            "the test needs an odd address"
        );
        f32_to_halves::<f16>(&values, unaligned, 0x7C00, f16::MAX.to_bits());
        assert_eq!(unaligned, &aligned[..]);
        assert_eq!(
            f16::from_le_bytes([aligned[0], aligned[1]]),
            f16::from_f32(-65504.0),
            "saturated"
        );
    }

    #[test]
    fn conversion_saturates_instead_of_overflowing_to_infinity() {
        // 65520 rounds to F16 infinity; 3.4e38 rounds to BF16 infinity.
        assert_eq!(
            &*CacheDtype::F16.to_f32(&CacheDtype::F16.from_f32(&[65520.0, -65520.0, 1.0])),
            &[65504.0, -65504.0, 1.0]
        );
        let bf16_max = bf16::MAX.to_f32();
        assert_eq!(
            &*CacheDtype::BF16.to_f32(&CacheDtype::BF16.from_f32(&[f32::MAX, -f32::MAX])),
            &[bf16_max, -bf16_max]
        );
    }

    #[test]
    fn torch_names_round_trip() {
        for dtype in CacheDtype::ALL {
            assert_eq!(CacheDtype::from_torch_name(dtype.torch_name()), Some(dtype));
        }
        assert_eq!(CacheDtype::from_torch_name("float64"), None);
    }
}
