//! The entropy-coded uniform quantizer (`-grid ecsq`): every value of a
//! tensor is rounded to one uniform step, `q = round((x - mean) / step)`
//! around its group's mean, and the integer codes are entropy coded: rANS
//! with a table per spread class of groups (`rans`, format 2), or, in
//! format-1 files, the adaptive binary range coder (`range_coder`).
//!
//! Why: a fixed-width code spends the same bits on every value, so its
//! grid must span each group's range and it needs a scale per group. With
//! the codes entropy coded, one step for the whole tensor gives every value
//! the same error (`step^2 / 12`, which at a given total rate is what
//! minimizes the squared error), a rare large value costs a few more bits
//! instead of stretching its group's grid, and no scale is stored per group.
//! At high rate this is within 0.25 bits of the rate-distortion bound of a
//! Gaussian source, where the best fixed-width quantizer is about 0.6 bits
//! short of it at 3 bits. The step is set from the rate `r` (the params'
//! `rate`, else `bits`): a Gaussian of the tensor's RMS quantized with
//! `step = rms * sqrt(2 pi e) * 2^-r` has an entropy of about `r` bits.

use half::f16;
use serde::{Deserialize, Serialize};

use super::groups::GroupGeometry;
use super::range_coder::{Decoder, IntegerModel, MAX_BUCKET};
use super::rans::{self, SlotTable, Table};
use super::scales::{GroupParams, ScaleDtype, ZERO_GROUP_SCALE};
use super::CodecError;
use crate::simd::moments;

/// The levels section: the step, little-endian f32.
pub(crate) const LEVELS_LEN: usize = 4;

/// Largest code magnitude (`2^30 - 1`): values further than this many steps
/// from their group's mean are clipped, which the step's tie to the RMS
/// rules out for tensors under 2^32 values (a value is at most `sqrt(n)`
/// RMS from the mean, and the step at rate 16 is RMS / 15,858).
const MAX_CODE: f64 = ((1u64 << (MAX_BUCKET + 1)) - 1) as f64;

/// `sqrt(2 pi e)`: a Gaussian of deviation `s` has differential entropy `log2(s * this)`.
const GAUSSIAN_ENTROPY_SCALE: f64 = 4.132_731_354_464_69;

/// What the step is chosen for.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Target {
    /// The Gaussian estimate for this many bits per value, in one pass.
    Gaussian(f64),
    /// The largest stored size within this many bits for the whole payload,
    /// of which `fixed_bits` (kept tokens) are not ecsq's.
    PayloadBits { budget: f64, fixed_bits: f64 },
}

/// A tensor's ecsq parameters: every group's stored mean (its offset; no
/// scales), the step, and what was coded with that step.
pub(crate) struct Choice {
    pub params: GroupParams,
    pub step: f32,
    pub coded: Coded,
}

/// Every value's code at a step, and the codes section made of them (the
/// codes are kept for the encoder's reconstruction).
pub(crate) struct Coded {
    pub codes: Vec<i32>,
    pub section: Vec<u8>,
}

/// Passes of the rate search: each prices the tensor's codes at one step.
const RATE_PASSES: usize = 8;

/// Codes at one step and what they would cost.
struct Priced {
    step: f32,
    codes: Vec<i32>,
    model: Model,
}

impl Priced {
    fn at(
        step: f32,
        params: &GroupParams,
        grouped: &[f32],
        geometry: &GroupGeometry,
        reuse: Vec<i32>,
    ) -> Self {
        let (codes, statistics) = tensor_codes(params, step, grouped, geometry, reuse);
        let model = Model::of(&statistics);
        Priced { step, codes, model }
    }

    fn coded(self, geometry: &GroupGeometry) -> (f32, Coded) {
        let section = encode_section(&self.codes, geometry, &self.model);
        (
            self.step,
            Coded {
                codes: self.codes,
                section,
            },
        )
    }
}

/// Chooses a tensor's means and step for `target` from its values in
/// group order, and codes them.
pub(crate) fn choose(target: Target, grouped: &[f32], geometry: &GroupGeometry) -> Choice {
    let means: Vec<f64> = (0..geometry.group_count())
        .map(|group| {
            let values = &grouped[geometry.range(group)];
            if values.is_empty() {
                0.0
            } else {
                moments(values, 0.0).0 / values.len() as f64
            }
        })
        .collect();
    let fits_f16 = means.iter().all(|&mean| f16::from_f64(mean).is_finite());
    let (dtype, offsets): (ScaleDtype, Vec<f32>) = if fits_f16 {
        let offsets = means.iter().map(|&m| f16::from_f64(m).to_f32()).collect();
        (ScaleDtype::F16, offsets)
    } else {
        (ScaleDtype::F32, means.iter().map(|&m| m as f32).collect())
    };
    let group_squares: Vec<f64> = (0..geometry.group_count())
        .map(|group| moments(&grouped[geometry.range(group)], f64::from(offsets[group])).1)
        .collect();
    let squares: f64 = group_squares.iter().sum();
    let params = GroupParams {
        dtype,
        scales: Vec::new(),
        offsets,
    };
    let count = grouped.len().max(1) as f64;
    let mean_square = squares / count;
    let rms = mean_square.sqrt();
    let gaussian_step = |rate: f64| -> f32 {
        // A zero tensor still needs a positive step; a huge one a finite step.
        if rms == 0.0 {
            ZERO_GROUP_SCALE
        } else {
            ((rms * GAUSSIAN_ENTROPY_SCALE * (-rate).exp2()) as f32)
                .clamp(f32::MIN_POSITIVE, f32::MAX)
        }
    };
    let price = |step: f32, reuse: Vec<i32>| Priced::at(step, &params, grouped, geometry, reuse);
    let (budget, fixed_bits) = match target {
        Target::Gaussian(rate) => {
            let (step, coded) = price(gaussian_step(rate), Vec::new()).coded(geometry);
            return Choice {
                params,
                step,
                coded,
            };
        }
        Target::PayloadBits { budget, fixed_bits } => (budget, fixed_bits),
    };
    // Bits for the codes section; its size falls by about one bit per
    // value for each doubling of the step, so each pass corrects the
    // rate it aims at by the last pass's miss. A pass prices the codes
    // with the tables they would get (`Model::bits`), which the coded
    // section matches to within a few bytes; the step found is then
    // coded, and checked.
    let target_bits =
        budget - fixed_bits - 8.0 * (params.offsets.len() * dtype.size_bytes() + LEVELS_LEN) as f64;
    let search = |target_bits: f64| -> Priced {
        // High-rate theory per group: a group of deviation s costs about
        // log2(s sqrt(2 pi e) / step) bits a value, so the tensor's rate
        // follows the groups' geometric mean deviation, not their pooled
        // RMS (which unequal channels pull up): the first pass aims there.
        // Each pass aims at the middle of the sizes that end the search
        // (within 0.002 bits a value under the target), so that a pass a
        // hair over it is rare.
        let goal = target_bits - 0.001 * count;
        let mut aim =
            goal / count + log2_rms_over_geometric_mean(&group_squares, mean_square, geometry);
        let mut best: Option<Priced> = None;
        let mut smallest: Option<Priced> = None;
        let mut spare = Vec::new();
        for _ in 0..RATE_PASSES {
            let priced = price(gaussian_step(aim), std::mem::take(&mut spare));
            let bits = priced.model.bits;
            aim -= (bits - goal) / count;
            let under = bits <= target_bits;
            let slot = if under { &mut best } else { &mut smallest };
            let better = match slot {
                None => true,
                Some(kept) if under => bits > kept.model.bits,
                Some(kept) => bits < kept.model.bits,
            };
            if better {
                if let Some(old) = slot.replace(priced) {
                    spare = old.codes;
                }
            } else {
                spare = priced.codes;
            }
            if best
                .as_ref()
                .is_some_and(|b| target_bits - b.model.bits < 0.002 * count)
            {
                break;
            }
        }
        // Unreachable budgets (kept tokens alone over it) take the smallest size tried.
        best.or(smallest).expect("at least one pass")
    };
    let (mut step, mut coded) = search(target_bits).coded(geometry);
    // The section past its estimate: aim that much lower, then widen the
    // step until it fits (each widening by about 1/1000 of a bit per value).
    let over = 8.0 * coded.section.len() as f64 - target_bits;
    if over > 0.0 {
        (step, coded) = search(target_bits - over).coded(geometry);
        for _ in 0..RATE_PASSES {
            if 8.0 * coded.section.len() as f64 <= target_bits {
                break;
            }
            (step, coded) = price((step * 1.000_7).min(f32::MAX), coded.codes).coded(geometry);
        }
    }
    Choice {
        params,
        step,
        coded,
    }
}

/// `log2(rms / g)`: the tensor's RMS (`mean_square`'s root) over the
/// values' geometric mean of their groups' RMS, each group's mean square
/// floored at 2^-20 of the tensor's (groups far below the step cost about
/// nothing, not negative bits).
fn log2_rms_over_geometric_mean(
    group_squares: &[f64],
    mean_square: f64,
    geometry: &GroupGeometry,
) -> f64 {
    if mean_square == 0.0 || !mean_square.is_finite() {
        return 0.0;
    }
    let floor = mean_square * (-20f64).exp2();
    let (mut count, mut weighted_log) = (0usize, 0.0f64);
    for (group, &squares) in group_squares.iter().enumerate() {
        let len = geometry.range(group).len();
        if len > 0 {
            count += len;
            weighted_log += len as f64 * (squares / len as f64).max(floor).log2();
        }
    }
    0.5 * (mean_square.log2() - weighted_log / count.max(1) as f64)
}

pub(crate) fn write_levels(step: f32, payload: &mut Vec<u8>) {
    payload.extend_from_slice(&step.to_le_bytes());
}

pub(crate) fn read_levels(bytes: &[u8]) -> Result<f32, CodecError> {
    let step =
        f32::from_le_bytes(bytes.try_into().map_err(|_| {
            CodecError::CorruptPayload("the ecsq levels section is not one f32 step")
        })?);
    if step.is_normal() && step > 0.0 {
        Ok(step)
    } else {
        Err(CodecError::CorruptPayload(
            "the ecsq step is not a positive normal number",
        ))
    }
}

/// Every value's code at `step` (see [`group_codes`]), in group order, in
/// `reuse`'s allocation, and their token counts, group by group while the
/// group's codes are in cache.
fn tensor_codes(
    params: &GroupParams,
    step: f32,
    grouped: &[f32],
    geometry: &GroupGeometry,
    mut reuse: Vec<i32>,
) -> (Vec<i32>, Statistics) {
    // The groups cover every value, so a buffer of the right length is
    // overwritten whole: zeroing it first would be a pass for nothing.
    if reuse.len() != grouped.len() {
        reuse.clear();
        reuse.resize(grouped.len(), 0);
    }
    let mut statistics = Statistics::new(geometry.group_count());
    for group in 0..geometry.group_count() {
        let span = geometry.range(group);
        let codes = &mut reuse[span.clone()];
        group_codes(params.offsets[group], step, &grouped[span], codes);
        statistics.add_group(codes);
    }
    (reuse, statistics)
}

/// The codes section of `codes` (format 2, docs/format.md "rANS-coded
/// codes"): the tables, the rANS stream of every value's token, then the
/// extra bits of the large ones.
fn encode_section(codes: &[i32], geometry: &GroupGeometry, model: &Model) -> Vec<u8> {
    let mut symbols = Vec::with_capacity(codes.len());
    let mut extra = BitWriter::default();
    for group in 0..geometry.group_count() {
        let context = (model.context(group) as u16) << 8;
        let codes = &codes[geometry.range(group)];
        // Small codes are their own tokens: one vectorized pass, then the
        // (rare) larger ones in order, with their extra bits.
        let start = symbols.len();
        symbols.extend(codes.iter().map(|&q| context | (zigzag(q) as u16 & 0xFF)));
        if codes.iter().any(|&q| zigzag(q) >= DIRECT_TOKENS) {
            for (symbol, &q) in symbols[start..].iter_mut().zip(codes) {
                let (token, len, bits) = token_of(zigzag(q));
                *symbol = context | u16::from(token);
                extra.write(bits, len);
            }
        }
    }
    let stream = rans::encode(&symbols, &model.tables);
    let mut section = model.header();
    section.extend_from_slice(&(stream.len() as u64).to_le_bytes());
    section.extend_from_slice(&stream);
    section.extend_from_slice(&extra.finish());
    section
}

/// The codes section of every value at `step`, with the codes.
pub(crate) fn encode_codes(
    params: &GroupParams,
    step: f32,
    grouped: &[f32],
    geometry: &GroupGeometry,
) -> Coded {
    Priced::at(step, params, grouped, geometry, Vec::new())
        .coded(geometry)
        .1
}

/// The format-1 codes section (adaptive binary range coding), which format
/// 2 files no longer hold: for the tests of reading format-1 files.
#[cfg(test)]
pub(crate) fn range_coded_codes(codes: &[i32], geometry: &GroupGeometry) -> Vec<u8> {
    let mut coder = super::range_coder::Encoder::new();
    for group in 0..geometry.group_count() {
        let mut model = IntegerModel::default();
        for &q in &codes[geometry.range(group)] {
            model.encode(&mut coder, q);
        }
    }
    coder.finish()
}

/// What [`decode_codes`] makes of a section of `codes`, without coding and
/// decoding it (the encoder's reconstruction).
pub(crate) fn reconstruct(
    params: &GroupParams,
    step: f32,
    codes: &[i32],
    geometry: &GroupGeometry,
    out: &mut [f32],
) -> Result<(), CodecError> {
    for group in 0..geometry.group_count() {
        let span = geometry.range(group);
        group_levels(
            params.offsets[group],
            step,
            &codes[span.clone()],
            &mut out[span],
        )?;
    }
    Ok(())
}

/// One group's codes as the section holds them: the nearest, stepped back
/// where that level is past f32's range.
fn group_codes(offset: f32, step: f32, values: &[f32], codes: &mut [i32]) {
    nearest_codes(values, f64::from(offset), f64::from(step), codes);
    finite_level_codes(offset, step, codes);
}

crate::simd::multiversion!(fn nearest_codes / nearest_codes_at(
    values: &[f32], offset: f64, step: f64, codes: &mut [i32]) => nearest_codes_generic);

/// Every value's nearest code `round((x - offset) / step)`, clipped to
/// ±[`MAX_CODE`]: one vectorized pass before the (sequential) coder.
///
/// An f64 division per value was most of the step search's time, so the
/// quotient is taken as a product with `1 / step`. That product is within
/// 3 ulp of the rounded quotient, so both round to the same integer unless
/// a half lies within 4 ulp of it: a run holding such a value (ties, in
/// practice) is divided again. Same codes, bit for bit.
#[inline(always)]
fn nearest_codes_generic(values: &[f32], offset: f64, step: f64, codes: &mut [i32]) {
    let divided = |x: f32| crate::simd::round((f64::from(x) - offset) / step);
    // `as i32` (0 for NaN) without its saturating checks, which kept the
    // conversion scalar: NaN is made 0 first, everything else is in range.
    let clipped = |q: f64| {
        let q = crate::simd::clamp(q, -MAX_CODE, MAX_CODE);
        let q = if q.is_nan() { 0.0 } else { q };
        // SAFETY: q is finite and within ±MAX_CODE < 2^31.
        unsafe { q.to_int_unchecked::<i32>() }
    };
    let inverse = 1.0 / step;
    if !inverse.is_finite() {
        for (code, &x) in codes.iter_mut().zip(values) {
            *code = clipped(divided(x));
        }
        return;
    }
    const RUN: usize = 16;
    for (codes, values) in codes.chunks_mut(RUN).zip(values.chunks(RUN)) {
        let mut clear_of_halves = true;
        for (code, &x) in codes.iter_mut().zip(values) {
            let quotient = (f64::from(x) - offset) * inverse;
            let magnitude = quotient.abs();
            let from_half = (magnitude - magnitude.floor() - 0.5).abs();
            clear_of_halves &= from_half > magnitude * (4.0 * f64::EPSILON);
            *code = clipped(crate::simd::round(quotient));
        }
        if !clear_of_halves {
            for (code, &x) in codes.iter_mut().zip(values) {
                *code = clipped(divided(x));
            }
        }
    }
}

crate::simd::multiversion!(fn finite_level_codes / finite_level_codes_at(
    offset: f32, step: f32, codes: &mut [i32]) => finite_level_codes_generic);

/// Next to f32's limits a value's nearest level can lie beyond them: its
/// code moves one step towards 0 (that level is within 1.5 steps of the
/// value). A vectorized pass of selects over the run of codes.
#[inline(always)]
fn finite_level_codes_generic(offset: f32, step: f32, codes: &mut [i32]) {
    for q in codes.iter_mut() {
        if !level(offset, *q, step).is_finite() {
            *q -= q.signum();
        }
    }
}

/// The value of code `q`: `offset + q * step` in f64, rounded to f32 (so
/// that a group spanning f32's whole range has no overflow on the way).
#[inline(always)]
fn level(offset: f32, q: i32, step: f32) -> f32 {
    (f64::from(offset) + f64::from(q) * f64::from(step)) as f32
}

/// Decodes a codes section written by `coder` into every value in group
/// order (see [`level`]).
pub(crate) fn decode_codes(
    coder: EntropyCoder,
    params: &GroupParams,
    step: f32,
    bytes: &[u8],
    geometry: &GroupGeometry,
    out: &mut [f32],
) -> Result<(), CodecError> {
    match coder {
        EntropyCoder::Range => decode_range_coded(params, step, bytes, geometry, out),
        EntropyCoder::Rans => decode_rans_coded(params, step, bytes, geometry, out),
    }
}

/// A group's values from its codes, every one of which must be a finite f32.
fn group_levels(offset: f32, step: f32, codes: &[i32], out: &mut [f32]) -> Result<(), CodecError> {
    if levels(offset, step, codes, out) {
        Ok(())
    } else {
        Err(CodecError::CorruptPayload("an ecsq value overflows f32"))
    }
}

crate::simd::multiversion!(fn levels / levels_at(
    offset: f32, step: f32, codes: &[i32], out: &mut [f32]) -> bool => levels_generic);

/// Every code's [`level`], and whether all are finite.
#[inline(always)]
fn levels_generic(offset: f32, step: f32, codes: &[i32], out: &mut [f32]) -> bool {
    let mut finite = true;
    for (value, &q) in out.iter_mut().zip(codes) {
        *value = level(offset, q, step);
        finite &= value.is_finite();
    }
    finite
}

fn decode_range_coded(
    params: &GroupParams,
    step: f32,
    bytes: &[u8],
    geometry: &GroupGeometry,
    out: &mut [f32],
) -> Result<(), CodecError> {
    let mut coder = Decoder::new(bytes)?;
    let mut codes = Vec::new();
    for group in 0..geometry.group_count() {
        let span = geometry.range(group);
        let mut model = IntegerModel::default();
        codes.clear();
        for _ in span.clone() {
            codes.push(model.decode(&mut coder)?);
        }
        group_levels(params.offsets[group], step, &codes, &mut out[span])?;
    }
    coder.finish()
}

fn decode_rans_coded(
    params: &GroupParams,
    step: f32,
    bytes: &[u8],
    geometry: &GroupGeometry,
    out: &mut [f32],
) -> Result<(), CodecError> {
    let mut reader = SectionReader(bytes);
    let (contexts, tables) = Model::read(&mut reader, geometry.group_count())?;
    let slots: Vec<SlotTable> = tables.iter().map(SlotTable::new).collect();
    let stream_len = u64::from_le_bytes(reader.take(8)?.try_into().expect("8 bytes"));
    let stream_len = usize::try_from(stream_len)
        .map_err(|_| CodecError::CorruptPayload("rANS-coded codes end early"))?;
    let mut coder = rans::Decoder::new(reader.take(stream_len)?)?;
    let mut extra = BitReader::new(reader.0);
    // A group's codes first (integer work only), then its levels in one
    // vectorized pass.
    let (mut tokens, mut codes) = (Vec::new(), Vec::new());
    for group in 0..geometry.group_count() {
        let span = geometry.range(group);
        let slots = &slots[contexts.get(group).map_or(0, |&c| usize::from(c))];
        tokens.resize(span.len(), 0);
        coder.decode_run(span.start, slots, &mut tokens);
        // Direct tokens are their zigzag codes: one vectorized pass, then
        // the (rare) larger ones in order, with their extra bits.
        codes.clear();
        codes.extend(tokens.iter().map(|&token| unzigzag(u32::from(token))));
        if tokens
            .iter()
            .any(|&token| u32::from(token) >= DIRECT_TOKENS)
        {
            for (code, &token) in codes.iter_mut().zip(&tokens) {
                if u32::from(token) >= DIRECT_TOKENS {
                    // A table holds at most TOKENS tokens: a guard, not a check.
                    if usize::from(token) >= TOKENS {
                        return Err(CodecError::CorruptPayload("an rANS token is out of range"));
                    }
                    *code = unzigzag(zigzag_of(token, extra.read(extra_len(token))?));
                }
            }
        }
        group_levels(params.offsets[group], step, &codes, &mut out[span])?;
    }
    coder.finish()?;
    extra.finish()
}

/// Which coder an `ecsq` codes section was written with: the adaptive
/// binary range coder of format 1, or rANS (format 2, what the encoder writes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntropyCoder {
    /// Absent from format-1 manifests, which had no other.
    #[default]
    Range,
    Rans,
}

/// Codes whose zigzag value is below this are tokens of their own.
const DIRECT_TOKENS: u32 = 64;
/// Bit length of the smallest zigzag value past the direct tokens, less one.
const FIRST_EXPONENT: u32 = 6;
/// Tokens: the direct ones, then four per exponent 6..=30 of a larger
/// zigzag value (its two bits below the leading one; the rest are extra bits).
const TOKENS: usize = DIRECT_TOKENS as usize + 4 * 25;

/// `q` as an unsigned integer, small magnitudes first: 0, -1, 1, -2, 2, ...
#[inline(always)]
fn zigzag(q: i32) -> u32 {
    ((q << 1) ^ (q >> 31)) as u32
}

#[inline(always)]
fn unzigzag(z: u32) -> i32 {
    ((z >> 1) as i32) ^ -((z & 1) as i32)
}

/// A zigzag value's token, its count of extra bits, and those bits.
#[inline(always)]
fn token_of(z: u32) -> (u8, u32, u32) {
    if z < DIRECT_TOKENS {
        return (z as u8, 0, 0);
    }
    let exponent = 31 - z.leading_zeros();
    let len = exponent - 2;
    let token = DIRECT_TOKENS + 4 * (exponent - FIRST_EXPONENT) + ((z >> len) & 3);
    (token as u8, len, z & ((1 << len) - 1))
}

#[inline(always)]
fn extra_len(token: u8) -> u32 {
    let token = u32::from(token);
    if token < DIRECT_TOKENS {
        0
    } else {
        (token - DIRECT_TOKENS) / 4 + FIRST_EXPONENT - 2
    }
}

#[inline(always)]
fn zigzag_of(token: u8, extra: u32) -> u32 {
    let token = u32::from(token);
    if token < DIRECT_TOKENS {
        return token;
    }
    let len = extra_len(token as u8);
    ((4 | (token & 3)) << len) | extra
}

/// Most contexts (tables) a section holds: a group's context is its spread
/// class, twice the log2 of one plus its mean zigzag code, so classes are
/// half an octave of spread apart (a table off by a quarter octave costs
/// about 0.01 bits per value on a Gaussian).
const MAX_CONTEXTS: usize = 32;

fn spread_class(zigzag_sum: u64, len: usize) -> usize {
    if len == 0 {
        return 0;
    }
    let mean = zigzag_sum as f64 / len as f64;
    ((2.0 * (1.0 + mean).log2()) as usize).min(MAX_CONTEXTS - 1)
}

crate::simd::multiversion!(fn zigzag_sum_and_max / zigzag_sum_and_max_at(codes: &[i32]) -> (u64, u32)
    => zigzag_sum_and_max_generic);

/// The sum and the largest of the codes' zigzag values, in lanes (so that it
/// vectorizes; an integer sum is the same in any order).
#[inline(always)]
fn zigzag_sum_and_max_generic(codes: &[i32]) -> (u64, u32) {
    const LANES: usize = 16;
    let (mut sums, mut largest) = ([0u64; LANES], [0u32; LANES]);
    let chunks = codes.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for lane in 0..LANES {
            let z = zigzag(chunk[lane]);
            sums[lane] += u64::from(z);
            largest[lane] = largest[lane].max(z);
        }
    }
    for (lane, &q) in tail.iter().enumerate() {
        let z = zigzag(q);
        sums[lane] += u64::from(z);
        largest[lane] = largest[lane].max(z);
    }
    (
        sums.iter().sum(),
        largest.iter().copied().max().unwrap_or(0),
    )
}

/// A tensor's token counts at one step: per spread class, and each group's class.
struct Statistics {
    classes: Vec<u8>,
    counts: Vec<[u32; TOKENS]>,
    extra_bits: u64,
    /// One group's counts in four histograms, used in turn so that a run of
    /// one token does not wait on its own count's last increment; all zero
    /// between groups.
    group_counts: [[u32; TOKENS]; 4],
}

impl Statistics {
    fn new(groups: usize) -> Self {
        Statistics {
            classes: Vec::with_capacity(groups),
            counts: vec![[0; TOKENS]; MAX_CONTEXTS],
            extra_bits: 0,
            group_counts: [[0; TOKENS]; 4],
        }
    }

    /// Counts the next group's tokens.
    fn add_group(&mut self, codes: &[i32]) {
        let (sum, largest) = zigzag_sum_and_max(codes);
        let group_counts = &mut self.group_counts;
        if largest < DIRECT_TOKENS {
            // Every code its own token, with no extra bits.
            for (k, &q) in codes.iter().enumerate() {
                group_counts[k % 4][zigzag(q) as usize & 0xFF] += 1;
            }
        } else {
            for (k, &q) in codes.iter().enumerate() {
                let (token, len, _) = token_of(zigzag(q));
                group_counts[k % 4][usize::from(token)] += 1;
                self.extra_bits += u64::from(len);
            }
        }
        let class = spread_class(sum, codes.len());
        self.classes.push(class as u8);
        for counts in group_counts {
            for (total, count) in self.counts[class].iter_mut().zip(counts.iter_mut()) {
                *total += std::mem::take(count);
            }
        }
    }
}

/// The tables a section codes with: one per spread class present, or one
/// for the whole tensor, whichever the estimate says is smaller.
struct Model {
    /// Each group's table (empty: table 0 for every group).
    contexts: Vec<u8>,
    tables: Vec<Table>,
    /// The section's estimated size in bits.
    bits: f64,
}

impl Model {
    fn of(stats: &Statistics) -> Self {
        let table_bits = |table: &Table| 8.0 + 16.0 * table.len() as f64;
        // The stream's length, its states and the extra bits.
        let fixed = 8.0 * (1 + 8 + 4 * rans::LANES) as f64 + stats.extra_bits as f64;
        let mut merged = [0u32; TOKENS];
        for counts in &stats.counts {
            for (total, &count) in merged.iter_mut().zip(counts) {
                *total += count;
            }
        }
        let table = Table::normalized(&merged);
        let one_bits = fixed + table_bits(&table) + table.cost_bits(&merged);
        let present: Vec<usize> = (0..MAX_CONTEXTS)
            .filter(|&class| stats.counts[class].iter().any(|&c| c > 0))
            .collect();
        if present.len() > 1 {
            let tables: Vec<Table> = present
                .iter()
                .map(|&class| Table::normalized(&stats.counts[class]))
                .collect();
            let split_bits = fixed
                + 8.0 * stats.classes.len() as f64
                + tables
                    .iter()
                    .zip(&present)
                    .map(|(table, &class)| {
                        table_bits(table) + table.cost_bits(&stats.counts[class])
                    })
                    .sum::<f64>();
            if split_bits < one_bits {
                let mut dense = [0u8; MAX_CONTEXTS];
                for (index, &class) in present.iter().enumerate() {
                    dense[class] = index as u8;
                }
                return Model {
                    contexts: stats
                        .classes
                        .iter()
                        .map(|&c| dense[usize::from(c)])
                        .collect(),
                    tables,
                    bits: split_bits,
                };
            }
        }
        Model {
            contexts: Vec::new(),
            tables: vec![table],
            bits: one_bits,
        }
    }

    fn context(&self, group: usize) -> usize {
        self.contexts.get(group).map_or(0, |&c| usize::from(c))
    }

    /// The section's head: the table count, each group's table (if more
    /// than one), and each table's length and frequencies.
    fn header(&self) -> Vec<u8> {
        let mut head = vec![self.tables.len() as u8];
        if self.tables.len() > 1 {
            head.extend_from_slice(&self.contexts);
        }
        for table in &self.tables {
            head.push(table.len() as u8);
            for &f in table.frequencies() {
                head.extend_from_slice(&(f as u16).to_le_bytes());
            }
        }
        head
    }

    /// Parses and checks [`Model::header`]: each group's table and the tables.
    fn read(
        reader: &mut SectionReader<'_>,
        group_count: usize,
    ) -> Result<(Vec<u8>, Vec<Table>), CodecError> {
        let count = usize::from(reader.take(1)?[0]);
        if count == 0 || count > MAX_CONTEXTS {
            return Err(CodecError::CorruptPayload(
                "an rANS section has 0 or over 32 tables",
            ));
        }
        let contexts = if count > 1 {
            let contexts = reader.take(group_count)?.to_vec();
            if contexts.iter().any(|&c| usize::from(c) >= count) {
                return Err(CodecError::CorruptPayload(
                    "a group's rANS table does not exist",
                ));
            }
            contexts
        } else {
            Vec::new()
        };
        let mut tables = Vec::with_capacity(count);
        for _ in 0..count {
            let len = usize::from(reader.take(1)?[0]);
            if len == 0 || len > TOKENS {
                return Err(CodecError::CorruptPayload(
                    "an rANS table has 0 or over 164 tokens",
                ));
            }
            let freq = reader
                .take(2 * len)?
                .chunks_exact(2)
                .map(|pair| u32::from(u16::from_le_bytes([pair[0], pair[1]])))
                .collect();
            tables.push(Table::new(freq)?);
        }
        Ok((contexts, tables))
    }
}

/// The unread rest of a codes section.
struct SectionReader<'a>(&'a [u8]);

impl<'a> SectionReader<'a> {
    fn take(&mut self, len: usize) -> Result<&'a [u8], CodecError> {
        if len > self.0.len() {
            return Err(CodecError::CorruptPayload("rANS-coded codes end early"));
        }
        let (head, rest) = self.0.split_at(len);
        self.0 = rest;
        Ok(head)
    }
}

/// Extra bits, least significant first, packed from each byte's low bit.
#[derive(Default)]
struct BitWriter {
    bytes: Vec<u8>,
    buffer: u64,
    len: u32,
}

impl BitWriter {
    #[inline(always)]
    fn write(&mut self, bits: u32, len: u32) {
        self.buffer |= u64::from(bits) << self.len;
        self.len += len;
        if self.len >= 32 {
            self.bytes
                .extend_from_slice(&(self.buffer as u32).to_le_bytes());
            self.buffer >>= 32;
            self.len -= 32;
        }
    }

    fn finish(mut self) -> Vec<u8> {
        let tail = self.len.div_ceil(8) as usize;
        self.bytes
            .extend_from_slice(&self.buffer.to_le_bytes()[..tail]);
        self.bytes
    }
}

struct BitReader<'a> {
    bytes: &'a [u8],
    /// Bits read so far.
    position: usize,
}

impl<'a> BitReader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        BitReader { bytes, position: 0 }
    }

    /// The next `len` (at most 28) bits.
    #[inline(always)]
    fn read(&mut self, len: u32) -> Result<u32, CodecError> {
        if len == 0 {
            return Ok(0);
        }
        let end = self.position + len as usize;
        if end > 8 * self.bytes.len() {
            return Err(CodecError::CorruptPayload(
                "the extra bits of ecsq codes end early",
            ));
        }
        let byte = self.position / 8;
        let mut window = [0u8; 8];
        let available = (self.bytes.len() - byte).min(8);
        window[..available].copy_from_slice(&self.bytes[byte..byte + available]);
        let bits = (u64::from_le_bytes(window) >> (self.position % 8)) as u32 & ((1 << len) - 1);
        self.position = end;
        Ok(bits)
    }

    /// Every byte read, and the last one's unused bits zero.
    fn finish(self) -> Result<(), CodecError> {
        let used = self.position.div_ceil(8);
        let padding_zero =
            self.position % 8 == 0 || self.bytes[used - 1] >> (self.position % 8) == 0;
        if used == self.bytes.len() && padding_zero {
            Ok(())
        } else {
            Err(CodecError::CorruptPayload(
                "the extra bits of ecsq codes have trailing bits",
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{decode, encode, Axis, CodecError, CodecParams, Grid};
    use super::{nearest_codes_at, MAX_CODE};

    /// Gaussian values (Box-Muller over a fixed LCG) with a mean per channel,
    /// `[1, heads, seq, 64]`.
    fn gaussian_cache(heads: usize, seq: usize, seed: u64) -> Vec<f32> {
        let mut state = seed;
        let mut uniform = move || {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((state >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        };
        (0..heads * seq * 64)
            .map(|i| {
                let channel_mean = ((i % 64) as f64 - 32.0) * 0.25;
                let (u, v) = (uniform(), uniform());
                let gaussian = (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos();
                (channel_mean + gaussian) as f32
            })
            .collect()
    }

    fn ecsq(axis: Axis, rate: Option<f64>) -> CodecParams {
        CodecParams {
            bits: 3,
            grid: Grid::Ecsq,
            axis,
            rate,
            ..CodecParams::adr002(1024)
        }
    }

    fn squared_error(a: &[f32], b: &[f32]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(&x, &y)| (f64::from(x) - f64::from(y)).powi(2))
            .sum::<f64>()
            / a.len() as f64
    }

    /// Decodes, checks every value within half the payload's step of its
    /// original and the squared error at `step^2 / 12`; returns the step and
    /// the payload's bits per value.
    fn step_and_bits(values: &[f32], shape: &[usize], params: &CodecParams) -> (f32, f64) {
        let encoded = encode(values, shape, params).unwrap();
        // 128 channel groups: f16 means, then the f32 step.
        let step_at = 128 * 2;
        let step = f32::from_le_bytes(encoded.payload[step_at..step_at + 4].try_into().unwrap());
        let decoded = decode(&encoded.payload, shape, params, &encoded.layout).unwrap();
        for (&x, &y) in values.iter().zip(&decoded) {
            assert!(
                (x - y).abs() <= step / 2.0 * 1.0001 + 1e-6,
                "{x} -> {y}, step {step}"
            );
        }
        let mse = squared_error(values, &decoded);
        let uniform_mse = f64::from(step).powi(2) / 12.0;
        assert!(
            (mse / uniform_mse - 1.0).abs() < 0.05,
            "mse {mse} against {uniform_mse}"
        );
        (
            step,
            8.0 * encoded.payload.len() as f64 / values.len() as f64,
        )
    }

    #[test]
    fn bits_set_the_gaussian_step_and_a_rate_bounds_the_size() {
        let shape = [1, 2, 1024, 64];
        let values = gaussian_cache(2, 1024, 7);
        for bits in [2u8, 3, 4, 6] {
            let params = CodecParams {
                bits,
                ..ecsq(Axis::Channel, None)
            };
            let (step, size) = step_and_bits(&values, &shape, &params);
            // Unit-variance channels: step = sqrt(2 pi e) 2^-bits.
            let expected = 4.132_731_354 * (-f64::from(bits)).exp2();
            assert!(
                (f64::from(step) / expected - 1.0).abs() < 0.01,
                "step {step}"
            );
            // High-rate theory: about `bits` per value (at 2 bits the
            // Gaussian's quantized entropy is 0.04 above it), plus the means.
            let bits = f64::from(bits);
            assert!(
                size > bits - 0.05 && size < bits + 0.1,
                "{bits} bits: {size} stored"
            );
        }
        for rate in [1.0, 2.35, 3.35, 4.35, 7.9] {
            let (_, size) = step_and_bits(&values, &shape, &ecsq(Axis::Channel, Some(rate)));
            assert!(
                size <= rate && size > rate - 0.01,
                "rate {rate}: {size} bits/value"
            );
        }
    }

    #[test]
    fn at_equal_bits_it_errs_less_than_the_best_fixed_width_grid() {
        // KIVI-style asymmetric 3-bit codes, per-channel groups of 64 tokens
        // with least-squares scales: 3.5 bits/value with their scales.
        let shape = [1, 2, 1024, 64];
        let values = gaussian_cache(2, 1024, 11);
        let fixed = CodecParams {
            bits: 3,
            grid: Grid::Asymmetric,
            axis: Axis::Channel,
            fit: super::super::Fit::Mse,
            ..CodecParams::adr002(64)
        };
        let packed = encode(&values, &shape, &fixed).unwrap();
        let fixed_bits = 8.0 * packed.payload.len() as f64 / values.len() as f64;
        let fixed_mse = squared_error(
            &values,
            &decode(&packed.payload, &shape, &fixed, &packed.layout).unwrap(),
        );
        let params = ecsq(Axis::Channel, Some(fixed_bits));
        let coded = encode(&values, &shape, &params).unwrap();
        let coded_bits = 8.0 * coded.payload.len() as f64 / values.len() as f64;
        let coded_mse = squared_error(
            &values,
            &decode(&coded.payload, &shape, &params, &coded.layout).unwrap(),
        );
        assert!(coded_bits <= fixed_bits, "{coded_bits} > {fixed_bits}");
        // Gaussian theory: 1.53 dB from the bound against about 4 dB (3 bits
        // plus the 0.5 bits of scales spent on range, not resolution).
        assert!(
            coded_mse < 0.6 * fixed_mse,
            "{coded_mse} against {fixed_mse}"
        );
    }

    #[test]
    fn tokens_and_extra_bits_give_back_every_code() {
        use super::{extra_len, token_of, unzigzag, zigzag, zigzag_of, TOKENS};
        let mut codes: Vec<i32> = (-300..300).collect();
        for shift in 0..30 {
            let power = 1i32 << shift;
            codes.extend([power - 1, power, power + 1, -power, 1 - power, -power - 1]);
            // The two bits below the leading one: 01 and 10.
            codes.extend([power + power / 4, -power - power / 4, power + power / 2]);
            codes.extend([-power - power / 2]);
        }
        codes.extend([MAX_CODE as i32, -(MAX_CODE as i32)]);
        let mut seen = [false; TOKENS];
        for q in codes {
            let z = zigzag(q);
            assert_eq!(unzigzag(z), q);
            let (token, len, bits) = token_of(z);
            assert!(usize::from(token) < TOKENS, "{q}: token {token}");
            assert_eq!(extra_len(token), len, "{q}");
            assert!(len < 32 && u64::from(bits) < 1 << len, "{q}");
            assert_eq!(zigzag_of(token, bits), z, "{q}");
            seen[usize::from(token)] = true;
        }
        assert!(seen.iter().all(|&s| s), "every token is reachable");
    }

    /// Groups of `group_size` over `values`, their means as f16 offsets.
    fn flat_groups(
        values: &[f32],
        group_size: usize,
    ) -> (super::GroupParams, super::GroupGeometry) {
        let geometry = super::GroupGeometry {
            segment_len: values.len(),
            segment_count: 1,
            group_size,
        };
        let offsets = (0..geometry.group_count())
            .map(|g| {
                let group = &values[geometry.range(g)];
                let mean = group.iter().map(|&x| f64::from(x)).sum::<f64>() / group.len() as f64;
                half::f16::from_f64(mean).to_f32()
            })
            .collect();
        let params = super::GroupParams {
            dtype: super::ScaleDtype::F16,
            scales: Vec::new(),
            offsets,
        };
        (params, geometry)
    }

    #[test]
    fn both_coders_decode_to_the_encoders_reconstruction() {
        use super::{decode_codes, encode_codes, range_coded_codes, reconstruct, EntropyCoder};
        // Groups of very different spreads (several tables), a ragged last
        // group, codes past the direct tokens (extra bits) and zeros.
        let mut values = gaussian_cache(1, 97, 3);
        for (i, x) in values.iter_mut().enumerate() {
            *x *= [0.01, 1.0, 30.0, 4000.0][(i / 500) % 4];
        }
        values.extend([0.0; 300]);
        let (params, geometry) = flat_groups(&values, 500);
        for step in [0.05f32, 1.0, 250.0] {
            let coded = encode_codes(&params, step, &values, &geometry);
            let mut expected = vec![0.0; values.len()];
            reconstruct(&params, step, &coded.codes, &geometry, &mut expected).unwrap();
            for (coder, section) in [
                (EntropyCoder::Rans, coded.section.clone()),
                (
                    EntropyCoder::Range,
                    range_coded_codes(&coded.codes, &geometry),
                ),
            ] {
                let mut decoded = vec![f32::NAN; values.len()];
                decode_codes(coder, &params, step, &section, &geometry, &mut decoded).unwrap();
                assert_eq!(decoded, expected, "{coder:?}, step {step}");
                // Any section cut short is an error, never a panic.
                for cut in [1, 2, section.len() / 2, section.len() - 1] {
                    let mut out = vec![0.0; values.len()];
                    assert!(
                        decode_codes(coder, &params, step, &section[..cut], &geometry, &mut out)
                            .is_err(),
                        "{coder:?} cut to {cut}"
                    );
                }
            }
        }
    }

    #[test]
    fn groups_of_different_spreads_get_their_own_tables_when_that_is_smaller() {
        use super::{encode_codes, tensor_codes, Model};
        // Per-channel groups whose deviations span 2^-3..2^4 of one step.
        let values: Vec<f32> = gaussian_cache(4, 1024, 9)
            .iter()
            .enumerate()
            .map(|(i, &x)| x * (((i / 4096) % 8) as f32 - 3.0).exp2())
            .collect();
        let (params, geometry) = flat_groups(&values, 4096);
        let model_at =
            |params, values| Model::of(&tensor_codes(params, 0.1, values, &geometry, Vec::new()).1);
        let model = model_at(&params, &values);
        assert!(model.tables.len() > 4, "{} tables", model.tables.len());
        let one_spread = gaussian_cache(4, 1024, 9);
        let (params_one, _) = flat_groups(&one_spread, 4096);
        let single = model_at(&params_one, &one_spread);
        assert_eq!(single.tables.len(), 1);
        // The estimate is what the section comes to, within a few bytes.
        for (params, values, model) in [
            (&params, &values, &model),
            (&params_one, &one_spread, &single),
        ] {
            let bits = 8.0 * encode_codes(params, 0.1, values, &geometry).section.len() as f64;
            assert!(
                (bits - model.bits).abs() < 64.0 + 0.001 * model.bits,
                "{bits} vs {}",
                model.bits
            );
        }
    }

    #[test]
    fn nearest_codes_are_roundings_half_away_from_zero_at_every_simd_level() {
        // Ties on both sides, zeros, values past ±MAX_CODE steps, a
        // subnormal step and a length that leaves SIMD remainders.
        let mut values: Vec<f32> = (-40..=40).map(|i| i as f32 * 0.25).collect();
        values.extend([
            0.0, -0.0, 1e30, -1e30, 3.4e38, -3.4e38, 1e-40, 0.49999997, -0.5000001,
        ]);
        values.extend(gaussian_cache(1, 37, 5));
        for (offset, step) in [
            (0.0, 0.5),
            (0.125, 0.25),
            (-1.0, 1e-3),
            (0.0, 1e-45),
            (2.5, 3.0),
        ] {
            let expected: Vec<i32> = values
                .iter()
                .map(|&x| {
                    ((f64::from(x) - offset) / step)
                        .round()
                        .clamp(-MAX_CODE, MAX_CODE) as i32
                })
                .collect();
            for level in crate::simd::Level::available() {
                let mut codes = vec![0; values.len()];
                nearest_codes_at(level, &values, offset, step, &mut codes);
                assert_eq!(codes, expected, "offset {offset}, step {step}, {level:?}");
            }
        }
    }

    #[test]
    fn codes_of_levels_past_f32_move_one_step_in_at_every_simd_level() {
        use super::{finite_level_codes_at, level};
        // A step of 2^127: code ±2 is ±2^128, past f32::MAX; ±1 is not.
        let step = 2f32.powi(127);
        let codes: Vec<i32> = (-5..=5).chain([i32::MAX / 2, -(i32::MAX / 2)]).collect();
        let expected: Vec<i32> = codes
            .iter()
            .map(|&q| {
                if level(0.0, q, step).is_finite() {
                    q
                } else {
                    q - q.signum()
                }
            })
            .collect();
        assert_eq!(&expected[..11], [-4, -3, -2, -1, -1, 0, 1, 1, 2, 3, 4]);
        for simd in crate::simd::Level::available() {
            let mut got = codes.clone();
            finite_level_codes_at(simd, 0.0, step, &mut got);
            assert_eq!(got, expected, "{simd:?}");
        }
    }

    #[test]
    fn params_and_layouts_that_do_not_fit_are_errors() {
        let shape = [1, 1, 8, 4];
        let values: Vec<f32> = (0..32).map(|i| i as f32 * 0.1).collect();
        let params = ecsq(Axis::Token, None);
        let encoded = encode(&values, &shape, &params).unwrap();
        assert_eq!(
            encoded.layout.coded_bytes,
            Some(encoded.payload.len() - 8 * 2 - 4)
        );
        let mut missing = encoded.layout.clone();
        missing.coded_bytes = None;
        assert_eq!(
            decode(&encoded.payload, &shape, &params, &missing),
            Err(CodecError::CodedBytes("missing"))
        );
        let adr002 = CodecParams::adr002(4);
        let symmetric = encode(&values, &shape, &adr002).unwrap();
        let mut given = symmetric.layout.clone();
        given.coded_bytes = Some(3);
        assert_eq!(
            decode(&symmetric.payload, &shape, &adr002, &given),
            Err(CodecError::CodedBytes("given"))
        );
        // A stream cut short, with the layout saying so, is caught by the coder.
        let mut short = encoded.layout.clone();
        short.coded_bytes = Some(encoded.layout.coded_bytes.unwrap() - 1);
        let cut = &encoded.payload[..encoded.payload.len() - 1];
        assert!(matches!(
            decode(cut, &shape, &params, &short),
            Err(CodecError::CorruptPayload(_))
        ));
        for (bad, error) in [
            (
                CodecParams {
                    sparsity: 0.5,
                    ..params.clone()
                },
                CodecError::GridWith {
                    grid: Grid::Ecsq,
                    feature: "sparsity",
                },
            ),
            (
                CodecParams {
                    outliers: 0.01,
                    ..params.clone()
                },
                CodecError::GridWith {
                    grid: Grid::Ecsq,
                    feature: "outliers",
                },
            ),
            (
                CodecParams {
                    rate: Some(2.5),
                    ..adr002.clone()
                },
                CodecError::InvalidRate(2.5),
            ),
            (
                CodecParams {
                    rate: Some(40.0),
                    ..params.clone()
                },
                CodecError::InvalidRate(40.0),
            ),
        ] {
            assert_eq!(encode(&values, &shape, &bad).unwrap_err(), error);
        }
    }
}
