//! Bounded memory on hostile headers: sizes a file claims but does not have
//! (terabyte headers, overflowing shapes, huge offsets, millions of tensors,
//! bomb-sized LZ4 payloads) are rejected with a clear error before anything
//! of that size is allocated. A counting allocator measures every allocation
//! the reader makes on the calling thread.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::BTreeMap;

mod hostile_common;

use hostile_common::{edit_first_manifest_entry, million_empty_tensors, safetensors_bytes};
use kvformat::codec::CodecParams;
use kvformat::packed::{pack_tensor, write_packed, PackedFile};
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
    let allocations = Allocations {
        peak: PEAK.with(Cell::get) - base,
        largest: LARGEST.with(Cell::get),
    };
    (result, allocations)
}

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;

/// Opens `bytes` as a KV cache; returns the error text and what opening allocated.
fn open_cache_error(bytes: &[u8]) -> (String, Allocations) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hostile.safetensors");
    std::fs::write(&path, bytes).unwrap();
    let (result, allocations) = measure(|| KvCache::open(&path).map(|_| ()));
    (
        result
            .expect_err("a hostile cache must be rejected")
            .to_string(),
        allocations,
    )
}

#[test]
fn header_length_of_a_terabyte_is_rejected_before_reading_it() {
    let mut bytes = (1u64 << 40).to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    let (error, allocations) = open_cache_error(&bytes);
    assert!(
        error.contains("hostile.safetensors") && error.contains("header length is larger than"),
        "{error}"
    );
    assert!(
        allocations.peak < 64 * KIB,
        "allocated {} bytes",
        allocations.peak
    );
}

#[test]
fn header_length_past_the_end_of_the_file_is_rejected() {
    let mut bytes = (50u64 * MIB as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    let (error, allocations) = open_cache_error(&bytes);
    assert!(error.contains("runs past the end of the file"), "{error}");
    assert!(
        allocations.peak < 64 * KIB,
        "allocated {} bytes",
        allocations.peak
    );
}

#[test]
fn shape_whose_product_overflows_usize_is_rejected() {
    // 2^32 * 2^32 * 16 overflows u64; each factor alone is a plausible dim.
    let header = r#"{"layer_0_key":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,4]}}"#;
    let (error, allocations) = open_cache_error(&safetensors_bytes(header, &[0; 4]));
    assert!(error.contains("overflows"), "{error}");
    assert!(
        allocations.peak < 64 * KIB,
        "allocated {} bytes",
        allocations.peak
    );
}

#[test]
fn offsets_claiming_a_petabyte_of_data_are_rejected() {
    let header = r#"{"layer_0_key":{"dtype":"U8","shape":[1000000000000000],"data_offsets":[0,1000000000000000]}}"#;
    let (error, allocations) = open_cache_error(&safetensors_bytes(header, &[0; 16]));
    assert!(
        error.contains("does not end exactly at the end of the file"),
        "{error}"
    );
    assert!(
        allocations.peak < 64 * KIB,
        "allocated {} bytes",
        allocations.peak
    );
}

#[test]
fn a_million_tiny_tensors_are_rejected_before_parsing_them() {
    let bytes = million_empty_tensors();
    let (error, allocations) = open_cache_error(&bytes);
    assert!(error.contains("tensors"), "{error}");
    // The header is ~56 MB; parsing it into a million entries would take far more.
    assert!(
        allocations.peak < 4 * MIB,
        "allocated {} bytes for a {} byte file",
        allocations.peak,
        bytes.len()
    );
}

/// Packs one small tensor, applies `edit` to its manifest entry (checksums
/// recomputed), and checks opening and unpacking it fails naming the tensor
/// and `needle` without any allocation near the claimed size.
fn assert_edited_manifest_rejected(
    edit: impl FnOnce(&mut serde_json::Map<String, Value>),
    needle: &str,
) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("edited.safetensors");
    let values: Vec<f32> = (0..256).map(|i| (i as f32 * 0.1).sin()).collect();
    let (tensor, _) = pack_tensor(
        "layer_0_key",
        CacheDtype::F16,
        &[1, 1, 4, 64],
        &values,
        &CodecParams::adr002(64),
    )
    .unwrap();
    write_packed(&path, &[tensor], &BTreeMap::new()).unwrap();
    edit_first_manifest_entry(&path, edit);
    let (result, allocations) =
        measure(|| PackedFile::open(&path).and_then(|packed| packed.unpack("layer_0_key")));
    let error = result
        .expect_err("a hostile packed file must be rejected")
        .to_string();
    assert!(
        error.contains("layer_0_key") && error.contains(needle),
        "{error}"
    );
    assert!(
        allocations.largest < MIB,
        "largest allocation {} bytes",
        allocations.largest
    );
}

#[test]
fn lz4_payload_claiming_terabytes_is_rejected_before_decompressing() {
    // A shape of 2^40 values makes 8 TB of raw payload "plausible" per value;
    // the stored bytes (a few hundred) can never expand to that much.
    assert_edited_manifest_rejected(
        |entry| {
            entry.insert("shape".into(), serde_json::json!([1u64 << 40]));
            entry.insert("lz4".into(), true.into());
            entry.insert("raw_len".into(), (1u64 << 43).into());
        },
        "more than LZ4 can expand",
    );
}

#[test]
fn payload_length_that_does_not_match_the_shape_is_rejected_before_decoding() {
    // The stored payload is for 256 values; the manifest claims 2^36.
    assert_edited_manifest_rejected(
        |entry| {
            entry.insert("shape".into(), serde_json::json!([1u64 << 36]));
        },
        "the codec payload for this shape is",
    );
}

#[test]
fn sidecar_larger_than_a_mebibyte_is_refused_unread() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kv_cache.metadata.json");
    // Sparse: claims 1 TB without using the disk.
    std::fs::File::create(&path)
        .unwrap()
        .set_len(1 << 40)
        .unwrap();
    let (result, allocations) = measure(|| kvformat::Sidecar::read(&path));
    let error = result
        .expect_err("a 1 TB sidecar must be refused")
        .to_string();
    assert!(
        error.contains("kv_cache.metadata.json") && error.contains("too large for a sidecar"),
        "{error}"
    );
    assert!(
        allocations.peak < 64 * KIB,
        "allocated {} bytes",
        allocations.peak
    );
}
