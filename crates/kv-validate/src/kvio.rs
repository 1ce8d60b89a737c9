//! The model's in-memory [`KvCache`] to and from a KV-cache safetensors file
//! (`layer_{i}_key` / `layer_{i}_value`, `[1, kv_heads, seq, head_dim]`) and
//! its `.metadata.json` sidecar, through `kvformat`, so the files are the
//! ones the Python `save_kv_cache()` / `load_kv_cache()` write and read.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use candle_core::{Device, Tensor};
use kvformat::preset::{tensor_name, TensorKind};
use kvformat::sidecar::{sidecar_path, validate_against_sidecar, Sidecar};
use kvformat::CacheDtype;

use crate::model::{KvCache, LayerKv};

/// Why a cache could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum KvIoError {
    #[error(transparent)]
    Format(#[from] kvformat::Error),
    #[error("{}: no sidecar {} beside it (load_kv_cache() needs one)", cache.display(), sidecar.display())]
    MissingSidecar { cache: PathBuf, sidecar: PathBuf },
    #[error("{}: {tensor} is missing", path.display())]
    MissingTensor { path: PathBuf, tensor: String },
    #[error("{}: {tensor} has shape {found:?}, expected {expected:?}", path.display())]
    ShapeMismatch {
        path: PathBuf,
        tensor: String,
        found: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("the cache to write has no layers")]
    EmptyCache,
    #[error("layer {layer}'s {kind} has shape {found:?}, but layer 0's key has {expected:?}")]
    InconsistentLayers {
        layer: usize,
        kind: &'static str,
        found: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

/// What a cache file holds: its sidecar, and per layer the positions its
/// key and value hold (the sidecar's `seq_len`, or fewer for a sliding-window
/// layer, as an engine keeps it).
#[derive(Clone, Debug, PartialEq)]
pub struct CacheLayout {
    pub sidecar: Sidecar,
    pub positions: Vec<usize>,
}

impl CacheLayout {
    /// Every layer holding the sidecar's `seq_len` positions.
    pub fn uniform(sidecar: Sidecar) -> Self {
        let positions = vec![sidecar.seq_len; sidecar.num_layers];
        CacheLayout { sidecar, positions }
    }
}

impl std::ops::Deref for CacheLayout {
    type Target = Sidecar;
    fn deref(&self) -> &Sidecar {
        &self.sidecar
    }
}

/// The layout of `cache` stored as `dtype`. Every tensor is
/// `[1, kv_heads, s, head_dim]` with layer 0's heads and head_dim; a layer's
/// key and value hold the same `s`; the sidecar's `seq_len` is the longest.
pub fn describe(
    cache: &KvCache,
    dtype: CacheDtype,
    model_name: &str,
) -> Result<CacheLayout, KvIoError> {
    let first = cache.layers.first().ok_or(KvIoError::EmptyCache)?;
    let expected = first.key.dims().to_vec();
    let mut positions = Vec::with_capacity(cache.layers.len());
    for (layer, kv) in cache.layers.iter().enumerate() {
        let layer_shape = kv.key.dims();
        for (kind, tensor) in TensorKind::BOTH.into_iter().zip([&kv.key, &kv.value]) {
            let dims = tensor.dims();
            let fits = expected.len() == 4
                && expected[0] == 1
                && dims.len() == 4
                && dims == layer_shape
                && [dims[0], dims[1], dims[3]] == [1, expected[1], expected[3]];
            if !fits {
                return Err(KvIoError::InconsistentLayers {
                    layer,
                    kind: kind.suffix(),
                    found: dims.to_vec(),
                    expected: expected.clone(),
                });
            }
        }
        positions.push(layer_shape[2]);
    }
    Ok(CacheLayout {
        sidecar: Sidecar {
            num_layers: cache.layers.len(),
            num_kv_heads: expected[1],
            seq_len: positions.iter().copied().max().unwrap_or(0),
            head_dim: expected[3],
            dtype: dtype.torch_name().to_string(),
            model_name: model_name.to_string(),
        },
        positions,
    })
}

/// Host memory for a cache's bytes, kept and reused window after window: a
/// fresh gigabyte per window costs a page fault per 4 KiB. Backed by `u64`s
/// so every tensor placed at a multiple of 8 can be viewed as its dtype.
#[derive(Debug, Default)]
pub struct HostBuffer {
    words: Vec<u64>,
}

impl HostBuffer {
    /// The first `len` bytes, grown (never shrunk) to hold them.
    fn bytes_mut(&mut self, len: usize) -> &mut [u8] {
        let words = len.div_ceil(8);
        if self.words.len() < words {
            self.words.resize(words, 0);
        }
        &mut bytemuck::cast_slice_mut(&mut self.words)[..len]
    }

    fn bytes(&self) -> &[u8] {
        bytemuck::cast_slice(&self.words)
    }
}

/// One tensor of a [`HostCache`]: where its bytes lie in the buffer.
#[derive(Clone, Debug)]
struct HostTensor {
    name: String,
    layer: usize,
    kind: TensorKind,
    dtype: CacheDtype,
    shape: Vec<usize>,
    /// Starts at a multiple of 8, so the bytes can be viewed as the dtype.
    bytes: std::ops::Range<usize>,
}

/// A cache's tensors as the bytes of their file dtype, in host memory: what
/// the model's cache is downloaded into and written from, or what a
/// reconstruction is read into and uploaded from, with no copy in between.
#[derive(Debug)]
pub struct HostCache {
    layout: CacheLayout,
    /// In file (name) order.
    tensors: Vec<HostTensor>,
    buffer: HostBuffer,
}

impl HostCache {
    /// `cache` converted to `dtype` on its device, then copied to `buffer`
    /// in one pass per tensor (on a GPU, device to host straight into it).
    pub fn download(
        cache: &KvCache,
        dtype: CacheDtype,
        model_name: &str,
        mut buffer: HostBuffer,
    ) -> Result<Self, KvIoError> {
        let layout = describe(cache, dtype, model_name)?;
        let tensors = place(&layout, |_| dtype);
        let total = tensors.last().map_or(0, |t| t.bytes.end);
        let bytes = buffer.bytes_mut(total);
        let stored = crate::model::device::dtype_of_cache(dtype);
        for tensor in &tensors {
            let kv = &cache.layers[tensor.layer];
            let source = match tensor.kind {
                TensorKind::Key => &kv.key,
                TensorKind::Value => &kv.value,
            };
            copy_to_host(
                &source.to_dtype(stored)?.contiguous()?,
                &mut bytes[tensor.bytes.clone()],
            )?;
        }
        if let Some(first) = cache.layers.first() {
            first.key.device().synchronize()?;
        }
        Ok(HostCache {
            layout,
            tensors,
            buffer,
        })
    }

    /// Writes the cache file and its sidecar for kv-compress to read: a
    /// scratch file, written in place without fsync
    /// ([`kvformat::write_scratch_tensor_file`] says why).
    pub fn write_scratch(&self, path: &Path) -> Result<(), KvIoError> {
        let bytes = self.buffer.bytes();
        let outputs: Vec<kvformat::OutputTensor<'_>> = self
            .tensors
            .iter()
            .map(|t| kvformat::OutputTensor {
                name: &t.name,
                dtype: t.dtype.to_safetensors(),
                shape: &t.shape,
                data: &bytes[t.bytes.clone()],
            })
            .collect();
        kvformat::write_scratch_tensor_file(path, &outputs, &BTreeMap::new())?;
        let sidecar = sidecar_path(path);
        std::fs::write(&sidecar, self.layout.sidecar.to_json())
            .map_err(|e| kvformat::Error::io(&sidecar, "write", e))?;
        Ok(())
    }

    /// Reads a cache that must have the layout `expected` describes (dtype
    /// aside) into `buffer`, every tensor checked (shape, finite values)
    /// before it is used: what `kv-compress -decompress` restored from a
    /// cache we wrote. The caller knows what it sent, so no sidecar is
    /// needed; one that is there must agree with the file, as
    /// `load_kv_cache()` would insist.
    pub fn read(
        path: &Path,
        expected: &CacheLayout,
        mut buffer: HostBuffer,
    ) -> Result<Self, KvIoError> {
        let file = kvformat::cache::KvCache::open(path)?;
        if let Some(sidecar) = Sidecar::read_beside(path)? {
            validate_against_sidecar(file.file(), &sidecar, &sidecar_path(path))?;
        }
        let mut entries = Vec::with_capacity(2 * expected.num_layers);
        for (layer, kind) in tensor_order(expected.num_layers) {
            let name = tensor_name(layer, kind);
            let positions = expected
                .positions
                .get(layer)
                .copied()
                .unwrap_or(expected.seq_len);
            let shape = vec![1, expected.num_kv_heads, positions, expected.head_dim];
            let (entry, dtype) = file
                .tensors()
                .find(|(entry, _)| entry.name == name)
                .ok_or_else(|| KvIoError::MissingTensor {
                    path: path.to_path_buf(),
                    tensor: name.clone(),
                })?;
            if entry.shape != shape {
                return Err(KvIoError::ShapeMismatch {
                    path: path.to_path_buf(),
                    tensor: name,
                    found: entry.shape.clone(),
                    expected: shape,
                });
            }
            entries.push((entry, dtype));
        }
        let tensors = place(expected, |index| entries[index].1);
        let total = tensors.last().map_or(0, |t| t.bytes.end);
        let mut rest = buffer.bytes_mut(total);
        let mut slices = Vec::with_capacity(tensors.len());
        let mut at = 0;
        for tensor in &tensors {
            let (_, tail) = rest.split_at_mut(tensor.bytes.start - at);
            let (slice, tail) = tail.split_at_mut(tensor.bytes.len());
            slices.push(slice);
            rest = tail;
            at = tensor.bytes.end;
        }
        // Every core reads (and checks) its own tensors: one pass over the bytes.
        slices
            .into_par_iter()
            .zip(&entries)
            .try_for_each(|(slice, &(entry, dtype))| {
                file.file().read_into(entry, slice)?;
                match dtype.first_non_finite(slice) {
                    None => Ok(()),
                    Some(index) => {
                        let size = dtype.size_bytes();
                        let value = dtype.to_f32(&slice[index * size..(index + 1) * size])[0];
                        Err(kvformat::Error::tensor(
                            path,
                            &entry.name,
                            kvformat::TensorProblem::NonFinite { index, value },
                        ))
                    }
                }
            })?;
        Ok(HostCache {
            layout: expected.clone(),
            tensors,
            buffer,
        })
    }

    /// The cache as f32 tensors on `device`, each uploaded from the buffer
    /// as it is (half the bytes of f32 for F16/BF16) and widened there
    /// (exact: every cache dtype fits in f32, so the model sees the values
    /// the file holds, as when the file was widened on the host).
    pub fn upload(&self, device: &Device) -> Result<KvCache, KvIoError> {
        let bytes = self.buffer.bytes();
        let upload = |tensor: &HostTensor| -> Result<Tensor, KvIoError> {
            let data = &bytes[tensor.bytes.clone()];
            let shape = tensor.shape.as_slice();
            // One copy, from the buffer onto the device (into candle's own
            // storage on the CPU); half precision widens there.
            let on_device = match tensor.dtype {
                CacheDtype::F32 => {
                    Tensor::from_slice::<_, f32>(bytemuck::cast_slice(data), shape, device)?
                }
                CacheDtype::F16 => {
                    Tensor::from_slice::<_, half::f16>(bytemuck::cast_slice(data), shape, device)?
                }
                CacheDtype::BF16 => {
                    Tensor::from_slice::<_, half::bf16>(bytemuck::cast_slice(data), shape, device)?
                }
            }
            .to_dtype(candle_core::DType::F32)?;
            Ok(on_device)
        };
        let mut layers: Vec<Option<Tensor>> = vec![None; self.tensors.len()];
        for tensor in &self.tensors {
            let slot = 2 * tensor.layer + usize::from(tensor.kind == TensorKind::Value);
            layers[slot] = Some(upload(tensor)?);
        }
        let mut tensors = layers.into_iter().map(|t| t.expect("every tensor placed"));
        let layers = (0..self.layout.num_layers)
            .map(|_| LayerKv {
                key: tensors.next().expect("a key per layer"),
                value: tensors.next().expect("a value per layer"),
            })
            .collect();
        Ok(KvCache { layers })
    }

    pub fn layout(&self) -> &CacheLayout {
        &self.layout
    }

    /// Bytes of tensor data held.
    pub fn data_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.bytes.len() as u64).sum()
    }

    /// The buffer back, for the next window.
    pub fn into_buffer(self) -> HostBuffer {
        self.buffer
    }
}

/// `(layer, kind)` of every tensor in file order: sorted by name, as the
/// original writer sorts them (`layer_10_key` before `layer_2_key`).
fn tensor_order(num_layers: usize) -> Vec<(usize, TensorKind)> {
    let mut order: Vec<(usize, TensorKind)> = (0..num_layers)
        .flat_map(|layer| TensorKind::BOTH.map(|kind| (layer, kind)))
        .collect();
    order.sort_by_key(|&(layer, kind)| tensor_name(layer, kind));
    order
}

/// Each tensor of `layout` in file order, at the next multiple of 8 bytes,
/// with the dtype `dtype_of(its index in that order)`.
fn place(layout: &CacheLayout, dtype_of: impl Fn(usize) -> CacheDtype) -> Vec<HostTensor> {
    let mut at = 0usize;
    tensor_order(layout.num_layers)
        .into_iter()
        .enumerate()
        .map(|(index, (layer, kind))| {
            let dtype = dtype_of(index);
            let positions = layout
                .positions
                .get(layer)
                .copied()
                .unwrap_or(layout.seq_len);
            let shape = vec![1, layout.num_kv_heads, positions, layout.head_dim];
            let len = shape.iter().product::<usize>() * dtype.size_bytes();
            let start = at.next_multiple_of(8);
            at = start + len;
            HostTensor {
                name: tensor_name(layer, kind),
                layer,
                kind,
                dtype,
                shape,
                bytes: start..at,
            }
        })
        .collect()
}

/// Copies the contiguous `tensor` (of the dtype whose bytes `out` holds) to `out`.
fn copy_to_host(tensor: &Tensor, out: &mut [u8]) -> Result<(), KvIoError> {
    let (storage, layout) = tensor.storage_and_layout();
    let Some((start, end)) = layout.contiguous_offsets() else {
        return Err(candle_core::Error::Msg("a contiguous tensor to download".into()).into());
    };
    match &*storage {
        candle_core::Storage::Cpu(cpu) => {
            let bytes: &[u8] = match cpu {
                candle_core::CpuStorage::F32(v) => bytemuck::cast_slice(&v[start..end]),
                candle_core::CpuStorage::F16(v) => bytemuck::cast_slice(&v[start..end]),
                candle_core::CpuStorage::BF16(v) => bytemuck::cast_slice(&v[start..end]),
                _ => {
                    return Err(candle_core::Error::Msg(format!(
                        "no cache dtype for {:?}",
                        tensor.dtype()
                    ))
                    .into())
                }
            };
            out.copy_from_slice(bytes);
        }
        #[cfg(feature = "cuda")]
        candle_core::Storage::Cuda(cuda) => {
            use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
            // The stream's own copy: into a slice of our buffer (pageable;
            // the copy returns once the bytes are there).
            let stream = cuda.device.cuda_stream();
            match &cuda.slice {
                CudaStorageSlice::F32(s) => stream
                    .memcpy_dtoh(
                        &s.slice(start..end),
                        bytemuck::cast_slice_mut::<u8, f32>(out),
                    )
                    .w()?,
                CudaStorageSlice::F16(s) => stream
                    .memcpy_dtoh(
                        &s.slice(start..end),
                        bytemuck::cast_slice_mut::<u8, half::f16>(out),
                    )
                    .w()?,
                CudaStorageSlice::BF16(s) => stream
                    .memcpy_dtoh(
                        &s.slice(start..end),
                        bytemuck::cast_slice_mut::<u8, half::bf16>(out),
                    )
                    .w()?,
                _ => {
                    return Err(candle_core::Error::Msg(format!(
                        "no cache dtype for {:?}",
                        tensor.dtype()
                    ))
                    .into())
                }
            }
        }
        _ => {
            drop(storage);
            let host = tensor.to_device(&Device::Cpu)?;
            return copy_to_host(&host, out);
        }
    }
    Ok(())
}

/// Writes `cache` as `dtype` to `path` with its sidecar, as a scratch file
/// ([`HostCache::write_scratch`]).
pub fn write_kv_cache(
    path: &Path,
    cache: &KvCache,
    dtype: CacheDtype,
    model_name: &str,
) -> Result<CacheLayout, KvIoError> {
    let host = HostCache::download(cache, dtype, model_name, HostBuffer::default())?;
    host.write_scratch(path)?;
    Ok(host.layout)
}

/// Reads a cache the way Python's `load_kv_cache()` does: the sidecar beside
/// it is required and must agree with every tensor's shape and dtype.
pub fn read_kv_cache(path: &Path, device: &Device) -> Result<(KvCache, Sidecar), KvIoError> {
    let sidecar_file = sidecar_path(path);
    let sidecar = Sidecar::read_beside(path)?.ok_or_else(|| KvIoError::MissingSidecar {
        cache: path.to_path_buf(),
        sidecar: sidecar_file.clone(),
    })?;
    let file = kvformat::cache::KvCache::open(path)?;
    validate_against_sidecar(file.file(), &sidecar, &sidecar_file)?;
    // The sidecar agrees with the file, so each layer's key gives its positions.
    let positions = (0..sidecar.num_layers)
        .map(|layer| {
            let name = tensor_name(layer, TensorKind::Key);
            file.tensors()
                .find(|(entry, _)| entry.name == name)
                .map_or(sidecar.seq_len, |(entry, _)| entry.shape[2])
        })
        .collect();
    let layout = CacheLayout { sidecar, positions };
    let cache = read_kv_cache_like(path, &layout, device)?;
    Ok((cache, layout.sidecar))
}

/// [`HostCache::read`] then [`HostCache::upload`], with a buffer of its own.
pub fn read_kv_cache_like(
    path: &Path,
    expected: &CacheLayout,
    device: &Device,
) -> Result<KvCache, KvIoError> {
    HostCache::read(path, expected, HostBuffer::default())?.upload(device)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 2-layer cache whose values encode their own position, so a
    /// transposed or swapped tensor would not compare equal.
    fn numbered_cache(heads: usize, seq: usize, head_dim: usize) -> KvCache {
        let len = heads * seq * head_dim;
        let layers = (0..2)
            .map(|layer| {
                let tensor = |offset: f32| {
                    let values: Vec<f32> = (0..len)
                        .map(|i| offset + layer as f32 * 100.0 + i as f32 * 0.25)
                        .collect();
                    Tensor::from_vec(values, (1, heads, seq, head_dim), &Device::Cpu).unwrap()
                };
                LayerKv {
                    key: tensor(0.0),
                    value: tensor(-50.0),
                }
            })
            .collect();
        KvCache { layers }
    }

    fn assert_same(a: &KvCache, b: &KvCache) {
        assert_eq!(a.layers.len(), b.layers.len());
        for (x, y) in a.layers.iter().zip(&b.layers) {
            for (s, t) in [(&x.key, &y.key), (&x.value, &y.value)] {
                assert_eq!(s.dims(), t.dims());
                assert_eq!(
                    s.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
                );
            }
        }
    }

    #[test]
    fn f32_cache_round_trips_exactly_with_its_sidecar() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kv_cache.safetensors");
        let cache = numbered_cache(2, 3, 4);
        let written = write_kv_cache(&path, &cache, CacheDtype::F32, "tiny").unwrap();
        assert_eq!(
            written.sidecar,
            Sidecar {
                num_layers: 2,
                num_kv_heads: 2,
                seq_len: 3,
                head_dim: 4,
                dtype: "float32".into(),
                model_name: "tiny".into()
            }
        );
        let (read, sidecar) = read_kv_cache(&path, &Device::Cpu).unwrap();
        assert_eq!(sidecar, written.sidecar);
        assert_same(&cache, &read);
    }

    #[test]
    fn f16_cache_holds_values_f16_represents_exactly() {
        // Multiples of 0.25 of magnitude below 256 are exact in f16.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kv.safetensors");
        let cache = numbered_cache(1, 2, 8);
        write_kv_cache(&path, &cache, CacheDtype::F16, "tiny").unwrap();
        let (read, sidecar) = read_kv_cache(&path, &Device::Cpu).unwrap();
        assert_eq!(sidecar.dtype, "float16");
        assert_same(&cache, &read);
    }

    #[test]
    fn a_sidecar_that_disagrees_with_the_shapes_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kv.safetensors");
        let sidecar = write_kv_cache(&path, &numbered_cache(2, 3, 4), CacheDtype::F32, "m")
            .unwrap()
            .sidecar;
        Sidecar {
            seq_len: 5,
            ..sidecar
        }
        .write(&sidecar_path(&path))
        .unwrap();
        let error = read_kv_cache(&path, &Device::Cpu).unwrap_err().to_string();
        assert!(
            error.contains("no layer holds the sidecar's seq_len = 5") && error.contains("sidecar"),
            "{error}"
        );
    }

    #[test]
    fn a_missing_sidecar_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kv.safetensors");
        write_kv_cache(&path, &numbered_cache(1, 1, 2), CacheDtype::F32, "m").unwrap();
        std::fs::remove_file(sidecar_path(&path)).unwrap();
        let error = read_kv_cache(&path, &Device::Cpu).unwrap_err();
        assert!(matches!(error, KvIoError::MissingSidecar { .. }), "{error}");
    }

    #[test]
    fn reading_like_a_layout_checks_every_tensor_shape() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kv.safetensors");
        let layout = write_kv_cache(&path, &numbered_cache(2, 3, 4), CacheDtype::F32, "m").unwrap();
        let sidecar = layout.sidecar.clone();
        let longer = CacheLayout::uniform(Sidecar {
            seq_len: 4,
            ..sidecar.clone()
        });
        let error = read_kv_cache_like(&path, &longer, &Device::Cpu).unwrap_err();
        assert!(matches!(error, KvIoError::ShapeMismatch { .. }), "{error}");
        // A layer that slides must come back as short as it went.
        let sliding = CacheLayout {
            positions: vec![2, 3],
            ..layout.clone()
        };
        let error = read_kv_cache_like(&path, &sliding, &Device::Cpu).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("layer_0_key has shape [1, 2, 3, 4], expected [1, 2, 2, 4]"),
            "{error}"
        );
        let deeper = CacheLayout::uniform(Sidecar {
            num_layers: 3,
            ..sidecar.clone()
        });
        let error = read_kv_cache_like(&path, &deeper, &Device::Cpu).unwrap_err();
        assert!(
            error.to_string().contains("layer_2_key is missing"),
            "{error}"
        );
        // A sidecar beside the file is checked too, even when the layout fits.
        Sidecar {
            head_dim: 8,
            ..sidecar.clone()
        }
        .write(&sidecar_path(&path))
        .unwrap();
        let error = read_kv_cache_like(&path, &layout, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("sidecar") && error.contains("layer_0_key"),
            "{error}"
        );
    }

    #[test]
    fn twelve_layers_round_trip_in_every_dtype_in_the_files_name_order() {
        // Small quarter steps are exact in bf16 and f16; 12 layers put
        // layer_10 before layer_2 in the file, and a sliding layer is shorter.
        let layers = (0..12)
            .map(|layer| {
                let tensor = |sign: f32, seq: usize| {
                    let values: Vec<f32> = (0..3 * seq * 2)
                        .map(|i| sign * (layer as f32 + (i % 8) as f32 * 0.25))
                        .collect();
                    Tensor::from_vec(values, (1, 3, seq, 2), &Device::Cpu).unwrap()
                };
                let seq = if layer % 5 == 1 { 3 } else { 5 };
                LayerKv {
                    key: tensor(1.0, seq),
                    value: tensor(-1.0, seq),
                }
            })
            .collect();
        let cache = KvCache { layers };
        let dir = tempfile::tempdir().unwrap();
        for dtype in CacheDtype::ALL {
            let path = dir
                .path()
                .join(format!("{}.safetensors", dtype.torch_name()));
            let layout = write_kv_cache(&path, &cache, dtype, "m").unwrap();
            assert_eq!(layout.positions[1], 3);
            // Read by the independent reader (kvformat's), tensor by name.
            let file = kvformat::cache::KvCache::open(&path).unwrap();
            for (entry, stored) in file.tensors() {
                assert_eq!(stored, dtype);
                let (layer, kind) = entry.name["layer_".len()..].split_once('_').unwrap();
                let kv = &cache.layers[layer.parse::<usize>().unwrap()];
                let expected = if kind == "key" { &kv.key } else { &kv.value };
                assert_eq!(
                    file.values(entry, stored).unwrap().into_owned(),
                    expected.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    "{}",
                    entry.name
                );
            }
            let host = HostCache::read(&path, &layout, HostBuffer::default()).unwrap();
            assert_same(&cache, &host.upload(&Device::Cpu).unwrap());
            // A buffer reused for a smaller cache still reads it exactly.
            let reused = HostCache::read(&path, &layout, host.into_buffer()).unwrap();
            assert_same(&cache, &reused.upload(&Device::Cpu).unwrap());
        }
    }

    #[test]
    fn a_non_finite_reconstruction_is_refused_naming_the_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kv.safetensors");
        let layout = write_kv_cache(&path, &numbered_cache(1, 2, 4), CacheDtype::F16, "m").unwrap();
        // bf16 0.5 is 0x3F00; value 5 of layer_1_value is +infinity (0x7F80).
        let finite: Vec<u8> = [0x00u8, 0x3F].repeat(8);
        let mut infinite = finite.clone();
        infinite[10..12].copy_from_slice(&[0x80, 0x7F]);
        let names: Vec<String> = (0..2)
            .flat_map(|layer| TensorKind::BOTH.map(|kind| tensor_name(layer, kind)))
            .collect();
        let tensors: Vec<kvformat::OutputTensor<'_>> = names
            .iter()
            .map(|name| kvformat::OutputTensor {
                name,
                dtype: safetensors::Dtype::BF16,
                shape: &[1, 1, 2, 4],
                data: if name == "layer_1_value" {
                    &infinite
                } else {
                    &finite
                },
            })
            .collect();
        kvformat::write_tensor_file(&path, &tensors, &BTreeMap::new()).unwrap();
        std::fs::remove_file(sidecar_path(&path)).unwrap();
        let error = HostCache::read(&path, &layout, HostBuffer::default())
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("layer_1_value") && error.contains("index 5"),
            "{error}"
        );
    }
}
