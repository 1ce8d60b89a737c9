//! Static-model rANS (Duda's range variant of asymmetric numeral systems,
//! in the shape of Giesen's `rans_word`): integer tokens coded with
//! frequency tables that the section stores, several states interleaved.
//!
//! Why not the adaptive binary range coder (`range_coder`, format 1): it
//! spends eight or more modelled binary decisions per value, each a
//! dependent multiply and renormalization, about 17 M values/s. Here a
//! value is one table lookup, one multiply and at most one 16-bit read,
//! and eight states in flight keep the core busy: the decoder runs at
//! several hundred M values/s. The cost of a static model is its table,
//! stored once per context (a few hundred bytes per tensor); the adaptive
//! coder paid more than that learning each group's statistics afresh.
//!
//! Every operation is integer arithmetic, so the numpy reference reproduces
//! it bit for bit; docs/format.md ("rANS-coded codes") is the specification.
//! Crates were considered (`constriction`'s ANS coder): its streams are its
//! own, not interleaved, and the Python reader would have to follow its
//! internals; the coder here is short, and the format spells it out.

use super::CodecError;

/// Precision of a token's probability: frequencies sum to `2^PROB_BITS`.
const PROB_BITS: u32 = 12;
const PROB_SCALE: u32 = 1 << PROB_BITS;
/// Lower bound of a state; states live in `[STATE_LOW, 2^32)`, and a state
/// below it after decoding reads one 16-bit word.
const STATE_LOW: u32 = 1 << 16;
/// Interleaved states: token `i` of a section is coded with state `i % LANES`.
pub(crate) const LANES: usize = 8;
/// Bytes of the stored final states.
const STATES_LEN: usize = 4 * LANES;

/// One context's table: every token's frequency and the sum of those
/// before it. Tokens past the stored ones have frequency 0.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Table {
    freq: Vec<u32>,
    cum: Vec<u32>,
}

impl Table {
    /// The table of stored frequencies, which must sum to `2^PROB_BITS`.
    pub fn new(freq: Vec<u32>) -> Result<Self, CodecError> {
        let mut cum = Vec::with_capacity(freq.len());
        let mut total = 0u32;
        for &f in &freq {
            cum.push(total);
            total = total.saturating_add(f);
        }
        if total != PROB_SCALE {
            return Err(CodecError::CorruptPayload(
                "an rANS table's frequencies do not sum to 4096",
            ));
        }
        Ok(Table { freq, cum })
    }

    /// Frequencies in proportion to `counts`, every counted token at least
    /// 1, summing to `2^PROB_BITS`; the rounding surplus or shortfall is
    /// taken from (given to) the largest frequencies. No counts: token 0
    /// alone (a table must sum to the scale).
    pub fn normalized(counts: &[u32]) -> Self {
        let used = counts
            .iter()
            .rposition(|&c| c > 0)
            .map_or(1, |last| last + 1);
        let total: u64 = counts.iter().map(|&c| u64::from(c)).sum();
        let mut freq: Vec<u32> = if total == 0 {
            let mut freq = vec![0; used];
            freq[0] = PROB_SCALE;
            freq
        } else {
            counts[..used]
                .iter()
                .map(|&c| {
                    if c == 0 {
                        0
                    } else {
                        let share = (u64::from(c) * u64::from(PROB_SCALE) + total / 2) / total;
                        share.max(1) as u32
                    }
                })
                .collect()
        };
        let mut sum: i64 = freq.iter().map(|&f| i64::from(f)).sum();
        while sum != i64::from(PROB_SCALE) {
            // The largest frequency (the first of equals) that can move.
            let shrink = sum > i64::from(PROB_SCALE);
            let (index, &largest) = freq
                .iter()
                .enumerate()
                .filter(|(_, &f)| if shrink { f > 1 } else { f > 0 })
                .max_by_key(|(i, &f)| (f, std::cmp::Reverse(*i)))
                .expect("a counted token");
            let step = (sum - i64::from(PROB_SCALE)).abs();
            let moved = if shrink {
                step.min(i64::from(largest) - 1)
            } else {
                step
            };
            freq[index] = if shrink {
                largest - moved as u32
            } else {
                largest + moved as u32
            };
            sum += if shrink { -moved } else { moved };
        }
        Table::new(freq).expect("normalized to the scale")
    }

    /// Stored tokens (the table's length).
    pub fn len(&self) -> usize {
        self.freq.len()
    }

    pub fn frequencies(&self) -> &[u32] {
        &self.freq
    }

    /// Bits that coding `counts` with this table costs, `-log2(f / 2^12)`
    /// per token (what the stream comes to, within a few bytes).
    pub fn cost_bits(&self, counts: &[u32]) -> f64 {
        counts
            .iter()
            .zip(&self.freq)
            .filter(|(&c, _)| c > 0)
            .map(|(&c, &f)| f64::from(c) * (f64::from(PROB_BITS) - f64::from(f).log2()))
            .sum()
    }
}

/// Codes `symbols`, each `context << 8 | token` (token `i` is coded with
/// `tables[context]`, where it must have a non-zero frequency): the final
/// states, then the 16-bit words in the order the decoder reads them.
pub(crate) fn encode(symbols: &[u16], tables: &[Table]) -> Vec<u8> {
    // Every context's 256 token slots, so a symbol is its own index.
    let mut constants = vec![EncodeSymbol::default(); tables.len() << 8];
    for (context, table) in tables.iter().enumerate() {
        let slots = &mut constants[context << 8..(context + 1) << 8];
        slots[..table.len()].copy_from_slice(&EncodeSymbol::of(table));
    }
    let mut states = [STATE_LOW; LANES];
    // At most one word per token, written back to front so that they end
    // in the decoder's order.
    let mut words = vec![0u16; symbols.len()];
    let mut at = words.len();
    let whole = symbols.len() / LANES * LANES;
    for i in (whole..symbols.len()).rev() {
        let constant = constants[usize::from(symbols[i])];
        states[i % LANES] = constant.put(states[i % LANES], &mut words, &mut at);
    }
    // Whole runs of LANES with the states in registers, back to front.
    for run in symbols[..whole].chunks_exact(LANES).rev() {
        for lane in (0..LANES).rev() {
            let constant = constants[usize::from(run[lane])];
            states[lane] = constant.put(states[lane], &mut words, &mut at);
        }
    }
    let words = &mut words[at..];
    // Little-endian words (a no-op on little-endian machines).
    words.iter_mut().for_each(|word| *word = word.to_le());
    let mut out = Vec::with_capacity(STATES_LEN + 2 * words.len());
    for state in states {
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.extend_from_slice(bytemuck::cast_slice::<u16, u8>(words));
    out
}

/// A token's encoding constants: the division by its frequency, which was
/// most of the encoder's time, as a multiplication by
/// `ceil(2^44 / f)`. For `x < 2^32` and `f <= 2^12` the product's top bits
/// are exactly `x / f` (the rounding up adds under `x / 2^44 < 1 / f`).
#[derive(Clone, Copy, Debug, Default)]
struct EncodeSymbol {
    freq: u32,
    cum: u32,
    limit: u64,
    reciprocal: u64,
}

const RECIPROCAL_SHIFT: u32 = 44;

impl EncodeSymbol {
    fn of(table: &Table) -> Vec<Self> {
        table
            .freq
            .iter()
            .zip(&table.cum)
            .map(|(&freq, &cum)| EncodeSymbol {
                freq,
                cum,
                limit: u64::from(freq) << (32 - PROB_BITS),
                reciprocal: if freq == 0 {
                    0
                } else {
                    (1u64 << RECIPROCAL_SHIFT).div_ceil(u64::from(freq))
                },
            })
            .collect()
    }

    #[inline(always)]
    fn quotient(self, x: u32) -> u32 {
        ((u128::from(x) * u128::from(self.reciprocal)) >> RECIPROCAL_SHIFT) as u32
    }

    /// State `x` with this token coded: first, if coding would carry it
    /// past 2^32 (at or above `((STATE_LOW >> PROB_BITS) << 16) * f`), its
    /// low 16 bits go out, once (x < 2^32 and f >= 1 put it below then).
    /// Branch-free: whether a word goes out is as unpredictable as the
    /// data. `words[*at - 1]` is written either way (`*at >= 1`: at most one
    /// word per token has gone before) and kept only if it counts.
    #[inline(always)]
    fn put(self, x: u32, words: &mut [u16], at: &mut usize) -> u32 {
        debug_assert!(self.freq > 0, "a token without frequency");
        let out = u64::from(x) >= self.limit;
        words[*at - 1] = x as u16;
        *at -= usize::from(out);
        let x = if out { x >> 16 } else { x };
        let quotient = self.quotient(x);
        (quotient << PROB_BITS) + (x - quotient * self.freq) + self.cum
    }
}

/// A context's decoding table: per slot `(token, frequency - 1, slot - cum)`
/// packed as `token << 24 | (f - 1) << 12 | bias`.
pub(crate) struct SlotTable(Vec<u32>);

impl SlotTable {
    pub fn new(table: &Table) -> Self {
        let mut slots = Vec::with_capacity(PROB_SCALE as usize);
        for (token, (&f, &c)) in table.freq.iter().zip(&table.cum).enumerate() {
            for slot in c..c + f {
                slots.push(((token as u32) << 24) | ((f - 1) << 12) | (slot - c));
            }
        }
        SlotTable(slots)
    }
}

/// One token off `state`; the next word is read either way (0 past the
/// end) and kept only if the state needs it.
#[inline(always)]
fn decode_one(state: &mut u32, slots: &SlotTable, words: &[u8], position: &mut usize) -> u8 {
    let entry = slots.0[(*state & (PROB_SCALE - 1)) as usize];
    let f = ((entry >> 12) & 0xFFF) + 1;
    let x = f * (*state >> PROB_BITS) + (entry & 0xFFF);
    let word = match words.get(*position..*position + 2) {
        Some(word) => u32::from(u16::from_le_bytes([word[0], word[1]])),
        None => 0,
    };
    let read = x < STATE_LOW;
    *position += 2 * usize::from(read);
    *state = if read { (x << 16) | word } else { x };
    (entry >> 24) as u8
}

/// The decoder over one rANS stream (states, then words).
pub(crate) struct Decoder<'a> {
    words: &'a [u8],
    position: usize,
    states: [u32; LANES],
}

const ENDS_EARLY: CodecError = CodecError::CorruptPayload("rANS-coded codes end early");

impl<'a> Decoder<'a> {
    pub fn new(stream: &'a [u8]) -> Result<Self, CodecError> {
        if stream.len() < STATES_LEN || (stream.len() - STATES_LEN) % 2 != 0 {
            return Err(CodecError::CorruptPayload(
                "an rANS stream is not 8 states and whole 16-bit words",
            ));
        }
        let mut states = [0u32; LANES];
        for (lane, state) in states.iter_mut().enumerate() {
            let bytes = stream[4 * lane..4 * lane + 4].try_into().expect("4 bytes");
            *state = u32::from_le_bytes(bytes);
            if *state < STATE_LOW {
                return Err(CodecError::CorruptPayload("an rANS state is below 2^16"));
            }
        }
        Ok(Decoder {
            words: &stream[STATES_LEN..],
            position: 0,
            states,
        })
    }

    /// Token `i` of the stream, decoded with `slots`. Branch-free, as the
    /// encoder: the next word is read either way (0 past the end) and kept
    /// only if the state needs it; reading past the end is caught by
    /// [`Decoder::finish`].
    #[inline(always)]
    pub fn decode(&mut self, i: usize, slots: &SlotTable) -> u8 {
        decode_one(
            &mut self.states[i % LANES],
            slots,
            self.words,
            &mut self.position,
        )
    }

    /// Tokens `first..first + tokens.len()`, all with `slots`: whole runs
    /// of [`LANES`] with the states in registers, so their eight
    /// dependency chains overlap.
    pub fn decode_run(&mut self, first: usize, slots: &SlotTable, tokens: &mut [u8]) {
        let lead = ((LANES - first % LANES) % LANES).min(tokens.len());
        let (head, rest) = tokens.split_at_mut(lead);
        for (k, token) in head.iter_mut().enumerate() {
            *token = self.decode(first + k, slots);
        }
        let whole = rest.len() / LANES * LANES;
        let (runs, tail) = rest.split_at_mut(whole);
        let mut states = self.states;
        let mut position = self.position;
        for run in runs.chunks_exact_mut(LANES) {
            for (token, state) in run.iter_mut().zip(states.iter_mut()) {
                *token = decode_one(state, slots, self.words, &mut position);
            }
        }
        self.states = states;
        self.position = position;
        let tail_first = first + lead + whole;
        for (k, token) in tail.iter_mut().enumerate() {
            *token = self.decode(tail_first + k, slots);
        }
    }

    /// Every word read and every state back at its start: the stream
    /// decoded exactly what was coded.
    pub fn finish(self) -> Result<(), CodecError> {
        if self.position > self.words.len() {
            return Err(ENDS_EARLY);
        }
        if self.position != self.words.len() {
            return Err(CodecError::CorruptPayload(
                "rANS-coded codes have trailing bytes",
            ));
        }
        if self.states.iter().any(|&state| state != STATE_LOW) {
            return Err(CodecError::CorruptPayload(
                "rANS-coded codes do not end in their initial states",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(state: &mut u64) -> u64 {
        *state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        *state >> 33
    }

    fn round_trip(
        tokens: &[u8],
        tables: &[Table],
        context_of: impl Fn(usize) -> usize + Copy,
    ) -> usize {
        let symbols: Vec<u16> = tokens
            .iter()
            .enumerate()
            .map(|(i, &t)| ((context_of(i) as u16) << 8) | u16::from(t))
            .collect();
        let stream = encode(&symbols, tables);
        let slots: Vec<SlotTable> = tables.iter().map(SlotTable::new).collect();
        let mut decoder = Decoder::new(&stream).unwrap();
        for (i, &token) in tokens.iter().enumerate() {
            assert_eq!(decoder.decode(i, &slots[context_of(i)]), token, "token {i}");
        }
        decoder.finish().unwrap();
        stream.len()
    }

    #[test]
    fn normalized_tables_sum_to_the_scale_and_keep_every_counted_token() {
        let mut state = 7;
        for case in 0..200 {
            let len = 1 + (lcg(&mut state) % 164) as usize;
            let counts: Vec<u32> = (0..len)
                .map(|i| match case % 4 {
                    0 => (lcg(&mut state) % 3) as u32,
                    1 if i == 0 => 1_000_000,
                    1 => (lcg(&mut state) % 2) as u32,
                    _ => (lcg(&mut state) % 100_000) as u32,
                })
                .collect();
            let table = Table::normalized(&counts);
            assert_eq!(table.freq.iter().sum::<u32>(), PROB_SCALE);
            for (&c, &f) in counts.iter().zip(&table.freq) {
                assert_eq!(c > 0, f > 0, "counts {counts:?} gave {:?}", table.freq);
            }
        }
        assert_eq!(Table::normalized(&[]).freq, vec![PROB_SCALE]);
        assert_eq!(Table::normalized(&[0, 0, 5]).freq, vec![0, 0, PROB_SCALE]);
    }

    #[test]
    fn tokens_round_trip_through_interleaved_states_and_contexts() {
        let mut state = 11;
        let counts_a: Vec<u32> = (0..40).map(|i| 1000 / (1 + i)).collect();
        let counts_b: Vec<u32> = (0..164).map(|i| 1 + (i % 7)).collect();
        let tables = [Table::normalized(&counts_a), Table::normalized(&counts_b)];
        let context_of = |i: usize| (i / 37) % 2;
        let tokens: Vec<u8> = (0..10_007)
            .map(|i| {
                let table = &tables[context_of(i)];
                loop {
                    let t = (lcg(&mut state) % table.len() as u64) as usize;
                    if table.freq[t] > 0 {
                        return t as u8;
                    }
                }
            })
            .collect();
        round_trip(&tokens, &tables, context_of);
        // Runs from any position decode what one token at a time does.
        let table = std::slice::from_ref(&tables[1]);
        let single: Vec<u8> = tokens.iter().map(|&t| t % 164).collect();
        let symbols: Vec<u16> = single.iter().map(|&t| u16::from(t)).collect();
        let stream = encode(&symbols, table);
        let slots = SlotTable::new(&tables[1]);
        let mut decoder = Decoder::new(&stream).unwrap();
        let (mut at, mut k) = (0, 0);
        while at < single.len() {
            let len = ((k * 7) % 29).min(single.len() - at);
            k += 1;
            let mut run = vec![0; len];
            decoder.decode_run(at, &slots, &mut run);
            assert_eq!(run, single[at..at + len], "run at {at}");
            at += len;
        }
        decoder.finish().unwrap();
        for n in 0..20 {
            round_trip(&tokens[..n], &tables, context_of);
        }
        // A certain token costs nothing: only the states are stored.
        let certain = [Table::normalized(&[0, 9])];
        assert_eq!(round_trip(&[1; 5000], &certain, |_| 0), STATES_LEN);
    }

    #[test]
    fn the_stream_costs_what_the_table_says() {
        let counts: Vec<u32> = (0..30).map(|i| 4000 >> (i / 3)).collect();
        let table = Table::normalized(&counts);
        let mut state = 5;
        let mut tokens = Vec::new();
        for (token, &c) in counts.iter().enumerate() {
            tokens.extend(std::iter::repeat_n(token as u8, c as usize));
        }
        // Shuffled, so the order carries nothing the table does not.
        for i in (1..tokens.len()).rev() {
            tokens.swap(i, (lcg(&mut state) % (i as u64 + 1)) as usize);
        }
        let bits = 8.0 * round_trip(&tokens, std::slice::from_ref(&table), |_| 0) as f64;
        let cost = table.cost_bits(&counts);
        assert!(
            bits >= cost - 64.0 && bits <= cost * 1.001 + 8.0 * STATES_LEN as f64 + 32.0,
            "{bits} bits for a cost of {cost}"
        );
    }

    #[test]
    fn the_reciprocal_divides_exactly_at_the_extremes_of_every_frequency() {
        for freq in 1..=PROB_SCALE {
            let symbol = EncodeSymbol::of(&Table {
                freq: vec![freq],
                cum: vec![0],
            })[0];
            let mut xs = vec![0, 1, freq - 1, freq, freq + 1, u32::MAX, u32::MAX - 1];
            // Multiples of f and the values just below them, across the range.
            for k in [1u64, 2, 3, 1 << 20, (1u64 << 32) / u64::from(freq)] {
                let m = (k * u64::from(freq)).min(u64::from(u32::MAX)) as u32;
                xs.extend([m, m.saturating_sub(1), m.saturating_add(1)]);
            }
            for x in xs {
                assert_eq!(symbol.quotient(x), x / freq, "{x} / {freq}");
            }
        }
    }

    #[test]
    fn broken_streams_are_errors_not_panics() {
        let table = Table::normalized(&[3, 2, 1]);
        let slots = SlotTable::new(&table);
        let tokens: Vec<u8> = (0..3000).map(|i| (i % 3) as u8).collect();
        let symbols: Vec<u16> = tokens.iter().map(|&t| u16::from(t)).collect();
        let stream = encode(&symbols, std::slice::from_ref(&table));
        let decode_all = |stream: &[u8]| -> Result<(), CodecError> {
            let mut decoder = Decoder::new(stream)?;
            for i in 0..tokens.len() {
                decoder.decode(i, &slots);
            }
            decoder.finish()
        };
        decode_all(&stream).unwrap();
        assert!(decode_all(&stream[..stream.len() - 2]).is_err());
        assert!(decode_all(&stream[..stream.len() - 1]).is_err());
        let mut padded = stream.clone();
        padded.extend_from_slice(&[0, 0]);
        assert!(decode_all(&padded).is_err());
        let mut flipped = stream.clone();
        flipped[40] ^= 0x10;
        assert!(decode_all(&flipped).is_err());
        assert!(decode_all(&[]).is_err());
        assert!(Table::new(vec![4095]).is_err());
    }
}
