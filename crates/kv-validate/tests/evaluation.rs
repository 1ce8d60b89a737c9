//! The evaluation and the cache files against independent references: a
//! one-pass forward with a hand-written log-softmax for the perplexity,
//! numpy-written safetensors for the file format, and ADR-002's own error
//! bound for the real compressor's reconstruction.

mod common;

use std::process::Command;

use candle_core::{DType, Device, IndexOp, Tensor};
use kv_validate::bridge::KvCompress;
use kv_validate::evaluate::{default_scratch_parent, evaluate, EvalOptions};
use kv_validate::kvio::{read_kv_cache, write_kv_cache};
use kv_validate::model::load::{load_model, LoadedModel, ModelSource};
use kv_validate::perplexity::{plan_windows, Protocol, Window};
use kv_validate::run_types::CompressSettings;
use kvformat::CacheDtype;

use common::*;

/// The tiny model loaded and the prose fixture tokenized, with the
/// temporary directory that holds the model files (and scripts) alive.
struct Fixture {
    dir: tempfile::TempDir,
    loaded: LoadedModel,
    tokens: Vec<u32>,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let files = tiny_model(dir.path());
    let loaded = load_model(
        &ModelSource::LocalDir(files.hf_dir),
        &Device::Cpu,
        DType::F32,
        false,
    )
    .unwrap();
    let text = std::fs::read_to_string(prose_path()).unwrap();
    let tokens = loaded
        .tokenizer
        .encode(text, true)
        .unwrap()
        .get_ids()
        .to_vec();
    Fixture {
        dir,
        loaded,
        tokens,
    }
}

fn options() -> EvalOptions {
    EvalOptions {
        cache_dtype: CacheDtype::F32,
        model_name: "tiny".into(),
        show_progress: false,
        scratch_parent: default_scratch_parent(),
        slice_start: None,
        pipeline_depth: kv_validate::evaluate::DEFAULT_PIPELINE_DEPTH,
    }
}

/// NLLs of a window's scored tokens from ONE forward pass over the whole
/// window (no cache split), with log-softmax done by hand in f64.
fn reference_nlls(loaded: &LoadedModel, tokens: &[u32], window: &Window) -> Vec<f64> {
    let input = Tensor::new(&tokens[window.begin..window.end], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let (logits, _) = loaded.model.forward(&input, None).unwrap();
    let logits: Vec<Vec<f32>> = logits.i(0).unwrap().to_vec2().unwrap();
    // Position p predicts token p + 1; the first scored token is context_end
    // (or begin + 1 when there is no context).
    let first = window.context_end.max(window.begin + 1);
    (first..window.end)
        .map(|target| {
            let row = &logits[target - 1 - window.begin];
            let max = row
                .iter()
                .fold(f64::NEG_INFINITY, |m, &x| m.max(f64::from(x)));
            let log_sum = max
                + row
                    .iter()
                    .map(|&x| (f64::from(x) - max).exp())
                    .sum::<f64>()
                    .ln();
            log_sum - f64::from(row[tokens[target] as usize])
        })
        .collect()
}

#[test]
fn baseline_perplexity_equals_a_one_pass_reference() {
    let Fixture {
        dir,
        loaded,
        tokens,
    } = fixture();
    let identity = KvCompress::at(identity_compressor(dir.path()));
    for protocol in [
        Protocol::ContextTargets {
            context: 40,
            targets: 24,
        },
        // Sliding: the first window has no context, later ones do.
        Protocol::Sliding {
            max_len: 64,
            stride: 32,
        },
    ] {
        let windows = plan_windows(tokens.len(), protocol, Some(3)).unwrap();
        let evaluation = evaluate(
            &loaded.model,
            &tokens,
            &windows,
            &identity,
            &[CompressSettings::default()],
            &options(),
        )
        .unwrap();

        let reference: Vec<Vec<f64>> = windows
            .iter()
            .map(|w| reference_nlls(&loaded, &tokens, w))
            .collect();
        let tokens_scored: usize = reference.iter().map(Vec::len).sum();
        let nll_sum: f64 = reference.iter().flatten().sum();
        let window_means: f64 = reference
            .iter()
            .map(|n| n.iter().sum::<f64>() / n.len() as f64)
            .sum();
        let baseline = &evaluation.baseline;
        assert_eq!(baseline.tokens, tokens_scored, "{protocol:?}");
        let reference_ppl = (nll_sum / tokens_scored as f64).exp();
        assert!(
            (baseline.perplexity() / reference_ppl - 1.0).abs() < 1e-4,
            "{protocol:?}: {} vs {reference_ppl}",
            baseline.perplexity()
        );
        let reference_per_window = (window_means / windows.len() as f64).exp();
        assert!((baseline.per_window_perplexity() / reference_per_window - 1.0).abs() < 1e-4);
        // The compressed-windows-only totals leave out the context-free window.
        let with_cache: Vec<f64> = windows
            .iter()
            .zip(&reference)
            .filter(|(window, _)| window.context_len() > 0 && window.target_len() > 1)
            .flat_map(|(_, nlls)| nlls.iter().copied())
            .collect();
        let only = &evaluation.baseline_compressed_windows;
        assert_eq!(only.tokens, with_cache.len(), "{protocol:?}");
        let reference_only = (with_cache.iter().sum::<f64>() / with_cache.len() as f64).exp();
        assert!((only.perplexity() / reference_only - 1.0).abs() < 1e-4);
        // The identity reconstruction scores bit-identically.
        assert_eq!(
            evaluation.variants[0].nll, evaluation.baseline,
            "{protocol:?}"
        );
        assert_eq!(
            evaluation.variants[0].nll_compressed_windows, *only,
            "{protocol:?}"
        );
    }
}

/// With a half-precision cache file the baseline scores the same rounded
/// cache the compressor gets: a lossless compressor then has a delta of
/// exactly 0, so the rounding is not charged to compression.
#[test]
fn a_lossless_compressor_costs_nothing_whatever_the_cache_dtype() {
    let Fixture {
        dir,
        loaded,
        tokens,
    } = fixture();
    let identity = KvCompress::at(identity_compressor(dir.path()));
    let protocol = Protocol::ContextTargets {
        context: 40,
        targets: 24,
    };
    let windows = plan_windows(tokens.len(), protocol, Some(2)).unwrap();
    let mut baselines = Vec::new();
    for cache_dtype in [CacheDtype::F32, CacheDtype::F16, CacheDtype::BF16] {
        let evaluation = evaluate(
            &loaded.model,
            &tokens,
            &windows,
            &identity,
            &[CompressSettings::default()],
            &EvalOptions {
                cache_dtype,
                ..options()
            },
        )
        .unwrap();
        assert_eq!(
            evaluation.variants[0].nll, evaluation.baseline,
            "{cache_dtype:?}"
        );
        baselines.push(evaluation.baseline.perplexity());
    }
    // The rounding itself is visible in the baseline (BF16 keeps 8 bits).
    assert_ne!(baselines[0], baselines[2]);
}

/// The same model in f16 and bf16 on the CPU (the candle-op path a GPU
/// takes too): the cache goes to the compressor in the model's own dtype, so
/// a lossless compressor still costs exactly nothing, and the perplexity
/// stays near f32's. Tolerances: each matmul, norm and softmax output is
/// rounded to the dtype (relative 2^-11 for f16, 2^-8 for bf16); over the tiny
/// model's few layers and a per-token mean that compounds to well under the
/// bounds below, which still catch a wrong mask, RoPE or cache dtype (those
/// move a random model's perplexity by tens of percent).
#[test]
fn half_precision_models_score_their_own_cache_exactly_and_stay_near_f32() {
    let Fixture {
        dir,
        loaded,
        tokens,
    } = fixture();
    let identity = KvCompress::at(identity_compressor(dir.path()));
    let windows = plan_windows(
        tokens.len(),
        Protocol::ContextTargets {
            context: 40,
            targets: 24,
        },
        Some(3),
    )
    .unwrap();
    let run = |model: &kv_validate::model::Llama, cache_dtype| {
        evaluate(
            model,
            &tokens,
            &windows,
            &identity,
            &[CompressSettings::default()],
            &EvalOptions {
                cache_dtype,
                ..options()
            },
        )
        .unwrap()
    };
    let f32_perplexity = run(&loaded.model, CacheDtype::F32).baseline.perplexity();
    let files = tiny_model(dir.path());
    for (dtype, cache_dtype, bound) in [
        (DType::F16, CacheDtype::F16, 0.002),
        (DType::BF16, CacheDtype::BF16, 0.01),
    ] {
        let half = load_model(
            &ModelSource::LocalDir(files.hf_dir.clone()),
            &Device::Cpu,
            dtype,
            false,
        )
        .unwrap();
        assert_eq!(half.model.dtype(), dtype);
        let evaluation = run(&half.model, cache_dtype);
        assert_eq!(evaluation.variants[0].nll, evaluation.baseline, "{dtype:?}");
        let relative = (evaluation.baseline.perplexity() / f32_perplexity - 1.0).abs();
        eprintln!(
            "{dtype:?}: perplexity {} vs f32 {f32_perplexity}: {relative:.2e}",
            evaluation.baseline.perplexity()
        );
        assert!(relative < bound, "{dtype:?}: {relative} from f32");
    }
}

#[test]
fn one_prefill_serves_several_variants_in_order() {
    let Fixture {
        dir: _model_files,
        loaded,
        tokens,
    } = fixture();
    let windows = plan_windows(
        tokens.len(),
        Protocol::ContextTargets {
            context: 64,
            targets: 16,
        },
        Some(2),
    )
    .unwrap();
    let compressor = KvCompress::at(kv_compress());
    let variants = [
        CompressSettings {
            group_size: 32,
            ..CompressSettings::default()
        },
        CompressSettings {
            group_size: 128,
            ..CompressSettings::default()
        },
    ];
    let evaluation = evaluate(
        &loaded.model,
        &tokens,
        &windows,
        &compressor,
        &variants,
        &options(),
    )
    .unwrap();
    assert_eq!(evaluation.variants.len(), 2);
    assert_eq!(evaluation.windows_compressed, 2);
    let [fine, coarse] = [&evaluation.variants[0], &evaluation.variants[1]];
    assert_eq!(fine.settings.group_size, 32);
    assert_eq!((fine.metrics.windows, coarse.metrics.windows), (2, 2));
    // Smaller groups: more scales, so a lower ratio and a smaller error.
    assert!(fine.metrics.compression_ratio < coarse.metrics.compression_ratio);
    assert!(fine.metrics.figures.rmse < coarse.metrics.figures.rmse);
    assert_eq!(fine.nll.tokens, evaluation.baseline.tokens);
    assert_ne!(fine.nll, coarse.nll);
}

#[test]
fn the_real_compressor_reconstructs_within_adr_002_bounds() {
    let Fixture {
        dir,
        loaded,
        tokens,
    } = fixture();
    let input = Tensor::new(&tokens[..48], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let (_, cache) = loaded.model.forward_last(&input, None).unwrap();
    let path = dir.path().join("cache.safetensors");
    write_kv_cache(&path, &cache, CacheDtype::F32, "tiny").unwrap();

    let compressor = KvCompress::at(kv_compress());
    let packed = dir.path().join("cache.kvc.safetensors");
    let decoded = dir.path().join("cache.decoded.safetensors");
    let metrics = compressor
        .round_trip(&path, &packed, &decoded, &CompressSettings::default())
        .unwrap();
    let (restored, sidecar) = read_kv_cache(&decoded, &Device::Cpu).unwrap();
    assert_eq!(
        (sidecar.num_layers, sidecar.seq_len, sidecar.head_dim),
        (3, 48, 16)
    );

    let mut worst = 0f32;
    for (original, restored) in cache.layers.iter().zip(&restored.layers) {
        for (a, b) in [
            (&original.key, &restored.key),
            (&original.value, &restored.value),
        ] {
            let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            // Groups of 64 consecutive values, scale = max|x| / 7, error <= scale / 2
            // (plus slack for the f16 rounding of scale and input).
            for (group_a, group_b) in a.chunks(64).zip(b.chunks(64)) {
                let scale = group_a.iter().fold(0f32, |m, x| m.max(x.abs())) / 7.0;
                for (x, y) in group_a.iter().zip(group_b) {
                    assert!(
                        (x - y).abs() <= scale * 0.5 * 1.01 + 1e-3,
                        "{x} -> {y}, scale {scale}"
                    );
                    worst = worst.max((x - y).abs());
                }
            }
        }
    }
    assert!(worst > 0.0, "INT4 cannot be exact on model activations");
    assert!(
        (f64::from(worst) - metrics.figures.max_error).abs() < 1e-3,
        "{worst} vs {}",
        metrics.figures.max_error
    );
}

#[test]
fn caches_written_by_python_safetensors_load() {
    let dir = tempfile::tempdir().unwrap();
    // What save_kv_cache() writes: numpy tensors (padded header) + the sidecar.
    let script = r#"
import json, sys
import numpy as np
from safetensors.numpy import save_file
for dtype, name in [(np.float16, "float16"), (np.float32, "float32")]:
    tensors = {}
    for layer in range(2):
        for k, kind in enumerate(["key", "value"]):
            base = np.arange(1 * 3 * 5 * 8, dtype=np.float64).reshape(1, 3, 5, 8)
            tensors[f"layer_{layer}_{kind}"] = ((base - 60) * 0.125 + 10 * layer + k).astype(dtype)
    path = f"{sys.argv[1]}/py_{name}.safetensors"
    save_file(tensors, path)
    meta = {"num_layers": 2, "num_kv_heads": 3, "seq_len": 5, "head_dim": 8, "dtype": name, "model_name": "py"}
    with open(f"{sys.argv[1]}/py_{name}.metadata.json", "w") as f:
        json.dump(meta, f)
"#;
    let status = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(dir.path())
        .status()
        .expect("python3 runs");
    assert!(status.success());
    for dtype in ["float16", "float32"] {
        let (cache, sidecar) = read_kv_cache(
            &dir.path().join(format!("py_{dtype}.safetensors")),
            &Device::Cpu,
        )
        .unwrap();
        assert_eq!(sidecar.dtype, dtype);
        assert_eq!(cache.layers.len(), 2);
        for (layer, kv) in cache.layers.iter().enumerate() {
            for (k, tensor) in [&kv.key, &kv.value].into_iter().enumerate() {
                assert_eq!(tensor.dims(), [1, 3, 5, 8]);
                let values = tensor.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                // Multiples of 1/8 under 32 in magnitude: exact in f16 and f32.
                for (i, value) in values.iter().enumerate() {
                    let expected = (i as f32 - 60.0) * 0.125 + 10.0 * layer as f32 + k as f32;
                    assert_eq!(*value, expected, "{dtype} layer {layer} kind {k} index {i}");
                }
            }
        }
    }
}

#[test]
fn caches_we_write_load_in_python_like_load_kv_cache() {
    let dir = tempfile::tempdir().unwrap();
    let values: Vec<f32> = (0..2 * 4 * 8).map(|i| (i as f32 - 30.0) * 0.25).collect();
    let tensor = |offset: f32| {
        let shifted: Vec<f32> = values.iter().map(|v| v + offset).collect();
        Tensor::from_vec(shifted, (1, 2, 4, 8), &Device::Cpu).unwrap()
    };
    let cache = kv_validate::model::KvCache {
        layers: (0..3)
            .map(|layer| kv_validate::model::LayerKv {
                key: tensor(layer as f32),
                value: tensor(-(layer as f32)),
            })
            .collect(),
    };
    let path = dir.path().join("ours.safetensors");
    write_kv_cache(&path, &cache, CacheDtype::F16, "tiny").unwrap();
    // load_kv_cache(): the sidecar says the shape, safetensors holds the tensors.
    let script = r#"
import json, sys
import numpy as np
from safetensors.numpy import load_file
path = sys.argv[1]
meta = json.load(open(path.replace(".safetensors", ".metadata.json")))
assert meta == {"num_layers": 3, "num_kv_heads": 2, "seq_len": 4, "head_dim": 8, "dtype": "float16", "model_name": "tiny"}, meta
tensors = load_file(path)
assert sorted(tensors) == sorted(f"layer_{i}_{k}" for i in range(3) for k in ["key", "value"]), sorted(tensors)
base = (np.arange(64, dtype=np.float32) - 30) * 0.25
for i in range(3):
    for kind, sign in [("key", 1), ("value", -1)]:
        t = tensors[f"layer_{i}_{kind}"]
        assert t.dtype == np.float16 and t.shape == (1, 2, 4, 8), (t.dtype, t.shape)
        np.testing.assert_array_equal(t.astype(np.float32).ravel(), base + sign * i)
"#;
    let output = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(&path)
        .output()
        .expect("python3 runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn windows_without_targets_or_past_the_text_are_refused() {
    let Fixture {
        dir,
        loaded,
        tokens,
    } = fixture();
    let identity = KvCompress::at(identity_compressor(dir.path()));
    let bad = [
        Window {
            begin: 0,
            context_end: 5,
            end: 5,
        },
        Window {
            begin: 0,
            context_end: 5,
            end: tokens.len() + 1,
        },
        Window {
            begin: 6,
            context_end: 5,
            end: 9,
        },
    ];
    for window in bad {
        let result = evaluate(
            &loaded.model,
            &tokens,
            &[window],
            &identity,
            &[CompressSettings::default()],
            &options(),
        );
        assert!(
            matches!(
                result,
                Err(kv_validate::evaluate::EvalError::WindowOutOfRange { .. })
            ),
            "{window:?}"
        );
    }
}
