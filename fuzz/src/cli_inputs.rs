//! Harnesses over `kv-compress`: the `-decompress` pipeline on arbitrary
//! packed-file bytes, and the Go-style flag parser on arbitrary arguments.

use kv_compress::flags::{self, Command, Options, GROUP_SIZE_RANGE};
use kvformat::metrics::Report;
use kvformat::packed::{MANIFEST_CRC_KEY, MANIFEST_KEY};
use kvformat::KvCache;
use serde_json::Value;

use crate::scratch::ScratchDir;

/// Runs `kv-compress -decompress -input IN -output OUT` on `bytes` after
/// [`with_fixed_checksums`]. When it succeeds, its JSON report must hold only
/// finite numbers and the restored file must be a KV cache with the
/// manifest's names and shapes.
pub fn decompress(bytes: &[u8]) -> Result<Report, kv_compress::Error> {
    let scratch = ScratchDir::new();
    let input = scratch.file("input.safetensors", &with_fixed_checksums(bytes));
    let output = scratch.path("restored.safetensors");
    let options = Options {
        input: Some(input),
        output: Some(output.clone()),
        decompress: true,
        ..Options::default()
    };
    let report = kv_compress::run(&options)?;
    let json = report.to_json();
    let parsed: Report = serde_json::from_str(&json).unwrap_or_else(|e| panic!("report is not valid JSON ({e}): {json}"));
    assert_eq!(parsed.num_tensors, report.num_tensors, "{json}");
    let restored = KvCache::open(&output).expect("the restored file is a KV cache");
    assert_eq!(restored.tensors().count(), report.num_tensors);
    Ok(report)
}

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
    let mut manifest: Value = serde_json::from_str(header.get("__metadata__")?.get(MANIFEST_KEY)?.as_str()?).ok()?;
    for (name, entry) in manifest.get_mut("tensors")?.as_object_mut()? {
        let offsets = header.get(name).and_then(|t| t.get("data_offsets")).and_then(Value::as_array);
        let range = offsets.and_then(|o| Some(usize::try_from(o.first()?.as_u64()?).ok()?..usize::try_from(o.get(1)?.as_u64()?).ok()?));
        if let (Some(stored), Some(entry)) = (range.and_then(|r| data.get(r)), entry.as_object_mut()) {
            entry.insert("crc32".into(), crc32fast::hash(stored).into());
        }
    }
    let manifest_json = serde_json::to_string(&manifest).ok()?;
    let metadata = header.get_mut("__metadata__")?.as_object_mut()?;
    metadata.insert(MANIFEST_CRC_KEY.into(), format!("{:08x}", crc32fast::hash(manifest_json.as_bytes())).into());
    metadata.insert(MANIFEST_KEY.into(), manifest_json.into());
    let header_json = serde_json::to_vec(&header).ok()?;
    let mut fixed = (header_json.len() as u64).to_le_bytes().to_vec();
    fixed.extend_from_slice(&header_json);
    fixed.extend_from_slice(data);
    Some(fixed)
}

/// Parses `bytes` as a command line (arguments separated by NUL, which no
/// real argument can contain). Whatever parses must respect the documented
/// ranges: out-of-range values are errors, never silently accepted.
pub fn parse_flags(bytes: &[u8]) -> Result<Command, flags::FlagError> {
    let text = String::from_utf8_lossy(bytes);
    let args: Vec<String> = if text.is_empty() { Vec::new() } else { text.split('\0').map(String::from).collect() };
    let command = flags::parse(&args)?;
    if let Command::Run(options) = &command {
        assert!(GROUP_SIZE_RANGE.contains(&options.group_size) && options.group_size.is_power_of_two(), "{options:?}");
        assert!((0.0..1.0).contains(&options.sparsity), "{options:?}");
        assert!(matches!(options.bits, 2 | 3 | 4 | 8), "{options:?}");
    }
    Ok(command)
}
