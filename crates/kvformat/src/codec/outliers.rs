//! Outliers kept in FP16 (`-outliers F`): the fraction `F` of quantized
//! values whose reconstruction errs most are stored exactly (as f16) beside
//! the codes, and overwrite their decoded values.
//!
//! At 2 bits a handful of values far from their group's grid carry much of
//! the attention error (keeping 1% of SmolLM2's key values takes a 2-bit
//! cache from +1.33 to about +0.8 perplexity; docs/fidelity.md). Positions are
//! indices into the grouped values (the order codes are stored in), within
//! fixed blocks of [`BLOCK`] values, so each is a u16 and the section's size
//! follows from the shape and `F` alone: `floor(F · block length)` outliers
//! per block, offsets ascending, then their f16 values in the same order.

use half::f16;

use super::CodecError;

/// Grouped values per block; an offset within a block fits a u16.
pub(crate) const BLOCK: usize = 1 << 16;

/// Bytes per outlier: a u16 offset and an f16 value.
const BYTES_PER_OUTLIER: usize = 4;

fn count_in_block(fraction: f64, len: usize) -> usize {
    (len as f64 * fraction).floor() as usize
}

/// Outliers among `n` grouped values.
pub(crate) fn count(fraction: f64, n: usize) -> usize {
    count_in_block(fraction, BLOCK) * (n / BLOCK) + count_in_block(fraction, n % BLOCK)
}

/// Byte length of the section for `n` grouped values, if it fits usize.
pub(crate) fn section_len(fraction: f64, n: usize) -> Option<usize> {
    count(fraction, n).checked_mul(BYTES_PER_OUTLIER)
}

/// Chooses each block's outliers (the values whose keeping saves the most
/// squared error: `restored`'s error against f16's; ties to the lower index;
/// only values f16 holds finitely) and returns the section's bytes.
pub(crate) fn encode(
    values: &[f32],
    restored: &[f32],
    fraction: f64,
) -> Result<Vec<u8>, CodecError> {
    let mut offsets = Vec::new();
    let mut kept = Vec::new();
    for (block, (values, restored)) in values.chunks(BLOCK).zip(restored.chunks(BLOCK)).enumerate()
    {
        let wanted = count_in_block(fraction, values.len());
        if wanted == 0 {
            continue;
        }
        let mut candidates: Vec<usize> = (0..values.len())
            .filter(|&i| f16::from_f32(values[i]).is_finite())
            .collect();
        if candidates.len() < wanted {
            return Err(CodecError::OutlierOverflow {
                index: block * BLOCK,
            });
        }
        // What keeping value i saves: its code's squared error less its f16's.
        let gain = |i: usize| {
            let x = f64::from(values[i]);
            (x - f64::from(restored[i])).powi(2) - (x - f64::from(f16::from_f32(values[i]))).powi(2)
        };
        let by_gain = |a: &usize, b: &usize| gain(*b).total_cmp(&gain(*a)).then(a.cmp(b));
        if wanted < candidates.len() {
            candidates.select_nth_unstable_by(wanted - 1, by_gain);
            candidates.truncate(wanted);
        }
        candidates.sort_unstable();
        offsets.extend(candidates.iter().map(|&i| i as u16));
        kept.extend(candidates.iter().map(|&i| f16::from_f32(values[i])));
    }
    let mut bytes = Vec::with_capacity(offsets.len() * BYTES_PER_OUTLIER);
    offsets
        .iter()
        .for_each(|o| bytes.extend_from_slice(&o.to_le_bytes()));
    kept.iter()
        .for_each(|v| bytes.extend_from_slice(&v.to_le_bytes()));
    Ok(bytes)
}

/// Overwrites the outliers' decoded values in `grouped` with their stored
/// ones. `bytes` is exactly [`section_len`] long (checked by the caller).
pub(crate) fn apply(bytes: &[u8], fraction: f64, grouped: &mut [f32]) -> Result<(), CodecError> {
    let (offset_bytes, value_bytes) = bytes.split_at(bytes.len() / 2);
    let mut offsets = offset_bytes
        .chunks_exact(2)
        .map(|b| usize::from(u16::from_le_bytes([b[0], b[1]])));
    let mut values = value_bytes
        .chunks_exact(2)
        .map(|b| f16::from_le_bytes([b[0], b[1]]));
    for grouped in grouped.chunks_mut(BLOCK) {
        let mut previous = None;
        for _ in 0..count_in_block(fraction, grouped.len()) {
            let (offset, value) =
                offsets
                    .next()
                    .zip(values.next())
                    .ok_or(CodecError::CorruptPayload(
                        "outlier section shorter than its count",
                    ))?;
            if offset >= grouped.len() || previous.is_some_and(|p| offset <= p) {
                return Err(CodecError::CorruptPayload(
                    "outlier offsets out of range or not ascending",
                ));
            }
            if !value.is_finite() {
                return Err(CodecError::CorruptPayload("outlier value is not finite"));
            }
            previous = Some(offset);
            grouped[offset] = value.to_f32();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_per_block_and_floor() {
        assert_eq!(count(0.01, 100), 1);
        assert_eq!(count(0.01, 99), 0);
        assert_eq!(count(0.01, BLOCK + 250), 655 + 2);
        assert_eq!(section_len(0.5, 10), Some(20));
        assert_eq!(count(0.0, 1 << 20), 0);
    }

    #[test]
    fn the_worst_reconstructed_values_are_kept_and_restored() {
        let values: Vec<f32> = (0..200).map(|i| i as f32).collect();
        let mut restored = values.clone();
        restored[17] += 5.0; // worst
        restored[3] -= 2.0; // second
        restored[150] += 2.0; // tied with 3: the lower index wins
        let bytes = encode(&values, &restored, 0.01).unwrap();
        assert_eq!(bytes.len(), section_len(0.01, 200).unwrap());
        assert_eq!(&bytes[..4], &[3, 0, 17, 0]);
        apply(&bytes, 0.01, &mut restored).unwrap();
        assert_eq!(
            (restored[3], restored[17], restored[150]),
            (3.0, 17.0, 152.0)
        );
    }

    #[test]
    fn values_f16_cannot_hold_are_never_chosen() {
        let mut values = vec![0.0f32; 100];
        values[5] = 1.0e6;
        let restored = vec![0.5f32; 100];
        let bytes = encode(&values, &restored, 0.01).unwrap();
        assert_ne!(bytes[..2], [5, 0]);
        let huge = vec![1.0e6f32; 100];
        assert!(matches!(
            encode(&huge, &restored, 0.01),
            Err(CodecError::OutlierOverflow { index: 0 })
        ));
    }

    #[test]
    fn hostile_sections_are_errors() {
        let mut grouped = vec![0.0f32; 200];
        let section = |offsets: [u16; 2], values: [f16; 2]| -> Vec<u8> {
            offsets
                .iter()
                .flat_map(|o| o.to_le_bytes())
                .chain(values.iter().flat_map(|v| v.to_le_bytes()))
                .collect()
        };
        let one = f16::ONE;
        for bad in [
            section([5, 5], [one, one]),
            section([9, 3], [one, one]),
            section([3, 200], [one, one]),
            section([3, 9], [one, f16::INFINITY]),
            section([3, 9], [f16::NAN, one]),
        ] {
            assert!(matches!(
                apply(&bad, 0.01, &mut grouped),
                Err(CodecError::CorruptPayload(_))
            ));
        }
        apply(&section([3, 9], [one, one]), 0.01, &mut grouped).unwrap();
        assert_eq!((grouped[3], grouped[9]), (1.0, 1.0));
    }
}
