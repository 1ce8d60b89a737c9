//! A safetensors file, validated by the `safetensors` crate before any
//! tensor byte is touched. Both KV caches and packed files are read through
//! it; it accepts Python's space-padded headers and Go's unpadded ones.
//!
//! The file is read, not memory-mapped: a tensor at a time, into memory that
//! is then checked and used, so a file truncated or rewritten by another
//! process mid-run is a clean error (or bytes that were checked), never a
//! SIGBUS, and what was validated is what gets encoded.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use safetensors::{Dtype, SafeTensorError, SafeTensors};

use crate::atomic::Staged;
use crate::error::{Error, Result, TensorProblem};
use crate::input::{open_regular, try_zeroed};

/// Size of the little-endian u64 that opens every safetensors file.
const HEADER_LENGTH_BYTES: usize = 8;
/// Largest header the `safetensors` crate reads (its own private limit);
/// writers check it too, so nothing is written that the reader refuses.
pub const MAX_HEADER_BYTES: usize = 100_000_000;
/// Most tensors a file may hold. A KV cache has two per layer, so this allows
/// 8192 layers, and keeps a hostile header (millions of empty tensors fit in
/// the crate's 100 MB header limit) from making the parser build them all.
pub const MAX_TENSORS: usize = 16_384;

/// One tensor's header entry; `data` is its byte range in the file.
#[derive(Clone, Debug)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    data: std::ops::Range<usize>,
}

impl TensorEntry {
    /// Bytes of this tensor's data in the file.
    pub fn byte_len(&self) -> usize {
        self.data.len()
    }
}

/// An open, structurally valid safetensors file.
#[derive(Debug)]
pub struct TensorFile {
    path: PathBuf,
    file: File,
    /// Sorted by name, as the original writer sorts them.
    tensors: Vec<TensorEntry>,
    metadata: BTreeMap<String, String>,
}

impl TensorFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = open_regular(path)?;
        let len = file
            .metadata()
            .map_err(|e| Error::io(path, "stat", e))?
            .len();
        if len == 0 {
            return Err(Error::EmptyFile { path: path.into() });
        }
        let structure = |e| structure_error(path, None, e);
        let mut prefix = [0u8; HEADER_LENGTH_BYTES];
        if len < HEADER_LENGTH_BYTES as u64 {
            return Err(structure(SafeTensorError::HeaderTooSmall));
        }
        read_exact_at(&file, path, &mut prefix, 0)?;
        let header_len = u64::from_le_bytes(prefix);
        if header_len > MAX_HEADER_BYTES as u64 {
            return Err(structure(SafeTensorError::HeaderTooLarge));
        }
        let header_end = HEADER_LENGTH_BYTES + header_len as usize;
        if header_end as u64 > len {
            return Err(structure(SafeTensorError::InvalidHeaderLength));
        }
        // Counted from the file before the header is read into memory or
        // parsed: a 56 MB header of a million empty tensors costs neither.
        if let Some(entries) = count_header_entries_in(&file, header_len) {
            if entries > MAX_TENSORS + 1 {
                return Err(Error::Structure {
                    path: path.into(),
                    problem: format!("header lists {entries} entries, more than the {MAX_TENSORS} tensors a file may hold"),
                });
            }
        }
        let mut header = try_zeroed::<u8>(header_end, "the header")
            .map_err(|p| Error::tensor(path, "(header)", p))?;
        read_exact_at(&file, path, &mut header, 0)?;
        // The crate validates a header against a buffer of the whole file, of
        // which it only reads the header and the length. Given the header
        // alone, a valid header with data fails with exactly
        // `MetadataIncompleteBuffer`; then the data length is checked here.
        let metadata = match SafeTensors::read_metadata(&header) {
            Ok((_, metadata)) => metadata,
            Err(SafeTensorError::MetadataIncompleteBuffer) => {
                serde_json::from_slice::<safetensors::tensor::Metadata>(
                    &header[HEADER_LENGTH_BYTES..],
                )
                .map_err(|e| structure(SafeTensorError::InvalidHeaderDeserialization(e)))?
            }
            Err(e) => return Err(structure_error(path, header_bytes(&header), e)),
        };
        let data_start = header_end;
        let mut tensors: Vec<TensorEntry> = metadata
            .tensors()
            .into_iter()
            .map(|(name, info)| TensorEntry {
                name,
                dtype: info.dtype,
                shape: info.shape.clone(),
                data: data_start + info.data_offsets.0..data_start + info.data_offsets.1,
            })
            .collect();
        let data_end = tensors
            .iter()
            .map(|t| t.data.end)
            .max()
            .unwrap_or(data_start);
        if data_end as u64 != len {
            return Err(structure(SafeTensorError::MetadataIncompleteBuffer));
        }
        if tensors.len() > MAX_TENSORS {
            return Err(Error::Structure {
                path: path.into(),
                problem: format!(
                    "{} tensors, more than the {MAX_TENSORS} a file may hold",
                    tensors.len()
                ),
            });
        }
        tensors.sort_by(|a, b| a.name.cmp(&b.name));
        let metadata = metadata
            .metadata()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect();
        Ok(TensorFile {
            path: path.into(),
            file,
            tensors,
            metadata,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn tensors(&self) -> &[TensorEntry] {
        &self.tensors
    }

    /// The header's `__metadata__` (empty when absent).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// Reads the tensor's bytes into memory (allocated fallibly).
    pub fn read(&self, entry: &TensorEntry) -> Result<Vec<u8>> {
        let mut bytes = try_zeroed::<u8>(entry.byte_len(), "the tensor's bytes")
            .map_err(|p| Error::tensor(&self.path, &entry.name, p))?;
        self.read_into(entry, &mut bytes)?;
        Ok(bytes)
    }

    /// Reads the tensor's bytes into `out`, which must be exactly as long.
    pub fn read_into(&self, entry: &TensorEntry, out: &mut [u8]) -> Result<()> {
        assert_eq!(out.len(), entry.byte_len(), "buffer of the tensor's length");
        read_exact_at(&self.file, &self.path, out, entry.data.start as u64)
    }

    /// Bytes of tensor data in the file (everything after the header).
    pub fn data_len(&self) -> usize {
        self.tensors.iter().map(|t| t.data.len()).sum()
    }
}

/// Fills `out` from `offset`; a file that ends early was truncated under us.
fn read_exact_at(file: &File, path: &Path, out: &mut [u8], offset: u64) -> Result<()> {
    #[cfg(unix)]
    let result = std::os::unix::fs::FileExt::read_exact_at(file, out, offset);
    #[cfg(not(unix))]
    let result = {
        use std::io::{Read, Seek};
        let mut file = file;
        file.seek(std::io::SeekFrom::Start(offset))
            .and_then(|_| file.read_exact(out))
    };
    result.map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => Error::Truncated {
            path: path.into(),
            source: e,
        },
        _ => Error::io(path, "read", e),
    })
}

/// One tensor to write: its name, safetensors dtype, shape and little-endian bytes.
#[derive(Clone, Copy, Debug)]
pub struct OutputTensor<'a> {
    pub name: &'a str,
    pub dtype: Dtype,
    pub shape: &'a [usize],
    pub data: &'a [u8],
}

/// A tensor whose bytes are produced while the file is written.
#[derive(Clone, Copy, Debug)]
pub struct TensorSpec<'a> {
    pub name: &'a str,
    pub dtype: Dtype,
    pub shape: &'a [usize],
    pub byte_len: usize,
}

/// Writes a safetensors file atomically (see [`crate::atomic`]): tensors in
/// name order, `__metadata__` only when non-empty, header padded with spaces to
/// 8 bytes as Python's writer does.
pub fn write_tensor_file(
    path: &Path,
    tensors: &[OutputTensor<'_>],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    crate::atomic::commit(vec![stage_tensor_file(path, tensors, metadata)?])
}

/// [`write_tensor_file`] up to the commit: the caller commits it with others.
pub fn stage_tensor_file(
    path: &Path,
    tensors: &[OutputTensor<'_>],
    metadata: &BTreeMap<String, String>,
) -> Result<Staged> {
    let mut sorted: Vec<&OutputTensor<'_>> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(b.name));
    let specs: Vec<TensorSpec<'_>> = sorted
        .iter()
        .map(|t| TensorSpec {
            name: t.name,
            dtype: t.dtype,
            shape: t.shape,
            byte_len: t.data.len(),
        })
        .collect();
    let header = header_bytes_for(path, &specs, metadata)?;
    crate::atomic::stage(path, |writer| {
        writer
            .write_all(&header)
            .map_err(crate::atomic::write_error(path))?;
        for tensor in &sorted {
            writer
                .write_all(tensor.data)
                .map_err(crate::atomic::write_error(path))?;
        }
        Ok(())
    })
}

/// Where a tensor's producer hands over its bytes: called once per tensor
/// with exactly the spec's byte length, from the producer's own buffer.
pub type Emit<'a> = &'a mut dyn FnMut(&[u8]) -> Result<()>;

/// Like [`write_tensor_file`], but each tensor's bytes come from
/// `produce(index into specs, emit)`, which passes them to `emit` once, from
/// a buffer it may reuse; producers run in parallel, so only the tensors in
/// flight are ever in memory. Into a regular file each tensor is written at
/// its offset as soon as it is produced (no thread waits for another's
/// turn); into a FIFO or device, a few at a time in name order. Returns each
/// tensor's by-product `T`, in `specs` order. An error from `produce`
/// aborts the write and leaves no file.
pub fn write_tensor_file_streaming<T, F>(
    path: &Path,
    specs: &[TensorSpec<'_>],
    metadata: &BTreeMap<String, String>,
    produce: F,
) -> Result<Vec<T>>
where
    T: Send,
    F: Fn(usize, Emit<'_>) -> Result<T> + Sync,
{
    let (by_products, staged) = stage_tensor_file_streaming(path, specs, metadata, produce)?;
    crate::atomic::commit(vec![staged])?;
    Ok(by_products)
}

/// [`write_tensor_file_streaming`] up to the commit: the caller commits it with others.
pub fn stage_tensor_file_streaming<T, F>(
    path: &Path,
    specs: &[TensorSpec<'_>],
    metadata: &BTreeMap<String, String>,
    produce: F,
) -> Result<(Vec<T>, Staged)>
where
    T: Send,
    F: Fn(usize, Emit<'_>) -> Result<T> + Sync,
{
    let mut order: Vec<usize> = (0..specs.len()).collect();
    order.sort_by(|&a, &b| specs[a].name.cmp(specs[b].name));
    let sorted: Vec<TensorSpec<'_>> = order.iter().map(|&i| specs[i]).collect();
    let header = header_bytes_for(path, &sorted, metadata)?;
    let mut offsets = vec![0u64; specs.len()];
    let mut at = header.len() as u64;
    for &index in &order {
        offsets[index] = at;
        at += specs[index].byte_len as u64;
    }
    let check_len = |index: usize, len: usize| -> Result<()> {
        let spec = &specs[index];
        if len == spec.byte_len {
            return Ok(());
        }
        Err(Error::Structure {
            path: path.into(),
            problem: format!(
                "{:?}: produced {len} bytes for a {}-byte tensor",
                spec.name, spec.byte_len
            ),
        })
    };
    // Each producer must emit exactly once.
    let produce_once = |index: usize, emit: Emit<'_>| -> Result<T> {
        let mut emitted = 0;
        let by_product = produce(index, &mut |bytes: &[u8]| {
            emitted += 1;
            check_len(index, bytes.len())?;
            emit(bytes)
        })?;
        if emitted != 1 {
            return Err(Error::Structure {
                path: path.into(),
                problem: format!("{:?}: produced {emitted} times", specs[index].name),
            });
        }
        Ok(by_product)
    };
    let mut by_products: Vec<Option<T>> = specs.iter().map(|_| None).collect();
    let staged = crate::atomic::stage(path, |writer| {
        writer
            .write_all(&header)
            .map_err(crate::atomic::write_error(path))?;
        #[cfg(unix)]
        {
            writer.flush().map_err(crate::atomic::write_error(path))?;
            let file: &std::fs::File = writer.get_ref();
            if file.metadata().is_ok_and(|meta| meta.is_file()) {
                use std::os::unix::fs::FileExt;
                // The first error stops the tensors not yet started.
                let produced: Vec<(usize, T)> = order
                    .par_iter()
                    .with_max_len(1)
                    .map(|&index| {
                        produce_once(index, &mut |bytes: &[u8]| {
                            file.write_all_at(bytes, offsets[index])
                                .map_err(crate::atomic::write_error(path))?;
                            start_writeback(file, offsets[index], bytes.len());
                            Ok(())
                        })
                        .map(|by_product| (index, by_product))
                    })
                    .collect::<Result<_>>()?;
                for (index, by_product) in produced {
                    by_products[index] = Some(by_product);
                }
                return Ok(());
            }
        }
        for batch in order.chunks(rayon::current_num_threads().max(1)) {
            let produced: Vec<Result<(Vec<u8>, T)>> = batch
                .par_iter()
                .map(|&index| {
                    let mut copy = Vec::new();
                    let by_product = produce_once(index, &mut |bytes: &[u8]| {
                        copy.try_reserve_exact(bytes.len()).map_err(|_| {
                            Error::tensor(
                                path,
                                specs[index].name,
                                crate::error::TensorProblem::OutOfMemory {
                                    bytes: bytes.len(),
                                    what: "the tensor's bytes",
                                },
                            )
                        })?;
                        copy.extend_from_slice(bytes);
                        Ok(())
                    })?;
                    Ok((copy, by_product))
                })
                .collect();
            for (&index, result) in batch.iter().zip(produced) {
                let (bytes, by_product) = result?;
                writer
                    .write_all(&bytes)
                    .map_err(crate::atomic::write_error(path))?;
                by_products[index] = Some(by_product);
            }
        }
        Ok(())
    })?;
    Ok((
        by_products
            .into_iter()
            .map(|b| b.expect("every tensor was produced"))
            .collect(),
        staged,
    ))
}

/// Bytes one `pwrite` of [`write_scratch_tensor_file`] hands the kernel:
/// large enough for sequential speed, small enough that every core gets some.
const SCRATCH_WRITE_CHUNK_BYTES: usize = 8 << 20;

/// Writes a safetensors file (the same bytes as [`write_tensor_file`]) for a
/// process of ours to read at once, not for a user: written in place, no
/// temp file, no rename, no fsync. A scratch file is throwaway (its
/// directory is removed at the end, or by the signal handler), so durability
/// across a crash buys nothing, while an fsync per window costs the disk's
/// latency; the child that reads it starts after this returns, and sees every
/// byte through the page cache.
///
/// A file already at `path` is overwritten, not truncated first, then cut or
/// extended to the new length: the validator rewrites each slot's cache
/// window after window at the same size, and on tmpfs (/dev/shm) the pages
/// it keeps are reused instead of being freed and allocated again, zeroed
/// (a 1.07 GB overwrite took 0.53 s against 0.74-0.93 s into a new file, `dd`
/// on a 2-core AMD EPYC). The data goes in [`SCRATCH_WRITE_CHUNK_BYTES`]
/// pieces at their offsets, from several threads.
/// User-facing outputs go through [`write_tensor_file`] instead.
pub fn write_scratch_tensor_file(
    path: &Path,
    tensors: &[OutputTensor<'_>],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let mut sorted: Vec<&OutputTensor<'_>> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(b.name));
    let specs: Vec<TensorSpec<'_>> = sorted
        .iter()
        .map(|t| TensorSpec {
            name: t.name,
            dtype: t.dtype,
            shape: t.shape,
            byte_len: t.data.len(),
        })
        .collect();
    let header = header_bytes_for(path, &specs, metadata)?;
    let write_error = crate::atomic::write_error(path);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| Error::io(path, "create", e))?;
    let mut pieces: Vec<(u64, &[u8])> = vec![(0, &header)];
    let mut at = header.len() as u64;
    for tensor in &sorted {
        for (index, chunk) in tensor.data.chunks(SCRATCH_WRITE_CHUNK_BYTES).enumerate() {
            pieces.push((at + (index * SCRATCH_WRITE_CHUNK_BYTES) as u64, chunk));
        }
        at += tensor.data.len() as u64;
    }
    // The full length first: the pieces then fill a file of its final size.
    file.set_len(at).map_err(&write_error)?;
    pieces
        .par_iter()
        .with_max_len(1)
        .try_for_each(|&(offset, bytes)| write_all_at(&file, bytes, offset))
        .map_err(write_error)
}

#[cfg(unix)]
fn write_all_at(file: &File, bytes: &[u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::write_all_at(file, bytes, offset)
}

#[cfg(not(unix))]
fn write_all_at(file: &File, bytes: &[u8], offset: u64) -> std::io::Result<()> {
    use std::io::{Seek, SeekFrom};
    // One writer at a time where there is no positioned write.
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut file = file;
    file.seek(SeekFrom::Start(offset))?;
    file.write_all(bytes)
}

/// Starts writing `len` bytes at `offset` back to disk without waiting, so
/// that the disk works while the next tensors are decoded and the fsync
/// before the rename (which still makes the file durable, and reports any
/// error) waits for little: on the VM disk measured, fsync of a 92 MB
/// restored cache took 38 ms, a third of the run. A hint: its errors are
/// ignored.
#[cfg(unix)]
fn start_writeback(file: &std::fs::File, offset: u64, len: usize) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: a plain syscall on an open descriptor; no memory is passed.
        unsafe {
            libc::sync_file_range(
                file.as_raw_fd(),
                offset as libc::off64_t,
                len as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, offset, len);
}

/// Length prefix and header JSON for `specs` (already in file order), checked
/// by the `safetensors` crate's own validation, and against this module's
/// reader limits, before anything is written: no file is written that
/// [`TensorFile::open`] would refuse.
fn header_bytes_for(
    path: &Path,
    specs: &[TensorSpec<'_>],
    metadata: &BTreeMap<String, String>,
) -> Result<Vec<u8>> {
    let unreadable = |problem: String| Error::Structure {
        path: path.into(),
        problem: format!("refusing to write a file the reader would refuse: {problem}"),
    };
    if specs.len() > MAX_TENSORS {
        return Err(unreadable(format!(
            "{} tensors, more than the {MAX_TENSORS} a file may hold",
            specs.len()
        )));
    }
    let mut offset = 0usize;
    let mut infos = Vec::with_capacity(specs.len());
    for spec in specs {
        let info = safetensors::tensor::TensorInfo {
            dtype: spec.dtype,
            shape: spec.shape.to_vec(),
            data_offsets: (offset, offset + spec.byte_len),
        };
        offset += spec.byte_len;
        infos.push((spec.name.to_string(), info));
    }
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert(
            "__metadata__".into(),
            serde_json::to_value(metadata).expect("string map serializes"),
        );
    }
    for (name, info) in &infos {
        header.insert(
            name.clone(),
            serde_json::to_value(info).expect("tensor info serializes"),
        );
    }
    safetensors::tensor::Metadata::new(None, infos).map_err(|e| Error::Structure {
        path: path.into(),
        problem: format!("refusing to write an invalid header: {e}"),
    })?;
    let mut header_json = serde_json::to_vec(&header).expect("JSON map serializes");
    header_json.resize(
        header_json.len().next_multiple_of(HEADER_LENGTH_BYTES),
        b' ',
    );
    if header_json.len() > MAX_HEADER_BYTES {
        return Err(unreadable(format!(
            "a {}-byte header, more than the {MAX_HEADER_BYTES}-byte limit",
            header_json.len()
        )));
    }
    let mut bytes = (header_json.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&header_json);
    Ok(bytes)
}

/// Turns the crate's error into one that names the file (and tensor, where known).
fn structure_error(path: &Path, header_json: Option<&[u8]>, error: SafeTensorError) -> Error {
    let problem = match error {
        SafeTensorError::HeaderTooSmall => "file shorter than the 8-byte header length".to_string(),
        SafeTensorError::HeaderTooLarge => {
            "header length is larger than the 100 MB limit".to_string()
        }
        SafeTensorError::InvalidHeaderLength => {
            "header length runs past the end of the file (truncated?)".to_string()
        }
        SafeTensorError::InvalidHeader(e) => format!("header is not UTF-8: {e}"),
        SafeTensorError::InvalidHeaderDeserialization(e) => {
            format!("header is not valid safetensors JSON: {e}")
        }
        SafeTensorError::MetadataIncompleteBuffer => {
            "tensor data does not end exactly at the end of the file (truncated or trailing bytes)"
                .to_string()
        }
        SafeTensorError::InvalidOffset(tensor) => {
            return Error::Tensor {
                path: path.into(),
                tensor,
                problem: TensorProblem::BadOffsets,
            }
        }
        SafeTensorError::TensorInvalidInfo => match tensor_with_wrong_size(header_json) {
            Some(tensor) => {
                return Error::Tensor {
                    path: path.into(),
                    tensor,
                    problem: TensorProblem::SizeMismatch,
                }
            }
            None => "a tensor's shape x dtype does not match its byte length".to_string(),
        },
        SafeTensorError::ValidationOverflow => {
            "a tensor's shape overflows when multiplied out".to_string()
        }
        SafeTensorError::MisalignedSlice => {
            "a tensor's size is not a whole number of bytes".to_string()
        }
        other => other.to_string(),
    };
    Error::Structure {
        path: path.into(),
        problem,
    }
}

/// The header JSON bytes, if the length prefix points inside the file.
fn header_bytes(map: &[u8]) -> Option<&[u8]> {
    let len = u64::from_le_bytes(map.get(..HEADER_LENGTH_BYTES)?.try_into().ok()?);
    let end = HEADER_LENGTH_BYTES.checked_add(usize::try_from(len).ok()?)?;
    map.get(HEADER_LENGTH_BYTES..end)
}

/// [`count_header_entries`] of the `header_len`-byte header in `file`, read
/// through a small buffer (never the whole header at once).
fn count_header_entries_in(file: &File, header_len: u64) -> Option<usize> {
    use std::io::{Read, Seek};
    let mut file = file;
    file.seek(std::io::SeekFrom::Start(HEADER_LENGTH_BYTES as u64))
        .ok()?;
    let reader = std::io::BufReader::with_capacity(16 * 1024, file.take(header_len));
    count_header_entries(serde_json::Deserializer::from_reader(reader))
}

/// Number of top-level entries (tensors and `__metadata__`) of a header,
/// counted without building them; `None` when it is not a JSON object.
fn count_header_entries<R: serde_json::de::Read<'static>>(
    mut json: serde_json::Deserializer<R>,
) -> Option<usize> {
    struct CountEntries;
    impl<'de> serde::de::Visitor<'de> for CountEntries {
        type Value = usize;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> std::result::Result<usize, A::Error> {
            let mut entries = 0;
            while map
                .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
                .is_some()
            {
                entries += 1;
            }
            Ok(entries)
        }
    }
    serde::Deserializer::deserialize_map(&mut json, CountEntries).ok()
}

/// The crate reports a shape x dtype / byte-length mismatch without a name;
/// find the first offending tensor so the error can name it.
fn tensor_with_wrong_size(header_json: Option<&[u8]>) -> Option<String> {
    let header: BTreeMap<String, safetensors::tensor::TensorInfo> =
        serde_json::from_slice::<BTreeMap<String, serde_json::Value>>(header_json?)
            .ok()?
            .into_iter()
            .filter(|(name, _)| name != "__metadata__")
            .map(|(name, value)| Some((name, serde_json::from_value(value).ok()?)))
            .collect::<Option<_>>()?;
    header.into_iter().find_map(|(name, info)| {
        let elements = info
            .shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d));
        let expected = elements
            .and_then(|n| n.checked_mul(info.dtype.bitsize()))
            .map(|bits| bits / 8);
        let actual = info.data_offsets.1.checked_sub(info.data_offsets.0);
        (expected != actual).then_some(name)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scratch_file_holds_the_bytes_the_atomic_writer_writes() {
        let dir = tempfile::tempdir().unwrap();
        // One tensor spans several write chunks, with a partial last one.
        let big: Vec<u8> = (0..2 * SCRATCH_WRITE_CHUNK_BYTES + 6)
            .map(|i| (i % 251) as u8)
            .collect();
        let small = [1u8, 2, 3, 4];
        let tensors = [
            OutputTensor {
                name: "layer_1_key",
                dtype: Dtype::F16,
                shape: &[big.len() / 2],
                data: &big,
            },
            OutputTensor {
                name: "layer_0_key",
                dtype: Dtype::F32,
                shape: &[1],
                data: &small,
            },
        ];
        let metadata = BTreeMap::from([("k".to_string(), "v".to_string())]);
        let (atomic, scratch) = (dir.path().join("a"), dir.path().join("s"));
        write_tensor_file(&atomic, &tensors, &metadata).unwrap();
        // What was there before, longer or shorter, is overwritten whole.
        let expected = std::fs::read(&atomic).unwrap();
        for before in [expected.len() + 4096, expected.len(), expected.len() / 2] {
            std::fs::write(&scratch, vec![9u8; before]).unwrap();
            write_scratch_tensor_file(&scratch, &tensors, &metadata).unwrap();
            assert!(
                std::fs::read(&scratch).unwrap() == expected,
                "{before} bytes before"
            );
        }
        let file = TensorFile::open(&scratch).unwrap();
        assert_eq!(file.read(&file.tensors()[1]).unwrap(), big);
    }
}
