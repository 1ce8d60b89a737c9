//! Lossless coding of integer codes in fewer bits than their fixed width:
//! an adaptive binary range coder (LZMA's carry-propagating coder, with
//! 12-bit probabilities) and the binarization of a signed integer into
//! modelled decisions. Every operation is integer arithmetic, so the numpy
//! reference (`python/kvformat/codec.py`) reproduces it bit for bit; the
//! format is in docs/format.md ("Range-coded codes"). Format 1 wrote it;
//! format 2 writes `rans`, and this is kept to read format-1 files.

use super::CodecError;

/// Precision of a decision's probability.
const PROB_BITS: u32 = 12;
/// The range is renormalized (a byte shifted out) whenever it drops below this.
const TOP: u32 = 1 << 24;
/// A model's counts are halved when they reach this total, so it keeps
/// following a drifting source and its counts fit 16 bits.
const COUNT_LIMIT: u32 = 1024;

/// `ceil(2^40 / (2 seen + 2))` for every count a model can hold (`seen <
/// COUNT_LIMIT`). With numerators below 2^23 and divisors at most 2^11,
/// `(n * r) >> 40` is exactly `n / d`: the rounding up adds less than
/// `n / 2^40 < 1 / d` to `n / d`, which cannot reach the next integer.
static RECIPROCALS: [u64; COUNT_LIMIT as usize] = {
    let mut table = [0u64; COUNT_LIMIT as usize];
    let mut seen = 0;
    while seen < table.len() {
        let divisor = 2 * seen as u64 + 2;
        table[seen] = (1u64 << RECIPROCAL_SHIFT).div_ceil(divisor);
        seen += 1;
    }
    table
};
const RECIPROCAL_SHIFT: u32 = 40;

/// One binary decision's adaptive model: counts of zeros and ones seen, and
/// the Krichevsky-Trofimov estimate `P(0) = (zeros + 1/2) / (seen + 1)`,
/// the minimax estimate for a memoryless source.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct BitModel {
    zeros: u16,
    ones: u16,
}

impl BitModel {
    /// `P(0)` in units of 2^-12, in `[1, 4095]`:
    /// `((2 zeros + 1) << 12) / (2 seen + 2)`, the division done as a
    /// multiplication by [`RECIPROCALS`] (a division per decision was most
    /// of the coder's time; the quotient is the same, see the tests).
    #[inline(always)]
    fn p_zero(self) -> u32 {
        let zeros = u64::from(self.zeros);
        let seen = usize::from(self.zeros) + usize::from(self.ones);
        let quotient = (((2 * zeros + 1) << PROB_BITS) * RECIPROCALS[seen]) >> RECIPROCAL_SHIFT;
        (quotient as u32).clamp(1, (1 << PROB_BITS) - 1)
    }

    #[inline(always)]
    fn update(&mut self, bit: bool) {
        self.ones += u16::from(bit);
        self.zeros += u16::from(!bit);
        if u32::from(self.zeros) + u32::from(self.ones) >= COUNT_LIMIT {
            self.zeros = self.zeros.div_ceil(2);
            self.ones = self.ones.div_ceil(2);
        }
    }
}

/// The encoder (format 1's; format 2 writes rANS, so only the tests that
/// make format-1 sections use it): `low` keeps a carry bit above its 32 bits until the byte it
/// would change (`cache`, followed by `pending` 0xFF bytes) is final.
#[cfg(test)]
pub(crate) struct Encoder {
    low: u64,
    range: u32,
    cache: u8,
    /// Bytes not yet written: `cache` and the 0xFF bytes after it.
    pending: u64,
    out: Vec<u8>,
    /// LZMA's first byte is always 0; it is not written.
    first: bool,
}

#[cfg(test)]
impl Encoder {
    pub fn new() -> Self {
        Encoder {
            low: 0,
            range: u32::MAX,
            cache: 0,
            pending: 1,
            out: Vec::new(),
            first: true,
        }
    }

    #[inline]
    pub fn encode(&mut self, model: &mut BitModel, bit: bool) {
        let bound = (self.range >> PROB_BITS) * model.p_zero();
        // Selects, not branches: the bits of a source worth coding are
        // unpredictable, and a mispredicted branch per decision was the
        // coder's largest cost.
        let taken = u32::from(bit).wrapping_neg();
        self.low += u64::from(bound & taken);
        self.range = (self.range.wrapping_sub(bound) & taken) | (bound & !taken);
        model.update(bit);
        while self.range < TOP {
            self.range <<= 8;
            self.shift_low();
        }
    }

    fn shift_low(&mut self) {
        if self.low < 0xFF00_0000 || self.low >= 1 << 32 {
            let carry = (self.low >> 32) as u8;
            let mut byte = self.cache;
            loop {
                if self.first {
                    self.first = false;
                } else {
                    self.out.push(byte.wrapping_add(carry));
                }
                byte = 0xFF;
                self.pending -= 1;
                if self.pending == 0 {
                    break;
                }
            }
            self.cache = (self.low >> 24) as u8;
        }
        self.pending += 1;
        self.low = (self.low & 0x00FF_FFFF) << 8;
    }

    /// The coded bytes: exactly as many as the decoder reads.
    pub fn finish(mut self) -> Vec<u8> {
        for _ in 0..5 {
            self.shift_low();
        }
        self.out
    }
}

/// The decoder over one coded section; [`Decoder::finish`] checks that the
/// decisions read used the section exactly.
pub(crate) struct Decoder<'a> {
    bytes: &'a [u8],
    position: usize,
    range: u32,
    code: u32,
}

const ENDS_EARLY: CodecError = CodecError::CorruptPayload("entropy-coded codes end early");

impl<'a> Decoder<'a> {
    pub fn new(bytes: &'a [u8]) -> Result<Self, CodecError> {
        let head: [u8; 4] = bytes
            .get(..4)
            .ok_or(ENDS_EARLY)?
            .try_into()
            .expect("4 bytes");
        Ok(Decoder {
            bytes,
            position: 4,
            range: u32::MAX,
            code: u32::from_be_bytes(head),
        })
    }

    #[inline]
    pub fn decode(&mut self, model: &mut BitModel) -> Result<bool, CodecError> {
        let bound = (self.range >> PROB_BITS) * model.p_zero();
        let bit = self.code >= bound;
        if bit {
            self.code -= bound;
            self.range -= bound;
        } else {
            self.range = bound;
        }
        model.update(bit);
        while self.range < TOP {
            let byte = *self.bytes.get(self.position).ok_or(ENDS_EARLY)?;
            self.position += 1;
            self.range <<= 8;
            self.code = (self.code << 8) | u32::from(byte);
        }
        Ok(bit)
    }

    pub fn finish(self) -> Result<(), CodecError> {
        if self.position == self.bytes.len() {
            Ok(())
        } else {
            Err(CodecError::CorruptPayload(
                "entropy-coded codes have trailing bytes",
            ))
        }
    }
}

/// Contexts of a magnitude's bucket (its bit length) beyond which buckets share one.
const BUCKET_CONTEXTS: usize = 16;
/// Largest bucket: `|q| < 2^30`, so every code and its negation fit i32.
pub(crate) const MAX_BUCKET: u32 = 29;

/// The models of one stream of signed integers (one group's codes). A
/// value `q` is coded as: `q != 0`; its sign; the bucket `e = floor(log2 |q|)`
/// in unary (a 1 per step, then a 0); the `e` bits of `|q|` below its
/// leading one, high to low, the first two through a bit tree per bucket
/// (where a bell-shaped source's slope is), the rest through one model.
#[derive(Clone, Debug, Default)]
pub(crate) struct IntegerModel {
    nonzero: BitModel,
    negative: BitModel,
    bucket: [BitModel; BUCKET_CONTEXTS],
    /// Node 1: the first bit below the leading one; nodes 2, 3: the second,
    /// after a 0 or a 1.
    top_bits: [[BitModel; 4]; BUCKET_CONTEXTS],
    low_bits: BitModel,
}

impl IntegerModel {
    /// Codes `q`, `|q| < 2^30`.
    #[cfg(test)]
    pub fn encode(&mut self, coder: &mut Encoder, q: i32) {
        coder.encode(&mut self.nonzero, q != 0);
        if q == 0 {
            return;
        }
        coder.encode(&mut self.negative, q < 0);
        let magnitude = q.unsigned_abs();
        let bucket = 31 - magnitude.leading_zeros();
        debug_assert!(bucket <= MAX_BUCKET, "|q| < 2^30");
        for step in 0..=bucket {
            coder.encode(&mut self.bucket[context(step)], step < bucket);
        }
        let top = &mut self.top_bits[context(bucket)];
        let mut node = 1;
        for (depth, position) in (0..bucket).rev().enumerate() {
            let bit = (magnitude >> position) & 1 == 1;
            if depth < 2 {
                coder.encode(&mut top[node], bit);
                node = 2 + usize::from(bit);
            } else {
                coder.encode(&mut self.low_bits, bit);
            }
        }
    }

    pub fn decode(&mut self, coder: &mut Decoder<'_>) -> Result<i32, CodecError> {
        if !coder.decode(&mut self.nonzero)? {
            return Ok(0);
        }
        let negative = coder.decode(&mut self.negative)?;
        let mut bucket = 0;
        while coder.decode(&mut self.bucket[context(bucket)])? {
            bucket += 1;
            if bucket > MAX_BUCKET {
                return Err(CodecError::CorruptPayload(
                    "an entropy-coded code is 2^30 or larger",
                ));
            }
        }
        let top = &mut self.top_bits[context(bucket)];
        let mut magnitude = 1u32;
        let mut node = 1;
        for depth in 0..bucket {
            let bit = if depth < 2 {
                let bit = coder.decode(&mut top[node])?;
                node = 2 + usize::from(bit);
                bit
            } else {
                coder.decode(&mut self.low_bits)?
            };
            magnitude = (magnitude << 1) | u32::from(bit);
        }
        let magnitude = magnitude as i32;
        Ok(if negative { -magnitude } else { magnitude })
    }
}

fn context(bucket: u32) -> usize {
    (bucket as usize).min(BUCKET_CONTEXTS - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(values: &[i32], streams: usize) -> usize {
        let mut models = vec![IntegerModel::default(); streams];
        let mut encoder = Encoder::new();
        for (i, &q) in values.iter().enumerate() {
            models[i % streams].encode(&mut encoder, q);
        }
        let bytes = encoder.finish();
        let mut models = vec![IntegerModel::default(); streams];
        let mut decoder = Decoder::new(&bytes).unwrap();
        for (i, &q) in values.iter().enumerate() {
            assert_eq!(
                models[i % streams].decode(&mut decoder).unwrap(),
                q,
                "value {i}"
            );
        }
        decoder.finish().unwrap();
        bytes.len()
    }

    #[test]
    fn the_reciprocal_gives_the_quotient_of_every_reachable_count() {
        for seen in 0..COUNT_LIMIT {
            for zeros in 0..=seen {
                let model = BitModel {
                    zeros: zeros as u16,
                    ones: (seen - zeros) as u16,
                };
                let divided = (((2 * zeros + 1) << PROB_BITS) / (2 * seen + 2))
                    .clamp(1, (1 << PROB_BITS) - 1);
                assert_eq!(model.p_zero(), divided, "zeros {zeros}, seen {seen}");
            }
        }
    }

    #[test]
    fn integers_round_trip_and_use_every_byte() {
        let limit = (1 << 30) - 1;
        let mut values = vec![0, 1, -1, 2, -2, 3, 4, -7, 8, 1000, -65536, limit, -limit];
        let mut state = 0x1234_5678u64;
        for _ in 0..20_000 {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let shift = (state >> 59) as u32; // 0..31
            values.push(((state >> 20) as i32) >> shift.max(2));
        }
        round_trip(&values, 1);
        round_trip(&values, 7);
        round_trip(&[], 1);
        // A long run of 0xFF-producing decisions exercises the carry.
        round_trip(&vec![limit; 5000], 1);
    }

    #[test]
    fn a_bell_shaped_source_costs_close_to_its_entropy() {
        // Codes round(N(0, 1) / step) for step 0.5: entropy ~ 3.05 bits.
        let mut state = 42u64;
        let mut uniform = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        };
        let n = 100_000;
        let values: Vec<i32> = (0..n)
            .map(|_| {
                let (u, v) = (uniform(), uniform());
                let gaussian = (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos();
                (gaussian / 0.5).round() as i32
            })
            .collect();
        let mut counts = std::collections::HashMap::new();
        values
            .iter()
            .for_each(|&q| *counts.entry(q).or_insert(0usize) += 1);
        let entropy: f64 = counts
            .values()
            .map(|&c| {
                let p = c as f64 / n as f64;
                -p * p.log2()
            })
            .sum();
        let bits = 8.0 * round_trip(&values, 1) as f64 / n as f64;
        assert!((entropy - 3.05).abs() < 0.05, "entropy {entropy}");
        assert!(
            bits < entropy * 1.01 + 0.01,
            "{bits} bits against entropy {entropy}"
        );
        assert!(
            bits > entropy * 0.99,
            "{bits} bits cannot beat entropy {entropy}"
        );
    }

    #[test]
    fn truncated_or_padded_streams_are_errors() {
        let values: Vec<i32> = (0..500).map(|i| (i % 11) - 5).collect();
        let mut models = IntegerModel::default();
        let mut encoder = Encoder::new();
        values.iter().for_each(|&q| models.encode(&mut encoder, q));
        let bytes = encoder.finish();
        let decode_all = |bytes: &[u8]| -> Result<(), CodecError> {
            let mut models = IntegerModel::default();
            let mut decoder = Decoder::new(bytes)?;
            for _ in &values {
                models.decode(&mut decoder)?;
            }
            decoder.finish()
        };
        decode_all(&bytes).unwrap();
        assert_eq!(decode_all(&bytes[..bytes.len() - 1]), Err(ENDS_EARLY));
        let mut padded = bytes.clone();
        padded.push(0);
        assert!(decode_all(&padded).is_err());
        assert_eq!(decode_all(&[]).unwrap_err(), ENDS_EARLY);
    }
}
