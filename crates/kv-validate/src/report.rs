//! The validation report: the original's figures (baseline, compressed,
//! delta, ratio, RMSE, SNR, cosine, threshold, PASSED/FAILED) plus what it
//! never said (tokens scored, windows, wall time and the compressor's share),
//! as text for people and as JSON (`--json`) for scripts.

use serde::Serialize;

use crate::evaluate::{Evaluation, MetricsSummary, Timings, VariantOutcome};

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
    pub threshold: f64,
    pub perplexity: PerplexityFigures,
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
}

/// Seconds of wall time and where they went.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TimingFigures {
    pub wall_seconds: f64,
    pub model_seconds: f64,
    pub cache_write_seconds: f64,
    pub compressor_seconds: f64,
    pub cache_read_seconds: f64,
    /// (cache write + compressor + cache read) / wall.
    pub compressor_share: f64,
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
        }
    }
}

/// Where the run's inputs came from, for the report's header.
#[derive(Clone, Debug, PartialEq)]
pub struct RunDescription {
    pub model: String,
    pub data: String,
    pub protocol: String,
    pub compressor: String,
    /// Where the model ran, with the device's name.
    pub device: String,
    pub cache_dtype: String,
    pub threshold: f64,
}

impl ValidationReport {
    /// The report of one variant of `evaluation`. Passed means delta < threshold.
    pub fn new(run: &RunDescription, evaluation: &Evaluation, variant: &VariantOutcome) -> Self {
        let baseline = evaluation.baseline.perplexity();
        let compressed = variant.nll.perplexity();
        let delta = compressed - baseline;
        ValidationReport {
            passed: delta < run.threshold,
            model: run.model.clone(),
            data: run.data.clone(),
            protocol: run.protocol.clone(),
            compressor: run.compressor.clone(),
            compressor_flags: variant.settings.label(),
            device: run.device.clone(),
            cache_dtype: run.cache_dtype.clone(),
            threshold: run.threshold,
            perplexity: PerplexityFigures {
                baseline,
                compressed,
                delta,
                delta_percent: 100.0 * delta / baseline,
                baseline_per_window: evaluation.baseline.per_window_perplexity(),
                compressed_per_window: variant.nll.per_window_perplexity(),
                compressed_windows_only: (evaluation.windows_compressed > 0).then(|| {
                    let baseline = evaluation.baseline_compressed_windows.perplexity();
                    let compressed = variant.nll_compressed_windows.perplexity();
                    PerplexityPair {
                        baseline,
                        compressed,
                        delta: compressed - baseline,
                    }
                }),
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
                &format!("{} {}", self.compressor, self.compressor_flags),
            ),
            field("Device", &self.device),
            field("Cache dtype", &self.cache_dtype),
            String::new(),
            field("Baseline perplexity", &format!("{:.4}", p.baseline)),
            field("Compressed perplexity", &format!("{:.4}", p.compressed)),
            field(
                "Delta",
                &format!("{:+.4} ({:+.3}%)", p.delta, p.delta_percent),
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
                    "{:.4} -> {:.4} (delta {:+.4})",
                    only.baseline, only.compressed, only.delta
                ),
            ));
        }
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
            field("Threshold", &format!("{}", self.threshold)),
            format!(
                "Status: {} (delta {:+.4} {} threshold {})",
                status(self.passed),
                p.delta,
                if self.passed { "<" } else { ">=" },
                self.threshold
            ),
            rule(),
        ]);
        lines.join("\n") + "\n"
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
pub(crate) fn compression_lines(figures: &MetricsSummary) -> Vec<String> {
    let mut lines = vec![field(
        "Compression ratio",
        &format!(
            "{:.2}x ({} -> {} bytes)",
            figures.compression_ratio, figures.original_size_bytes, figures.compressed_size_bytes
        ),
    )];
    if let Some(bits) = figures.bits_per_value {
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
                figures
                    .worst_quality_level
                    .map_or("-".to_string(), |level| format!("{level:?}").to_uppercase()),
                figures.quality_failures
            ),
        ),
    ]);
    lines
}

/// Wall time and the compressor's share of it.
pub(crate) fn timing_line(timing: &TimingFigures) -> String {
    field(
        "Wall time",
        &format!(
            "{:.2} s (model {:.2} s, cache write {:.2} s, kv-compress {:.2} s, cache read {:.2} s: \
             {:.1}% outside the model)",
            timing.wall_seconds,
            timing.model_seconds,
            timing.cache_write_seconds,
            timing.compressor_seconds,
            timing.cache_read_seconds,
            100.0 * timing.compressor_share
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bridge::CompressSettings;
    use crate::perplexity::NllTotals;
    use std::time::Duration;

    fn evaluation(baseline_nll: f32, compressed_nll: f32) -> (Evaluation, RunDescription) {
        let mut baseline = NllTotals::default();
        baseline.add_window(&[baseline_nll, baseline_nll]);
        let mut compressed = NllTotals::default();
        compressed.add_window(&[compressed_nll, compressed_nll]);
        let metrics = MetricsSummary {
            compression_ratio: 3200.0 / 850.0,
            windows: 1,
            original_size_bytes: 3200,
            compressed_size_bytes: 850,
            rmse: 0.25,
            snr_db: 16.0,
            cosine_similarity: 0.985,
            max_error: 0.75,
            bits_per_value: None,
            quality_failures: 1,
            worst_quality_level: Some(kvformat::metrics::QualityLevel::Poor),
        };
        let evaluation = Evaluation {
            baseline_compressed_windows: baseline.clone(),
            baseline,
            variants: vec![VariantOutcome {
                settings: CompressSettings::default(),
                nll_compressed_windows: compressed.clone(),
                nll: compressed,
                metrics,
                compressor_time: Duration::from_secs(1),
            }],
            windows: 1,
            windows_compressed: 1,
            tokens_on_cache: 1,
            timings: Timings {
                total: Duration::from_secs(20),
                model: Duration::from_secs(18),
                cache_write: Duration::from_millis(600),
                cache_read: Duration::from_millis(400),
                compressor: Duration::from_secs(1),
            },
        };
        let run = RunDescription {
            model: "tiny".into(),
            data: "text".into(),
            protocol: "sliding".into(),
            compressor: "kv-compress".into(),
            device: "cpu".into(),
            cache_dtype: "float32".into(),
            threshold: 0.5,
        };
        (evaluation, run)
    }

    #[test]
    fn figures_follow_from_the_nlls() {
        // ln 20 and ln 20.4: perplexities 20 and 20.4, delta 0.4 (2%).
        let (evaluation, run) = evaluation(20f32.ln(), 20.4f32.ln());
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
        let (evaluation, mut run) = evaluation(2f32.ln(), 2f32.ln());
        run.threshold = 0.0;
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
