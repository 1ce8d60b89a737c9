//! The model's in-memory [`KvCache`] to and from a KV-cache safetensors file
//! (`layer_{i}_key` / `layer_{i}_value`, `[1, kv_heads, seq, head_dim]`) and
//! its `.metadata.json` sidecar, through `kvformat`, so the files are the
//! ones the Python `save_kv_cache()` / `load_kv_cache()` write and read.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use kvformat::cache::{write_cache, CacheTensor};
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

pub fn write_kv_cache(
    path: &Path,
    cache: &KvCache,
    dtype: CacheDtype,
    model_name: &str,
) -> Result<CacheLayout, KvIoError> {
    let layout = describe(cache, dtype, model_name)?;
    let shapes: Vec<[usize; 4]> = layout
        .positions
        .iter()
        .map(|&positions| [1, layout.num_kv_heads, positions, layout.head_dim])
        .collect();
    let mut names = Vec::with_capacity(2 * cache.layers.len());
    let mut values = Vec::with_capacity(2 * cache.layers.len());
    for (layer, kv) in cache.layers.iter().enumerate() {
        for (kind, tensor) in TensorKind::BOTH.into_iter().zip([&kv.key, &kv.value]) {
            names.push((layer, tensor_name(layer, kind)));
            values.push(
                tensor
                    .to_dtype(candle_core::DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?,
            );
        }
    }
    let tensors: Vec<CacheTensor<'_>> = names
        .iter()
        .zip(&values)
        .map(|((layer, name), values)| CacheTensor {
            name,
            dtype,
            shape: &shapes[*layer],
            values,
        })
        .collect();
    write_cache(path, &tensors, &BTreeMap::new())?;
    layout.sidecar.write(&sidecar_path(path))?;
    Ok(layout)
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
    let cache = read_layers(&file, &layout, device)?;
    Ok((cache, layout.sidecar))
}

/// Reads a cache that must have the layout `expected` describes (dtype
/// aside): what `kv-compress -decompress` restored from a cache we wrote.
/// The caller knows what it sent, so no sidecar is needed; one that is
/// there must agree with the file, as `load_kv_cache()` would insist.
pub fn read_kv_cache_like(
    path: &Path,
    expected: &CacheLayout,
    device: &Device,
) -> Result<KvCache, KvIoError> {
    let file = kvformat::cache::KvCache::open(path)?;
    if let Some(sidecar) = Sidecar::read_beside(path)? {
        validate_against_sidecar(file.file(), &sidecar, &sidecar_path(path))?;
    }
    read_layers(&file, expected, device)
}

/// Layers `0..num_layers` of `file` as f32 tensors, each checked against `layout`.
fn read_layers(
    file: &kvformat::cache::KvCache,
    layout: &CacheLayout,
    device: &Device,
) -> Result<KvCache, KvIoError> {
    let path = file.file().path();
    let read = |name: String, positions: usize| -> Result<Tensor, KvIoError> {
        let expected = vec![1, layout.num_kv_heads, positions, layout.head_dim];
        let (entry, dtype) = file
            .tensors()
            .find(|(entry, _)| entry.name == name)
            .ok_or_else(|| KvIoError::MissingTensor {
                path: path.to_path_buf(),
                tensor: name.clone(),
            })?;
        if entry.shape != expected {
            return Err(KvIoError::ShapeMismatch {
                path: path.to_path_buf(),
                tensor: name,
                found: entry.shape.clone(),
                expected,
            });
        }
        let values = file.values(entry, dtype)?.into_owned();
        Ok(Tensor::from_vec(values, expected.as_slice(), device)?)
    };
    let layers = (0..layout.num_layers)
        .map(|layer| {
            let positions = layout
                .positions
                .get(layer)
                .copied()
                .unwrap_or(layout.seq_len);
            Ok(LayerKv {
                key: read(tensor_name(layer, TensorKind::Key), positions)?,
                value: read(tensor_name(layer, TensorKind::Value), positions)?,
            })
        })
        .collect::<Result<Vec<_>, KvIoError>>()?;
    Ok(KvCache { layers })
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
}
