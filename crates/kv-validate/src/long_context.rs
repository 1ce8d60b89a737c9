//! `--context-lengths`: what compression costs as the context grows (issue
//! 20). The evaluation runs once per context length L over windows of L +
//! T tokens (the first L tokens' cache through kv-compress, the last T
//! scored on the original and on each reconstruction, sharing the prefill);
//! this module gathers each length's sweep table into one report: per
//! length and method the delta ± SE, the mean KLD and the top-1 agreement.

use serde::Serialize;

use crate::identity::ContentIds;
use crate::sweep::{SweepReport, SweepRow};

/// One context length's figures.
#[derive(Clone, Debug, Serialize)]
pub struct LengthResult {
    pub context_length: usize,
    pub windows: usize,
    /// Tokens scored on a (reconstructed) cache, per method.
    pub tokens_on_compressed_cache: usize,
    pub baseline_perplexity: f64,
    pub wall_seconds: f64,
    /// One row per method, as the sweep's table has them (sorted by bits/value).
    pub rows: Vec<SweepRow>,
}

/// The whole context-length sweep.
#[derive(Clone, Debug, Serialize)]
pub struct LongContextReport {
    pub model: String,
    pub data: String,
    pub compressor: String,
    pub device: String,
    pub cache_dtype: String,
    /// The text and model by content (the first length's run; all share them).
    #[serde(flatten)]
    pub content: ContentIds,
    /// Tokens scored after each window's context.
    pub targets: usize,
    pub threshold: Option<f64>,
    pub max_kld: Option<f64>,
    pub lengths: Vec<LengthResult>,
    /// Methods that meet the criteria at every length, in the first length's order.
    pub passing_at_every_length: Vec<String>,
}

impl LongContextReport {
    /// From each length's sweep report (in the order of `--context-lengths`;
    /// at least one).
    pub fn new(targets: usize, per_length: Vec<(usize, SweepReport)>) -> Self {
        let first = &per_length.first().expect("at least one context length").1;
        let passing_at_every_length = first
            .table
            .rows
            .iter()
            .map(|row| row.label.clone())
            .filter(|label| {
                per_length.iter().all(|(_, report)| {
                    report
                        .table
                        .rows
                        .iter()
                        .any(|row| &row.label == label && row.passed)
                })
            })
            .collect();
        LongContextReport {
            model: first.model.clone(),
            data: first.data.clone(),
            compressor: first.compressor.clone(),
            device: first.device.clone(),
            cache_dtype: first.cache_dtype.clone(),
            content: first.content.clone(),
            targets,
            threshold: first.table.threshold,
            max_kld: first.table.max_kld,
            passing_at_every_length,
            lengths: per_length
                .into_iter()
                .map(|(context_length, report)| LengthResult {
                    context_length,
                    windows: report.windows,
                    tokens_on_compressed_cache: report.tokens_on_compressed_cache,
                    baseline_perplexity: report.table.baseline_perplexity,
                    wall_seconds: report.wall_seconds,
                    rows: report.table.rows,
                })
                .collect(),
        }
    }

    /// Whether some method meets the criteria at every length.
    pub fn passed(&self) -> bool {
        !self.passing_at_every_length.is_empty()
    }

    /// The labels of the methods, in the first length's order.
    pub fn labels(&self) -> Vec<&str> {
        self.lengths
            .first()
            .map(|length| length.rows.iter().map(|r| r.label.as_str()).collect())
            .unwrap_or_default()
    }

    /// The text report: one line per length and method.
    pub fn render_text(&self) -> String {
        let mut out = format!(
            "Context-length sweep\n  model: {}\n  data: {}\n  device: {}, cache dtype {}\n  \
             windows of L context + {} scored tokens\n\n",
            self.model, self.data, self.device, self.cache_dtype, self.targets
        );
        let width = self
            .labels()
            .iter()
            .map(|l| l.len())
            .max()
            .unwrap_or(6)
            .max(6);
        out += &format!(
            "{:>7}  {:>4}  {:>10}  {:<width$}  {:>6}  {:>19}  {:>10}  {:>7}  {}\n",
            "context",
            "win",
            "baseline",
            "method",
            "bits",
            "delta ± SE",
            "mean KLD",
            "top-1 %",
            "pass"
        );
        for length in &self.lengths {
            for row in &length.rows {
                let se = row
                    .delta_standard_error
                    .map_or_else(|| "-".to_string(), |se| format!("{se:.4}"));
                let optional = |value: Option<f64>, precision: usize| {
                    value.map_or_else(|| "-".to_string(), |v| format!("{v:.precision$}"))
                };
                out += &format!(
                    "{:>7}  {:>4}  {:>10.4}  {:<width$}  {:>6.2}  {:>19}  {:>10}  {:>7}  {}\n",
                    length.context_length,
                    length.windows,
                    length.baseline_perplexity,
                    row.label,
                    row.bits_per_value,
                    format!("{:+.4} ± {se}", row.delta),
                    optional(row.kld_mean, 6),
                    optional(row.top1_agreement_percent, 2),
                    if row.passed { "yes" } else { "no" },
                );
            }
        }
        out += &if self.passing_at_every_length.is_empty() {
            "\nNo method meets the criteria at every length.\n".to_string()
        } else {
            format!(
                "\nMeeting the criteria at every length: {}\n",
                self.passing_at_every_length.join(", ")
            )
        };
        out
    }
}
