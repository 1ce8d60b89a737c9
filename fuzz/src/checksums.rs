//! Checksums recomputed so that mutated inputs reach the decoders. Needs
//! only `kvformat` and `serde_json`, so every crate's tests can include it.

use kvformat::packed::{MANIFEST_CRC_KEY, MANIFEST_KEY};
use serde_json::Value;

/// A checksum-carrying input with its checksums recomputed, so mutations get
/// past them to the manifest and payload decoders (a fuzzer cannot forge a
/// CRC-32 by chance; the checksum checks themselves are covered by tests).
/// Bytes that are not a safetensors file with a parsable manifest come back unchanged.
pub fn with_fixed_checksums(bytes: &[u8]) -> Vec<u8> {
    fix_checksums(bytes).unwrap_or_else(|| bytes.to_vec())
}

fn fix_checksums(bytes: &[u8]) -> Option<Vec<u8>> {
    let header_len = usize::try_from(u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?)).ok()?;
    let header_end = header_len.checked_add(8)?;
    let mut header: Value = serde_json::from_slice(bytes.get(8..header_end)?).ok()?;
    let data = &bytes[header_end..];
    let mut manifest: Value =
        serde_json::from_str(header.get("__metadata__")?.get(MANIFEST_KEY)?.as_str()?).ok()?;
    for (name, entry) in manifest.get_mut("tensors")?.as_object_mut()? {
        let offsets = header
            .get(name)
            .and_then(|t| t.get("data_offsets"))
            .and_then(Value::as_array);
        let range = offsets.and_then(|o| {
            Some(
                usize::try_from(o.first()?.as_u64()?).ok()?
                    ..usize::try_from(o.get(1)?.as_u64()?).ok()?,
            )
        });
        if let (Some(stored), Some(entry)) =
            (range.and_then(|r| data.get(r)), entry.as_object_mut())
        {
            entry.insert("crc32".into(), crc32(stored).into());
        }
    }
    let manifest_json = serde_json::to_string(&manifest).ok()?;
    let metadata = header.get_mut("__metadata__")?.as_object_mut()?;
    metadata.insert(
        MANIFEST_CRC_KEY.into(),
        format!("{:08x}", crc32(manifest_json.as_bytes())).into(),
    );
    metadata.insert(MANIFEST_KEY.into(), manifest_json.into());
    let header_json = serde_json::to_vec(&header).ok()?;
    let mut fixed = (header_json.len() as u64).to_le_bytes().to_vec();
    fixed.extend_from_slice(&header_json);
    fixed.extend_from_slice(data);
    Some(fixed)
}

/// CRC-32 (IEEE, as zlib), bit by bit: inputs are small and this keeps the
/// harness free of dependencies its includers lack.
pub fn crc32(bytes: &[u8]) -> u32 {
    !bytes.iter().fold(!0u32, |crc, &byte| {
        (0..8).fold(crc ^ u32::from(byte), |crc, _| {
            (crc >> 1) ^ (0xEDB8_8320 & (crc & 1).wrapping_neg())
        })
    })
}
