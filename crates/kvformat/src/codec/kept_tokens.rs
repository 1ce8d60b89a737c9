//! Kept tokens (attention sinks and the most recent tokens) stored as raw
//! little-endian FP16, so they round trip exactly to their f16 values.

use half::f16;

use super::CodecError;

/// Appends `values` as little-endian f16 (round to nearest even); a value
/// beyond f16's range is an error rather than a silent infinity.
pub fn write(values: &[f32], payload: &mut Vec<u8>) -> Result<(), CodecError> {
    let mut halves = vec![f16::ZERO; values.len()];
    half::slice::HalfFloatSliceExt::convert_from_f32_slice(&mut halves[..], values);
    if let Some(index) = halves.iter().position(|h| h.is_infinite()) {
        return Err(CodecError::KeptTokenOverflow {
            value: values[index],
        });
    }
    for value in halves {
        payload.extend_from_slice(&value.to_le_bytes());
    }
    Ok(())
}

/// Reads `bytes.len() / 2` little-endian f16 values; they must all be finite.
pub fn read(bytes: &[u8]) -> Result<Vec<f32>, CodecError> {
    bytes
        .chunks_exact(2)
        .map(|pair| {
            let value = f16::from_le_bytes([pair[0], pair[1]]).to_f32();
            if value.is_finite() {
                Ok(value)
            } else {
                Err(CodecError::CorruptPayload("non-finite kept-token value"))
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_values_round_trip_to_their_f16() {
        let values = [1.0f32, -2.5, 0.1, 65504.0, 6.0e-8];
        let mut payload = Vec::new();
        write(&values, &mut payload).unwrap();
        // 1.0 = 0x3C00, -2.5 = 0xC100 (little-endian).
        assert_eq!(&payload[..4], [0x00, 0x3C, 0x00, 0xC1]);
        let decoded = read(&payload).unwrap();
        for (x, y) in values.iter().zip(&decoded) {
            assert_eq!(*y, f16::from_f32(*x).to_f32());
        }
    }

    #[test]
    fn values_beyond_f16_range_are_rejected() {
        let error = write(&[1.0, 70000.0], &mut Vec::new()).unwrap_err();
        assert!(matches!(error, CodecError::KeptTokenOverflow { value } if value == 70000.0));
    }
}
