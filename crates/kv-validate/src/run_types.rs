//! The vocabulary of a run, on the bottom floor of the crate: what a run
//! was (its description and pass criteria), what it compared (variants,
//! each the flags of one `kv-compress` setting), where its time went and
//! what it measured per window (its records). The evaluation produces these,
//! the records file holds them, the reports read them; none of those is
//! imported here, so the modules above depend on this one and never on
//! each other in a circle.

use std::time::Duration;

use kvformat::preset::DEFAULT_GROUP_SIZE;
use kvformat::Report;
use serde::{Deserialize, Serialize};

use crate::identity::ContentIds;

/// The flags one compression variant passes to `kv-compress`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CompressSettings {
    pub group_size: u32,
    pub sparsity: f64,
    /// Further flags, passed through verbatim after the standard ones.
    pub extra_args: Vec<String>,
}

impl Default for CompressSettings {
    /// What the original bridge passed: group 64, no sparsification.
    fn default() -> Self {
        CompressSettings {
            group_size: DEFAULT_GROUP_SIZE as u32,
            sparsity: 0.0,
            extra_args: Vec::new(),
        }
    }
}

impl CompressSettings {
    /// A short human name for reports: `-group-size 64 -sparsity 0.0 -bits 8`.
    pub fn label(&self) -> String {
        let mut label = format!(
            "-group-size {} -sparsity {:?}",
            self.group_size, self.sparsity
        );
        for arg in &self.extra_args {
            label.push(' ');
            label.push_str(arg);
        }
        label
    }
}

/// Where the run's inputs came from and how it is judged: the report's
/// header, and what merged slices must agree on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunDescription {
    pub model: String,
    pub data: String,
    pub protocol: String,
    pub compressor: String,
    /// Where the model ran, with the device's name.
    pub device: String,
    pub cache_dtype: String,
    pub criteria: PassCriteria,
    /// Model, config, text and tokens by content: what slices must share.
    #[serde(flatten)]
    pub content: ContentIds,
}

/// What a variant must meet to pass; each criterion that is set applies.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct PassCriteria {
    /// delta < threshold.
    pub threshold: Option<f64>,
    /// Mean KLD over the tokens on a compressed cache < max_kld (nats).
    pub max_kld: Option<f64>,
}

impl PassCriteria {
    /// Whether `delta` and the mean KLD on a compressed cache (`None`: no
    /// token was on one) pass. Equal to a bound fails.
    pub fn passes(&self, delta: f64, mean_kld: Option<f64>) -> bool {
        self.threshold.is_none_or(|threshold| delta < threshold)
            && self
                .max_kld
                .is_none_or(|max| mean_kld.is_some_and(|kld| kld < max))
    }

    /// `delta < 0.5`, `mean KLD < 0.01`, or both joined by `and`.
    pub fn describe(&self) -> String {
        let parts: Vec<String> = [
            self.threshold.map(|t| format!("delta < {t}")),
            self.max_kld.map(|k| format!("mean KLD < {k}")),
        ]
        .into_iter()
        .flatten()
        .collect();
        parts.join(" and ")
    }
}

/// One compressor configuration of a sweep.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Variant {
    pub label: String,
    pub settings: CompressSettings,
}

/// Where the wall time went. With windows in flight together
/// (`--pipeline-depth` above 1) the exchange's steps run beside the model,
/// so the steps may sum to more than the wall time: the overlap.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Timings {
    pub total: Duration,
    /// Prefills and scoring passes.
    pub model: Duration,
    /// Each window's cache from the model's device to host memory and into
    /// its file (with its sidecar).
    pub cache_write: Duration,
    /// The reconstructions from their files to host memory, then onto the
    /// model's device.
    pub cache_read: Duration,
    /// Inside `kv-compress` subprocesses.
    pub compressor: Duration,
    /// Bytes of cache files written (once per window).
    #[serde(default)]
    pub cache_bytes_written: u64,
    /// Bytes of cache files compressed (once per window and variant).
    #[serde(default)]
    pub cache_bytes_compressed: u64,
    /// Bytes of reconstructions read (once per window and variant).
    #[serde(default)]
    pub cache_bytes_read: u64,
}

impl Timings {
    /// Adds another slice's (or window's) times and bytes: merged slices report the sum.
    pub fn add(&mut self, other: &Timings) {
        self.total += other.total;
        self.model += other.model;
        self.cache_write += other.cache_write;
        self.cache_read += other.cache_read;
        self.compressor += other.compressor;
        self.cache_bytes_written = self
            .cache_bytes_written
            .saturating_add(other.cache_bytes_written);
        self.cache_bytes_compressed = self
            .cache_bytes_compressed
            .saturating_add(other.cache_bytes_compressed);
        self.cache_bytes_read = self.cache_bytes_read.saturating_add(other.cache_bytes_read);
    }

    /// Share of the wall time the model was not running: the time spent on
    /// caches outside it (the "compressor share"). Run one window
    /// after another it is the exchange's whole time; overlapped, only what
    /// the model waited for.
    pub fn compressor_share(&self) -> f64 {
        let total = self.total.as_secs_f64();
        (1.0 - self.model.as_secs_f64() / total.max(f64::MIN_POSITIVE)).max(0.0)
    }

    /// The model's and the exchange's steps, summed.
    pub fn steps(&self) -> Duration {
        self.model + self.cache_write + self.compressor + self.cache_read
    }

    /// How much longer the steps took than the wall: what ran side by side.
    pub fn overlapped(&self) -> Duration {
        self.steps().saturating_sub(self.total)
    }
}

/// One window's scores.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WindowRecord {
    /// Position in the run's window plan (0-based).
    pub index: usize,
    pub begin: usize,
    pub context_end: usize,
    pub end: usize,
    /// The baseline's NLL of every scored token (nats).
    pub baseline_nll: Vec<f64>,
    /// One per variant, in the run's order, when the window had a compressed
    /// cache; empty when it had none (no context, or a single target that
    /// the prefill predicts): then every variant scored exactly the baseline.
    pub variants: Vec<VariantRecord>,
}

impl WindowRecord {
    /// Whether a reconstructed cache changed what was scored.
    pub fn compressed(&self) -> bool {
        !self.variants.is_empty()
    }
}

/// One variant's scores in one window, token for token with `baseline_nll`.
/// The first token comes from the uncompressed prefill: its NLL is the
/// baseline's, its KLD 0 and its top-1 the same.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VariantRecord {
    pub nll: Vec<f64>,
    /// KL(baseline ‖ compressed) over the vocabulary, nats.
    pub kld: Vec<f64>,
    pub top1_agrees: Vec<bool>,
    /// kv-compress's report on this window's cache.
    pub metrics: Report,
}

/// A records file: one run's, or one slice's, windows.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunRecords {
    pub format: String,
    pub version: u32,
    pub run: RunDescription,
    /// A sweep (table and recommendation) or a single validation (one variant).
    pub sweep: bool,
    pub variants: Vec<Variant>,
    /// Windows in the whole run's plan; a slice evaluates some of them.
    pub windows_planned: usize,
    /// Sorted by index.
    pub windows: Vec<WindowRecord>,
    /// Summed over slices when merged.
    pub timings: Timings,
}

/// Most bytes a window's cache may plausibly take (1 TiB: a 2048-token cache
/// of a 405B-parameter Llama is about 1 GB). Sizes beyond it in a
/// compressor's report or a records file are refused, so the sums over
/// windows cannot overflow short of 16 million windows.
pub const MAX_WINDOW_CACHE_BYTES: u64 = 1 << 40;

/// What is implausible about a compressor report's sizes, if anything.
pub fn implausible_sizes(metrics: &Report) -> Option<String> {
    [
        ("original_size_bytes", metrics.figures.original_size_bytes),
        ("compressed_size_bytes", metrics.figures.compressed_size_bytes),
    ]
    .into_iter()
    .find(|&(_, bytes)| bytes > MAX_WINDOW_CACHE_BYTES)
    .map(|(field, bytes)| {
        format!(
            "{field} = {bytes} is beyond the {MAX_WINDOW_CACHE_BYTES} bytes a window's cache can plausibly take"
        )
    })
}
