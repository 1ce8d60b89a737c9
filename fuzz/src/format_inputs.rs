//! Harnesses over `kvformat`'s readers: a KV cache, a sidecar, a packed file.
//! Each returns the reader's verdict; any panic (including the invariant
//! checks below, which hold for every input a reader accepts) is a bug.

use kvformat::codec::CodecParams;
use kvformat::packed::{pack_tensor, PackedFile};
use kvformat::{KvCache, Sidecar};

use crate::checksums::with_fixed_checksums;
use crate::scratch::ScratchDir;

/// Opens `bytes` as a KV cache, reads every tensor and compresses it with
/// ADR-002: every finite cache must compress, to a payload that decodes back
/// to the reconstruction. Returns the number of tensors.
pub fn read_cache(bytes: &[u8]) -> kvformat::Result<usize> {
    let scratch = ScratchDir::new();
    let path = scratch.file("input.safetensors", bytes);
    let cache = KvCache::open(&path)?;
    for (entry, dtype) in cache.tensors() {
        let values = cache.values(entry, dtype)?;
        let count = entry.shape.iter().product::<usize>();
        assert_eq!(
            values.len(),
            count,
            "{}: values do not fill the shape",
            entry.name
        );
        let (packed, reconstruction) = pack_tensor(
            &entry.name,
            dtype,
            &entry.shape,
            &values,
            &CodecParams::adr002(64),
        )
        .unwrap_or_else(|e| panic!("{}: a finite cache tensor must compress: {e}", entry.name));
        assert_eq!(reconstruction.len(), count);
        assert_eq!(packed.entry.stored_len, packed.stored.len());
    }
    Ok(cache.tensors().count())
}

/// Parses `bytes` as a `.metadata.json` sidecar; one that parses must
/// survive a write and read back unchanged.
pub fn read_sidecar(bytes: &[u8]) -> kvformat::Result<Sidecar> {
    let scratch = ScratchDir::new();
    let sidecar = Sidecar::read(&scratch.file("input.metadata.json", bytes))?;
    let copy = scratch.path("copy.metadata.json");
    sidecar
        .write(&copy)
        .expect("a parsed sidecar can be written");
    assert_eq!(
        Sidecar::read(&copy).expect("a written sidecar reads back"),
        sidecar
    );
    Ok(sidecar)
}

/// Opens `bytes` (after [`with_fixed_checksums`]) as a packed file and
/// unpacks every tensor: each one that unpacks has exactly as many values as
/// its manifest shape. Returns the number of tensors.
pub fn read_packed(bytes: &[u8]) -> kvformat::Result<usize> {
    let scratch = ScratchDir::new();
    let packed =
        PackedFile::open(&scratch.file("input.safetensors", &with_fixed_checksums(bytes)))?;
    for (name, tensor) in &packed.manifest().tensors {
        let values = packed.unpack(name)?;
        assert_eq!(
            values.len(),
            tensor.shape.iter().product::<usize>(),
            "{name}: values do not fill the shape"
        );
    }
    Ok(packed.manifest().tensors.len())
}
