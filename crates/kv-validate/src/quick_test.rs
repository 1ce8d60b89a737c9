//! `--quick-test`: the whole file contract exercised without a model. A
//! synthetic cache with TinyLlama's dimensions is written with its sidecar,
//! compressed and decompressed by the real `kv-compress`, read back and
//! compared with the original here, independently of the compressor.
//!
//! It passes when the contract holds: the reconstruction has every tensor
//! back with its name and shape, the compressor's own RMSE and cosine agree
//! with ours (it reports what it did), and the packed form is smaller than
//! the input. It says nothing about perplexity; the values are Gaussian
//! noise, which 4-bit grids reproduce worse than real caches, so the
//! compressor's quality grade is shown but does not decide.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{Device, Tensor};
use kvformat::CacheDtype;
use serde::Serialize;

use crate::bridge::KvCompress;
use crate::cleanup::ScratchDir;
use crate::evaluate::EvalError;
use crate::evaluate::MetricsSummary;
use crate::kvio::{read_kv_cache_like, write_kv_cache};
use crate::model::{KvCache, LayerKv};
use crate::report::{compression_lines, field, rule, status};
use crate::run_types::CompressSettings;

/// TinyLlama-1.1B's cache dimensions (the original's default model).
pub const TINYLLAMA_LAYERS: usize = 22;
pub const TINYLLAMA_KV_HEADS: usize = 4;
pub const TINYLLAMA_HEAD_DIM: usize = 64;
/// Cached positions of the synthetic cache.
pub const QUICK_TEST_SEQ_LEN: usize = 256;
/// How far our RMSE and cosine may be from the compressor's, relatively:
/// both are computed in f32 from the same files, in another order.
const METRIC_AGREEMENT: f64 = 1e-3;

/// One check of the quick test.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Check {
    pub name: String,
    pub passed: bool,
    pub detail: String,
}

/// What the quick test found.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct QuickTestReport {
    pub passed: bool,
    pub compressor: String,
    pub compressor_flags: String,
    pub num_layers: usize,
    pub num_kv_heads: usize,
    pub seq_len: usize,
    pub head_dim: usize,
    pub cache_dtype: String,
    pub compression: MetricsSummary,
    /// Mean per-tensor RMSE and cosine measured here, from the files.
    pub measured_rmse: f64,
    pub measured_cosine_similarity: f64,
    pub checks: Vec<Check>,
    pub wall_seconds: f64,
}

impl QuickTestReport {
    pub fn render_text(&self) -> String {
        let mut lines = vec![
            rule(),
            "KV-CACHE CONTRACT QUICK TEST (synthetic cache, no model)".to_string(),
            rule(),
            field(
                "Compressor",
                &format!("{} {}", self.compressor, self.compressor_flags),
            ),
            field(
                "Cache",
                &format!(
                    "{} layers x [1, {}, {}, {}] {}",
                    self.num_layers,
                    self.num_kv_heads,
                    self.seq_len,
                    self.head_dim,
                    self.cache_dtype
                ),
            ),
            String::new(),
        ];
        lines.extend(compression_lines(&self.compression));
        lines.push(String::new());
        for check in &self.checks {
            lines.push(format!(
                "[{}] {}: {}",
                if check.passed { "ok" } else { "FAIL" },
                check.name,
                check.detail
            ));
        }
        lines.push(field("Wall time", &format!("{:.2} s", self.wall_seconds)));
        lines.push(format!("Status: {}", status(self.passed)));
        lines.push(rule());
        lines.join("\n") + "\n"
    }
}

/// A deterministic Gaussian cache (splitmix64 + Box-Muller, seeded per run
/// so every run tests the same values).
pub fn synthetic_cache(
    layers: usize,
    heads: usize,
    seq: usize,
    head_dim: usize,
) -> candle_core::Result<KvCache> {
    let mut state = 0x5EED_CAFE_u64;
    let mut next_unit = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        // 53 random bits in (0, 1].
        ((z >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    };
    let len = heads * seq * head_dim;
    let mut tensor = || {
        let values: Vec<f32> = (0..len)
            .map(|_| {
                let (u, v) = (next_unit(), next_unit());
                ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
            })
            .collect();
        Tensor::from_vec(values, (1, heads, seq, head_dim), &Device::Cpu)
    };
    let layers = (0..layers)
        .map(|_| {
            Ok(LayerKv {
                key: tensor()?,
                value: tensor()?,
            })
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(KvCache { layers })
}

/// Mean over tensors of per-tensor RMSE and cosine similarity, as CONTRACT §3 defines them.
pub fn mean_rmse_and_cosine(
    original: &KvCache,
    reconstructed: &KvCache,
) -> candle_core::Result<(f64, f64)> {
    let pairs: Vec<(&Tensor, &Tensor)> = original
        .layers
        .iter()
        .zip(&reconstructed.layers)
        .flat_map(|(a, b)| [(&a.key, &b.key), (&a.value, &b.value)])
        .collect();
    let (mut rmse_sum, mut cosine_sum) = (0.0, 0.0);
    for (a, b) in &pairs {
        let a = a.flatten_all()?.to_vec1::<f32>()?;
        let b = b.flatten_all()?.to_vec1::<f32>()?;
        let (mut squared_error, mut dot, mut norm_a, mut norm_b) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
        for (&x, &y) in a.iter().zip(&b) {
            let (x, y) = (f64::from(x), f64::from(y));
            squared_error += (x - y) * (x - y);
            dot += x * y;
            norm_a += x * x;
            norm_b += y * y;
        }
        rmse_sum += (squared_error / a.len() as f64).sqrt();
        cosine_sum += dot / (norm_a.sqrt() * norm_b.sqrt()).max(f64::MIN_POSITIVE);
    }
    let n = pairs.len() as f64;
    Ok((rmse_sum / n, cosine_sum / n))
}

fn agrees(ours: f64, theirs: f64) -> bool {
    (ours - theirs).abs() <= METRIC_AGREEMENT * ours.abs().max(theirs.abs()).max(1e-6)
}

/// Runs the quick test with one compressor variant.
pub fn run_quick_test(
    compressor: &KvCompress,
    settings: &CompressSettings,
    cache_dtype: CacheDtype,
) -> Result<QuickTestReport, EvalError> {
    let started = Instant::now();
    let parent = std::env::temp_dir();
    let scratch = ScratchDir::new("kv-validate-quick-", &parent)
        .map_err(|source| EvalError::Scratch { parent, source })?;
    let cache = synthetic_cache(
        TINYLLAMA_LAYERS,
        TINYLLAMA_KV_HEADS,
        QUICK_TEST_SEQ_LEN,
        TINYLLAMA_HEAD_DIM,
    )?;
    let input: PathBuf = scratch.path().join("kv_cache.safetensors");
    let packed = scratch.path().join("kv_cache.compressed.safetensors");
    let decoded = scratch.path().join("kv_cache.decompressed.safetensors");
    // Written as the dtype under test, then read back, so `original` holds
    // exactly what the compressor saw (f16 rounding included).
    let layout = write_kv_cache(&input, &cache, cache_dtype, "synthetic-tinyllama")?;
    let (original, _) = crate::kvio::read_kv_cache(&input, &Device::Cpu)?;
    let metrics = compressor.round_trip(&input, &packed, &decoded, settings)?;

    let mut checks = Vec::new();
    let reconstructed = match read_kv_cache_like(&decoded, &layout, &Device::Cpu) {
        Ok(reconstructed) => {
            checks.push(Check {
                name: "layout".into(),
                passed: true,
                detail: format!(
                    "all {} tensors back with their names and shapes",
                    2 * layout.num_layers
                ),
            });
            Some(reconstructed)
        }
        Err(error) => {
            checks.push(Check {
                name: "layout".into(),
                passed: false,
                detail: error.to_string(),
            });
            None
        }
    };
    let (measured_rmse, measured_cosine) = match &reconstructed {
        Some(reconstructed) => mean_rmse_and_cosine(&original, reconstructed)?,
        None => (f64::NAN, f64::NAN),
    };
    if reconstructed.is_some() {
        checks.push(Check {
            name: "rmse agrees".into(),
            passed: agrees(measured_rmse, metrics.figures.rmse),
            detail: format!(
                "measured {measured_rmse:.6}, kv-compress reported {:.6}",
                metrics.figures.rmse
            ),
        });
        checks.push(Check {
            name: "cosine agrees".into(),
            passed: agrees(measured_cosine, metrics.figures.cosine_similarity),
            detail: format!(
                "measured {measured_cosine:.6}, kv-compress reported {:.6}",
                metrics.figures.cosine_similarity
            ),
        });
    }
    checks.push(Check {
        name: "smaller".into(),
        passed: metrics.figures.compressed_size_bytes < metrics.figures.original_size_bytes,
        detail: format!(
            "{} -> {} bytes",
            metrics.figures.original_size_bytes, metrics.figures.compressed_size_bytes
        ),
    });
    let mut summary = MetricsSummary::default();
    summary.add(&metrics);
    Ok(QuickTestReport {
        passed: checks.iter().all(|check| check.passed),
        compressor: compressor.program().display().to_string(),
        compressor_flags: settings.label(),
        num_layers: layout.num_layers,
        num_kv_heads: layout.num_kv_heads,
        seq_len: layout.seq_len,
        head_dim: layout.head_dim,
        cache_dtype: layout.sidecar.dtype,
        compression: summary,
        // JSON has no NaN: a failed layout check reports zeros beside it.
        measured_rmse: if measured_rmse.is_finite() {
            measured_rmse
        } else {
            0.0
        },
        measured_cosine_similarity: if measured_cosine.is_finite() {
            measured_cosine
        } else {
            0.0
        },
        checks,
        wall_seconds: started.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_cache_is_deterministic_and_standard_normal() {
        let a = synthetic_cache(1, 2, 64, 64).unwrap();
        let b = synthetic_cache(1, 2, 64, 64).unwrap();
        let values = a.layers[0]
            .key
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(
            values,
            b.layers[0]
                .key
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        );
        let n = values.len() as f64;
        let mean = values.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
        let variance = values
            .iter()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / n;
        // 8192 samples: the standard error of the mean is ~0.011.
        assert!(mean.abs() < 0.05, "mean {mean}");
        assert!((variance - 1.0).abs() < 0.06, "variance {variance}");
    }

    #[test]
    fn rmse_and_cosine_match_a_hand_computed_case() {
        let tensor =
            |values: &[f32]| Tensor::from_vec(values.to_vec(), (1, 1, 1, 2), &Device::Cpu).unwrap();
        let original = KvCache {
            layers: vec![LayerKv {
                key: tensor(&[3.0, 4.0]),
                value: tensor(&[1.0, 0.0]),
            }],
        };
        let reconstructed = KvCache {
            layers: vec![LayerKv {
                key: tensor(&[3.0, 4.0]),
                value: tensor(&[0.0, 1.0]),
            }],
        };
        // key: rmse 0, cosine 1; value: rmse sqrt((1+1)/2) = 1, cosine 0.
        let (rmse, cosine) = mean_rmse_and_cosine(&original, &reconstructed).unwrap();
        assert!((rmse - 0.5).abs() < 1e-12);
        assert!((cosine - 0.5).abs() < 1e-12);
    }
}
