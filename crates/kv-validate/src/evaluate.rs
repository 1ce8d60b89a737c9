//! The evaluation loop: for each window, one uncompressed prefill of the
//! context, then the targets scored on the original cache (baseline) and on
//! every compressor variant's reconstructed cache.
//!
//! The first target of a window is predicted by the prefill's last position,
//! which attends to the context's own, uncompressed keys and values: no cache
//! is involved, so its score is the same for the baseline and every variant
//! and is computed once. The remaining targets are fed on top of a cache (the
//! original or a reconstruction), so both sides score exactly the same tokens.
//!
//! The cache is written once per window and shared by all variants, which is
//! what lets a sweep (issue 5) compare N methods for one model pass. The
//! baseline's log-probabilities of a window's targets stay on the model's
//! device while each variant's are compared with them ([`crate::fidelity`]).
//!
//! The loop produces [`WindowRecord`]s; every figure of the reports is
//! computed from them by [`Evaluation::from_records`], the same function
//! `kv-validate merge` calls on slices.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, IndexOp, Tensor};
use kvformat::metrics::QualityLevel;
use kvformat::{CacheDtype, CompressionFigures, Report};
use serde::Serialize;

use crate::bridge::{BridgeError, KvCompress};
use crate::cleanup::ScratchDir;
use crate::fidelity::{delta_p, BaselineRows, FidelityFigures, MeanWithError, TokenFigures};
use crate::kvio::{HostBuffer, HostCache, KvIoError};
use crate::model::device::dtype_of_cache;
use crate::model::{KvCache, LayerKv, Llama};
use crate::perplexity::{token_nlls, NllTotals, Window};
use crate::progress::TokenProgress;
use crate::run_types::{CompressSettings, Timings, VariantRecord, WindowRecord};

/// Why an evaluation stopped.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("model forward pass failed: {0}")]
    Model(#[from] candle_core::Error),
    #[error(transparent)]
    KvIo(#[from] KvIoError),
    #[error(transparent)]
    Bridge(#[from] BridgeError),
    #[error("cannot create a scratch directory for caches in {}: {source} (see --scratch-dir)", parent.display())]
    Scratch {
        parent: PathBuf,
        source: std::io::Error,
    },
    #[error("no compressor variant to evaluate")]
    NoVariants,
    /// Nothing would be measured, and nothing measured is not a pass.
    #[error(
        "none of the {windows} window(s) has a cache for the compressor to change, so \
         nothing would be measured: a window needs context tokens and at least 2 targets \
         (the first target is predicted by the prefill alone); use --targets 2 or more, \
         or more windows (--max-windows 2 or more: the sliding window's first window \
         has no context)"
    )]
    NothingToCompress { windows: usize },
    #[error(
        "window [{begin}, {end}) lies outside the {tokens} tokens of the text or has no target"
    )]
    WindowOutOfRange {
        begin: usize,
        end: usize,
        tokens: usize,
    },
}

/// Windows in flight at once by default: kv-compress on two windows' caches
/// while the model works on a third.
pub const DEFAULT_PIPELINE_DEPTH: usize = 3;
/// Most windows in flight `--pipeline-depth` allows: beyond a few, only memory grows.
pub const MAX_PIPELINE_DEPTH: usize = 8;

/// What the evaluation needs besides the model, tokens and windows.
#[derive(Clone, Debug)]
pub struct EvalOptions {
    /// Element type of the cache file handed to `kv-compress`.
    pub cache_dtype: CacheDtype,
    /// Written into each cache's sidecar (`model_name`).
    pub model_name: String,
    /// Progress bar with tokens/s and ETA on stderr.
    pub show_progress: bool,
    /// Where each window's cache files go (a fresh directory inside it,
    /// removed at the end): see [`default_scratch_parent`].
    pub scratch_parent: PathBuf,
    /// `Some(plan index of the first window)` when the windows are a
    /// `--windows` slice of a larger plan: the records carry plan indices,
    /// and a slice may hold no compressed cache (the caller checks the whole
    /// plan with [`ensure_measurable`]). `None` for a whole run.
    pub slice_start: Option<usize>,
    /// Windows in flight at once (`--pipeline-depth`): 1 runs one window
    /// after another; more let kv-compress work on one window's cache while
    /// the model works on others (see [`Pipeline`] for the memory it takes).
    pub pipeline_depth: usize,
}

/// `/dev/shm` where it is a directory (RAM: on a GPU the per-window file
/// exchange with kv-compress, not the model, is what costs), else the
/// system's temporary directory.
pub fn default_scratch_parent() -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

/// Compressor metrics of one variant over every window it compressed.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct MetricsSummary {
    /// Measured from bytes summed over windows: original / compressed.
    pub compression_ratio: f64,
    /// Mean over windows, when the compressor reports it (the Go original does not).
    pub bits_per_value: Option<f64>,
    /// kv-compress's figures over windows (flat in the JSON): sizes summed,
    /// the largest max error, the mean of the other (already per-tensor
    /// averaged) figures.
    #[serde(flatten)]
    pub figures: CompressionFigures,
    /// The worst grade kv-compress gave a window's cache.
    pub worst_quality_level: Option<QualityLevel>,
    /// Windows kv-compress graded as failing its own quality thresholds.
    pub quality_failures: usize,
    /// Windows whose cache this variant compressed.
    pub windows: usize,
}

/// POOR < ACCEPTABLE < GOOD < EXCELLENT.
fn quality_rank(level: QualityLevel) -> u8 {
    match level {
        QualityLevel::Poor => 0,
        QualityLevel::Acceptable => 1,
        QualityLevel::Good => 2,
        QualityLevel::Excellent => 3,
    }
}

impl MetricsSummary {
    /// Adds one window's compressor report.
    pub fn add(&mut self, metrics: &Report) {
        let n = self.windows as f64;
        let running_mean = |mean: f64, value: f64| (mean * n + value) / (n + 1.0);
        let (sum, window) = (&mut self.figures, &metrics.figures);
        sum.rmse = running_mean(sum.rmse, window.rmse);
        sum.snr_db = running_mean(sum.snr_db, window.snr_db);
        sum.cosine_similarity = running_mean(sum.cosine_similarity, window.cosine_similarity);
        sum.max_error = sum.max_error.max(window.max_error);
        // Saturating: unreachable under MAX_WINDOW_CACHE_BYTES, never a wrap.
        sum.original_size_bytes = sum
            .original_size_bytes
            .saturating_add(window.original_size_bytes);
        sum.compressed_size_bytes = sum
            .compressed_size_bytes
            .saturating_add(window.compressed_size_bytes);
        self.compression_ratio = sum.original_size_bytes as f64 / sum.compressed_size_bytes as f64;
        let bits = (metrics.bits_per_value > 0.0).then_some(metrics.bits_per_value);
        self.bits_per_value = match (self.bits_per_value, bits) {
            (Some(mean), Some(value)) => Some(running_mean(mean, value)),
            (None, value) if self.windows == 0 => value,
            _ => None,
        };
        self.quality_failures += usize::from(!metrics.quality_passed);
        if self
            .worst_quality_level
            .is_none_or(|worst| quality_rank(metrics.quality_level) < quality_rank(worst))
        {
            self.worst_quality_level = Some(metrics.quality_level);
        }
        self.windows += 1;
    }
}

/// One compressor variant's result.
#[derive(Clone, Debug)]
pub struct VariantOutcome {
    pub settings: CompressSettings,
    /// Every scored token, the ones scored on a reconstructed cache included.
    pub nll: NllTotals,
    /// Only the windows that had a compressed cache (see [`Evaluation::baseline_compressed_windows`]).
    pub nll_compressed_windows: NllTotals,
    pub metrics: MetricsSummary,
    /// Per-token NLL_compressed − NLL_baseline over every scored token.
    pub nll_difference: MeanWithError,
    /// The same over the windows that had a compressed cache (`None` when none had).
    pub nll_difference_compressed_windows: Option<MeanWithError>,
    pub fidelity: FidelityFigures,
}

impl VariantOutcome {
    /// Variant number `variant` of `records`, with `settings`.
    fn from_records(settings: &CompressSettings, variant: usize, records: &[WindowRecord]) -> Self {
        let mut nll = NllTotals::default();
        let mut nll_compressed_windows = NllTotals::default();
        let mut metrics = MetricsSummary::default();
        let mut differences = Vec::new();
        let mut differences_compressed_windows = Vec::new();
        let (mut kld, mut top1, mut dp) = (Vec::new(), Vec::new(), Vec::new());
        // Index in kld/top1/dp of each token scored on a compressed cache.
        let mut on_cache = Vec::new();
        for record in records {
            let Some(scores) = record.variants.get(variant) else {
                // No compressed cache: the variant scored exactly the baseline.
                let tokens = record.baseline_nll.len();
                nll.add_window(&record.baseline_nll);
                differences.extend(std::iter::repeat_n(0.0, tokens));
                kld.extend(std::iter::repeat_n(0.0, tokens));
                top1.extend(std::iter::repeat_n(true, tokens));
                dp.extend(std::iter::repeat_n(0.0, tokens));
                continue;
            };
            nll.add_window(&scores.nll);
            nll_compressed_windows.add_window(&scores.nll);
            metrics.add(&scores.metrics);
            for (token, (&baseline, &compressed)) in
                record.baseline_nll.iter().zip(&scores.nll).enumerate()
            {
                differences.push(compressed - baseline);
                differences_compressed_windows.push(compressed - baseline);
                // The first target comes from the uncompressed prefill.
                if token > 0 {
                    on_cache.push(kld.len() + token);
                }
                dp.push(delta_p(baseline, compressed));
            }
            kld.extend_from_slice(&scores.kld);
            top1.extend_from_slice(&scores.top1_agrees);
        }
        let pick = |values: &[f64]| on_cache.iter().map(|&i| values[i]).collect::<Vec<_>>();
        let top1_on_cache: Vec<bool> = on_cache.iter().map(|&i| top1[i]).collect();
        VariantOutcome {
            settings: settings.clone(),
            nll,
            nll_compressed_windows,
            metrics,
            nll_difference: MeanWithError::of(&differences),
            nll_difference_compressed_windows: (!differences_compressed_windows.is_empty())
                .then(|| MeanWithError::of(&differences_compressed_windows)),
            fidelity: FidelityFigures {
                on_compressed_cache: TokenFigures::of(&pick(&kld), &top1_on_cache, &pick(&dp)),
                all_tokens: TokenFigures::of(&kld, &top1, &dp),
            },
        }
    }
}

/// The whole evaluation.
#[derive(Clone, Debug)]
pub struct Evaluation {
    pub baseline: NllTotals,
    /// The baseline over the windows that had a compressed cache only: the
    /// sliding window's first window has no context, and its many tokens,
    /// scored alike on both sides, dilute the headline delta.
    pub baseline_compressed_windows: NllTotals,
    pub variants: Vec<VariantOutcome>,
    pub windows: usize,
    /// Windows with a context cache and more than one target, i.e. where a
    /// reconstructed cache actually changed what was scored.
    pub windows_compressed: usize,
    /// Tokens scored on top of a cache (the rest come from the prefill, or,
    /// in a window with no context, from the model alone).
    pub tokens_on_cache: usize,
    pub timings: Timings,
    /// What every figure above was computed from, sorted by window index.
    pub records: Vec<WindowRecord>,
}

impl Evaluation {
    /// The figures of `records` (sorted by window index) for variants
    /// `settings`: a pure function, so one run and merged slices of it agree
    /// to the last digit.
    pub fn from_records(
        settings: &[CompressSettings],
        records: Vec<WindowRecord>,
        timings: Timings,
    ) -> Self {
        let mut baseline = NllTotals::default();
        let mut baseline_compressed_windows = NllTotals::default();
        let mut windows_compressed = 0;
        let mut tokens_on_cache = 0;
        for record in &records {
            baseline.add_window(&record.baseline_nll);
            if record.compressed() {
                baseline_compressed_windows.add_window(&record.baseline_nll);
                windows_compressed += 1;
                tokens_on_cache += record.baseline_nll.len() - 1;
            }
        }
        let variants = settings
            .iter()
            .enumerate()
            .map(|(variant, settings)| VariantOutcome::from_records(settings, variant, &records))
            .collect();
        Evaluation {
            baseline,
            baseline_compressed_windows,
            variants,
            windows: records.len(),
            windows_compressed,
            tokens_on_cache,
            timings,
            records,
        }
    }
}

/// Runs the model over `windows` of `tokens`, scoring the baseline and each of `variants`.
pub fn evaluate(
    model: &Llama,
    tokens: &[u32],
    windows: &[Window],
    compressor: &KvCompress,
    variants: &[CompressSettings],
    options: &EvalOptions,
) -> Result<Evaluation, EvalError> {
    if variants.is_empty() {
        return Err(EvalError::NoVariants);
    }
    let malformed =
        |w: &&Window| w.end > tokens.len() || w.begin > w.context_end || w.context_end >= w.end;
    if let Some(window) = windows.iter().find(malformed) {
        return Err(EvalError::WindowOutOfRange {
            begin: window.begin,
            end: window.end,
            tokens: tokens.len(),
        });
    }
    if options.slice_start.is_none() {
        ensure_measurable(windows)?;
    }
    let started = Instant::now();
    let scratch = ScratchDir::new("kv-validate-", &options.scratch_parent).map_err(|source| {
        EvalError::Scratch {
            parent: options.scratch_parent.clone(),
            source,
        }
    })?;
    let progress = TokenProgress::new(
        windows.iter().map(Window::scored_len).sum::<usize>() as u64,
        options.show_progress,
    );
    let buffers = std::sync::Mutex::new(Vec::new());
    let mut run = Pipeline {
        model,
        tokens,
        compressor,
        variants,
        options,
        scratch: scratch.path(),
        depth: options.pipeline_depth.max(1),
        timings: Timings::default(),
        records: Vec::with_capacity(windows.len()),
        buffers: &buffers,
        progress: &progress,
    };
    run.run(windows)?;
    progress.finish();
    let mut timings = run.timings;
    timings.total = started.elapsed();
    Ok(Evaluation::from_records(variants, run.records, timings))
}

/// The evaluation's loop. Up to `depth` windows are in flight at once: the
/// model prefills window i + 1 (and scores window i − 1) on this thread
/// while kv-compress works on window i's cache on a thread of its own. The
/// model does exactly the same work on exactly the same inputs in the
/// same order of windows whatever the depth, so the records are the same.
///
/// Bounds, with `depth` windows in flight: on the model's device, each
/// one's cache and its baseline's log-probabilities; in host memory, each
/// one's cache until its file is written and up to two reconstructions
/// (one read, one waiting for the model), all in buffers reused window
/// after window; in the scratch directory, each one's cache file and one
/// variant's packed and reconstructed files.
struct Pipeline<'a> {
    model: &'a Llama,
    tokens: &'a [u32],
    compressor: &'a KvCompress,
    variants: &'a [CompressSettings],
    options: &'a EvalOptions,
    scratch: &'a Path,
    depth: usize,
    timings: Timings,
    records: Vec<WindowRecord>,
    /// Host buffers free for the next cache or reconstruction.
    buffers: &'a std::sync::Mutex<Vec<HostBuffer>>,
    progress: &'a TokenProgress,
}

/// What the model side keeps of a window while its cache is in the exchange.
struct Prefilled {
    record: WindowRecord,
    targets: std::ops::Range<usize>,
    /// Every position of every layer, on the model's device.
    cache: KvCache,
    baseline_rows: BaselineRows,
    first_nll: f64,
}

/// A window on its way to the records, in window order.
enum InFlight<'scope> {
    /// Scored by the model alone (no cache to compress).
    Scored(WindowRecord),
    /// Its cache in the exchange: reconstructions arrive on `reconstructions`
    /// one variant at a time; the thread ends with the exchange's timings.
    Exchanging {
        prefilled: Prefilled,
        slot: usize,
        reconstructions: std::sync::mpsc::Receiver<(Report, HostCache)>,
        exchange: std::thread::ScopedJoinHandle<'scope, Result<Timings, EvalError>>,
    },
}

impl<'a> Pipeline<'a> {
    fn run(&mut self, windows: &[Window]) -> Result<(), EvalError> {
        std::thread::scope(|scope| {
            let mut in_flight: std::collections::VecDeque<InFlight<'_>> = Default::default();
            let mut free_slots: Vec<usize> = (0..self.depth).rev().collect();
            for (offset, window) in windows.iter().enumerate() {
                let index = self.options.slice_start.unwrap_or(0) + offset;
                match self.prefill(index, window)? {
                    Err(record) => in_flight.push_back(InFlight::Scored(record)),
                    Ok(prefilled) => {
                        let slot = free_slots.pop().expect("a slot per window in flight");
                        let entry = self.send_to_exchange(scope, prefilled, slot)?;
                        in_flight.push_back(entry);
                    }
                }
                // Finished windows leave in order; the oldest is waited
                // for once `depth` windows are in the exchange.
                loop {
                    let exchanging = in_flight
                        .iter()
                        .filter(|w| matches!(w, InFlight::Exchanging { .. }))
                        .count();
                    match in_flight.front() {
                        Some(InFlight::Scored(_)) => {}
                        Some(InFlight::Exchanging { .. }) if exchanging >= self.depth => {}
                        _ => break,
                    }
                    let oldest = in_flight.pop_front().expect("a front window");
                    free_slots.extend(self.finish(oldest)?);
                }
            }
            while let Some(oldest) = in_flight.pop_front() {
                self.finish(oldest)?;
            }
            Ok(())
        })
    }

    /// The model's first pass over a window: its record when that is all
    /// (no context, or one target), else what scoring its variants needs.
    fn prefill(
        &mut self,
        index: usize,
        window: &Window,
    ) -> Result<Result<Prefilled, WindowRecord>, EvalError> {
        let model = self.model;
        let context = &self.tokens[window.begin..window.context_end];
        let targets = &self.tokens[window.context_end..window.end];
        let mut record = WindowRecord {
            index,
            begin: window.begin,
            context_end: window.context_end,
            end: window.end,
            baseline_nll: Vec::new(),
            variants: Vec::new(),
        };
        let model_started = Instant::now();
        if context.is_empty() {
            // Nothing cached to compress: one score for everyone.
            if targets.len() > 1 {
                let logits = logits_after(model, targets, None)?;
                record.baseline_nll = token_nlls(&logits, &targets[1..])?;
            }
            self.timings.model += model_started.elapsed();
            return Ok(Err(record));
        }
        let (last_logits, cache) = model.forward_last(&token_tensor(model, context)?, None)?;
        let first_nll = token_nlls(&last_logits, &targets[..1])?[0];
        record.baseline_nll.push(first_nll);
        if targets.len() == 1 {
            // The only target came from the prefill; a reconstruction would change nothing.
            self.timings.model += model_started.elapsed();
            return Ok(Err(record));
        }
        let baseline_logits = logits_after(
            model,
            targets,
            Some(&rounded_to(&cache, self.options.cache_dtype)?),
        )?;
        let baseline_rows = BaselineRows::new(&baseline_logits, &targets[1..])?;
        drop(baseline_logits);
        record.baseline_nll.extend_from_slice(&baseline_rows.nll);
        self.timings.model += model_started.elapsed();
        Ok(Ok(Prefilled {
            record,
            targets: window.context_end..window.end,
            cache,
            baseline_rows,
            first_nll,
        }))
    }

    /// Downloads the window's cache (here: the device is this thread's) and
    /// starts its exchange on a thread of its own in scratch slot `slot`.
    fn send_to_exchange<'scope, 'env>(
        &mut self,
        scope: &'scope std::thread::Scope<'scope, 'env>,
        prefilled: Prefilled,
        slot: usize,
    ) -> Result<InFlight<'scope>, EvalError>
    where
        'a: 'scope,
    {
        let write_started = Instant::now();
        let buffer = self.take_buffer();
        // What an engine stores: sliding-window layers hold only their window.
        let host = HostCache::download(
            &self.model.kept_cache(&prefilled.cache)?,
            self.options.cache_dtype,
            &self.options.model_name,
            buffer,
        )?;
        self.timings.cache_write += write_started.elapsed();
        let (sender, reconstructions) = std::sync::mpsc::sync_channel(1);
        let dir = self.scratch.join(format!("slot_{slot}"));
        let (compressor, variants, buffers) = (self.compressor, self.variants, self.buffers);
        let exchange =
            scope.spawn(move || exchange(host, &dir, compressor, variants, buffers, sender));
        Ok(InFlight::Exchanging {
            prefilled,
            slot,
            reconstructions,
            exchange,
        })
    }

    /// Scores a window's variants on their reconstructions as they arrive
    /// and files its record; returns the scratch slot it freed.
    fn finish(&mut self, window: InFlight<'_>) -> Result<Option<usize>, EvalError> {
        let (mut prefilled, slot, reconstructions, exchange) = match window {
            InFlight::Scored(record) => {
                self.file(record);
                return Ok(None);
            }
            InFlight::Exchanging {
                prefilled,
                slot,
                reconstructions,
                exchange,
            } => (prefilled, slot, reconstructions, exchange),
        };
        let targets = &self.tokens[prefilled.targets.clone()];
        // Ends early when the exchange failed: its error comes from the join.
        for (metrics, host) in reconstructions.iter() {
            let read_started = Instant::now();
            let reconstructed = self
                .model
                .with_dropped_positions(&prefilled.cache, host.upload(self.model.device())?)?;
            self.return_buffer(host.into_buffer());
            self.timings.cache_read += read_started.elapsed();

            let model_started = Instant::now();
            let logits = logits_after(self.model, targets, Some(&reconstructed))?;
            let compared = prefilled.baseline_rows.compare(&logits)?;
            self.timings.model += model_started.elapsed();
            let first_nll = prefilled.first_nll;
            // The first target: the prefill's, identical on both sides.
            prefilled.record.variants.push(VariantRecord {
                nll: [first_nll].into_iter().chain(compared.nll).collect(),
                kld: [0.0].into_iter().chain(compared.kld).collect(),
                top1_agrees: [true].into_iter().chain(compared.top1_agrees).collect(),
                metrics,
            });
        }
        let exchanged = exchange
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))?;
        self.timings.add(&exchanged);
        self.file(prefilled.record);
        Ok(Some(slot))
    }

    fn file(&mut self, record: WindowRecord) {
        self.progress.inc(record.baseline_nll.len() as u64);
        self.records.push(record);
    }

    fn take_buffer(&self) -> HostBuffer {
        take_buffer(self.buffers)
    }

    fn return_buffer(&self, buffer: HostBuffer) {
        lock(self.buffers).push(buffer);
    }
}

fn lock(buffers: &std::sync::Mutex<Vec<HostBuffer>>) -> std::sync::MutexGuard<'_, Vec<HostBuffer>> {
    buffers
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A free buffer, or a new one while fewer exist than windows in flight need.
fn take_buffer(buffers: &std::sync::Mutex<Vec<HostBuffer>>) -> HostBuffer {
    lock(buffers).pop().unwrap_or_default()
}

/// One window's exchange, on a thread of its own: the cache file written
/// into `dir`, then per variant kv-compress's round trip and the
/// reconstruction read, handed to the model side through `reconstructions`
/// (which holds one: reading runs at most one variant ahead of scoring).
/// Returns the time and bytes of each step.
fn exchange(
    host: HostCache,
    dir: &Path,
    compressor: &KvCompress,
    variants: &[CompressSettings],
    buffers: &std::sync::Mutex<Vec<HostBuffer>>,
    reconstructions: std::sync::mpsc::SyncSender<(Report, HostCache)>,
) -> Result<Timings, EvalError> {
    let mut timings = Timings::default();
    let write_started = Instant::now();
    std::fs::create_dir_all(dir).map_err(|source| EvalError::Scratch {
        parent: dir.to_path_buf(),
        source,
    })?;
    let cache_path = dir.join("context.safetensors");
    host.write_scratch(&cache_path)?;
    let layout = host.layout().clone();
    let cache_bytes = host.data_bytes();
    lock(buffers).push(host.into_buffer());
    timings.cache_write += write_started.elapsed();
    timings.cache_bytes_written += cache_bytes;
    for (index, settings) in variants.iter().enumerate() {
        let compressor_started = Instant::now();
        let packed = dir.join(format!("variant_{index}.kvc.safetensors"));
        let decoded = dir.join(format!("variant_{index}.decoded.safetensors"));
        // kv-compress writes its two outputs through its atomic writer, with
        // an fsync each: those are the only fsyncs left in the exchange. It
        // cannot know they are scratch (nor can the Go original, which the
        // bridge runs the same way), and in /dev/shm, the default, an fsync
        // has no disk to wait for.
        let metrics = compressor.round_trip(&cache_path, &packed, &decoded, settings)?;
        timings.compressor += compressor_started.elapsed();
        timings.cache_bytes_compressed += cache_bytes;

        let read_started = Instant::now();
        let reconstruction = HostCache::read(&decoded, &layout, take_buffer(buffers))?;
        // Read whole: the files only take room (RAM, in /dev/shm) now.
        for done in [
            &packed,
            &decoded,
            &kvformat::sidecar_path(&packed),
            &kvformat::sidecar_path(&decoded),
        ] {
            let _ = std::fs::remove_file(done);
        }
        timings.cache_read += read_started.elapsed();
        timings.cache_bytes_read += reconstruction.data_bytes();
        if reconstructions.send((metrics, reconstruction)).is_err() {
            // The model side stopped (an error of its own): nothing to do.
            break;
        }
    }
    Ok(timings)
}

/// One cache through kv-compress and back, on the calling thread (the
/// passkey test's exchange; the evaluation loop pipelines the same steps):
/// what an engine keeps of `cache` written to `dir` as `cache_dtype`,
/// compressed and decompressed with `settings`, read and uploaded, the
/// sliding layers' dropped positions put back. Returns kv-compress's
/// metrics and the reconstruction, ready to extend.
pub fn reconstruct(
    model: &Llama,
    cache: &KvCache,
    compressor: &KvCompress,
    settings: &CompressSettings,
    dir: &Path,
    options: &EvalOptions,
) -> Result<(Report, KvCache), EvalError> {
    let host = HostCache::download(
        &model.kept_cache(cache)?,
        options.cache_dtype,
        &options.model_name,
        HostBuffer::default(),
    )?;
    let cache_path = dir.join("context.safetensors");
    let packed = dir.join("context.kvc.safetensors");
    let decoded = dir.join("context.decoded.safetensors");
    host.write_scratch(&cache_path)?;
    let layout = host.layout().clone();
    let metrics = compressor.round_trip(&cache_path, &packed, &decoded, settings)?;
    let reconstruction = HostCache::read(&decoded, &layout, host.into_buffer())?;
    for done in [&cache_path, &packed, &decoded] {
        let _ = std::fs::remove_file(done);
        let _ = std::fs::remove_file(kvformat::sidecar_path(done));
    }
    let restored = model.with_dropped_positions(cache, reconstruction.upload(model.device())?)?;
    Ok((metrics, restored))
}

/// Fails when no window of `plan` has a cache the compressor can change.
pub fn ensure_measurable(plan: &[Window]) -> Result<(), EvalError> {
    if plan.iter().any(has_compressed_cache) {
        Ok(())
    } else {
        Err(EvalError::NothingToCompress {
            windows: plan.len(),
        })
    }
}

/// Whether a reconstructed cache changes what `window` scores: it has a
/// context to cache and a target after the one the prefill predicts.
fn has_compressed_cache(window: &Window) -> bool {
    window.context_end > window.begin && window.end - window.context_end > 1
}

/// The cache as the compressor receives it, rounded to the dtype its file
/// stores: the baseline scores on that, so rounding to F16/BF16 counts
/// against neither side and the delta is the compression's alone.
pub(crate) fn rounded_to(cache: &KvCache, dtype: CacheDtype) -> candle_core::Result<KvCache> {
    let stored = dtype_of_cache(dtype);
    let model_dtype = cache.layers.first().map(|layer| layer.key.dtype());
    if stored == DType::F32 || model_dtype == Some(stored) {
        // Exact: every model dtype fits in f32, and a file in the model's own dtype is lossless.
        return Ok(cache.clone());
    }
    let round = |t: &Tensor| t.to_dtype(stored)?.to_dtype(t.dtype());
    let layers = cache
        .layers
        .iter()
        .map(|layer| {
            Ok(LayerKv {
                key: round(&layer.key)?,
                value: round(&layer.value)?,
            })
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(KvCache { layers })
}

/// `tokens` as the model's `[1, T]` input.
pub(crate) fn token_tensor(model: &Llama, tokens: &[u32]) -> candle_core::Result<Tensor> {
    Tensor::new(tokens, model.device())?.unsqueeze(0)
}

/// Logits `[T - 1, vocab]` predicting `targets[1..]`, each from the
/// previous target on top of `cache` (`targets` has at least two tokens).
fn logits_after(
    model: &Llama,
    targets: &[u32],
    cache: Option<&KvCache>,
) -> candle_core::Result<Tensor> {
    let inputs = &targets[..targets.len() - 1];
    let (logits, _) = model.forward(&token_tensor(model, inputs)?, cache)?;
    logits.i(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn metrics(rmse: f64, level: QualityLevel, passed: bool, bits_per_value: f64) -> Report {
        Report {
            compression_ratio: 4.0,
            figures: CompressionFigures {
                original_size_bytes: 400,
                compressed_size_bytes: 100,
                rmse,
                snr_db: 20.0 + rmse,
                cosine_similarity: 0.99,
                max_error: rmse * 10.0,
            },
            quality_level: level,
            processing_time_ms: 1.0,
            quality_passed: passed,
            violations: Vec::new(),
            bits_per_value,
            num_tensors: 2,
            num_values: 100,
            tensor_metrics: None,
        }
    }

    #[test]
    fn metrics_summary_averages_sums_and_keeps_the_worst() {
        let mut summary = MetricsSummary::default();
        summary.add(&metrics(0.1, QualityLevel::Good, true, 4.25));
        summary.add(&metrics(0.3, QualityLevel::Poor, false, 4.75));
        summary.add(&metrics(0.2, QualityLevel::Acceptable, true, 4.5));
        assert_eq!(summary.windows, 3);
        let figures = &summary.figures;
        assert!((figures.rmse - 0.2).abs() < 1e-12);
        assert!((figures.snr_db - 20.2).abs() < 1e-12);
        assert!((figures.max_error - 3.0).abs() < 1e-12);
        assert_eq!(summary.bits_per_value, Some(4.5));
        assert_eq!(
            (figures.original_size_bytes, figures.compressed_size_bytes),
            (1200, 300)
        );
        assert_eq!(summary.compression_ratio, 4.0);
        assert_eq!(summary.quality_failures, 1);
        assert_eq!(summary.worst_quality_level, Some(QualityLevel::Poor));
    }

    #[test]
    fn bits_per_value_is_dropped_when_a_window_lacks_it() {
        let mut summary = MetricsSummary::default();
        summary.add(&metrics(0.1, QualityLevel::Good, true, 4.25));
        summary.add(&metrics(0.1, QualityLevel::Good, true, 0.0));
        assert_eq!(summary.bits_per_value, None);
    }

    #[test]
    fn compressor_share_counts_cache_files_and_subprocesses() {
        let timings = Timings {
            total: Duration::from_secs(10),
            model: Duration::from_secs(9),
            cache_write: Duration::from_millis(200),
            cache_read: Duration::from_millis(100),
            compressor: Duration::from_millis(700),
            ..Timings::default()
        };
        assert!((timings.compressor_share() - 0.1).abs() < 1e-12);
    }
}
