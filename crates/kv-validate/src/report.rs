//! The validation report: the original's figures (baseline, compressed,
//! delta, ratio, RMSE, SNR, cosine, threshold, PASSED/FAILED) plus what it
//! never said (the delta's standard error, KL divergence, top-1 agreement
//! and Δp against the baseline, tokens scored, windows, wall time and the
//! compressor's share), as text for people and as JSON (`--json`) for scripts.

use serde::Serialize;

use crate::evaluate::{Evaluation, MetricsSummary, VariantOutcome};
use crate::fidelity::{
    delta_standard_error, within_noise, FidelityFigures, MeanWithError, TokenFigures,
};
use crate::identity::ContentIds;
use crate::run_types::{RunDescription, Timings};

/// Everything a validation run measured, in the shape of its JSON.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ValidationReport {
    pub passed: bool,
    pub model: String,
    pub data: String,
    pub protocol: String,
    pub compressor: String,
    pub compressor_flags: String,
    /// Where the model ran: `cuda:0 (NVIDIA H200)`, `cpu (...)`.
    pub device: String,
    /// Element type of the cache file handed to the compressor (the ratio is against it).
    pub cache_dtype: String,
    /// Model, config, text and tokens by content (SHA-256 and size).
    #[serde(flatten)]
    pub content: ContentIds,
    /// Pass criterion delta < threshold (`None` when only `max_kld` applies).
    pub threshold: Option<f64>,
    /// Pass criterion mean KLD on compressed-cache tokens < max_kld.
    pub max_kld: Option<f64>,
    pub perplexity: PerplexityFigures,
    /// KL divergence, top-1 agreement and Δp against the baseline.
    pub fidelity: FidelityFigures,
    pub tokens_scored: usize,
    /// Scored tokens that attended to a (reconstructed) cache.
    pub tokens_on_compressed_cache: usize,
    pub windows: usize,
    pub windows_compressed: usize,
    pub compression: MetricsSummary,
    pub timing: TimingFigures,
}

/// Perplexities: the headline figures are token-weighted (each scored token
/// counts once); `*_per_window` is the original's mean of per-window means.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PerplexityFigures {
    pub baseline: f64,
    pub compressed: f64,
    pub delta: f64,
    /// From the paired per-token NLL differences ([`delta_standard_error`]).
    pub delta_standard_error: Option<f64>,
    /// |delta| < 2 standard errors.
    pub delta_within_noise: Option<bool>,
    pub delta_percent: f64,
    pub baseline_per_window: f64,
    pub compressed_per_window: f64,
    /// Token-weighted, over the windows that had a compressed cache only
    /// (absent when none had); the pass/fail decision uses `delta`.
    pub compressed_windows_only: Option<PerplexityPair>,
}

/// Baseline and compressed perplexity of the same tokens.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PerplexityPair {
    pub baseline: f64,
    pub compressed: f64,
    pub delta: f64,
    pub delta_standard_error: Option<f64>,
    pub delta_within_noise: Option<bool>,
}

impl PerplexityPair {
    /// From the two sides' perplexities and the paired NLL differences.
    fn new(baseline: f64, compressed: f64, differences: &MeanWithError) -> Self {
        let delta = compressed - baseline;
        let delta_standard_error = delta_standard_error(compressed, differences);
        PerplexityPair {
            baseline,
            compressed,
            delta,
            delta_standard_error,
            delta_within_noise: within_noise(delta, delta_standard_error),
        }
    }
}

/// Seconds of wall time and where they went, and each exchange step's rate.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TimingFigures {
    pub wall_seconds: f64,
    pub model_seconds: f64,
    pub cache_write_seconds: f64,
    pub compressor_seconds: f64,
    pub cache_read_seconds: f64,
    /// Share of the wall time the model was not running (see [`Timings::compressor_share`]).
    pub compressor_share: f64,
    /// Bytes of caches written / cache write time (`None` when nothing was written).
    pub cache_write_gb_per_s: Option<f64>,
    /// Bytes of caches compressed / kv-compress time (compress and decompress).
    pub compressor_gb_per_s: Option<f64>,
    /// Bytes of reconstructions read / cache read time.
    pub cache_read_gb_per_s: Option<f64>,
    /// Model and exchange steps summed, and by how much that exceeds the wall:
    /// the time that windows in flight together saved.
    pub steps_seconds: f64,
    pub overlapped_seconds: f64,
}

/// `bytes / time` in GB/s (10^9 bytes), when both are there.
fn gb_per_s(bytes: u64, time: std::time::Duration) -> Option<f64> {
    (bytes > 0 && !time.is_zero()).then(|| bytes as f64 / 1e9 / time.as_secs_f64())
}

impl From<&Timings> for TimingFigures {
    fn from(timings: &Timings) -> Self {
        TimingFigures {
            wall_seconds: timings.total.as_secs_f64(),
            model_seconds: timings.model.as_secs_f64(),
            cache_write_seconds: timings.cache_write.as_secs_f64(),
            compressor_seconds: timings.compressor.as_secs_f64(),
            cache_read_seconds: timings.cache_read.as_secs_f64(),
            compressor_share: timings.compressor_share(),
            cache_write_gb_per_s: gb_per_s(timings.cache_bytes_written, timings.cache_write),
            compressor_gb_per_s: gb_per_s(timings.cache_bytes_compressed, timings.compressor),
            cache_read_gb_per_s: gb_per_s(timings.cache_bytes_read, timings.cache_read),
            steps_seconds: timings.steps().as_secs_f64(),
            overlapped_seconds: timings.overlapped().as_secs_f64(),
        }
    }
}

/// The mean KLD over a variant's tokens on a compressed cache, if any.
pub fn mean_kld_on_cache(fidelity: &FidelityFigures) -> Option<f64> {
    fidelity.on_compressed_cache.as_ref().map(|f| f.kld.mean)
}

impl ValidationReport {
    /// The report of one variant of `evaluation`, judged by `run.criteria`.
    pub fn new(run: &RunDescription, evaluation: &Evaluation, variant: &VariantOutcome) -> Self {
        let baseline = evaluation.baseline.perplexity();
        let compressed = variant.nll.perplexity();
        let headline = PerplexityPair::new(baseline, compressed, &variant.nll_difference);
        let delta = headline.delta;
        ValidationReport {
            passed: run
                .criteria
                .passes(delta, mean_kld_on_cache(&variant.fidelity)),
            model: run.model.clone(),
            data: run.data.clone(),
            protocol: run.protocol.clone(),
            compressor: run.compressor.clone(),
            compressor_flags: variant.settings.label(),
            device: run.device.clone(),
            cache_dtype: run.cache_dtype.clone(),
            content: run.content.clone(),
            threshold: run.criteria.threshold,
            max_kld: run.criteria.max_kld,
            fidelity: variant.fidelity.clone(),
            perplexity: PerplexityFigures {
                baseline,
                compressed,
                delta,
                delta_standard_error: headline.delta_standard_error,
                delta_within_noise: headline.delta_within_noise,
                delta_percent: 100.0 * delta / baseline,
                baseline_per_window: evaluation.baseline.per_window_perplexity(),
                compressed_per_window: variant.nll.per_window_perplexity(),
                compressed_windows_only: variant.nll_difference_compressed_windows.as_ref().map(
                    |differences| {
                        PerplexityPair::new(
                            evaluation.baseline_compressed_windows.perplexity(),
                            variant.nll_compressed_windows.perplexity(),
                            differences,
                        )
                    },
                ),
            },
            tokens_scored: evaluation.baseline.tokens,
            tokens_on_compressed_cache: evaluation.tokens_on_cache,
            windows: evaluation.windows,
            windows_compressed: evaluation.windows_compressed,
            compression: variant.metrics.clone(),
            timing: TimingFigures::from(&evaluation.timings),
        }
    }

    /// The text report, laid out like the original's.
    pub fn render_text(&self) -> String {
        let p = &self.perplexity;
        let mut lines = vec![
            rule(),
            "PERPLEXITY VALIDATION RESULTS".to_string(),
            rule(),
            field("Model", &self.model),
            field("Data", &self.data),
            field("Protocol", &self.protocol),
            field(
                "Compressor",
                // A command line people paste: quoted for a shell.
                &crate::shell::quote_words(&format!(
                    "{} {}",
                    self.compressor, self.compressor_flags
                )),
            ),
            field("Device", &self.device),
            field("Cache dtype", &self.cache_dtype),
            String::new(),
            field("Baseline perplexity", &format!("{:.4}", p.baseline)),
            field("Compressed perplexity", &format!("{:.4}", p.compressed)),
            field(
                "Delta",
                &format!(
                    "{:+.4} ({:+.3}%){}",
                    p.delta,
                    p.delta_percent,
                    noise_note(p.delta_standard_error, p.delta_within_noise)
                ),
            ),
            field(
                "Per-window mean (original)",
                &format!(
                    "{:.4} -> {:.4}",
                    p.baseline_per_window, p.compressed_per_window
                ),
            ),
            "  (headline figures are token-weighted; the original averaged per-window means)"
                .to_string(),
        ];
        if let Some(only) = &p.compressed_windows_only {
            lines.push(field(
                "Compressed windows only",
                &format!(
                    "{:.4} -> {:.4} (delta {:+.4}{})",
                    only.baseline,
                    only.compressed,
                    only.delta,
                    noise_note(only.delta_standard_error, only.delta_within_noise)
                ),
            ));
        }
        lines.push(String::new());
        lines.extend(fidelity_lines(&self.fidelity));
        lines.push(String::new());
        lines.extend(compression_lines(&self.compression));
        lines.extend([
            String::new(),
            field("Tokens scored", &self.tokens_scored.to_string()),
            field(
                "  on a compressed cache",
                &self.tokens_on_compressed_cache.to_string(),
            ),
            field(
                "Windows",
                &format!(
                    "{} ({} with a compressed cache)",
                    self.windows, self.windows_compressed
                ),
            ),
            timing_line(&self.timing),
            String::new(),
        ]);
        if let Some(threshold) = self.threshold {
            lines.push(field("Threshold", &format!("{threshold}")));
        }
        if let Some(max_kld) = self.max_kld {
            lines.push(field(
                "Max KLD",
                &format!("{max_kld} nats (mean over the tokens on a compressed cache)"),
            ));
        }
        lines.extend([
            format!("Status: {} ({})", status(self.passed), self.status_reason()),
            rule(),
        ]);
        lines.join("\n") + "\n"
    }
}

impl ValidationReport {
    /// Each criterion against its measured figure: `delta +0.0100 < threshold 0.5`.
    fn status_reason(&self) -> String {
        let mut reasons = Vec::new();
        if let Some(threshold) = self.threshold {
            let delta = self.perplexity.delta;
            let relation = if delta < threshold { "<" } else { ">=" };
            reasons.push(format!(
                "delta {delta:+.4} {relation} threshold {threshold}"
            ));
        }
        if let Some(max_kld) = self.max_kld {
            reasons.push(match mean_kld_on_cache(&self.fidelity) {
                Some(kld) => {
                    let relation = if kld < max_kld { "<" } else { ">=" };
                    format!("mean KLD {kld:.6} {relation} max-kld {max_kld}")
                }
                None => format!("no token on a compressed cache to hold to max-kld {max_kld}"),
            });
        }
        reasons.join("; ")
    }
}

/// ` ± 0.0123, within noise` (|delta| < 2 SE) or `beyond noise`; empty without an error.
pub(crate) fn noise_note(standard_error: Option<f64>, within: Option<bool>) -> String {
    match (standard_error, within) {
        (Some(se), Some(within)) => format!(
            " ± {se:.4}, {}",
            if within {
                "within noise (< 2 SE)"
            } else {
                "beyond noise (>= 2 SE)"
            }
        ),
        _ => String::new(),
    }
}

/// KL divergence, top-1 agreement and Δp, for the tokens on a compressed
/// cache and for every scored token.
pub(crate) fn fidelity_lines(fidelity: &FidelityFigures) -> Vec<String> {
    let Some(on_cache) = &fidelity.on_compressed_cache else {
        return vec![field(
            "KL divergence",
            "- (no token was scored on a compressed cache)",
        )];
    };
    let mut lines = vec![format!(
        "Against the baseline, {} tokens on a compressed cache:",
        on_cache.tokens
    )];
    lines.extend(token_figure_lines(on_cache));
    if let Some(all) = &fidelity.all_tokens {
        lines.push(format!(
            "All {} scored tokens (the prefill's have KLD 0 by construction):",
            all.tokens
        ));
        lines.push(field(
            "  Mean KLD",
            &format!(
                "{} nats",
                mean_error(all.kld.mean, all.kld.standard_error, 6)
            ),
        ));
        lines.push(field(
            "  Same top-1 token",
            &format!(
                "{} %",
                mean_error(
                    all.top1_agreement_percent,
                    all.top1_standard_error_percent,
                    3
                )
            ),
        ));
    }
    lines
}

fn token_figure_lines(figures: &TokenFigures) -> Vec<String> {
    let kld = &figures.kld;
    let dp = &figures.delta_p;
    vec![
        field(
            "  Mean KLD",
            &format!("{} nats", mean_error(kld.mean, kld.standard_error, 6)),
        ),
        field(
            "  KLD median / p99 / max",
            &format!("{:.6} / {:.6} / {:.6}", kld.median, kld.p99, kld.max),
        ),
        field(
            "  Same top-1 token",
            &format!(
                "{} %",
                mean_error(
                    figures.top1_agreement_percent,
                    figures.top1_standard_error_percent,
                    3
                )
            ),
        ),
        field(
            "  Mean Δp (correct token)",
            &format!(
                "{} % (RMS {:.3} %)",
                mean_error(dp.mean_percent, dp.standard_error_percent, 3),
                dp.rms_percent
            ),
        ),
        field(
            "  Δp min / p1 / p99 / max",
            &format!(
                "{:+.3} / {:+.3} / {:+.3} / {:+.3} %",
                dp.min_percent, dp.p1_percent, dp.p99_percent, dp.max_percent
            ),
        ),
    ]
}

/// `mean ± se` with `decimals` digits, or just the mean without an error.
fn mean_error(mean: f64, standard_error: Option<f64>, decimals: usize) -> String {
    match standard_error {
        Some(se) => format!("{mean:.decimals$} ± {se:.decimals$}"),
        None => format!("{mean:.decimals$}"),
    }
}

/// `PASSED` or `FAILED`, as the original printed it.
pub fn status(passed: bool) -> &'static str {
    if passed {
        "PASSED"
    } else {
        "FAILED"
    }
}

pub(crate) fn rule() -> String {
    "=".repeat(60)
}

/// One aligned `label: value` line.
pub(crate) fn field(label: &str, value: &str) -> String {
    format!("{:<28}{value}", format!("{label}:"))
}

/// The compressor's figures, one per line.
pub(crate) fn compression_lines(summary: &MetricsSummary) -> Vec<String> {
    let figures = &summary.figures;
    let mut lines = vec![field(
        "Compression ratio",
        &format!(
            "{:.2}x ({} -> {} bytes)",
            summary.compression_ratio, figures.original_size_bytes, figures.compressed_size_bytes
        ),
    )];
    if let Some(bits) = summary.bits_per_value {
        lines.push(field("Bits per value", &format!("{bits:.3}")));
    }
    lines.extend([
        field("RMSE", &format!("{:.6}", figures.rmse)),
        field("SNR", &format!("{:.2} dB", figures.snr_db)),
        field(
            "Cosine similarity",
            &format!("{:.6}", figures.cosine_similarity),
        ),
        field("Max error", &format!("{:.6}", figures.max_error)),
        field(
            "Compressor's grade",
            &format!(
                "worst {} ({} cache(s) below its thresholds)",
                summary
                    .worst_quality_level
                    .map_or("-".to_string(), |level| format!("{level:?}").to_uppercase()),
                summary.quality_failures
            ),
        ),
    ]);
    lines
}

/// Wall time, where it went (each exchange step with its rate), the share
/// the model was not running, and what overlapped.
pub(crate) fn timing_line(timing: &TimingFigures) -> String {
    let step = |name: &str, seconds: f64, rate: Option<f64>| match rate {
        Some(rate) => format!("{name} {seconds:.2} s at {rate:.2} GB/s"),
        None => format!("{name} {seconds:.2} s"),
    };
    let mut text = format!(
        "{:.2} s (model {:.2} s, {}, {}, {}: {:.1}% outside the model",
        timing.wall_seconds,
        timing.model_seconds,
        step(
            "cache write",
            timing.cache_write_seconds,
            timing.cache_write_gb_per_s
        ),
        step(
            "kv-compress",
            timing.compressor_seconds,
            timing.compressor_gb_per_s
        ),
        step(
            "cache read",
            timing.cache_read_seconds,
            timing.cache_read_gb_per_s
        ),
        100.0 * timing.compressor_share
    );
    if timing.overlapped_seconds > 0.0 {
        text.push_str(&format!(
            "; the steps sum to {:.2} s, {:.2} s of them overlapped",
            timing.steps_seconds, timing.overlapped_seconds
        ));
    }
    text.push(')');
    field("Wall time", &text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run_types::{CompressSettings, PassCriteria, VariantRecord, WindowRecord};
    use std::time::Duration;

    fn compressor_report() -> kvformat::Report {
        kvformat::Report {
            compression_ratio: 3200.0 / 850.0,
            figures: kvformat::CompressionFigures {
                original_size_bytes: 3200,
                compressed_size_bytes: 850,
                rmse: 0.25,
                snr_db: 16.0,
                cosine_similarity: 0.985,
                max_error: 0.75,
            },
            quality_level: kvformat::metrics::QualityLevel::Poor,
            processing_time_ms: 1.0,
            quality_passed: false,
            violations: Vec::new(),
            bits_per_value: 0.0,
            num_tensors: 2,
            num_values: 800,
            tensor_metrics: None,
        }
    }

    /// One window of 2 context and 3 scored tokens: every baseline NLL is
    /// `baseline_nll`, every compressed one `compressed_nll`; KLDs 0 (the
    /// prefill's token), 0.01, 0.03; top-1 agrees on the first two.
    fn evaluation(baseline_nll: f64, compressed_nll: f64) -> (Evaluation, RunDescription) {
        let record = WindowRecord {
            index: 0,
            begin: 0,
            context_end: 2,
            end: 5,
            baseline_nll: vec![baseline_nll; 3],
            variants: vec![VariantRecord {
                nll: vec![compressed_nll; 3],
                kld: vec![0.0, 0.01, 0.03],
                top1_agrees: vec![true, true, false],
                metrics: compressor_report(),
            }],
        };
        let timings = Timings {
            total: Duration::from_secs(20),
            model: Duration::from_secs(18),
            cache_write: Duration::from_millis(600),
            cache_read: Duration::from_millis(400),
            compressor: Duration::from_secs(1),
            ..Timings::default()
        };
        let evaluation =
            Evaluation::from_records(&[CompressSettings::default()], vec![record], timings);
        let run = RunDescription {
            model: "tiny".into(),
            data: "text".into(),
            protocol: "sliding".into(),
            compressor: "kv-compress".into(),
            device: "cpu".into(),
            cache_dtype: "float32".into(),
            criteria: PassCriteria {
                threshold: Some(0.5),
                max_kld: None,
            },
            content: Default::default(),
        };
        (evaluation, run)
    }

    #[test]
    fn fidelity_figures_cover_the_tokens_on_a_cache_and_all_tokens() {
        let (evaluation, run) = evaluation(20f64.ln(), 20.4f64.ln());
        let report = ValidationReport::new(&run, &evaluation, &evaluation.variants[0]);
        assert_eq!(report.tokens_on_compressed_cache, 2);
        let on_cache = report.fidelity.on_compressed_cache.as_ref().unwrap();
        assert_eq!(on_cache.tokens, 2);
        assert!((on_cache.kld.mean - 0.02).abs() < 1e-15);
        assert_eq!(on_cache.kld.max, 0.03);
        assert_eq!(on_cache.top1_agreement_percent, 50.0);
        let all = report.fidelity.all_tokens.as_ref().unwrap();
        assert_eq!(all.tokens, 3);
        assert!((all.kld.mean - 0.04 / 3.0).abs() < 1e-15);
        // Every token moved by the same ln(20.4/20): no spread, SE 0, so the
        // delta is beyond noise.
        assert!(report.perplexity.delta_standard_error.unwrap() < 1e-12);
        assert_eq!(report.perplexity.delta_within_noise, Some(false));
        let text = report.render_text();
        assert!(text.contains("2 tokens on a compressed cache"), "{text}");
        assert!(
            text.contains("  Mean KLD:                 0.020000 ± 0.010000 nats"),
            "{text}"
        );
        assert!(
            text.contains("  Same top-1 token:         50.000 ± 50.000 %"),
            "{text}"
        );
        assert!(text.contains("beyond noise"), "{text}");
    }

    #[test]
    fn max_kld_is_an_alternative_criterion_and_both_must_hold_when_given() {
        let (evaluation, mut run) = evaluation(20f64.ln(), 20.4f64.ln());
        let passed = |criteria: PassCriteria, run: &mut RunDescription| {
            run.criteria = criteria;
            ValidationReport::new(run, &evaluation, &evaluation.variants[0])
        };
        let kld_only = |max_kld| PassCriteria {
            threshold: None,
            max_kld: Some(max_kld),
        };
        // Mean KLD on the cache is 0.02; the delta 0.4.
        let report = passed(kld_only(0.03), &mut run);
        assert!(report.passed);
        assert!(report
            .render_text()
            .contains("Status: PASSED (mean KLD 0.020000 < max-kld 0.03)"));
        let report = passed(kld_only(0.02), &mut run);
        assert!(!report.passed, "equal to the bound fails");
        let both = PassCriteria {
            threshold: Some(0.3),
            max_kld: Some(0.03),
        };
        let report = passed(both, &mut run);
        assert!(!report.passed, "the delta 0.4 misses threshold 0.3");
        let text = report.render_text();
        assert!(
            text.contains("\nThreshold:                  0.3\n"),
            "{text}"
        );
        assert!(
            text.contains("\nMax KLD:                    0.03 nats"),
            "{text}"
        );
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["max_kld"], 0.03);
        assert_eq!(json["threshold"], 0.3);
    }

    #[test]
    fn figures_follow_from_the_nlls() {
        // ln 20 and ln 20.4: perplexities 20 and 20.4, delta 0.4 (2%).
        let (evaluation, run) = evaluation(20f64.ln(), 20.4f64.ln());
        let report = ValidationReport::new(&run, &evaluation, &evaluation.variants[0]);
        assert!((report.perplexity.baseline - 20.0).abs() < 1e-4);
        assert!((report.perplexity.delta - 0.4).abs() < 1e-4);
        assert!((report.perplexity.delta_percent - 2.0).abs() < 1e-3);
        let only = report.perplexity.compressed_windows_only.as_ref().unwrap();
        assert!((only.delta - 0.4).abs() < 1e-4);
        assert!(report.passed);
        assert!((report.compression.compression_ratio - 3200.0 / 850.0).abs() < 1e-12);
        assert!((report.timing.compressor_share - 0.1).abs() < 1e-12);
        let text = report.render_text();
        assert!(text.contains("Status: PASSED"), "{text}");
        assert!(text.contains("Compression ratio:          3.76x"), "{text}");
    }

    #[test]
    fn a_delta_equal_to_the_threshold_fails() {
        let (evaluation, mut run) = evaluation(2f64.ln(), 2f64.ln());
        run.criteria.threshold = Some(0.0);
        let report = ValidationReport::new(&run, &evaluation, &evaluation.variants[0]);
        assert!(!report.passed);
        assert!(report.render_text().contains("Status: FAILED"));
    }

    #[test]
    fn json_names_the_figures_as_scripts_read_them() {
        let (evaluation, run) = evaluation(1.0, 1.5);
        let report = ValidationReport::new(&run, &evaluation, &evaluation.variants[0]);
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["passed"], false);
        assert_eq!(json["windows"], 1);
        assert_eq!(json["compression"]["worst_quality_level"], "POOR");
    }
}
