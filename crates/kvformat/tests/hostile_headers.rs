//! Bounded memory on hostile headers: sizes a file claims but does not have
//! (terabyte headers, overflowing shapes, huge offsets, millions of tensors,
//! bomb-sized LZ4 payloads) are rejected with a clear error before anything
//! of that size is allocated. A counting allocator measures every allocation
//! the reader makes on the calling thread.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::path::Path;

use kvformat::codec::CodecParams;
use kvformat::packed::{pack_tensor, write_packed, PackedFile, MANIFEST_CRC_KEY, MANIFEST_KEY};
use kvformat::{CacheDtype, KvCache};
use serde_json::Value;

/// Counts this thread's live bytes, their peak and the largest single request.
struct CountingAllocator;

thread_local! {
    static LIVE: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn record(size: usize) {
    let _ = LIVE.try_with(|live| {
        live.set(live.get() + size);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(live.get())));
    });
    let _ = LARGEST.try_with(|largest| largest.set(largest.get().max(size)));
}

fn forget(size: usize) {
    let _ = LIVE.try_with(|live| live.set(live.get().saturating_sub(size)));
}

unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        record(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        forget(layout.size());
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        forget(layout.size());
        record(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// Peak bytes live at once, and the largest single allocation, during `f`.
struct Allocations {
    peak: usize,
    largest: usize,
}

fn measure<T>(f: impl FnOnce() -> T) -> (T, Allocations) {
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    LARGEST.with(|l| l.set(0));
    let result = f();
    let allocations = Allocations { peak: PEAK.with(Cell::get) - base, largest: LARGEST.with(Cell::get) };
    (result, allocations)
}

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;

/// `header` as a safetensors header (u64 length, JSON) followed by `data`.
fn safetensors_bytes(header: &str, data: &[u8]) -> Vec<u8> {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(data);
    bytes
}

/// Opens `bytes` as a KV cache; returns the error text and what opening allocated.
fn open_cache_error(bytes: &[u8]) -> (String, Allocations) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hostile.safetensors");
    std::fs::write(&path, bytes).unwrap();
    let (result, allocations) = measure(|| KvCache::open(&path).map(|_| ()));
    (result.expect_err("a hostile cache must be rejected").to_string(), allocations)
}

#[test]
fn header_length_of_a_terabyte_is_rejected_before_reading_it() {
    let mut bytes = (1u64 << 40).to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    let (error, allocations) = open_cache_error(&bytes);
    assert!(error.contains("hostile.safetensors") && error.contains("header length is larger than"), "{error}");
    assert!(allocations.peak < 64 * KIB, "allocated {} bytes", allocations.peak);
}

#[test]
fn header_length_past_the_end_of_the_file_is_rejected() {
    let mut bytes = (50u64 * MIB as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    let (error, allocations) = open_cache_error(&bytes);
    assert!(error.contains("runs past the end of the file"), "{error}");
    assert!(allocations.peak < 64 * KIB, "allocated {} bytes", allocations.peak);
}

#[test]
fn shape_whose_product_overflows_usize_is_rejected() {
    // 2^32 * 2^32 * 16 overflows u64; each factor alone is a plausible dim.
    let header = r#"{"layer_0_key":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,4]}}"#;
    let (error, allocations) = open_cache_error(&safetensors_bytes(header, &[0; 4]));
    assert!(error.contains("overflows"), "{error}");
    assert!(allocations.peak < 64 * KIB, "allocated {} bytes", allocations.peak);
}

#[test]
fn offsets_claiming_a_petabyte_of_data_are_rejected() {
    let header = r#"{"layer_0_key":{"dtype":"U8","shape":[1000000000000000],"data_offsets":[0,1000000000000000]}}"#;
    let (error, allocations) = open_cache_error(&safetensors_bytes(header, &[0; 16]));
    assert!(error.contains("does not end exactly at the end of the file"), "{error}");
    assert!(allocations.peak < 64 * KIB, "allocated {} bytes", allocations.peak);
}

#[test]
fn a_million_tiny_tensors_are_rejected_before_parsing_them() {
    let entries: Vec<String> =
        (0..1_000_000).map(|i| format!(r#""t{i:07}":{{"dtype":"F16","shape":[0],"data_offsets":[0,0]}}"#)).collect();
    let header = format!("{{{}}}", entries.join(","));
    let bytes = safetensors_bytes(&header, &[]);
    drop(entries);
    let (error, allocations) = open_cache_error(&bytes);
    assert!(error.contains("tensors"), "{error}");
    // The header is ~56 MB; parsing it into a million entries would take far more.
    assert!(allocations.peak < 4 * MIB, "allocated {} bytes for a {} byte file", allocations.peak, bytes.len());
}

/// A real packed file of one small tensor, then `edit` applied to its
/// manifest entry, with every checksum recomputed so only the edit is wrong.
fn packed_with_edited_manifest(path: &Path, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) {
    let values: Vec<f32> = (0..256).map(|i| (i as f32 * 0.1).sin()).collect();
    let (tensor, _) = pack_tensor("layer_0_key", CacheDtype::F16, &[1, 1, 4, 64], &values, &CodecParams::adr002(64)).unwrap();
    write_packed(path, &[tensor], &BTreeMap::new()).unwrap();
    let bytes = std::fs::read(path).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    let metadata = header["__metadata__"].as_object_mut().unwrap();
    let mut manifest: Value = serde_json::from_str(metadata[MANIFEST_KEY].as_str().unwrap()).unwrap();
    edit(manifest["tensors"]["layer_0_key"].as_object_mut().unwrap());
    let manifest_json = manifest.to_string();
    metadata.insert(MANIFEST_CRC_KEY.into(), format!("{:08x}", crc32fast::hash(manifest_json.as_bytes())).into());
    metadata.insert(MANIFEST_KEY.into(), manifest_json.into());
    std::fs::write(path, safetensors_bytes(&header.to_string(), &bytes[8 + header_len..])).unwrap();
}

/// Opens and unpacks a packed file; returns the error text and the allocations.
fn unpack_error(path: &Path) -> (String, Allocations) {
    let (result, allocations) = measure(|| PackedFile::open(path).and_then(|packed| packed.unpack("layer_0_key")));
    (result.expect_err("a hostile packed file must be rejected").to_string(), allocations)
}

#[test]
fn lz4_payload_claiming_terabytes_is_rejected_before_decompressing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bomb.safetensors");
    // A shape of 2^40 values makes 8 TB of raw payload "plausible" per value;
    // the stored bytes (a few hundred) can never expand to that much.
    packed_with_edited_manifest(&path, |entry| {
        entry.insert("shape".into(), serde_json::json!([1u64 << 40]));
        entry.insert("lz4".into(), true.into());
        entry.insert("raw_len".into(), (1u64 << 43).into());
    });
    let (error, allocations) = unpack_error(&path);
    assert!(error.contains("layer_0_key") && error.contains("raw_len"), "{error}");
    assert!(allocations.largest < MIB, "largest allocation {} bytes", allocations.largest);
}

#[test]
fn payload_length_that_does_not_match_the_shape_is_rejected_before_decoding() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shape.safetensors");
    // The stored payload is for 256 values; the manifest claims 2^36.
    packed_with_edited_manifest(&path, |entry| {
        entry.insert("shape".into(), serde_json::json!([1u64 << 36]));
    });
    let (error, allocations) = unpack_error(&path);
    assert!(error.contains("layer_0_key"), "{error}");
    assert!(allocations.largest < MIB, "largest allocation {} bytes", allocations.largest);
}

#[test]
fn sidecar_larger_than_a_mebibyte_is_refused_unread() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kv_cache.metadata.json");
    // Sparse: claims 1 TB without using the disk.
    std::fs::File::create(&path).unwrap().set_len(1 << 40).unwrap();
    let (result, allocations) = measure(|| kvformat::Sidecar::read(&path));
    let error = result.expect_err("a 1 TB sidecar must be refused").to_string();
    assert!(error.contains("kv_cache.metadata.json") && error.contains("too large for a sidecar"), "{error}");
    assert!(allocations.peak < 64 * KIB, "allocated {} bytes", allocations.peak);
}
