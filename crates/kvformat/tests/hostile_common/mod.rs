//! Hostile files shared by the `hostile_*` tests.
#![allow(dead_code)]

use std::path::Path;

use kvformat::packed::{MANIFEST_CRC_KEY, MANIFEST_KEY};
use serde_json::Value;

/// `header` as a safetensors header (u64 length, JSON) followed by `data`.
pub fn safetensors_bytes(header: &str, data: &[u8]) -> Vec<u8> {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(data);
    bytes
}

/// A valid safetensors file of a million empty tensors (a ~56 MB header).
pub fn million_empty_tensors() -> Vec<u8> {
    let entries: Vec<String> = (0..1_000_000)
        .map(|i| format!(r#""t{i:07}":{{"dtype":"F16","shape":[0],"data_offsets":[0,0]}}"#))
        .collect();
    safetensors_bytes(&format!("{{{}}}", entries.join(",")), &[])
}

/// Applies `edit` to the first manifest entry of the packed file at `path`
/// and recomputes the manifest checksum, so only the edit is wrong.
pub fn edit_first_manifest_entry(
    path: &Path,
    edit: impl FnOnce(&mut serde_json::Map<String, Value>),
) {
    let bytes = std::fs::read(path).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    let metadata = header["__metadata__"].as_object_mut().unwrap();
    let mut manifest: Value =
        serde_json::from_str(metadata[MANIFEST_KEY].as_str().unwrap()).unwrap();
    let entry = manifest["tensors"]
        .as_object_mut()
        .unwrap()
        .values_mut()
        .next()
        .unwrap();
    edit(entry.as_object_mut().unwrap());
    let manifest_json = manifest.to_string();
    metadata.insert(
        MANIFEST_CRC_KEY.into(),
        format!("{:08x}", crc32fast::hash(manifest_json.as_bytes())).into(),
    );
    metadata.insert(MANIFEST_KEY.into(), manifest_json.into());
    std::fs::write(
        path,
        safetensors_bytes(&header.to_string(), &bytes[8 + header_len..]),
    )
    .unwrap();
}
