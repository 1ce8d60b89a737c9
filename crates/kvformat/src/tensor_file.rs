//! A safetensors file, memory-mapped and validated by the `safetensors` crate
//! before any tensor byte is touched. Both KV caches and packed files are read
//! through it; it accepts Python's space-padded headers and Go's unpadded ones.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use rayon::prelude::*;
use safetensors::{Dtype, SafeTensorError, SafeTensors};

use crate::error::{Error, Result, TensorProblem};

/// Size of the little-endian u64 that opens every safetensors file.
const HEADER_LENGTH_BYTES: usize = 8;
/// Most tensors a file may hold. A KV cache has two per layer, so this allows
/// 8192 layers, and keeps a hostile header (millions of empty tensors fit in
/// the crate's 100 MB header limit) from making the parser build them all.
pub const MAX_TENSORS: usize = 16_384;

/// One tensor's header entry; `data` is its byte range in the mapped file.
#[derive(Clone, Debug)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    data: std::ops::Range<usize>,
}

/// An open, structurally valid safetensors file.
#[derive(Debug)]
pub struct TensorFile {
    path: PathBuf,
    map: Mmap,
    /// Sorted by name, as the original writer sorts them.
    tensors: Vec<TensorEntry>,
    metadata: BTreeMap<String, String>,
}

impl TensorFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, "open", e))?;
        let len = file
            .metadata()
            .map_err(|e| Error::io(path, "stat", e))?
            .len();
        if len == 0 {
            return Err(Error::EmptyFile { path: path.into() });
        }
        // SAFETY: the map is read-only and private to this process; like every
        // mmap reader (including the safetensors crate's own examples) we rely
        // on nobody truncating the input while we read it.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, "memory-map", e))?;
        if let Some(entries) = header_bytes(&map).and_then(count_header_entries) {
            if entries > MAX_TENSORS + 1 {
                return Err(Error::Structure {
                    path: path.into(),
                    problem: format!("header lists {entries} entries, more than the {MAX_TENSORS} tensors a file may hold"),
                });
            }
        }
        let (header_len, metadata) = SafeTensors::read_metadata(&map)
            .map_err(|e| structure_error(path, header_bytes(&map), e))?;
        let data_start = HEADER_LENGTH_BYTES + header_len;
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
        tensors.sort_by(|a, b| a.name.cmp(&b.name));
        let metadata = metadata.metadata().clone().unwrap_or_default().into_iter().collect();
        Ok(TensorFile {
            path: path.into(),
            map,
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

    pub fn data(&self, entry: &TensorEntry) -> &[u8] {
        &self.map[entry.data.clone()]
    }

    /// Drops the tensor's pages from this process's memory once it has been
    /// read, so peak memory tracks the tensors in flight, not the whole file.
    /// A hint: later reads fault the bytes back in from the file unchanged.
    pub fn release(&self, entry: &TensorEntry) {
        #[cfg(unix)]
        // SAFETY: MADV_DONTNEED on a read-only file mapping that is never
        // written only discards clean pages; any later access re-reads the
        // same bytes from the file, so no borrowed slice observes a change.
        unsafe {
            let _ = self.map.unchecked_advise_range(
                memmap2::UncheckedAdvice::DontNeed,
                entry.data.start,
                entry.data.len(),
            );
        }
    }

    /// Bytes of tensor data in the file (everything after the header).
    pub fn data_len(&self) -> usize {
        self.tensors.iter().map(|t| t.data.len()).sum()
    }
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
pub fn write_tensor_file(path: &Path, tensors: &[OutputTensor<'_>], metadata: &BTreeMap<String, String>) -> Result<()> {
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
    crate::atomic::write_atomically(path, |writer| {
        writer.write_all(&header).map_err(crate::atomic::write_error(path))?;
        for tensor in &sorted {
            writer.write_all(tensor.data).map_err(crate::atomic::write_error(path))?;
        }
        Ok(())
    })
}

/// Like [`write_tensor_file`], but each tensor's bytes come from
/// `produce(index into specs)`, run in parallel a few tensors at a time and
/// written in name order, so only the tensors in flight are ever in memory.
/// Returns each tensor's by-product `T`, in `specs` order. An error from
/// `produce` aborts the write and leaves no file.
pub fn write_tensor_file_streaming<T, F>(
    path: &Path,
    specs: &[TensorSpec<'_>],
    metadata: &BTreeMap<String, String>,
    produce: F,
) -> Result<Vec<T>>
where
    T: Send,
    F: Fn(usize) -> Result<(Vec<u8>, T)> + Sync,
{
    let mut order: Vec<usize> = (0..specs.len()).collect();
    order.sort_by(|&a, &b| specs[a].name.cmp(specs[b].name));
    let sorted: Vec<TensorSpec<'_>> = order.iter().map(|&i| specs[i]).collect();
    let header = header_bytes_for(path, &sorted, metadata)?;
    let mut by_products: Vec<Option<T>> = specs.iter().map(|_| None).collect();
    crate::atomic::write_atomically(path, |writer| {
        writer.write_all(&header).map_err(crate::atomic::write_error(path))?;
        for batch in order.chunks(rayon::current_num_threads().max(1)) {
            let produced: Vec<Result<(Vec<u8>, T)>> = batch.par_iter().map(|&i| produce(i)).collect();
            for (&index, result) in batch.iter().zip(produced) {
                let (bytes, by_product) = result?;
                let spec = &specs[index];
                if bytes.len() != spec.byte_len {
                    return Err(Error::Structure {
                        path: path.into(),
                        problem: format!("{}: produced {} bytes for a {}-byte tensor", spec.name, bytes.len(), spec.byte_len),
                    });
                }
                writer.write_all(&bytes).map_err(crate::atomic::write_error(path))?;
                by_products[index] = Some(by_product);
            }
        }
        Ok(())
    })?;
    Ok(by_products.into_iter().map(|b| b.expect("every tensor was produced")).collect())
}

/// Length prefix and header JSON for `specs` (already in file order), checked
/// by the `safetensors` crate's own validation before anything is written.
fn header_bytes_for(path: &Path, specs: &[TensorSpec<'_>], metadata: &BTreeMap<String, String>) -> Result<Vec<u8>> {
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
        header.insert("__metadata__".into(), serde_json::to_value(metadata).expect("string map serializes"));
    }
    for (name, info) in &infos {
        header.insert(name.clone(), serde_json::to_value(info).expect("tensor info serializes"));
    }
    safetensors::tensor::Metadata::new(None, infos).map_err(|e| Error::Structure {
        path: path.into(),
        problem: format!("refusing to write an invalid header: {e}"),
    })?;
    let mut header_json = serde_json::to_vec(&header).expect("JSON map serializes");
    header_json.resize(header_json.len().next_multiple_of(HEADER_LENGTH_BYTES), b' ');
    let mut bytes = (header_json.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&header_json);
    Ok(bytes)
}

/// Turns the crate's error into one that names the file (and tensor, where known).
fn structure_error(path: &Path, header_json: Option<&[u8]>, error: SafeTensorError) -> Error {
    let problem = match error {
        SafeTensorError::HeaderTooSmall => "file shorter than the 8-byte header length".to_string(),
        SafeTensorError::HeaderTooLarge => "header length is larger than the 100 MB limit".to_string(),
        SafeTensorError::InvalidHeaderLength => "header length runs past the end of the file (truncated?)".to_string(),
        SafeTensorError::InvalidHeader(e) => format!("header is not UTF-8: {e}"),
        SafeTensorError::InvalidHeaderDeserialization(e) => format!("header is not valid safetensors JSON: {e}"),
        SafeTensorError::MetadataIncompleteBuffer => {
            "tensor data does not end exactly at the end of the file (truncated or trailing bytes)".to_string()
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
        SafeTensorError::ValidationOverflow => "a tensor's shape overflows when multiplied out".to_string(),
        SafeTensorError::MisalignedSlice => "a tensor's size is not a whole number of bytes".to_string(),
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

/// Number of top-level entries (tensors and `__metadata__`) of a header,
/// counted without building them; `None` when it is not a JSON object.
fn count_header_entries(json: &[u8]) -> Option<usize> {
    struct CountEntries;
    impl<'de> serde::de::Visitor<'de> for CountEntries {
        type Value = usize;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> std::result::Result<usize, A::Error> {
            let mut entries = 0;
            while map.next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?.is_some() {
                entries += 1;
            }
            Ok(entries)
        }
    }
    serde::Deserializer::deserialize_map(&mut serde_json::Deserializer::from_slice(json), CountEntries).ok()
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
        let elements = info.shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
        let expected = elements.and_then(|n| n.checked_mul(info.dtype.bitsize())).map(|bits| bits / 8);
        let actual = info.data_offsets.1.checked_sub(info.data_offsets.0);
        (expected != actual).then_some(name)
    })
}
