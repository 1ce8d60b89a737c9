//! A plain KV cache: a safetensors file whose every tensor is F32, F16 or
//! BF16 and finite (CONTRACT §1), read as `f32`, and its writer.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::Path;

use crate::dtype::{first_non_finite, CacheDtype};
use crate::error::{Error, Result, TensorProblem};
use crate::input::try_resize_for_overwrite;
use crate::tensor_file::{write_tensor_file_streaming, TensorEntry, TensorFile, TensorSpec};

/// An open KV cache whose tensors all have a cache dtype.
#[derive(Debug)]
pub struct KvCache {
    file: TensorFile,
    dtypes: Vec<CacheDtype>,
}

impl KvCache {
    /// Opens and validates the file; fails on the first tensor (by name) with
    /// a dtype other than F32, F16 or BF16.
    pub fn open(path: &Path) -> Result<Self> {
        let file = TensorFile::open(path)?;
        let dtypes = file
            .tensors()
            .iter()
            .map(|t| {
                CacheDtype::from_safetensors(t.dtype).ok_or_else(|| {
                    Error::tensor(
                        path,
                        &t.name,
                        TensorProblem::UnsupportedDtype(t.dtype.to_string()),
                    )
                })
            })
            .collect::<Result<_>>()?;
        Ok(KvCache { file, dtypes })
    }

    pub fn file(&self) -> &TensorFile {
        &self.file
    }

    /// Tensors sorted by name, each with its dtype.
    pub fn tensors(&self) -> impl Iterator<Item = (&TensorEntry, CacheDtype)> {
        self.file.tensors().iter().zip(self.dtypes.iter().copied())
    }

    /// The tensor's values as `f32`, read from the file once into memory
    /// (allocated fallibly) and checked there: what is returned is what was
    /// checked. Fails on the first NaN or infinity.
    pub fn values(&self, entry: &TensorEntry, dtype: CacheDtype) -> Result<Cow<'_, [f32]>> {
        let (mut values, mut bytes) = (Vec::new(), Vec::new());
        self.read_values(entry, dtype, &mut values, &mut bytes)?;
        Ok(Cow::Owned(values))
    }

    /// [`Self::values`] lent to `use_values`, read into buffers this thread
    /// reuses tensor after tensor: a fresh buffer per tensor costs a page
    /// fault per 4 KiB (the allocator hands large blocks back to the kernel),
    /// which doubled the time of a metrics-only run.
    pub fn with_values<R>(
        &self,
        entry: &TensorEntry,
        dtype: CacheDtype,
        use_values: impl FnOnce(&[f32]) -> R,
    ) -> Result<R> {
        // Taken, not borrowed: the codec's rayon calls may run another
        // tensor's read on this thread, which then gets buffers of its own.
        let (mut values, mut bytes) = SCRATCH.take();
        let result = self
            .read_values(entry, dtype, &mut values, &mut bytes)
            .map(|()| use_values(&values));
        SCRATCH.set((values, bytes));
        result
    }

    fn read_values(
        &self,
        entry: &TensorEntry,
        dtype: CacheDtype,
        values: &mut Vec<f32>,
        bytes: &mut Vec<u8>,
    ) -> Result<()> {
        let path = self.file.path();
        let problem = |problem| Error::tensor(path, &entry.name, problem);
        // Both buffers are overwritten whole (read_into, to_f32_into).
        try_resize_for_overwrite(
            values,
            entry.byte_len() / dtype.size_bytes(),
            "the tensor's values",
        )
        .map_err(problem)?;
        match dtype {
            CacheDtype::F32 => self
                .file
                .read_into(entry, bytemuck::cast_slice_mut(values))?,
            CacheDtype::F16 | CacheDtype::BF16 => {
                try_resize_for_overwrite(bytes, entry.byte_len(), "the tensor's bytes")
                    .map_err(problem)?;
                self.file.read_into(entry, bytes)?;
                dtype.to_f32_into(bytes, values);
            }
        }
        if let Some(index) = first_non_finite(values) {
            return Err(problem(TensorProblem::NonFinite {
                index,
                value: values[index],
            }));
        }
        Ok(())
    }
}

thread_local! {
    /// The buffers of [`KvCache::with_values`]: values, and raw bytes for F16/BF16.
    static SCRATCH: std::cell::Cell<(Vec<f32>, Vec<u8>)> = const { std::cell::Cell::new((Vec::new(), Vec::new())) };
}

/// One tensor of a cache to write, values as `f32`, stored as `dtype`.
#[derive(Clone, Copy, Debug)]
pub struct CacheTensor<'a> {
    pub name: &'a str,
    pub dtype: CacheDtype,
    pub shape: &'a [usize],
    pub values: &'a [f32],
}

/// Writes a plain KV cache atomically (tensors sorted by name), converting
/// to each tensor's dtype a few tensors at a time.
pub fn write_cache(
    path: &Path,
    tensors: &[CacheTensor<'_>],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let specs: Vec<TensorSpec<'_>> = tensors
        .iter()
        .map(|t| TensorSpec {
            name: t.name,
            dtype: t.dtype.to_safetensors(),
            shape: t.shape,
            byte_len: t.values.len() * t.dtype.size_bytes(),
        })
        .collect();
    write_tensor_file_streaming(path, &specs, metadata, |i, emit| {
        emit(&tensors[i].dtype.from_f32(tensors[i].values))
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_cache_reads_back_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.safetensors");
        let values = [1.0f32, -2.5, 0.125, 3.0, 4.0, 5.5];
        let tensors = [
            CacheTensor {
                name: "b",
                dtype: CacheDtype::BF16,
                shape: &[2, 3],
                values: &values,
            },
            CacheTensor {
                name: "a",
                dtype: CacheDtype::F32,
                shape: &[6],
                values: &values,
            },
        ];
        let metadata = BTreeMap::from([("k".to_string(), "v".to_string())]);
        write_cache(&path, &tensors, &metadata).unwrap();
        let cache = KvCache::open(&path).unwrap();
        assert_eq!(cache.file().metadata(), &metadata);
        let read: Vec<_> = cache
            .tensors()
            .map(|(t, d)| {
                (
                    t.name.clone(),
                    d,
                    t.shape.clone(),
                    cache.values(t, d).unwrap().into_owned(),
                )
            })
            .collect();
        assert_eq!(
            read[0],
            ("a".into(), CacheDtype::F32, vec![6], values.to_vec())
        );
        assert_eq!(
            read[1],
            ("b".into(), CacheDtype::BF16, vec![2, 3], values.to_vec())
        );
    }

    #[test]
    fn nan_is_rejected_naming_the_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.safetensors");
        let values = [1.0f32, f32::NAN];
        write_cache(
            &path,
            &[CacheTensor {
                name: "layer_0_key",
                dtype: CacheDtype::F16,
                shape: &[2],
                values: &values,
            }],
            &BTreeMap::new(),
        )
        .unwrap();
        let cache = KvCache::open(&path).unwrap();
        let (entry, dtype) = cache.tensors().next().unwrap();
        let error = cache.values(entry, dtype).unwrap_err().to_string();
        assert!(
            error.contains("layer_0_key") && error.contains("index 1"),
            "{error}"
        );
    }
}
