//! Issue 10 ("Reliability II") at the library level: decoded values that
//! overflow, manifest metrics out of range, names that would break the
//! one-line error, sidecars that are not regular files, writers that would
//! write what the reader refuses.

use std::collections::BTreeMap;

use kvformat::codec::CodecParams;
use kvformat::packed::{pack_tensor, write_packed, PackedFile, PackedTensor};
use kvformat::{write_cache, CacheDtype, CacheTensor, KvCache, Sidecar};

/// One packed tensor of `values` (shape `[1, 1, n/64, 64]`), for editing.
fn packed_tensor(values: &[f32], params: &CodecParams) -> PackedTensor {
    let shape = [1, 1, values.len() / 64, 64];
    pack_tensor("layer_0_key", CacheDtype::F32, &shape, values, params)
        .unwrap()
        .0
}

/// Makes `tensor` store `stored` uncompressed, checksum recomputed.
fn restore_as(tensor: &mut PackedTensor, stored: Vec<u8>) {
    tensor.entry.lz4 = false;
    tensor.entry.raw_len = stored.len();
    tensor.entry.stored_len = stored.len();
    tensor.entry.crc32 = crc32fast_hash(&stored);
    tensor.stored = stored;
}

/// CRC-32 (IEEE), bit by bit: the checksum the manifest holds, computed
/// independently of the crate under test.
fn crc32fast_hash(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[test]
fn checksum_valid_scales_that_overflow_the_inverse_rotation_saturate() {
    // Values beyond f16 range make the encoder store f32 scales; then every
    // scale is set to f32::MAX and every code to the largest: each value
    // decodes to f32::MAX, and un-rotating sums 64 of them. The inverse
    // rotation saturates to finite f32 instead of overflowing to infinity
    // (the encoder's -fit mse can choose such scales itself, so refusing
    // would make kv-compress write files -decompress refuses).
    let values: Vec<f32> = (0..64).map(|i| 1e30 * (i as f32 - 31.5)).collect();
    let params = CodecParams {
        rotation_seed: Some(7),
        ..CodecParams::adr002(64)
    };
    let mut tensor = packed_tensor(&values, &params);
    assert_eq!(
        tensor.entry.raw_len,
        4 + 32,
        "one f32 scale and 64 4-bit codes"
    );
    let mut stored = f32::MAX.to_le_bytes().to_vec();
    stored.extend([0xFF; 32]);
    restore_as(&mut tensor, stored);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("inf.safetensors");
    write_packed(&path, &[tensor], &BTreeMap::new()).unwrap();
    let decoded = PackedFile::open(&path)
        .and_then(|packed| packed.unpack("layer_0_key"))
        .unwrap();
    assert_eq!(decoded.len(), 64);
    assert!(decoded.iter().all(|x| x.is_finite()), "{decoded:?}");
    // Every stored value is f32::MAX: the rotated-back vector is its
    // Hadamard image, sqrt(64) * f32::MAX at one position, saturated.
    assert!(decoded.iter().any(|x| x.abs() == f32::MAX), "{decoded:?}");
}

/// An edit of a manifest entry's metrics.
type MetricsEdit = fn(&mut kvformat::TensorMetrics);

#[test]
fn manifest_metrics_out_of_range_are_refused() {
    let values: Vec<f32> = (0..64).map(|i| (i as f32 * 0.3).sin()).collect();
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, MetricsEdit); 5] = [
        ("metrics.rmse -1.0", |m| m.rmse = -1.0),
        ("metrics.cosine 7.0", |m| m.cosine = 7.0),
        ("metrics.max_error 1e308", |m| m.max_error = 1e308),
        ("metrics.rmse 1e300", |m| m.rmse = 1e300),
        ("metrics.snr_db 1000.0", |m| m.snr_db = 1000.0),
    ];
    for (needle, edit) in cases {
        let mut tensor = packed_tensor(&values, &CodecParams::adr002(64));
        edit(&mut tensor.entry.metrics);
        let path = dir.path().join("metrics.safetensors");
        write_packed(&path, &[tensor], &BTreeMap::new()).unwrap();
        let error = PackedFile::open(&path).unwrap_err().to_string();
        assert!(
            error.contains(needle) && error.contains("out of range"),
            "{needle}: {error}"
        );
    }
}

#[test]
fn a_name_with_a_newline_or_escape_stays_on_one_quoted_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("names.safetensors");
    let name = "layer_0_key\nError: forged\u{1b}[2K";
    write_cache(
        &path,
        &[CacheTensor {
            name,
            dtype: CacheDtype::F32,
            shape: &[2],
            values: &[1.0, f32::NAN],
        }],
        &BTreeMap::new(),
    )
    .unwrap();
    let cache = KvCache::open(&path).unwrap();
    let (entry, dtype) = cache.tensors().next().unwrap();
    let error = cache.values(entry, dtype).unwrap_err().to_string();
    assert_eq!(error.lines().count(), 1, "{error:?}");
    assert!(!error.contains('\u{1b}'), "{error:?}");
    assert!(
        error.contains(r#""layer_0_key\nError: forged\u{1b}[2K": non-finite"#),
        "{error}"
    );
}

#[cfg(unix)]
#[test]
fn a_sidecar_that_is_a_fifo_or_a_device_is_refused_without_reading_it() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("kv.metadata.json");
    assert!(std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    // No writer ever opens the FIFO: a blocking open would hang here.
    let error = Sidecar::read_beside(&dir.path().join("kv.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("kv.metadata.json: is a FIFO, not a regular file"),
        "{error}"
    );
    // A link to /dev/zero (length 0, endless data): read, never written.
    let zero = dir.path().join("zero.metadata.json");
    std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
    let error = Sidecar::read(&zero).unwrap_err().to_string();
    assert!(error.contains("is a device, not a regular file"), "{error}");
}

#[test]
fn no_file_is_written_that_the_reader_would_refuse() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("many.safetensors");
    let names: Vec<String> = (0..=kvformat::tensor_file::MAX_TENSORS)
        .map(|i| format!("t{i:05}"))
        .collect();
    let tensors: Vec<CacheTensor<'_>> = names
        .iter()
        .map(|name| CacheTensor {
            name,
            dtype: CacheDtype::F32,
            shape: &[0],
            values: &[],
        })
        .collect();
    let error = write_cache(&path, &tensors, &BTreeMap::new())
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("16385 tensors, more than the 16384"),
        "{error}"
    );
    // The reader's limit is the safetensors crate's 100 MB header.
    let huge = BTreeMap::from([("note".to_string(), "x".repeat(100_000_000))]);
    let error = write_cache(&path, &tensors[..1], &huge)
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("more than the 100000000-byte limit"),
        "{error}"
    );
    assert!(!path.exists());
}

#[test]
fn a_file_of_16385_tensors_is_refused_on_reading_too() {
    // 16385 entries and no __metadata__ passed the entry count, so the
    // file could be read but not packed (the packed file adds __metadata__).
    let header: String = (0..=kvformat::tensor_file::MAX_TENSORS)
        .map(|i| format!(r#""t{i:05}":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}"#))
        .collect::<Vec<_>>()
        .join(",");
    let header = format!("{{{header}}}");
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend(header.as_bytes());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("many.safetensors");
    std::fs::write(&path, bytes).unwrap();
    let error = KvCache::open(&path).unwrap_err().to_string();
    assert!(
        error.contains("16385 tensors, more than the 16384 a file may hold"),
        "{error}"
    );
}
