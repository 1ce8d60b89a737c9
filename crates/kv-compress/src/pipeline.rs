//! What one `kv-compress` invocation does, as a library call: compress (to the
//! packed file, to a reconstructed cache, or only measure) or decompress, and
//! return the report that `main` prints as JSON.

use std::path::Path;
use std::time::Instant;

use kvformat::atomic::Staged;
use kvformat::cache::KvCache;
use kvformat::metrics::{Report, TensorMetrics};
use kvformat::packed::{
    ensure_packable, pack_tensor, pack_tensor_measured, stage_packed, PackedFile, PackedTensor,
};
use kvformat::sidecar::{
    sidecar_path, validate_against_sidecar, validate_tensors_against_sidecar, Sidecar,
};
use kvformat::{stage_tensor_file_streaming, CacheDtype, Emit, TensorSpec};
use rayon::prelude::*;

use crate::flags::Options;
use crate::settings::{CodecSettings, SettingsError};

/// A failed run; `main` prints it as `Error: {self}` and exits 1.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("-input is required")]
    MissingInput,
    #[error("-output is required (use -metrics-only for dry run)")]
    MissingOutput,
    #[error("{0}")]
    File(#[from] kvformat::Error),
    /// Options built by hand whose codec settings conflict (the flag
    /// parser refuses these before a run).
    #[error("{0}")]
    Settings(#[from] SettingsError),
}

impl Error {
    /// Whether the command line itself is at fault (exit 2, as for a bad
    /// flag): paths that collide are refused before any work.
    pub fn is_usage(&self) -> bool {
        matches!(self, Error::File(kvformat::Error::PathClash { .. }))
    }
}

/// Runs the command the options describe, puts its outputs in place and
/// reports on it.
pub fn run(options: &Options) -> Result<Report, Error> {
    let (report, outputs) = prepare(options)?;
    outputs.commit()?;
    Ok(report)
}

/// A run's outputs, written and fsynced but not yet in place: the cache and
/// its sidecar, committed as a pair (see `kvformat::atomic`). Dropped
/// uncommitted, they leave the old pair and no temp file.
#[must_use = "outputs are not in place until committed"]
pub struct Outputs(Vec<Staged>);

impl Outputs {
    pub fn commit(self) -> Result<(), Error> {
        Ok(kvformat::atomic::commit(self.0)?)
    }

    /// The cache and its sidecar, which is committed first.
    /// No sidecar is written beside a special file (a FIFO or device has no
    /// "beside"); without one, a stale sidecar of the old output is removed,
    /// so the pair left is all from this run. A file at the sidecar's path
    /// that is not the old output's sidecar is neither replaced nor removed.
    fn pair(output: &Path, cache: Staged, sidecar: Option<&Sidecar>) -> Result<Outputs, Error> {
        if cache.wrote_through() {
            return Ok(Outputs(vec![cache]));
        }
        let path = sidecar_path(output);
        // Whatever is there is replaced or removed: only if it is the old
        // output's sidecar, never a file the user keeps under that name.
        kvformat::sidecar::ensure_old_sidecar_replaceable(&path, output)?;
        let sidecar = match sidecar {
            Some(sidecar) => sidecar.stage(&path)?,
            None => Staged::removal(&path)?,
        };
        Ok(Outputs(vec![sidecar, cache]))
    }
}

/// Everything [`run`] does but the commit, so a caller can put the outputs in
/// place only once the report is delivered (`main` prints it first).
pub fn prepare(options: &Options) -> Result<(Report, Outputs), Error> {
    let started = Instant::now();
    // An empty value is a missing one, as for the Go original (`-output=`).
    fn given(path: &Option<std::path::PathBuf>) -> Option<&Path> {
        path.as_deref().filter(|path| !path.as_os_str().is_empty())
    }
    let input = given(&options.input).ok_or(Error::MissingInput)?;
    let output = match (given(&options.output), options.metrics_only) {
        (_, true) => None,
        (Some(output), false) => Some(output),
        (None, false) => return Err(Error::MissingOutput),
    };
    if let Some(output) = output {
        kvformat::atomic::ensure_output_dir(output)?;
        ensure_outputs_spare_inputs(input, output)?;
    }
    let (mut report, outputs) = if options.decompress {
        decompress(input, output, options.verbose)?
    } else {
        compress(input, output, options)?
    };
    report.processing_time_ms = started.elapsed().as_secs_f64() * 1e3;
    Ok((report, outputs.unwrap_or(Outputs(Vec::new()))))
}

/// The one rule of `kvformat::atomic::ensure_no_clobber` for this run's
/// files: the output and its sidecar against the input and its sidecar.
fn ensure_outputs_spare_inputs(input: &Path, output: &Path) -> Result<(), Error> {
    use kvformat::atomic::NamedPath;
    let (input_sidecar, output_sidecar) = (sidecar_path(input), sidecar_path(output));
    let program = std::env::current_exe().ok();
    let mut reads = vec![
        NamedPath::new("-input", input),
        NamedPath::new("-input's sidecar", &input_sidecar),
    ];
    reads.extend(
        program
            .as_deref()
            .map(|exe| NamedPath::new("the running kv-compress", exe)),
    );
    let mut writes = vec![NamedPath::new("-output", output)];
    if !kvformat::atomic::writes_through(output) {
        writes.push(NamedPath::new("-output's sidecar", &output_sidecar));
    }
    Ok(kvformat::atomic::ensure_no_clobber(&reads, &writes)?)
}

/// What one tensor contributed to the report.
struct TensorOutcome {
    name: String,
    original_bytes: u64,
    stored_bytes: u64,
    values: u64,
    metrics: TensorMetrics,
}

/// Compresses one tensor of the cache; returns the packed form, the
/// reconstruction and the tensor's line of the report. The tensor is read
/// into memory once, so only the tensors in flight are held.
/// The reconstruction is kept only when `keep_reconstruction` (for
/// `-reconstruct`): otherwise it is measured as it is made and dropped.
fn compress_tensor(
    cache: &KvCache,
    index: usize,
    codec: &CodecSettings,
    verbose: bool,
    keep_reconstruction: bool,
) -> Result<(PackedTensor, Option<Vec<f32>>, TensorOutcome), kvformat::Error> {
    let (entry, dtype) = cache
        .tensors()
        .nth(index)
        .expect("index of an existing tensor");
    let path = cache.file().path();
    let params = codec.params_for(&entry.name);
    let (packed, reconstruction) = cache
        .with_values(entry, dtype, |values| {
            if keep_reconstruction {
                pack_tensor(&entry.name, dtype, &entry.shape, values, &params)
                    .map(|(packed, reconstruction)| (packed, Some(reconstruction)))
            } else {
                pack_tensor_measured(&entry.name, dtype, &entry.shape, values, &params)
                    .map(|packed| (packed, None))
            }
        })?
        .map_err(|problem| kvformat::Error::tensor(path, &entry.name, problem))?;
    let outcome = TensorOutcome {
        name: entry.name.clone(),
        original_bytes: entry.byte_len() as u64,
        stored_bytes: packed.stored.len() as u64,
        values: entry.shape.iter().product::<usize>() as u64,
        metrics: packed.entry.metrics,
    };
    if verbose {
        log_tensor(index, cache.file().tensors().len(), &outcome);
    }
    Ok((packed, reconstruction, outcome))
}

fn compress(
    input: &Path,
    output: Option<&Path>,
    options: &Options,
) -> Result<(Report, Option<Outputs>), Error> {
    let codec = options.codec_settings()?;
    let verbose = options.verbose;
    let cache = KvCache::open(input)?;
    let sidecar = Sidecar::read_beside(input)?;
    if let Some(sidecar) = &sidecar {
        validate_against_sidecar(cache.file(), sidecar, &sidecar_path(input))?;
    }
    let count = cache.file().tensors().len();
    let metadata = cache.file().metadata();
    let (outcomes, staged) = match output {
        None => {
            let outcomes = (0..count)
                .into_par_iter()
                .map(|i| {
                    compress_tensor(&cache, i, &codec, verbose, false)
                        .map(|(_, _, outcome)| outcome)
                })
                .collect::<Result<Vec<_>, _>>()?;
            (outcomes, None)
        }
        Some(output) if options.reconstruct => {
            let specs: Vec<TensorSpec<'_>> = cache
                .tensors()
                .map(|(entry, _)| TensorSpec {
                    name: &entry.name,
                    dtype: entry.dtype,
                    shape: &entry.shape,
                    byte_len: entry.byte_len(),
                })
                .collect();
            let (outcomes, staged) =
                stage_tensor_file_streaming(output, &specs, metadata, |i, emit| {
                    let (packed, reconstruction, outcome) =
                        compress_tensor(&cache, i, &codec, verbose, true)?;
                    let bytes = packed
                        .entry
                        .dtype
                        .try_from_f32(&reconstruction.expect("kept when asked for"))
                        .map_err(|problem| {
                            kvformat::Error::tensor(input, &outcome.name, problem)
                        })?;
                    emit(&bytes)?;
                    Ok(outcome)
                })?;
            (outcomes, Some(staged))
        }
        Some(output) => {
            ensure_packable(output, count, metadata)?;
            let (packed, outcomes): (Vec<PackedTensor>, Vec<TensorOutcome>) = (0..count)
                .into_par_iter()
                .map(|i| {
                    compress_tensor(&cache, i, &codec, verbose, false)
                        .map(|(packed, _, outcome)| (packed, outcome))
                })
                .collect::<Result<Vec<_>, _>>()?
                .into_iter()
                .unzip();
            (outcomes, Some(stage_packed(output, &packed, metadata)?))
        }
    };
    let outputs = match (output, staged) {
        (Some(output), Some(staged)) => Some(Outputs::pair(output, staged, sidecar.as_ref())?),
        _ => None,
    };
    Ok((report_of(&outcomes, options.verbose), outputs))
}

fn decompress(
    input: &Path,
    output: Option<&Path>,
    verbose: bool,
) -> Result<(Report, Option<Outputs>), Error> {
    let packed = PackedFile::open(input)?;
    let manifest = packed.manifest();
    let names: Vec<&String> = manifest.tensors.keys().collect();
    // Decoded straight into a per-thread buffer, whose bytes (F32) or
    // conversion (F16/BF16) go to the writer as they are.
    let restore =
        |index: usize, emit: Option<Emit<'_>>| -> Result<TensorOutcome, kvformat::Error> {
            let name = names[index];
            let tensor = &manifest.tensors[name];
            let (mut values, mut bytes) = RESTORE_SCRATCH.take();
            let result = (|| {
                packed.unpack_into(name, &mut values)?;
                let restored: &[u8] = match tensor.dtype {
                    CacheDtype::F32 => bytemuck::cast_slice(&values),
                    dtype => {
                        dtype
                            .try_from_f32_into(&values, &mut bytes)
                            .map_err(|problem| kvformat::Error::tensor(input, name, problem))?;
                        &bytes
                    }
                };
                if let Some(emit) = emit {
                    emit(restored)?;
                }
                Ok(restored.len())
            })();
            RESTORE_SCRATCH.set((values, bytes));
            let restored_len = result?;
            let outcome = TensorOutcome {
                name: name.clone(),
                original_bytes: restored_len as u64,
                stored_bytes: tensor.stored_len as u64,
                values: (restored_len / tensor.dtype.size_bytes()) as u64,
                metrics: tensor.metrics,
            };
            if verbose {
                log_tensor(index, names.len(), &outcome);
            }
            Ok(outcome)
        };
    let Some(output) = output else {
        let outcomes = (0..names.len())
            .into_par_iter()
            .map(|i| restore(i, None))
            .collect::<Result<Vec<_>, _>>()?;
        return Ok((report_of(&outcomes, verbose), None));
    };
    // The sidecar to write is settled before anything is: one beside the
    // packed file must describe the cache being restored, as compress
    // insists for its input; without one it is inferred from the layout.
    let restored: Vec<(String, CacheDtype, Vec<usize>)> = names
        .iter()
        .map(|&name| {
            (
                name.clone(),
                manifest.tensors[name].dtype,
                manifest.tensors[name].shape.clone(),
            )
        })
        .collect();
    let model_name = manifest
        .input_metadata
        .get("model_name")
        .map_or("", String::as_str);
    let sidecar = match Sidecar::read_beside(input)? {
        Some(sidecar) => {
            validate_tensors_against_sidecar(&restored, input, &sidecar, &sidecar_path(input))?;
            Some(sidecar)
        }
        None => Sidecar::infer(&restored, model_name),
    };
    let specs: Vec<TensorSpec<'_>> = names
        .iter()
        .map(|&name| {
            let tensor = &manifest.tensors[name];
            TensorSpec {
                name,
                dtype: tensor.dtype.to_safetensors(),
                shape: &tensor.shape,
                byte_len: tensor.shape.iter().product::<usize>() * tensor.dtype.size_bytes(),
            }
        })
        .collect();
    let (outcomes, staged) =
        stage_tensor_file_streaming(output, &specs, &manifest.input_metadata, |i, emit| {
            restore(i, Some(emit))
        })?;
    let outputs = Outputs::pair(output, staged, sidecar.as_ref())?;
    Ok((report_of(&outcomes, verbose), Some(outputs)))
}

thread_local! {
    /// `decompress`'s buffers: the decoded values, and their F16/BF16 bytes.
    static RESTORE_SCRATCH: std::cell::Cell<(Vec<f32>, Vec<u8>)> =
        const { std::cell::Cell::new((Vec::new(), Vec::new())) };
}

fn report_of(outcomes: &[TensorOutcome], with_tensor_metrics: bool) -> Report {
    let per_tensor: Vec<(String, TensorMetrics)> = outcomes
        .iter()
        .map(|o| (o.name.clone(), o.metrics))
        .collect();
    Report::new(
        outcomes.iter().map(|o| o.original_bytes).sum(),
        outcomes.iter().map(|o| o.stored_bytes).sum(),
        outcomes.iter().map(|o| o.values).sum(),
        &per_tensor,
        with_tensor_metrics,
    )
}

fn log_tensor(index: usize, total: usize, outcome: &TensorOutcome) {
    let m = &outcome.metrics;
    eprintln!(
        "kv-compress: [{}/{total}] {:?}: {} values -> {} bytes, rmse {:.6}, snr {:.2} dB, cosine {:.6}, max error {:.6}",
        index + 1,
        outcome.name,
        outcome.values,
        outcome.stored_bytes,
        m.rmse,
        m.snr_db,
        m.cosine,
        m.max_error
    );
}
