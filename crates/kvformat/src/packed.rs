//! The packed (compressed) file: a valid safetensors file holding, under each
//! input tensor's name, one U8 tensor with that tensor's stored payload, and in
//! `__metadata__` a checksummed JSON manifest that says how to decode each one.
//! `docs/format.md` ("Container") is the specification; this is its code.

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::Dtype;
use serde::{Deserialize, Serialize};

use crate::atomic::Staged;
use crate::codec::{self, CodecParams, Layout, ScaleDtype};
use crate::dtype::CacheDtype;
use crate::error::{Error, Result, TensorProblem};
use crate::input::try_resize_for_overwrite;
use crate::metrics::{Accumulator, TensorMetrics, SNR_CAP_DB};
use crate::tensor_file::{stage_tensor_file, OutputTensor, TensorFile, MAX_HEADER_BYTES};

/// `__metadata__` key of the container version.
pub const FORMAT_VERSION_KEY: &str = "kvformat.format_version";
/// The versions this code reads. A file is written with the lowest that
/// describes it ([`Manifest::format_version`]): 2 only when a tensor's codes
/// are rANS coded, so every other file stays readable by format-1 readers.
pub const FORMAT_VERSIONS: [&str; 2] = ["1", "2"];
/// `__metadata__` key of the manifest JSON string.
pub const MANIFEST_KEY: &str = "kvformat.manifest";
/// `__metadata__` key of the manifest's CRC-32 (8 lowercase hex digits).
pub const MANIFEST_CRC_KEY: &str = "kvformat.manifest_crc32";

/// Upper bound on a payload's raw length per value, so a hostile manifest
/// cannot make LZ4 allocate without limit: no codec stores more than an f32
/// per value, plus its per-group overhead.
const MAX_RAW_BYTES_PER_VALUE: usize = 8;
const MAX_RAW_OVERHEAD_BYTES: usize = 1 << 16;
/// An LZ4 block expands at most 255-fold (each extra match-length byte adds
/// 255 bytes of output), so a larger `raw_len` is a lie told to make the
/// decompressor allocate it.
const LZ4_MAX_EXPANSION: usize = 255;

/// Everything decoding one tensor needs beyond its stored bytes.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ManifestTensor {
    pub dtype: CacheDtype,
    pub shape: Vec<usize>,
    pub codec: CodecParams,
    pub layout: Layout,
    /// Whether the stored bytes are an LZ4 block (lz4_flex, no size prefix).
    pub lz4: bool,
    /// Length of the codec payload (after LZ4 decompression).
    pub raw_len: usize,
    /// Length of the stored U8 tensor.
    pub stored_len: usize,
    /// CRC-32 (IEEE) of the stored bytes.
    pub crc32: u32,
    /// Quality the compressor measured on this very reconstruction, so
    /// `-decompress` can report it.
    pub metrics: TensorMetrics,
}

/// The `kvformat.manifest` JSON: per-tensor entries and the input's own
/// `__metadata__`, which decompression restores exactly.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Manifest {
    pub tensors: BTreeMap<String, ManifestTensor>,
    pub input_metadata: BTreeMap<String, String>,
}

impl Manifest {
    /// The lowest format version that describes these tensors: `"2"` if
    /// any codes section is rANS coded, else `"1"`. A reader compares the
    /// file's `__metadata__` with the one rebuilt from the manifest, so a
    /// file may not claim another.
    pub fn format_version(&self) -> &'static str {
        let rans = self
            .tensors
            .values()
            .any(|t| t.layout.coder == Some(codec::EntropyCoder::Rans));
        FORMAT_VERSIONS[usize::from(rans)]
    }
}

/// One tensor compressed: its manifest entry and stored bytes.
#[derive(Clone, Debug)]
pub struct PackedTensor {
    pub name: String,
    pub entry: ManifestTensor,
    pub stored: Vec<u8>,
}

/// Encodes `values`, decodes the result (the reconstruction every metric and
/// `-decompress` use), measures it, and LZ4-compresses the payload where that
/// makes it smaller. Returns the packed tensor and the reconstruction. A
/// reconstruction that is not finite is refused: it would be written as
/// garbage and make the metrics meaningless.
pub fn pack_tensor(
    name: &str,
    dtype: CacheDtype,
    shape: &[usize],
    values: &[f32],
    params: &CodecParams,
) -> std::result::Result<(PackedTensor, Vec<f32>), TensorProblem> {
    let (packed, reconstruction) = pack(name, dtype, shape, values, params, true)?;
    Ok((packed, reconstruction.expect("kept when asked for")))
}

/// [`pack_tensor`] without keeping the reconstruction: for the ADR-002 grid
/// it is then never held whole, only measured block by block as the encoder
/// makes it (`codec::encode_observed`).
pub fn pack_tensor_measured(
    name: &str,
    dtype: CacheDtype,
    shape: &[usize],
    values: &[f32],
    params: &CodecParams,
) -> std::result::Result<PackedTensor, TensorProblem> {
    Ok(pack(name, dtype, shape, values, params, false)?.0)
}

fn pack(
    name: &str,
    dtype: CacheDtype,
    shape: &[usize],
    values: &[f32],
    params: &CodecParams,
    keep_reconstruction: bool,
) -> std::result::Result<(PackedTensor, Option<Vec<f32>>), TensorProblem> {
    let mut accumulator = Accumulator::new();
    let mut reconstruction = keep_reconstruction.then(|| Vec::with_capacity(values.len()));
    // transformers' quantized cache computes in the model's dtype: the input's.
    let quanto_params;
    let params = if params.grid.is_quanto() && params.model_dtype.is_none() {
        quanto_params = CodecParams {
            model_dtype: Some(match dtype {
                CacheDtype::F32 => ScaleDtype::F32,
                CacheDtype::F16 => ScaleDtype::F16,
                CacheDtype::BF16 => ScaleDtype::Bf16,
            }),
            ..params.clone()
        };
        &quanto_params
    } else {
        params
    };
    let encoded = codec::encode_observed(values, shape, params, &mut |original, restored| {
        accumulator.push(original, restored);
        if let Some(reconstruction) = &mut reconstruction {
            reconstruction.extend_from_slice(restored);
        }
    })?;
    let metrics = accumulator.finish();
    // `encode` refused non-finite inputs, so the squared-error sum is finite
    // exactly when every reconstructed value is: the metrics pass doubles as
    // the check, and the scan for the culprit runs only on the error path.
    if !metrics.rmse.is_finite() {
        let decoded;
        let restored: &[f32] = match &reconstruction {
            Some(restored) => restored,
            None => {
                decoded = codec::decode(&encoded.payload, shape, params, &encoded.layout)?;
                &decoded
            }
        };
        if let Some(index) = crate::dtype::first_non_finite(restored) {
            return Err(TensorProblem::ReconstructionNotFinite {
                index,
                value: restored[index],
            });
        }
    }
    let raw_len = encoded.payload.len();
    // An engine's bytes are what the engine stores: no LZ4 stage, so the
    // bits per value are its memory cost.
    let compressed = (!params.grid.is_engine_format() && lz4_may_pay(&encoded.payload))
        .then(|| lz4_flex::block::compress(&encoded.payload))
        .filter(|compressed| compressed.len() < raw_len);
    let (lz4, stored) = match compressed {
        Some(compressed) => (true, compressed),
        None => (false, encoded.payload),
    };
    let entry = ManifestTensor {
        dtype,
        shape: shape.to_vec(),
        codec: params.clone(),
        layout: encoded.layout,
        lz4,
        raw_len,
        stored_len: stored.len(),
        crc32: crc32fast::hash(&stored),
        metrics,
    };
    Ok((
        PackedTensor {
            name: name.to_string(),
            entry,
            stored,
        },
        reconstruction,
    ))
}

/// Slices of a payload that LZ4 is tried on before the whole payload.
const LZ4_TRIAL_SLICES: usize = 32;
const LZ4_TRIAL_SLICE_BYTES: usize = 1024;

/// Whether LZ4 may make `payload` shorter, judged for the price of a
/// fraction of compressing it. A payload no longer than the trial is simply
/// tried whole. A longer one is tried on evenly spaced slices, 1 KiB each
/// and 1/32 of the way apart: 4-bit codes of real data hardly ever shrink
/// (about 10% of a compress run went to finding that out), while what LZ4
/// does shrink, runs and repeats, shows up in any slice it covers. So only a
/// payload in which no slice shrinks at all is stored without trying the
/// whole; the decision, not the bytes, is what a trial may get wrong (a
/// compressible stretch shorter than the gap between slices, all of it
/// missed), and both forms decode to the same values.
fn lz4_may_pay(payload: &[u8]) -> bool {
    if payload.len() <= LZ4_TRIAL_SLICES * LZ4_TRIAL_SLICE_BYTES {
        return true;
    }
    let stride = payload.len() / LZ4_TRIAL_SLICES;
    let mut trial = vec![0u8; lz4_flex::block::get_maximum_output_size(LZ4_TRIAL_SLICE_BYTES)];
    (0..LZ4_TRIAL_SLICES).any(|slice| {
        let start = (slice * stride).min(payload.len() - LZ4_TRIAL_SLICE_BYTES);
        let slice = &payload[start..start + LZ4_TRIAL_SLICE_BYTES];
        lz4_flex::block::compress_into(slice, &mut trial).is_ok_and(|len| len < slice.len())
    })
}

/// The original's method name for `params`: `int4` for ADR-002.
fn compression_name(params: &CodecParams) -> String {
    format!("int{}", params.bits)
}

/// The full `__metadata__` of a packed file: the input's keys, the original's
/// `compression` / `group_size` / `original_dtype` (from the first tensor),
/// then ours. Decompression rebuilds it from the manifest and requires equality.
fn container_metadata(manifest: &Manifest, manifest_json: &str) -> BTreeMap<String, String> {
    let mut metadata = manifest.input_metadata.clone();
    if let Some(first) = manifest.tensors.values().next() {
        metadata.insert("compression".into(), compression_name(&first.codec));
        metadata.insert("group_size".into(), first.codec.group_size.to_string());
        metadata.insert("original_dtype".into(), first.dtype.torch_name().into());
    }
    metadata.insert(FORMAT_VERSION_KEY.into(), manifest.format_version().into());
    metadata.insert(MANIFEST_KEY.into(), manifest_json.into());
    metadata.insert(
        MANIFEST_CRC_KEY.into(),
        format!("{:08x}", crc32fast::hash(manifest_json.as_bytes())),
    );
    metadata
}

/// Fails, before any work, when a packed file of `tensor_count` tensors
/// carrying `input_metadata` could not be read back: more tensors than a file
/// may hold, or input metadata whose two copies (as `__metadata__` keys and
/// inside the manifest) alone exceed the header limit.
pub fn ensure_packable(
    path: &Path,
    tensor_count: usize,
    input_metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let refuse = |problem: String| Error::Structure {
        path: path.into(),
        problem: format!("refusing to write a file the reader would refuse: {problem}"),
    };
    if tensor_count > crate::tensor_file::MAX_TENSORS {
        return Err(refuse(format!(
            "{tensor_count} tensors, more than the {} a file may hold",
            crate::tensor_file::MAX_TENSORS
        )));
    }
    let metadata_bytes = serde_json::to_vec(input_metadata)
        .expect("string map serializes")
        .len();
    if metadata_bytes.saturating_mul(2) > MAX_HEADER_BYTES {
        return Err(refuse(format!(
            "the input's {metadata_bytes} bytes of __metadata__ are stored twice, more than the {MAX_HEADER_BYTES}-byte header limit"
        )));
    }
    Ok(())
}

/// Writes the packed file atomically.
pub fn write_packed(
    path: &Path,
    tensors: &[PackedTensor],
    input_metadata: &BTreeMap<String, String>,
) -> Result<()> {
    crate::atomic::commit(vec![stage_packed(path, tensors, input_metadata)?])
}

/// [`write_packed`] up to the commit: the caller commits it with its sidecar.
pub fn stage_packed(
    path: &Path,
    tensors: &[PackedTensor],
    input_metadata: &BTreeMap<String, String>,
) -> Result<Staged> {
    let manifest = Manifest {
        tensors: tensors
            .iter()
            .map(|t| (t.name.clone(), t.entry.clone()))
            .collect(),
        input_metadata: input_metadata.clone(),
    };
    let manifest_json = serde_json::to_string(&manifest).expect("manifest serializes");
    let metadata = container_metadata(&manifest, &manifest_json);
    let shapes: Vec<[usize; 1]> = tensors.iter().map(|t| [t.stored.len()]).collect();
    let outputs: Vec<OutputTensor<'_>> = tensors
        .iter()
        .zip(&shapes)
        .map(|(t, shape)| OutputTensor {
            name: &t.name,
            dtype: Dtype::U8,
            shape,
            data: &t.stored,
        })
        .collect();
    stage_tensor_file(path, &outputs, &metadata)
}

/// An open packed file whose manifest is present, intact and consistent
/// with the tensors in the file. Tensor data is checked when unpacked.
#[derive(Debug)]
pub struct PackedFile {
    file: TensorFile,
    manifest: Manifest,
}

impl PackedFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = TensorFile::open(path)?;
        let manifest_error = |problem: String| Error::Manifest {
            path: path.into(),
            problem,
        };
        let metadata = file.metadata();
        let Some(manifest_json) = metadata.get(MANIFEST_KEY) else {
            return Err(Error::NotPacked { path: path.into() });
        };
        match metadata.get(FORMAT_VERSION_KEY) {
            Some(version) if FORMAT_VERSIONS.contains(&version.as_str()) => {}
            other => {
                return Err(manifest_error(format!(
                    "unsupported {FORMAT_VERSION_KEY} {other:?} (this reads {}): a newer kv-compress wrote it; read it with that version",
                    FORMAT_VERSIONS.map(|v| format!("\"{v}\"")).join(" and ")
                )))
            }
        }
        let actual_crc = format!("{:08x}", crc32fast::hash(manifest_json.as_bytes()));
        if metadata.get(MANIFEST_CRC_KEY) != Some(&actual_crc) {
            return Err(manifest_error(format!(
                "checksum mismatch (stored {:?}, manifest has {actual_crc}): the file is corrupted",
                metadata.get(MANIFEST_CRC_KEY)
            )));
        }
        let manifest: Manifest = serde_json::from_str(manifest_json)
            .map_err(|e| manifest_error(format!("not valid JSON: {e}")))?;
        if &container_metadata(&manifest, manifest_json) != metadata {
            return Err(manifest_error(
                "__metadata__ does not match the manifest (a carried key was altered): the file is corrupted".into(),
            ));
        }
        for entry in file.tensors() {
            if !manifest.tensors.contains_key(&entry.name) {
                return Err(Error::tensor(
                    path,
                    &entry.name,
                    TensorProblem::UnlistedTensor,
                ));
            }
        }
        for (name, tensor) in &manifest.tensors {
            let Some(entry) = entry_named(&file, name) else {
                return Err(Error::tensor(path, name, TensorProblem::MissingTensor));
            };
            if entry.dtype != Dtype::U8 || entry.shape != [tensor.stored_len] {
                return Err(Error::tensor(
                    path,
                    name,
                    TensorProblem::StoredShapeMismatch {
                        dtype: entry.dtype.to_string(),
                        shape: entry.shape.clone(),
                        stored_len: tensor.stored_len,
                    },
                ));
            }
            check_plausible(tensor).map_err(|problem| {
                Error::tensor(path, name, TensorProblem::BadManifestEntry(problem))
            })?;
        }
        Ok(PackedFile { file, manifest })
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn path(&self) -> &Path {
        self.file.path()
    }

    /// Bytes of stored payloads: what decompression reads.
    pub fn stored_len(&self) -> usize {
        self.file.data_len()
    }

    /// Verifies the tensor's checksum, undoes LZ4 and decodes it to `f32`:
    /// bit-identical to the compressor's reconstruction.
    pub fn unpack(&self, name: &str) -> Result<Vec<f32>> {
        let mut values = Vec::new();
        self.unpack_into(name, &mut values)?;
        Ok(values)
    }

    /// [`Self::unpack`] into `values`, resized to the tensor (its old
    /// contents are overwritten, never zeroed first): a caller restoring
    /// tensor after tensor reuses one buffer, and the stored and LZ4 bytes
    /// live in per-thread buffers, so no tensor costs fresh pages.
    pub fn unpack_into(&self, name: &str, values: &mut Vec<f32>) -> Result<()> {
        let path = self.file.path();
        let (Some(tensor), Some(entry)) = (
            self.manifest.tensors.get(name),
            entry_named(&self.file, name),
        ) else {
            return Err(Error::tensor(path, name, TensorProblem::MissingTensor));
        };
        let problem = |problem: TensorProblem| Error::tensor(path, name, problem);
        // Taken, not borrowed: a rayon call inside may run another tensor's
        // unpack on this thread, which then gets buffers of its own.
        let (mut stored, mut decompressed) = UNPACK_SCRATCH.take();
        let result = (|| {
            // Read once: the bytes checksummed are the bytes decoded,
            // whatever another process does to the file meanwhile.
            try_resize_for_overwrite(&mut stored, entry.byte_len(), "the tensor's bytes")
                .map_err(problem)?;
            self.file.read_into(entry, &mut stored)?;
            let actual = crc32fast::hash(&stored);
            if actual != tensor.crc32 {
                return Err(problem(TensorProblem::ChecksumMismatch {
                    expected: tensor.crc32,
                    actual,
                }));
            }
            let lz4_error = |reason: String| {
                problem(TensorProblem::Lz4 {
                    raw_len: tensor.raw_len,
                    reason,
                })
            };
            let payload: &[u8] = if tensor.lz4 {
                try_resize_for_overwrite(
                    &mut decompressed,
                    tensor.raw_len,
                    "the decompressed payload",
                )
                .map_err(problem)?;
                let len = lz4_flex::block::decompress_into(&stored, &mut decompressed)
                    .map_err(|e| lz4_error(e.to_string()))?;
                if len != tensor.raw_len {
                    return Err(lz4_error(format!("got {len} bytes")));
                }
                &decompressed
            } else {
                &stored
            };
            tensor
                .codec
                .validate(&tensor.shape)
                .map_err(|e| problem(e.into()))?;
            let count = tensor.shape.iter().product::<usize>();
            try_resize_for_overwrite(values, count, "the decoded tensor").map_err(problem)?;
            codec::decode_into(
                payload,
                &tensor.shape,
                &tensor.codec,
                &tensor.layout,
                values,
            )
            .map_err(|e| problem(e.into()))
        })();
        UNPACK_SCRATCH.set((stored, decompressed));
        result?;
        // A checksum only proves the bytes are the ones written; hostile
        // scales can still make a valid payload decode past f32's range
        // (docs/format.md promises finite values).
        if let Some(index) = crate::dtype::first_non_finite(values) {
            return Err(problem(TensorProblem::DecodedNotFinite {
                index,
                value: values[index],
            }));
        }
        Ok(())
    }
}

thread_local! {
    /// The buffers of [`PackedFile::unpack_into`]: stored bytes, LZ4 output.
    static UNPACK_SCRATCH: std::cell::Cell<(Vec<u8>, Vec<u8>)> = const { std::cell::Cell::new((Vec::new(), Vec::new())) };
}

/// The file's entry for tensor `name`, by binary search (entries are sorted
/// by name): a linear search per tensor made files of many tensors quadratic.
fn entry_named<'a>(
    file: &'a TensorFile,
    name: &str,
) -> Option<&'a crate::tensor_file::TensorEntry> {
    let tensors = file.tensors();
    tensors
        .binary_search_by(|t| t.name.as_str().cmp(name))
        .ok()
        .map(|i| &tensors[i])
}

/// Rejects manifest entries whose sizes cannot be right before any allocation.
fn check_plausible(tensor: &ManifestTensor) -> std::result::Result<(), String> {
    let values = tensor
        .shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .filter(|n| n.checked_mul(4).is_some())
        .ok_or_else(|| format!("shape {:?} overflows", tensor.shape))?;
    let max_raw = values
        .saturating_mul(MAX_RAW_BYTES_PER_VALUE)
        .saturating_add(MAX_RAW_OVERHEAD_BYTES);
    if tensor.raw_len > max_raw {
        return Err(format!(
            "raw_len {} exceeds {max_raw} for {values} values",
            tensor.raw_len
        ));
    }
    if tensor.lz4 && tensor.raw_len > tensor.stored_len.saturating_mul(LZ4_MAX_EXPANSION) {
        return Err(format!(
            "raw_len {} is more than LZ4 can expand {} stored bytes to",
            tensor.raw_len, tensor.stored_len
        ));
    }
    // Invalid codec params are reported by `unpack`, which names them.
    if let Ok(expected) = codec::payload_len(&tensor.shape, &tensor.codec, &tensor.layout) {
        if tensor.raw_len != expected {
            return Err(format!(
                "raw_len {} but the codec payload for this shape is {expected} bytes",
                tensor.raw_len
            ));
        }
    }
    if !tensor.lz4 && tensor.raw_len != tensor.stored_len {
        return Err(format!(
            "uncompressed payload with raw_len {} != stored_len {}",
            tensor.raw_len, tensor.stored_len
        ));
    }
    check_metrics(&tensor.metrics)
}

/// Largest error two finite f32 values can differ by: every honest RMSE and
/// max error is at most this, and 16384 tensors of it still sum finitely.
const MAX_ERROR: f64 = 2.0 * f32::MAX as f64;

/// Rejects metrics no measurement of finite values can produce, so the report
/// stays finite JSON and means what it says.
fn check_metrics(m: &TensorMetrics) -> std::result::Result<(), String> {
    let in_range = |value: f64, low: f64, high: f64| (low..=high).contains(&value);
    let problem = if !in_range(m.rmse, 0.0, MAX_ERROR) {
        Some(("rmse", m.rmse))
    } else if !in_range(m.max_error, 0.0, MAX_ERROR) {
        Some(("max_error", m.max_error))
    } else if !in_range(m.cosine, -1.0, 1.0) {
        Some(("cosine", m.cosine))
    } else if !in_range(m.snr_db, -SNR_CAP_DB, SNR_CAP_DB) {
        Some(("snr_db", m.snr_db))
    } else {
        None
    };
    match problem {
        Some((field, value)) => Err(format!("metrics.{field} {value:?} is out of range")),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Seeded bytes LZ4 cannot shrink.
    fn noise(len: usize) -> Vec<u8> {
        let mut rng = crate::codec::SplitMix64(3);
        (0..len).map(|_| (rng.next_u64() >> 56) as u8).collect()
    }

    #[test]
    fn the_lz4_trial_skips_noise_and_tries_what_lz4_shrinks() {
        let len = 280_000;
        let payload = noise(len);
        assert!(
            lz4_flex::block::compress(&payload).len() >= len,
            "noise does not shrink"
        );
        assert!(!lz4_may_pay(&payload));
        // Short payloads are tried whole, whatever they hold.
        assert!(lz4_may_pay(
            &payload[..LZ4_TRIAL_SLICES * LZ4_TRIAL_SLICE_BYTES]
        ));
        // A stretch of zeros (padding tokens) or of one repeated token, a
        // twentieth of the payload, anywhere: LZ4 shrinks it and the trial sees it.
        let stretch = len / 20;
        for start in (0..len - stretch).step_by(997) {
            for repeated in [false, true] {
                let mut payload = payload.clone();
                for (i, byte) in payload[start..start + stretch].iter_mut().enumerate() {
                    *byte = if repeated { (i % 32) as u8 } else { 0 };
                }
                assert!(lz4_flex::block::compress(&payload).len() < len);
                assert!(
                    lz4_may_pay(&payload),
                    "stretch at {start}, repeated {repeated}"
                );
            }
        }
    }
}
