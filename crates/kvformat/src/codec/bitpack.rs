//! Dense packing of unsigned b-bit codes (b in 1..=8; the codec uses 2, 3, 4, 5, 6, 8).
//!
//! Code `i` occupies stream bits `[i*b, (i+1)*b)`, and stream bit `k` is bit
//! `k % 8` of byte `k / 8`: for 4 bits the first code is the low nibble, and
//! 3-bit codes fill 8 values into 3 bytes. Unused trailing bits are zero.

use rayon::prelude::*;

/// Codes per parallel work item: a multiple of 8, so every chunk starts on a
/// byte boundary whatever the bit width.
const CODES_PER_CHUNK: usize = 8 * 8192;

/// Bytes that `count` codes of `bits` bits occupy, `None` on overflow.
pub fn packed_len(count: usize, bits: u8) -> Option<usize> {
    count
        .checked_mul(usize::from(bits))
        .map(|total_bits| total_bits.div_ceil(8))
}

/// Packs `codes` (each `< 2^bits`) into `out`, which must be exactly
/// `packed_len(codes.len(), bits)` bytes.
pub fn pack(codes: &[u8], bits: u8, out: &mut [u8]) {
    assert_eq!(Some(out.len()), packed_len(codes.len(), bits));
    let bytes_per_chunk = CODES_PER_CHUNK / 8 * usize::from(bits);
    out.par_chunks_mut(bytes_per_chunk)
        .zip(codes.par_chunks(CODES_PER_CHUNK))
        .for_each(|(out, codes)| pack_chunk(codes, bits, out));
}

crate::simd::multiversion!(fn pack_chunk / pack_chunk_at(
    codes: &[u8], bits: u8, out: &mut [u8]) => pack_serial);

crate::simd::multiversion!(fn unpack_chunk / unpack_chunk_at(
    packed: &[u8], bits: u8, out: &mut [u8]) => unpack_serial);

/// Unpacks `out.len()` codes from `packed`, which must be exactly
/// `packed_len(out.len(), bits)` bytes.
pub fn unpack(packed: &[u8], bits: u8, out: &mut [u8]) {
    assert_eq!(Some(packed.len()), packed_len(out.len(), bits));
    let bytes_per_chunk = CODES_PER_CHUNK / 8 * usize::from(bits);
    out.par_chunks_mut(CODES_PER_CHUNK)
        .zip(packed.par_chunks(bytes_per_chunk))
        .for_each(|(out, packed)| unpack_chunk(packed, bits, out));
}

/// [`pack`] on the calling thread, for callers that parallelize themselves.
/// Inlined so that the callers' SIMD levels (`crate::simd`) apply to it.
#[inline(always)]
pub fn pack_serial(codes: &[u8], bits: u8, out: &mut [u8]) {
    match bits {
        8 => out.copy_from_slice(codes),
        4 => pack_nibbles(codes, out),
        _ => pack_bitwise(codes, bits, out),
    }
}

/// Values a nibble loop takes at a time: fixed-size arrays, so it vectorizes.
const NIBBLE_CHUNK: usize = 32;

/// Two 4-bit codes per byte, the first in the low nibble. A pair read as a
/// little-endian u16 `c0 | c1 << 8` gives the byte as `w | w >> 4` (low 8 bits).
#[inline(always)]
fn pack_nibbles(codes: &[u8], out: &mut [u8]) {
    let chunks = codes.chunks_exact(NIBBLE_CHUNK);
    let tail = chunks.remainder();
    let (out_bulk, out_tail) = out.split_at_mut(codes.len() / NIBBLE_CHUNK * (NIBBLE_CHUNK / 2));
    for (chunk, bytes) in chunks.zip(out_bulk.chunks_exact_mut(NIBBLE_CHUNK / 2)) {
        let chunk: &[u8; NIBBLE_CHUNK] = chunk.try_into().expect("chunks_exact");
        for (i, byte) in bytes.iter_mut().enumerate() {
            let pair = u16::from_le_bytes([chunk[2 * i], chunk[2 * i + 1]]);
            *byte = (pair | (pair >> 4)) as u8;
        }
    }
    let pairs = tail.chunks_exact(2);
    if let [last] = pairs.remainder() {
        out_tail[tail.len() / 2] = *last;
    }
    for (byte, pair) in out_tail.iter_mut().zip(pairs) {
        *byte = pair[0] | (pair[1] << 4);
    }
}

/// [`unpack`] on the calling thread, for callers that parallelize themselves.
/// Inlined so that the callers' SIMD levels (`crate::simd`) apply to it.
#[inline(always)]
pub fn unpack_serial(packed: &[u8], bits: u8, out: &mut [u8]) {
    match bits {
        8 => out.copy_from_slice(packed),
        4 => unpack_nibbles(packed, out),
        _ => unpack_bitwise(packed, bits, out),
    }
}

/// [`pack_nibbles`] undone, a fixed-size chunk at a time.
#[inline(always)]
fn unpack_nibbles(packed: &[u8], out: &mut [u8]) {
    let bulk = out.len() / NIBBLE_CHUNK;
    let (out_bulk, out_tail) = out.split_at_mut(bulk * NIBBLE_CHUNK);
    let (packed_bulk, packed_tail) = packed.split_at(bulk * (NIBBLE_CHUNK / 2));
    for (codes, bytes) in out_bulk
        .chunks_exact_mut(NIBBLE_CHUNK)
        .zip(packed_bulk.chunks_exact(NIBBLE_CHUNK / 2))
    {
        let bytes: &[u8; NIBBLE_CHUNK / 2] = bytes.try_into().expect("chunks_exact");
        for (i, &byte) in bytes.iter().enumerate() {
            codes[2 * i] = byte & 0x0f;
            codes[2 * i + 1] = byte >> 4;
        }
    }
    let mut pairs = out_tail.chunks_exact_mut(2);
    for (pair, byte) in pairs.by_ref().zip(packed_tail) {
        pair[0] = byte & 0x0f;
        pair[1] = byte >> 4;
    }
    if let [last] = pairs.into_remainder() {
        *last = packed_tail[packed_tail.len() - 1] & 0x0f;
    }
}

/// Any width up to 8 bits through a little-endian bit accumulator.
#[inline(always)]
fn pack_bitwise(codes: &[u8], bits: u8, out: &mut [u8]) {
    let mut accumulator: u32 = 0;
    let mut pending_bits = 0u32;
    let mut position = 0;
    for &code in codes {
        accumulator |= u32::from(code) << pending_bits;
        pending_bits += u32::from(bits);
        while pending_bits >= 8 {
            out[position] = accumulator as u8;
            position += 1;
            accumulator >>= 8;
            pending_bits -= 8;
        }
    }
    if pending_bits > 0 {
        out[position] = accumulator as u8;
    }
}

#[inline(always)]
fn unpack_bitwise(packed: &[u8], bits: u8, out: &mut [u8]) {
    let mask = (1u32 << bits) - 1;
    let mut accumulator: u32 = 0;
    let mut pending_bits = 0u32;
    let mut bytes = packed.iter();
    for code in out.iter_mut() {
        if pending_bits < u32::from(bits) {
            // `packed` holds exactly enough bytes for `out`, so this never runs dry.
            let byte = bytes.next().copied().unwrap_or(0);
            accumulator |= u32::from(byte) << pending_bits;
            pending_bits += 8;
        }
        *code = (accumulator & mask) as u8;
        accumulator >>= bits;
        pending_bits -= u32::from(bits);
    }
}

/// `codes` packed at `bits` bits each into a fresh buffer.
pub(crate) fn packed(codes: &[u8], bits: u8) -> Vec<u8> {
    let mut packed = vec![
        0u8;
        packed_len(codes.len(), bits)
            .expect("length fits: checked by layout::Sections::new")
    ];
    pack(codes, bits, &mut packed);
    packed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(codes: &[u8], bits: u8) -> Vec<u8> {
        let mut packed = vec![0u8; packed_len(codes.len(), bits).unwrap()];
        pack(codes, bits, &mut packed);
        let mut unpacked = vec![0u8; codes.len()];
        unpack(&packed, bits, &mut unpacked);
        assert_eq!(unpacked, codes, "round trip at {bits} bits");
        packed
    }

    #[test]
    fn three_bit_codes_fill_eight_values_into_three_bytes() {
        // Codes 0..8 as bits, LSB first: 000 100 010 110 001 101 011 111
        // (each code written LSB first). Stream bits 0..24:
        // byte 0 = bits 0..8  = v0 | v1<<3 | (v2&3)<<6 = 0 | 8 | (2<<6) = 0x88
        // byte 1 = v2>>2 | v3<<1 | v4<<4 | (v5&1)<<7 = 0 | 6 | 64 | 128 = 0xC6
        // byte 2 = v5>>1 | v6<<2 | v7<<5 = 2 | 24 | 224 = 0xFA
        let packed = round_trip(&[0, 1, 2, 3, 4, 5, 6, 7], 3);
        assert_eq!(packed, [0x88, 0xC6, 0xFA]);
    }

    #[test]
    fn four_bit_first_code_is_low_nibble_and_odd_tail_is_padded() {
        let packed = round_trip(&[0x1, 0xF, 0x7], 4);
        assert_eq!(packed, [0xF1, 0x07]);
    }

    #[test]
    fn nibble_chunks_agree_with_the_bit_accumulator_at_every_length() {
        for len in 0..100usize {
            let codes: Vec<u8> = (0..len).map(|i| ((i * 7 + len) % 16) as u8).collect();
            let packed_len = packed_len(len, 4).unwrap();
            let (mut fast, mut reference) = (vec![0xAA; packed_len], vec![0; packed_len]);
            pack_nibbles(&codes, &mut fast);
            pack_bitwise(&codes, 4, &mut reference);
            assert_eq!(fast, reference, "{len} codes");
            let mut unpacked = vec![0xAA; len];
            unpack_nibbles(&fast, &mut unpacked);
            assert_eq!(unpacked, codes, "{len} codes");
        }
    }

    #[test]
    fn two_bit_codes_pack_four_per_byte() {
        // 3 | 0<<2 | 2<<4 | 1<<6 = 3 + 32 + 64 = 0x63; then 2.
        let packed = round_trip(&[3, 0, 2, 1, 2], 2);
        assert_eq!(packed, [0x63, 0x02]);
    }

    #[test]
    fn eight_bit_codes_are_stored_as_is() {
        assert_eq!(round_trip(&[0, 255, 128], 8), [0, 255, 128]);
    }

    #[test]
    fn every_simd_level_packs_as_the_bit_accumulator() {
        for bits in 1u8..=8 {
            for count in [0, 1, 31, 32, 33, 1000] {
                let codes: Vec<u8> = (0..count)
                    .map(|i| ((i * 2654435761usize) >> 9) as u8 & ((1u16 << bits) - 1) as u8)
                    .collect();
                let len = packed_len(count, bits).unwrap();
                let mut expected = vec![0u8; len];
                pack_bitwise(&codes, bits, &mut expected);
                for level in crate::simd::Level::available() {
                    let mut packed = vec![0u8; len];
                    pack_chunk_at(level, &codes, bits, &mut packed);
                    assert_eq!(packed, expected, "{bits} bits, {count} codes at {level:?}");
                    let mut unpacked = vec![0u8; count];
                    unpack_chunk_at(level, &packed, bits, &mut unpacked);
                    assert_eq!(unpacked, codes, "{bits} bits, {count} codes at {level:?}");
                }
            }
        }
    }

    #[test]
    fn every_width_round_trips_across_parallel_chunk_boundaries() {
        for bits in [2u8, 3, 4, 8] {
            let count = CODES_PER_CHUNK * 2 + 13;
            let codes: Vec<u8> = (0..count)
                .map(|i| ((i * 2654435761usize) >> 7) as u8 & ((1u16 << bits) - 1) as u8)
                .collect();
            let packed = round_trip(&codes, bits);
            assert_eq!(packed.len(), (count * bits as usize).div_ceil(8));
        }
    }
}
