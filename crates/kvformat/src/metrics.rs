//! Reconstruction quality (CONTRACT §3): per-tensor RMSE, SNR, cosine and max
//! error, their aggregate, the quality grade and the threshold violations, and
//! the JSON report `kv-compress` prints. Every figure is finite by construction.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// SNR reported for an exact reconstruction (MSE 0), and the bound every SNR
/// is clamped to (±), so the JSON never holds an infinity. 200 dB is beyond any
/// lossy figure: f32 rounding noise alone is about 150 dB.
pub const SNR_CAP_DB: f64 = 200.0;

/// Quality of one tensor's reconstruction.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct TensorMetrics {
    pub rmse: f64,
    /// `10·log10(var(original) / MSE)`, clamped to ±[`SNR_CAP_DB`]; `SNR_CAP_DB`
    /// when MSE is 0, `-SNR_CAP_DB` for a constant original reconstructed with error.
    pub snr_db: f64,
    /// Cosine of the two vectors; 1 when both are all zeros, 0 when exactly one is.
    pub cosine: f64,
    pub max_error: f64,
}

/// Independent accumulators per sum: lets the compiler vectorize the f64
/// loop (a single running sum cannot be reordered, so it would not).
const LANES: usize = 4;

/// Running f64 sums of one measurement, one slot per lane. Only five sums per
/// value: `Σo²` and `Σo·r` follow from them exactly (see [`measure`]).
#[derive(Clone, Copy)]
pub(crate) struct Sums {
    /// `Σ(o - k)` for the shift `k`.
    shifted: [f64; LANES],
    /// `Σ(o - k)²`.
    shifted_sq: [f64; LANES],
    /// `Σr²`.
    reconstructed_sq: [f64; LANES],
    /// `Σ(o - r)²`.
    err_sq: [f64; LANES],
    max_error: [f64; LANES],
}

impl Sums {
    const ZERO: Sums = Sums {
        shifted: [0.0; LANES],
        shifted_sq: [0.0; LANES],
        reconstructed_sq: [0.0; LANES],
        err_sq: [0.0; LANES],
        max_error: [0.0; LANES],
    };

    #[inline(always)]
    fn add(&mut self, lane: usize, shift: f64, original: f32, reconstructed: f32) {
        let (o, r) = (f64::from(original), f64::from(reconstructed));
        let shifted = o - shift;
        self.shifted[lane] += shifted;
        self.shifted_sq[lane] += shifted * shifted;
        self.reconstructed_sq[lane] += r * r;
        let err = (o - r).abs();
        self.err_sq[lane] += err * err;
        self.max_error[lane] = if err > self.max_error[lane] {
            err
        } else {
            self.max_error[lane]
        };
    }
}

/// Measures `reconstructed` against `original` in one pass, accumulating in f64.
/// The variance is taken around the first value `k`, which keeps it exact for
/// data with a large mean; then `Σo² = Σ(o-k)² + 2kΣ(o-k) + nk²` and
/// `Σo·r = (Σo² + Σr² - Σ(o-r)²) / 2`.
pub fn measure(original: &[f32], reconstructed: &[f32]) -> TensorMetrics {
    let mut accumulator = Accumulator::new();
    accumulator.push(original, reconstructed);
    accumulator.finish()
}

/// [`measure`] fed in consecutive runs (as the encoder produces them), with
/// the same bits as one call on the whole: value `i` always goes to lane
/// `i % LANES`, and each lane sums in order.
#[derive(Clone, Copy)]
pub struct Accumulator {
    shift: f64,
    sums: Sums,
    count: usize,
}

impl Default for Accumulator {
    fn default() -> Self {
        Self::new()
    }
}

impl Accumulator {
    pub fn new() -> Self {
        Accumulator {
            shift: 0.0,
            sums: Sums::ZERO,
            count: 0,
        }
    }

    /// Adds the next run of values; `original` and `reconstructed` are equally long.
    pub fn push(&mut self, original: &[f32], reconstructed: &[f32]) {
        assert_eq!(
            original.len(),
            reconstructed.len(),
            "metrics need equal lengths"
        );
        if original.is_empty() {
            return;
        }
        if self.count == 0 {
            self.shift = f64::from(original[0]);
        }
        // Up to the next multiple of LANES one at a time, whole chunks in the
        // kernel, the rest one at a time.
        let head = ((LANES - self.count % LANES) % LANES).min(original.len());
        let bulk = (original.len() - head) / LANES * LANES;
        let (head_o, rest_o) = original.split_at(head);
        let (head_r, rest_r) = reconstructed.split_at(head);
        let (bulk_o, tail_o) = rest_o.split_at(bulk);
        let (bulk_r, tail_r) = rest_r.split_at(bulk);
        for (&o, &r) in head_o.iter().zip(head_r) {
            self.sums.add(self.count % LANES, self.shift, o, r);
            self.count += 1;
        }
        self.sums = accumulate(self.sums, self.shift, bulk_o, bulk_r);
        self.count += bulk;
        for (&o, &r) in tail_o.iter().zip(tail_r) {
            self.sums.add(self.count % LANES, self.shift, o, r);
            self.count += 1;
        }
    }

    pub fn finish(&self) -> TensorMetrics {
        if self.count == 0 {
            return TensorMetrics {
                rmse: 0.0,
                snr_db: SNR_CAP_DB,
                cosine: 1.0,
                max_error: 0.0,
            };
        }
        let (shift, sums) = (self.shift, &self.sums);
        let total = |lanes: [f64; LANES]| lanes.iter().sum::<f64>();
        let n = self.count as f64;
        let (shifted, shifted_sq, err_sq) = (
            total(sums.shifted),
            total(sums.shifted_sq),
            total(sums.err_sq),
        );
        let norm_original = (shifted_sq + 2.0 * shift * shifted + n * shift * shift).max(0.0);
        let norm_reconstructed = total(sums.reconstructed_sq);
        let dot = (norm_original + norm_reconstructed - err_sq) / 2.0;
        let mse = err_sq / n;
        let mean_shifted = shifted / n;
        let variance = (shifted_sq / n - mean_shifted * mean_shifted).max(0.0);
        TensorMetrics {
            rmse: mse.sqrt(),
            snr_db: snr_db(variance, mse),
            cosine: cosine(dot, norm_original, norm_reconstructed),
            max_error: sums.max_error.iter().fold(0.0, |a: f64, &b| a.max(b)),
        }
    }
}

crate::simd::multiversion!(fn accumulate / accumulate_at(sums: Sums, shift: f64, original: &[f32], reconstructed: &[f32]) -> Sums => accumulate_generic);

/// The sums over whole chunks of `LANES` values, lane `j` of a chunk into lane `j`.
#[inline(always)]
fn accumulate_generic(mut sums: Sums, shift: f64, original: &[f32], reconstructed: &[f32]) -> Sums {
    for (o, r) in original
        .chunks_exact(LANES)
        .zip(reconstructed.chunks_exact(LANES))
    {
        for lane in 0..LANES {
            sums.add(lane, shift, o[lane], r[lane]);
        }
    }
    sums
}

fn snr_db(variance: f64, mse: f64) -> f64 {
    if mse == 0.0 {
        return SNR_CAP_DB;
    }
    if variance == 0.0 {
        return -SNR_CAP_DB;
    }
    (10.0 * (variance / mse).log10()).clamp(-SNR_CAP_DB, SNR_CAP_DB)
}

fn cosine(dot: f64, norm_o: f64, norm_r: f64) -> f64 {
    match (norm_o == 0.0, norm_r == 0.0) {
        (true, true) => 1.0,
        (true, false) | (false, true) => 0.0,
        _ => (dot / (norm_o.sqrt() * norm_r.sqrt())).clamp(-1.0, 1.0),
    }
}

/// The aggregate over tensors: means of RMSE, SNR and cosine, global max error.
pub fn aggregate(per_tensor: &[TensorMetrics]) -> TensorMetrics {
    if per_tensor.is_empty() {
        return measure(&[], &[]);
    }
    let n = per_tensor.len() as f64;
    TensorMetrics {
        rmse: per_tensor.iter().map(|m| m.rmse).sum::<f64>() / n,
        snr_db: per_tensor.iter().map(|m| m.snr_db).sum::<f64>() / n,
        cosine: per_tensor.iter().map(|m| m.cosine).sum::<f64>() / n,
        max_error: per_tensor.iter().map(|m| m.max_error).fold(0.0, f64::max),
    }
}

/// Pass/fail limits of the quality check (CONTRACT §3 defaults).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Thresholds {
    pub max_rmse: f64,
    pub max_error: f64,
    pub min_cosine: f64,
    pub min_snr_db: f64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            max_rmse: 0.10,
            max_error: 0.50,
            min_cosine: 0.99,
            min_snr_db: 18.0,
        }
    }
}

impl Thresholds {
    /// The original's violation strings, in its order: RMSE, MaxError, CosineSim, SNR.
    pub fn violations(&self, m: &TensorMetrics) -> Vec<String> {
        let mut found = Vec::new();
        if m.rmse > self.max_rmse {
            found.push(format!("RMSE {:.4} > {:.4}", m.rmse, self.max_rmse));
        }
        if m.max_error > self.max_error {
            found.push(format!(
                "MaxError {:.4} > {:.4}",
                m.max_error, self.max_error
            ));
        }
        if m.cosine < self.min_cosine {
            found.push(format!(
                "CosineSim {:.4} < {:.4}",
                m.cosine, self.min_cosine
            ));
        }
        if m.snr_db < self.min_snr_db {
            found.push(format!("SNR {:.2}dB < {:.2}dB", m.snr_db, self.min_snr_db));
        }
        found
    }
}

/// The original's grade of the aggregate metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum QualityLevel {
    Excellent,
    Good,
    Acceptable,
    Poor,
}

impl QualityLevel {
    pub fn of(m: &TensorMetrics) -> Self {
        if m.rmse < 0.01 && m.snr_db > 40.0 {
            QualityLevel::Excellent
        } else if m.rmse < 0.05 && m.snr_db > 30.0 {
            QualityLevel::Good
        } else if m.rmse < 0.1 && m.snr_db > 18.0 {
            QualityLevel::Acceptable
        } else {
            QualityLevel::Poor
        }
    }
}

/// A compressed cache's sizes and its reconstruction's quality, as
/// [`Report`] names them: declared once for kv-compress's report and for
/// kv-validate's summary of a variant over windows, which embed it flat.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CompressionFigures {
    pub original_size_bytes: u64,
    pub compressed_size_bytes: u64,
    pub rmse: f64,
    pub snr_db: f64,
    pub cosine_similarity: f64,
    pub max_error: f64,
}

/// The JSON object `kv-compress` prints on stdout (CONTRACT §3), fields in the
/// contract's order. `kv-validate` parses it back with the same type.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub compression_ratio: f64,
    /// Sizes, RMSE, SNR, cosine and max error (flat in the JSON).
    #[serde(flatten)]
    pub figures: CompressionFigures,
    pub quality_level: QualityLevel,
    pub processing_time_ms: f64,
    pub quality_passed: bool,
    pub violations: Vec<String>,
    /// Stored bits per input value (8 · compressed bytes / values). This and
    /// the counts below are ours: absent (0) when parsing the Go original's JSON.
    #[serde(default)]
    pub bits_per_value: f64,
    #[serde(default)]
    pub num_tensors: usize,
    #[serde(default)]
    pub num_values: u64,
    /// `{name}_rmse`, `{name}_snr_db`, `{name}_cosine`, `{name}_max_error` per tensor (`-verbose`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tensor_metrics: Option<BTreeMap<String, f64>>,
}

impl Report {
    /// Builds the report from sizes and per-tensor metrics (`(name, metrics)`).
    pub fn new(
        original_size_bytes: u64,
        compressed_size_bytes: u64,
        num_values: u64,
        per_tensor: &[(String, TensorMetrics)],
        with_tensor_metrics: bool,
    ) -> Self {
        let metrics: Vec<TensorMetrics> = per_tensor.iter().map(|(_, m)| *m).collect();
        let total = aggregate(&metrics);
        let violations = Thresholds::default().violations(&total);
        let tensor_metrics = with_tensor_metrics.then(|| {
            per_tensor
                .iter()
                .flat_map(|(name, m)| {
                    [
                        (format!("{name}_rmse"), m.rmse),
                        (format!("{name}_snr_db"), m.snr_db),
                        (format!("{name}_cosine"), m.cosine),
                        (format!("{name}_max_error"), m.max_error),
                    ]
                })
                .collect()
        });
        Report {
            compression_ratio: ratio(original_size_bytes, compressed_size_bytes),
            figures: CompressionFigures {
                original_size_bytes,
                compressed_size_bytes,
                rmse: total.rmse,
                snr_db: total.snr_db,
                cosine_similarity: total.cosine,
                max_error: total.max_error,
            },
            quality_level: QualityLevel::of(&total),
            processing_time_ms: 0.0,
            quality_passed: violations.is_empty(),
            violations,
            bits_per_value: ratio(8 * compressed_size_bytes, num_values),
            num_tensors: per_tensor.len(),
            num_values,
            tensor_metrics,
        }
    }

    /// 2-space indented JSON with a trailing newline, as the bridge reads it.
    pub fn to_json(&self) -> String {
        let mut json = serde_json::to_string_pretty(self).expect("report serializes");
        json.push('\n');
        json
    }
}

/// `a / b`, 0 when `b` is 0 (an empty cache), so the JSON stays finite.
fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_computed_metrics() {
        // errors 0, 0, 1, -1 -> MSE 0.5; var(orig) of [1,2,3,4] = 1.25
        let m = measure(&[1.0, 2.0, 3.0, 4.0], &[1.0, 2.0, 2.0, 5.0]);
        assert!((m.rmse - 0.5f64.sqrt()).abs() < 1e-12);
        assert!((m.snr_db - 10.0 * (1.25f64 / 0.5).log10()).abs() < 1e-12);
        let cos = (1.0 + 4.0 + 6.0 + 20.0) / (30f64.sqrt() * 34f64.sqrt());
        assert!((m.cosine - cos).abs() < 1e-12);
        assert_eq!(m.max_error, 1.0);
    }

    #[test]
    fn degenerate_cases_stay_finite() {
        let exact = measure(&[3.0, 3.0], &[3.0, 3.0]);
        assert_eq!(
            (exact.snr_db, exact.cosine, exact.rmse),
            (SNR_CAP_DB, 1.0, 0.0)
        );
        let constant_wrong = measure(&[3.0, 3.0], &[3.0, 2.0]);
        assert_eq!(constant_wrong.snr_db, -SNR_CAP_DB);
        assert_eq!(measure(&[0.0, 0.0], &[0.0, 0.0]).cosine, 1.0);
        assert_eq!(measure(&[0.0, 0.0], &[1.0, 0.0]).cosine, 0.0);
    }

    /// Pseudo-random originals and a coarse reconstruction of them.
    fn sample(n: usize) -> (Vec<f32>, Vec<f32>) {
        let mut rng = crate::codec::SplitMix64(7);
        let original: Vec<f32> = (0..n)
            .map(|_| (rng.next_u64() >> 40) as f32 / (1u64 << 20) as f32 - 8.0)
            .collect();
        let reconstructed = original.iter().map(|x| (x * 3.0).round() / 3.0).collect();
        (original, reconstructed)
    }

    #[test]
    fn value_i_goes_to_lane_i_mod_4_whatever_the_runs_and_simd_level() {
        let (original, reconstructed) = sample(1003);
        // The definition, one value at a time: lane i % 4, each lane in order.
        let shift = f64::from(original[0]);
        let mut reference = Sums::ZERO;
        for (i, (&o, &r)) in original.iter().zip(&reconstructed).enumerate() {
            reference.add(i % LANES, shift, o, r);
        }
        let bits = |s: &Sums| {
            [
                s.shifted,
                s.shifted_sq,
                s.reconstructed_sq,
                s.err_sq,
                s.max_error,
            ]
            .map(|lanes| lanes.map(f64::to_bits))
        };
        for level in crate::simd::Level::available() {
            let bulk = original.len() / LANES * LANES;
            let sums = accumulate_at(
                level,
                Sums::ZERO,
                shift,
                &original[..bulk],
                &reconstructed[..bulk],
            );
            let mut tail = sums;
            for i in bulk..original.len() {
                tail.add(i % LANES, shift, original[i], reconstructed[i]);
            }
            assert_eq!(bits(&tail), bits(&reference), "{level:?}");
        }
        let whole = measure(&original, &reconstructed);
        for runs in [
            &[1usize, 2, 3, 64, 5, 928][..],
            &[4, 4, 995],
            &[1003],
            &[0, 1, 0, 1001, 1],
        ] {
            let mut accumulator = Accumulator::new();
            let mut at = 0;
            for &len in runs {
                accumulator.push(&original[at..at + len], &reconstructed[at..at + len]);
                at += len;
            }
            assert_eq!(at, original.len());
            assert_eq!(accumulator.finish(), whole, "{runs:?}");
        }
        // And the figures are the plain formulas.
        let n = original.len() as f64;
        let mse = original
            .iter()
            .zip(&reconstructed)
            .map(|(&o, &r)| (f64::from(o) - f64::from(r)).powi(2))
            .sum::<f64>()
            / n;
        assert!((whole.rmse - mse.sqrt()).abs() < 1e-12);
    }

    #[test]
    fn large_mean_does_not_destroy_the_variance() {
        let original = [1e6f32, 1e6 + 1.0, 1e6 + 2.0, 1e6 + 3.0];
        let reconstructed = [1e6f32 + 0.5, 1e6 + 1.0, 1e6 + 2.0, 1e6 + 3.0];
        // var = 1.25, MSE = 0.0625 -> 10·log10(20)
        let m = measure(&original, &reconstructed);
        assert!(
            (m.snr_db - 10.0 * 20f64.log10()).abs() < 1e-9,
            "{}",
            m.snr_db
        );
    }

    #[test]
    fn violation_strings_match_the_original() {
        let m = TensorMetrics {
            rmse: 0.1234,
            snr_db: 16.14,
            cosine: 0.9847,
            max_error: 0.7793,
        };
        assert_eq!(
            Thresholds::default().violations(&m),
            vec![
                "RMSE 0.1234 > 0.1000",
                "MaxError 0.7793 > 0.5000",
                "CosineSim 0.9847 < 0.9900",
                "SNR 16.14dB < 18.00dB"
            ]
        );
        assert_eq!(QualityLevel::of(&m), QualityLevel::Poor);
    }

    #[test]
    fn quality_levels_follow_the_thresholds() {
        let at = |rmse, snr_db| {
            QualityLevel::of(&TensorMetrics {
                rmse,
                snr_db,
                cosine: 1.0,
                max_error: 0.0,
            })
        };
        assert_eq!(at(0.005, 41.0), QualityLevel::Excellent);
        assert_eq!(at(0.005, 40.0), QualityLevel::Good);
        assert_eq!(at(0.04, 31.0), QualityLevel::Good);
        assert_eq!(at(0.09, 19.0), QualityLevel::Acceptable);
        assert_eq!(at(0.1, 19.0), QualityLevel::Poor);
    }

    #[test]
    fn report_json_is_indented_and_ends_with_newline() {
        let report = Report::new(64, 17, 32, &[("t".into(), measure(&[1.0], &[1.0]))], true);
        let json = report.to_json();
        assert!(
            json.starts_with("{\n  \"compression_ratio\": 3.764"),
            "{json}"
        );
        assert!(json.ends_with("}\n"));
        assert!((report.bits_per_value - 8.0 * 17.0 / 32.0).abs() < 1e-12);
        assert_eq!(
            report.tensor_metrics.as_ref().unwrap()["t_snr_db"],
            SNR_CAP_DB
        );
        assert_eq!(serde_json::from_str::<Report>(&json).unwrap(), report);
    }

    #[test]
    fn the_go_originals_json_parses() {
        let go = r#"{"compression_ratio": 8, "original_size_bytes": 100, "compressed_size_bytes": 12,
            "rmse": 0.26, "snr_db": 16.1, "cosine_similarity": 0.98, "max_error": 1.2,
            "quality_level": "POOR", "processing_time_ms": 4300.5, "quality_passed": false,
            "violations": ["RMSE 0.2600 > 0.1000"]}"#;
        let report: Report = serde_json::from_str(go).unwrap();
        assert_eq!(
            (
                report.quality_level,
                report.bits_per_value,
                report.tensor_metrics
            ),
            (QualityLevel::Poor, 0.0, None)
        );
    }
}
