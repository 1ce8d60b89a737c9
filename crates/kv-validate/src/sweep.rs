//! Issue 5's sweep: many compressor variants scored over the same windows
//! (one shared prefill per window, see [`crate::evaluate`]), the results as a
//! table sorted by bits/value with two Pareto fronts marked (bits against
//! the perplexity delta, and against the mean KL divergence), and the
//! recommendation: the variant with the fewest bits that passes the run's
//! criteria (`--threshold` on the delta, `--max-kld` on the KLD, or both).
//!
//! A variant is a label and the `kv-compress` flags it runs with, written as
//! `LABEL=FLAGS` on the command line (`--variant "kivi3=-method kivi -bits 3"`).

use kvformat::CacheDtype;
use serde::{Deserialize, Serialize};

use crate::engines;
use crate::evaluate::Evaluation;
use crate::fidelity::{delta_standard_error, within_noise, TokenFigures};
use crate::identity::ContentIds;
use crate::report::{field, noise_note, rule};
use crate::run_types::{CompressSettings, PassCriteria, RunDescription, Variant};

/// The built-in matrix (`--sweep`), defined in kvformat so that
/// `cargo xtask bench` times the same methods.
pub use kvformat::sweep_matrix::DEFAULT_MATRIX;

/// The flags the bridge passes on every run ([`CompressSettings`]'s own).
const BRIDGE_FLAGS: [&str; 2] = ["group-size", "sparsity"];

/// Why a sweep could not be set up or its outputs written.
#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    #[error("--variant {spec:?}: expected LABEL=FLAGS, e.g. \"kivi3=-method kivi -bits 3\"")]
    MissingEquals { spec: String },
    #[error("--variant {spec:?}: the label is empty")]
    EmptyLabel { spec: String },
    /// kv-compress's own parser refused the flags.
    #[error("--variant {spec:?}: {source}")]
    Flags {
        spec: String,
        source: kv_compress::FlagError,
    },
    #[error("two sweep variants are labelled {label:?}")]
    DuplicateLabel { label: String },
}

impl Variant {
    /// Parses `LABEL=FLAGS`; FLAGS are whitespace-separated `kv-compress`
    /// flags, read and checked by kv-compress's own parser: `-group-size`
    /// and `-sparsity` (in any Go spelling) become the settings the bridge
    /// always passes, every other flag is passed on as it was written.
    pub fn parse(spec: &str) -> Result<Self, SweepError> {
        let (label, flags) = spec
            .split_once('=')
            .ok_or_else(|| SweepError::MissingEquals {
                spec: spec.to_string(),
            })?;
        let label = label.trim();
        if label.is_empty() {
            return Err(SweepError::EmptyLabel {
                spec: spec.to_string(),
            });
        }
        let words: Vec<&str> = flags.split_whitespace().collect();
        let (written, options) =
            kv_compress::flags::split_words(&words).map_err(|source| SweepError::Flags {
                spec: spec.to_string(),
                source,
            })?;
        let settings = CompressSettings {
            group_size: u32::try_from(options.group_size).expect("group sizes are at most 1024"),
            sparsity: options.sparsity,
            extra_args: written
                .into_iter()
                .filter(|flag| !BRIDGE_FLAGS.contains(&flag.name))
                .flat_map(|flag| flag.words)
                .collect(),
        };
        Ok(Variant {
            label: label.to_string(),
            settings,
        })
    }

    /// [`DEFAULT_MATRIX`] as variants.
    pub fn default_matrix() -> Vec<Variant> {
        DEFAULT_MATRIX
            .iter()
            .map(|(label, flags)| {
                Variant::parse(&format!("{label}={flags}")).expect("the built-in matrix parses")
            })
            .collect()
    }
}

/// Fails on two variants with the same label (their rows would be ambiguous).
pub fn ensure_unique_labels(variants: &[Variant]) -> Result<(), SweepError> {
    for (index, variant) in variants.iter().enumerate() {
        if variants[..index]
            .iter()
            .any(|earlier| earlier.label == variant.label)
        {
            return Err(SweepError::DuplicateLabel {
                label: variant.label.clone(),
            });
        }
    }
    Ok(())
}

/// What was measured for one variant: the inputs of a table row.
#[derive(Clone, Debug, PartialEq)]
pub struct Measurement {
    pub label: String,
    pub flags: String,
    /// Every stored byte (codes, scales, offsets, kept tokens) per value, in bits.
    pub bits_per_value: f64,
    pub compression_ratio: f64,
    pub perplexity: f64,
    /// Of the delta, from the paired per-token NLL differences.
    pub delta_standard_error: Option<f64>,
    /// Over the tokens on a compressed cache.
    pub fidelity: Option<TokenFigures>,
}

/// One row of the sweep table (read back from a sweep's JSON by `capacity`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SweepRow {
    pub label: String,
    pub flags: String,
    pub bits_per_value: f64,
    pub compression_ratio: f64,
    pub perplexity: f64,
    /// Perplexity minus the baseline's.
    pub delta: f64,
    pub delta_standard_error: Option<f64>,
    /// |delta| < 2 standard errors.
    pub delta_within_noise: Option<bool>,
    /// KL(baseline ‖ compressed) over the tokens on a compressed cache, nats.
    pub kld_mean: Option<f64>,
    pub kld_standard_error: Option<f64>,
    pub kld_p99: Option<f64>,
    pub kld_max: Option<f64>,
    pub top1_agreement_percent: Option<f64>,
    /// Mean change of the correct token's probability, percentage points.
    pub delta_p_mean_percent: Option<f64>,
    /// Meets the run's criteria.
    pub passed: bool,
    /// No other variant is at least as good on both bits and delta and better on one.
    pub pareto: bool,
    /// The same front with the mean KLD in place of the delta.
    pub pareto_kld: bool,
}

/// The sweep's results, sorted by bits/value (then delta).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SweepTable {
    pub baseline_perplexity: f64,
    /// The criteria rows pass by: delta < threshold, mean KLD < max_kld.
    pub threshold: Option<f64>,
    pub max_kld: Option<f64>,
    pub rows: Vec<SweepRow>,
    /// Label of the passing variant with the fewest bits/value (the lower
    /// delta on a tie); `None` when no variant passes.
    pub recommendation: Option<String>,
}

impl SweepTable {
    pub fn new(
        baseline_perplexity: f64,
        criteria: PassCriteria,
        measurements: Vec<Measurement>,
    ) -> Self {
        let mut rows: Vec<SweepRow> = measurements
            .into_iter()
            .map(|m| {
                let delta = m.perplexity - baseline_perplexity;
                let kld = m.fidelity.as_ref().map(|f| &f.kld);
                SweepRow {
                    label: m.label,
                    flags: m.flags,
                    bits_per_value: m.bits_per_value,
                    compression_ratio: m.compression_ratio,
                    perplexity: m.perplexity,
                    delta,
                    delta_standard_error: m.delta_standard_error,
                    delta_within_noise: within_noise(delta, m.delta_standard_error),
                    kld_mean: kld.map(|k| k.mean),
                    kld_standard_error: kld.and_then(|k| k.standard_error),
                    kld_p99: kld.map(|k| k.p99),
                    kld_max: kld.map(|k| k.max),
                    top1_agreement_percent: m.fidelity.as_ref().map(|f| f.top1_agreement_percent),
                    delta_p_mean_percent: m.fidelity.as_ref().map(|f| f.delta_p.mean_percent),
                    passed: criteria.passes(delta, kld.map(|k| k.mean)),
                    pareto: false,
                    pareto_kld: false,
                }
            })
            .collect();
        rows.sort_by(|a, b| {
            a.bits_per_value
                .total_cmp(&b.bits_per_value)
                .then(a.delta.total_cmp(&b.delta))
        });
        let front = pareto_front(&rows, |row| Some(row.delta));
        let kld_front = pareto_front(&rows, |row| row.kld_mean);
        for ((row, on_front), on_kld_front) in rows.iter_mut().zip(front).zip(kld_front) {
            row.pareto = on_front;
            row.pareto_kld = on_kld_front;
        }
        // Sorted by bits then delta: the first passing row is the recommendation.
        let recommendation = rows
            .iter()
            .find(|row| row.passed)
            .map(|row| row.label.clone());
        SweepTable {
            baseline_perplexity,
            threshold: criteria.threshold,
            max_kld: criteria.max_kld,
            rows,
            recommendation,
        }
    }

    /// The criteria the rows were judged by.
    pub fn criteria(&self) -> PassCriteria {
        PassCriteria {
            threshold: self.threshold,
            max_kld: self.max_kld,
        }
    }

    /// The recommended row, if any variant passed.
    pub fn recommended(&self) -> Option<&SweepRow> {
        let label = self.recommendation.as_deref()?;
        self.rows.iter().find(|row| row.label == label)
    }

    /// The table as CSV (RFC 4180: a header line, flags quoted).
    pub fn to_csv(&self) -> String {
        // The columns before `pareto` are the original table's; new ones follow.
        let mut csv = String::from(
            "label,flags,bits_per_value,compression_ratio,perplexity,delta,passed,pareto,\
             delta_se,within_noise,kld_mean,kld_se,kld_p99,kld_max,top1_percent,\
             delta_p_mean_percent,pareto_kld\n",
        );
        let number = |value: Option<f64>, decimals: usize| {
            value.map_or(String::new(), |v| format!("{v:.decimals$}"))
        };
        for row in &self.rows {
            csv.push_str(&format!(
                "{},{},{:.4},{:.4},{:.4},{:.4},{},{},{},{},{},{},{},{},{},{},{}\n",
                csv_field(&row.label),
                csv_field(&row.flags),
                row.bits_per_value,
                row.compression_ratio,
                row.perplexity,
                row.delta,
                row.passed,
                row.pareto,
                number(row.delta_standard_error, 4),
                row.delta_within_noise
                    .map_or(String::new(), |w| w.to_string()),
                number(row.kld_mean, 6),
                number(row.kld_standard_error, 6),
                number(row.kld_p99, 6),
                number(row.kld_max, 6),
                number(row.top1_agreement_percent, 3),
                number(row.delta_p_mean_percent, 4),
                row.pareto_kld
            ));
        }
        csv
    }

    /// The table for people: one line per variant, `*` on the Pareto front.
    pub fn render_rows(&self) -> Vec<String> {
        let label_width = self
            .rows
            .iter()
            .map(|row| row.label.len())
            .max()
            .unwrap_or(0)
            .max("method".len());
        let mut lines = vec![format!(
            "{:<label_width$}  {:>10}  {:>7}  {:>10}  {:>9}  {:>7}  {:>9}  {:>9}  {:>7}  {:<6}  {:<6}  flags",
            "method", "bits/value", "ratio", "perplexity", "delta", "±SE", "mean KLD", "KLD p99",
            "top-1 %", "passed", "pareto"
        )];
        let number = |value: Option<f64>, width: usize, decimals: usize| {
            value.map_or(format!("{:>width$}", "-"), |v| {
                format!("{v:>width$.decimals$}")
            })
        };
        lines.extend(self.rows.iter().map(|row| {
            let front = match (row.pareto, row.pareto_kld) {
                (true, true) => "*+",
                (true, false) => "*",
                (false, true) => "+",
                (false, false) => "",
            };
            format!(
                "{:<label_width$}  {:>10.3}  {:>6.2}x  {:>10.4}  {:>+9.4}  {}  {}  {}  {}  {:<6}  {:<6}  {}",
                row.label,
                row.bits_per_value,
                row.compression_ratio,
                row.perplexity,
                row.delta,
                number(row.delta_standard_error, 7, 4),
                number(row.kld_mean, 9, 6),
                number(row.kld_p99, 9, 6),
                number(row.top1_agreement_percent, 7, 2),
                if row.passed { "yes" } else { "no" },
                front,
                row.flags
            )
        }));
        lines
    }

    /// One sentence: the recommendation, or that nothing passed.
    pub fn recommendation_line(&self) -> String {
        let criteria = self.criteria().describe();
        match self.recommended() {
            Some(row) => format!(
                "Recommendation: {} ({:.3} bits/value, delta {:+.4}{}, mean KLD {}; meets {criteria})",
                row.label,
                row.bits_per_value,
                row.delta,
                noise_note(row.delta_standard_error, row.delta_within_noise),
                row.kld_mean.map_or("-".to_string(), |k| format!("{k:.6}")),
            ),
            None => format!("Recommendation: none; no variant meets {criteria}"),
        }
    }
}

/// Whether each row is on the Pareto front of bits against `metric`: no
/// other row is at least as good on both and better on one. A row without
/// the metric is on no front and dominates none.
fn pareto_front(rows: &[SweepRow], metric: impl Fn(&SweepRow) -> Option<f64>) -> Vec<bool> {
    rows.iter()
        .map(|row| {
            let Some(value) = metric(row) else {
                return false;
            };
            !rows.iter().any(|other| {
                metric(other).is_some_and(|other_value| {
                    other.bits_per_value <= row.bits_per_value
                        && other_value <= value
                        && (other.bits_per_value < row.bits_per_value || other_value < value)
                })
            })
        })
        .collect()
}

/// `value` as one CSV field, quoted when it holds a comma, quote or space.
fn csv_field(value: &str) -> String {
    if value.contains([',', '"', ' ', '\n']) {
        format!("\"{}\"", value.replace('"', "\"\""))
    } else {
        value.to_string()
    }
}

/// A sweep run and its table, in the shape of its JSON (`--json`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SweepReport {
    pub model: String,
    pub data: String,
    pub protocol: String,
    pub compressor: String,
    /// Where the model ran, with the device's name.
    pub device: String,
    /// Element type of the cache files handed to kv-compress (ratios are against it).
    pub cache_dtype: String,
    /// Model, config, text and tokens by content (SHA-256 and size).
    #[serde(flatten)]
    pub content: ContentIds,
    pub tokens_scored: usize,
    pub tokens_on_compressed_cache: usize,
    pub windows: usize,
    pub wall_seconds: f64,
    pub table: SweepTable,
}

impl SweepReport {
    /// The report of `evaluation`, whose variants are `variants` in order.
    pub fn new(
        run: &RunDescription,
        evaluation: &Evaluation,
        variants: &[Variant],
        cache_dtype: CacheDtype,
    ) -> Self {
        let measurements = variants
            .iter()
            .zip(&evaluation.variants)
            .map(|(variant, outcome)| {
                let metrics = &outcome.metrics;
                // The Go original reports no bits/value: derive it from the bytes.
                let bits_per_value = metrics.bits_per_value.unwrap_or_else(|| {
                    8.0 * metrics.figures.compressed_size_bytes as f64
                        * cache_dtype.size_bytes() as f64
                        / metrics.figures.original_size_bytes as f64
                });
                let perplexity = outcome.nll.perplexity();
                Measurement {
                    label: variant.label.clone(),
                    flags: outcome.settings.label(),
                    bits_per_value,
                    compression_ratio: metrics.compression_ratio,
                    perplexity,
                    delta_standard_error: delta_standard_error(perplexity, &outcome.nll_difference),
                    fidelity: outcome.fidelity.on_compressed_cache.clone(),
                }
            })
            .collect();
        SweepReport {
            model: run.model.clone(),
            data: run.data.clone(),
            protocol: run.protocol.clone(),
            compressor: run.compressor.clone(),
            device: run.device.clone(),
            cache_dtype: run.cache_dtype.clone(),
            content: run.content.clone(),
            tokens_scored: evaluation.baseline.tokens,
            tokens_on_compressed_cache: evaluation.tokens_on_cache,
            windows: evaluation.windows,
            wall_seconds: evaluation.timings.total.as_secs_f64(),
            table: SweepTable::new(evaluation.baseline.perplexity(), run.criteria, measurements),
        }
    }

    pub fn render_text(&self) -> String {
        let mut lines = vec![
            rule(),
            "COMPRESSION SWEEP".to_string(),
            rule(),
            field("Model", &self.model),
            field("Data", &self.data),
            field("Protocol", &self.protocol),
            field("Compressor", &self.compressor),
            field("Device", &self.device),
            field("Cache dtype", &self.cache_dtype),
            field(
                "Tokens scored",
                &format!(
                    "{} ({} on a compressed cache)",
                    self.tokens_scored, self.tokens_on_compressed_cache
                ),
            ),
            field("Windows", &self.windows.to_string()),
            field("Wall time", &format!("{:.1} s", self.wall_seconds)),
            field(
                "Baseline perplexity",
                &format!("{:.4}", self.table.baseline_perplexity),
            ),
            field("Pass criterion", &self.table.criteria().describe()),
            String::new(),
        ];
        lines.extend(self.table.render_rows());
        let has_engine_rows = self
            .table
            .rows
            .iter()
            .any(|row| engines::engine_grid(&row.flags).is_some());
        lines.push(
            "(* = Pareto front: no other variant has fewer or equal bits and a lower or equal delta; \
             + = the same with the mean KLD)"
                .into(),
        );
        lines.push(
            "(±SE: the delta's standard error from paired per-token NLL differences; KLD and \
             top-1 over the tokens on a compressed cache)"
                .into(),
        );
        if has_engine_rows {
            lines.push(String::new());
            lines.extend(self.table.render_by_engine());
        }
        lines.push(String::new());
        lines.push(self.table.recommendation_line());
        if has_engine_rows {
            lines.extend(self.table.deploy_lines());
        }
        lines.push(rule());
        lines.join("\n") + "\n"
    }
}

/// The report's engine sections (`--matrix engines`, issue 19).
impl SweepTable {
    /// The rows grouped by the engine that ships each format, each group
    /// by bits/value.
    fn render_by_engine(&self) -> Vec<String> {
        let mut names: Vec<&str> = self
            .rows
            .iter()
            .map(|row| engines::engine_name(&row.flags))
            .collect();
        names.sort();
        names.dedup();
        let mut lines = vec!["By engine (bits/value, delta, mean KLD, top-1 %):".to_string()];
        for name in names {
            lines.push(format!("  {name}"));
            for row in self
                .rows
                .iter()
                .filter(|row| engines::engine_name(&row.flags) == name)
            {
                lines.push(format!(
                    "    {:<32} {:>7.3}  {:>+9.4}  {:>9}  {:>6}  {}",
                    row.label,
                    row.bits_per_value,
                    row.delta,
                    row.kld_mean.map_or("-".into(), |k| format!("{k:.6}")),
                    row.top1_agreement_percent
                        .map_or("-".into(), |t| format!("{t:.2}")),
                    if row.passed { "passes" } else { "fails" }
                ));
            }
        }
        lines
    }

    /// The deploy line: for the recommended row, the engine flags where an
    /// engine ships it; else that no engine does, and the engine formats that pass.
    fn deploy_lines(&self) -> Vec<String> {
        let Some(best) = self.recommended() else {
            return vec!["Deploy: nothing passed, so no engine setting is recommended.".into()];
        };
        if let Some(grid) = engines::engine_grid(&best.flags) {
            let mut lines = vec![format!("Deploy {} as:", best.label)];
            lines.extend(
                engines::deploy_commands(grid, &best.flags)
                    .into_iter()
                    .map(|c| format!("  {c}")),
            );
            return lines;
        }
        let mut lines = vec![format!(
            "Deploy: the recommended {} is kv-compress's own format; no inference engine ships it.",
            best.label
        )];
        let passing = self
            .rows
            .iter()
            .filter(|row| row.passed)
            .find_map(|row| engines::engine_grid(&row.flags).map(|grid| (row, grid)));
        match passing {
            Some((row, grid)) => {
                lines.push(format!(
                    "  The fewest-bits engine format that passes is {} ({:.3} bits/value):",
                    row.label, row.bits_per_value
                ));
                lines.extend(
                    engines::deploy_commands(grid, &row.flags)
                        .into_iter()
                        .map(|c| format!("    {c}")),
                );
            }
            None => lines.push("  No engine format passes the criteria.".into()),
        }
        lines
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn measurement(label: &str, bits_per_value: f64, perplexity: f64) -> Measurement {
        Measurement {
            label: label.into(),
            flags: format!("-flags of {label}"),
            bits_per_value,
            compression_ratio: 32.0 / bits_per_value,
            perplexity,
            delta_standard_error: None,
            fidelity: None,
        }
    }

    pub(crate) const THRESHOLD: PassCriteria = PassCriteria {
        threshold: Some(0.5),
        max_kld: None,
    };

    /// A table at baseline 10 and threshold 0.5 of (label, bits, perplexity) rows.
    pub(crate) fn table_of(rows: &[(&str, f64, f64)]) -> SweepTable {
        let measurements = rows
            .iter()
            .map(|&(label, bits, perplexity)| measurement(label, bits, perplexity));
        SweepTable::new(10.0, THRESHOLD, measurements.collect())
    }

    /// Deltas: a 0.9 @4.25, b 0.3 @4.5, c 0.1 @4.5, d 2.0 @2.5, e 0.0 @8.25,
    /// f 1.0 @3.5 (dominated by nothing: fewer bits than a).
    fn table() -> SweepTable {
        table_of(&[
            ("a", 4.25, 10.9),
            ("b", 4.5, 10.3),
            ("c", 4.5, 10.1),
            ("d", 2.5, 12.0),
            ("e", 8.25, 10.0),
            ("f", 3.5, 11.0),
        ])
    }

    #[test]
    fn deploy_line_gives_engine_flags_or_says_no_engine_ships_it() {
        let mut table = table_of(&[("llama-q4_0", 4.5, 10.1), ("ecsq", 4.35, 10.05)]);
        for row in &mut table.rows {
            row.flags = if row.label == "ecsq" {
                "-grid ecsq -rate 4.35".into()
            } else {
                "-method llama-q4_0".into()
            };
        }
        let text = table.deploy_lines().join("\n");
        assert!(text.contains("no inference engine ships it"), "{text}");
        assert!(text.contains("-ctk q4_0 -ctv q4_0 -fa on"), "{text}");
        assert!(text.contains("LLAMA_ATTN_ROT_DISABLE=1"), "{text}");
        let rotated =
            engines::deploy_commands(kvformat::codec::Grid::Q4_0, "-method llama-q4_0 -llama-rot")
                .join("\n");
        assert!(
            rotated.contains("llama-server -m MODEL -ctk q4_0 -ctv q4_0 -fa on"),
            "{rotated}"
        );
        assert!(!rotated.contains("LLAMA_ATTN_ROT_DISABLE"), "{rotated}");
        let fp8 = engines::deploy_commands(
            kvformat::codec::Grid::Fp8E4m3,
            "-method vllm-fp8-e4m3 -fp8-scale calibrated",
        )
        .join("\n");
        assert!(
            fp8.contains("vllm serve MODEL --kv-cache-dtype fp8_e4m3 --calculate-kv-scales"),
            "{fp8}"
        );
    }

    #[test]
    fn rows_are_sorted_by_bits_then_delta_with_pass_and_front_by_hand() {
        let table = table();
        let labels: Vec<&str> = table.rows.iter().map(|r| r.label.as_str()).collect();
        assert_eq!(labels, ["d", "f", "a", "c", "b", "e"]);
        let passed: Vec<bool> = table.rows.iter().map(|r| r.passed).collect();
        assert_eq!(passed, [false, false, false, true, true, true]);
        // a (4.25, 0.9) is dominated by f (3.5, 1.0)? No: f's delta is higher.
        // b (4.5, 0.3) is dominated by c (4.5, 0.1): same bits, lower delta.
        let front: Vec<&str> = table
            .rows
            .iter()
            .filter(|r| r.pareto)
            .map(|r| r.label.as_str())
            .collect();
        assert_eq!(front, ["d", "f", "a", "c", "e"]);
        assert!((table.rows[0].delta - 2.0).abs() < 1e-12);
    }

    #[test]
    fn recommendation_is_the_fewest_bits_that_pass_lower_delta_on_ties() {
        let table = table();
        assert_eq!(table.recommendation.as_deref(), Some("c"));
        assert_eq!(table.recommended().unwrap().bits_per_value, 4.5);
        assert!(table
            .recommendation_line()
            .starts_with("Recommendation: c (4.500 bits/value, delta +0.1000"));
    }

    #[test]
    fn no_recommendation_when_nothing_passes_and_equal_to_threshold_fails() {
        let table = table_of(&[("at-threshold", 4.0, 10.5), ("worse", 2.0, 13.0)]);
        assert!(table.rows.iter().all(|r| !r.passed));
        assert_eq!(table.recommendation, None);
        assert!(table.recommendation_line().contains("none"));
    }

    /// `measurement` with a delta SE and these per-token KLDs (top-1
    /// agreeing on the first token only, Δp 0).
    fn measured(label: &str, bits: f64, perplexity: f64, se: f64, kld: &[f64]) -> Measurement {
        let agrees: Vec<bool> = (0..kld.len()).map(|i| i == 0).collect();
        Measurement {
            delta_standard_error: Some(se),
            fidelity: TokenFigures::of(kld, &agrees, &vec![0.0; kld.len()]),
            ..measurement(label, bits, perplexity)
        }
    }

    #[test]
    fn csv_has_a_header_quoted_flags_and_one_line_per_row() {
        let table = SweepTable::new(
            20.0,
            THRESHOLD,
            vec![
                // KLD 0.001, 0.003: mean 0.002, SE sd/√2 = 0.001, p99 0.00298.
                measured("int8", 8.25, 20.002, 0.0005, &[0.001, 0.003]),
                measurement("odd,\"x\"", 2.5, 28.0),
            ],
        );
        let csv = table.to_csv();
        assert_eq!(
            csv,
            "label,flags,bits_per_value,compression_ratio,perplexity,delta,passed,pareto,\
             delta_se,within_noise,kld_mean,kld_se,kld_p99,kld_max,top1_percent,\
             delta_p_mean_percent,pareto_kld\n\
             \"odd,\"\"x\"\"\",\"-flags of odd,\"\"x\"\"\",2.5000,12.8000,28.0000,8.0000,false,true,\
             ,,,,,,,,false\n\
             int8,\"-flags of int8\",8.2500,3.8788,20.0020,0.0020,true,true,\
             0.0005,false,0.002000,0.001000,0.002980,0.003000,50.000,0.0000,true\n"
        );
    }

    #[test]
    fn a_kld_criterion_judges_rows_by_their_mean_kld_and_has_its_own_front() {
        let kld_only = PassCriteria {
            threshold: None,
            max_kld: Some(0.01),
        };
        let table = SweepTable::new(
            10.0,
            kld_only,
            vec![
                // a: fewest bits, large KLD; b: small delta but KLD above the bound;
                // c: passes; d: no KLD at all (fails a KLD criterion).
                measured("a", 2.0, 11.0, 0.1, &[0.2, 0.4]),
                measured("b", 3.0, 10.01, 0.1, &[0.01, 0.03]),
                measured("c", 4.0, 10.3, 0.1, &[0.004, 0.006]),
                measurement("d", 5.0, 10.0),
            ],
        );
        let passed: Vec<bool> = table.rows.iter().map(|r| r.passed).collect();
        assert_eq!(passed, [false, false, true, false]);
        assert_eq!(table.recommendation.as_deref(), Some("c"));
        let kld_front: Vec<bool> = table.rows.iter().map(|r| r.pareto_kld).collect();
        assert_eq!(kld_front, [true, true, true, false]);
        // On the delta front c (0.3) is dominated by b (0.01 at fewer bits).
        let front: Vec<bool> = table.rows.iter().map(|r| r.pareto).collect();
        assert_eq!(front, [true, true, false, true]);
        let line = table.recommendation_line();
        assert!(
            line.contains("mean KLD 0.005000; meets mean KLD < 0.01"),
            "{line}"
        );
        // c's delta 0.3 against SE 0.1: beyond noise; b's 0.01: within.
        assert!(line.contains("± 0.1000, beyond noise"), "{line}");
        assert_eq!(table.rows[1].delta_within_noise, Some(true));
    }

    #[test]
    fn variant_flags_split_into_settings_and_pass_through() {
        let variant =
            Variant::parse("kivi3 = -method kivi -bits 3 -group-size 32 -rotate").unwrap();
        assert_eq!(variant.label, "kivi3");
        assert_eq!(variant.settings.group_size, 32);
        assert_eq!(variant.settings.sparsity, 0.0);
        assert_eq!(
            variant.settings.extra_args,
            ["-method", "kivi", "-bits", "3", "-rotate"]
        );

        let variant = Variant::parse("s=--sparsity=0.25 -group-size=128 -bits=2").unwrap();
        assert_eq!(
            (variant.settings.group_size, variant.settings.sparsity),
            (128, 0.25)
        );
        assert_eq!(variant.settings.extra_args, ["-bits=2"]);

        let plain = Variant::parse("adr002=").unwrap();
        assert_eq!(plain.settings, CompressSettings::default());
    }

    #[test]
    fn malformed_variants_are_errors_that_say_why() {
        let message = |spec: &str| Variant::parse(spec).unwrap_err().to_string();
        assert!(message("kivi3").contains("expected LABEL=FLAGS"));
        assert!(message(" =-bits 3").contains("the label is empty"));
        assert!(message("x=-bits 3 -group-size").contains("flag needs an argument: -group-size"));
        assert!(message("x=-sparsity half")
            .contains("invalid value \"half\" for flag -sparsity: parse error"));
        assert!(
            message("x=-group-size -64").contains("for flag -group-size: must be a power of two")
        );
        assert!(message("x=-bitz 3").contains("flag provided but not defined: -bitz"));
        assert!(message("x=-grid lloyd -bits 8").contains("the lloyd grid takes 2, 3 or 4 bits"));
    }

    #[test]
    fn the_default_matrix_parses_with_unique_labels() {
        let matrix = Variant::default_matrix();
        assert_eq!(matrix.len(), DEFAULT_MATRIX.len());
        ensure_unique_labels(&matrix).unwrap();
        assert_eq!(
            matrix[0].settings,
            CompressSettings::default(),
            "ADR-002 is the reference row"
        );
        let g128 = matrix.iter().find(|v| v.label == "adr002-g128").unwrap();
        assert_eq!(g128.settings.group_size, 128);
        assert!(g128.settings.extra_args.is_empty());
        let twice = vec![matrix[0].clone(), matrix[0].clone()];
        assert!(ensure_unique_labels(&twice)
            .unwrap_err()
            .to_string()
            .contains("adr002-g64"));
    }
}
