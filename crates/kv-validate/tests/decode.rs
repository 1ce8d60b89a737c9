//! `Llama::decode_step`, the passkey test's decoder, against the prefill:
//! on the tiny random model, a prefill of N tokens and a prefill of k tokens
//! followed by N − k decode steps give the same logits at every position,
//! and decoding on a changed prefix (as a reconstruction is) reads that
//! prefix exactly as a prefill on top of it does.
//!
//! Tolerance: both paths run the same kernels in f32 on the same weights;
//! they differ only in how query rows are blocked (one row per step against
//! blocks of rows), which changes summation order in the matmuls and moves
//! logits by ~1e-6 here. 1e-4 leaves two orders of margin, while a wrong
//! position (RoPE offset), a missed or doubled cache entry or a mask error
//! moves this model's logits by 0.1 or more (checked below: decoding one
//! position off differs by far more than the tolerance).

mod common;

use candle_core::{DType, Device, IndexOp, Tensor};
use kv_validate::model::load::{load_model, LoadedModel, ModelSource};
use kv_validate::model::{KvCache, LayerKv};

const TOLERANCE: f32 = 1e-4;

fn tiny() -> (tempfile::TempDir, LoadedModel) {
    let dir = tempfile::tempdir().unwrap();
    let files = common::tiny_model(dir.path());
    let loaded = load_model(
        &ModelSource::LocalDir(files.hf_dir.clone()),
        &Device::Cpu,
        DType::F32,
        false,
    )
    .expect("tiny model loads");
    (dir, loaded)
}

fn prose_tokens(loaded: &LoadedModel, n: usize) -> Vec<u32> {
    let text = std::fs::read_to_string(common::prose_path()).unwrap();
    let ids = loaded.tokenizer.encode(text, false).unwrap().get_ids()[..n].to_vec();
    assert_eq!(ids.len(), n);
    ids
}

fn input(ids: &[u32]) -> Tensor {
    Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    common::max_abs(&(a - b).unwrap())
}

/// Decodes `ids` one at a time after `cache`; each step's logits `[len, vocab]`.
fn decode_all(loaded: &LoadedModel, ids: &[u32], mut cache: KvCache) -> (Tensor, KvCache) {
    let mut rows = Vec::new();
    for &id in ids {
        let (logits, grown) = loaded.model.decode_step(id, &cache).unwrap();
        assert_eq!(grown.seq_len(), cache.seq_len() + 1);
        rows.push(logits);
        cache = grown;
    }
    (Tensor::stack(&rows, 0).unwrap(), cache)
}

#[test]
fn prefill_then_decode_steps_equal_one_prefill() {
    let (_dir, loaded) = tiny();
    let ids = prose_tokens(&loaded, 200);
    let (full, full_cache) = loaded.model.forward(&input(&ids), None).unwrap();
    let full = full.squeeze(0).unwrap();
    for k in [1, 64, 150, 199] {
        let (_, prefix) = loaded.model.forward(&input(&ids[..k]), None).unwrap();
        let (decoded, cache) = decode_all(&loaded, &ids[k..], prefix);
        let diff = max_diff(&decoded, &full.i(k..).unwrap());
        assert!(diff < TOLERANCE, "k = {k}: logits differ by {diff}");
        // The grown cache is the prefill's, position for position.
        for (grown, whole) in cache.layers.iter().zip(&full_cache.layers) {
            assert!(max_diff(&grown.key, &whole.key) < TOLERANCE);
            assert!(max_diff(&grown.value, &whole.value) < TOLERANCE);
        }
    }
    // From an empty cache, the first step is the prefill's first position.
    let (first, _) = loaded
        .model
        .decode_step(ids[0], &KvCache::default())
        .unwrap();
    assert!(max_diff(&first, &full.i(0).unwrap()) < TOLERANCE);
}

#[test]
fn decoding_reads_the_prefix_it_is_given() {
    let (_dir, loaded) = tiny();
    let ids = prose_tokens(&loaded, 96);
    let k = 80;
    let (_, prefix) = loaded.model.forward(&input(&ids[..k]), None).unwrap();
    // A "reconstruction": every value scaled, every key shifted.
    let changed = KvCache {
        layers: prefix
            .layers
            .iter()
            .map(|layer| LayerKv {
                key: (&layer.key + 0.05).unwrap(),
                value: (&layer.value * 0.9).unwrap(),
            })
            .collect(),
    };
    let (on_changed, _) = loaded
        .model
        .forward(&input(&ids[k..]), Some(&changed))
        .unwrap();
    let (decoded, _) = decode_all(&loaded, &ids[k..], changed);
    let diff = max_diff(&decoded, &on_changed.squeeze(0).unwrap());
    assert!(
        diff < TOLERANCE,
        "logits on a changed prefix differ by {diff}"
    );
    let (on_original, _) = loaded
        .model
        .forward(&input(&ids[k..]), Some(&prefix))
        .unwrap();
    let moved = max_diff(&decoded, &on_original.squeeze(0).unwrap());
    assert!(
        moved > 100.0 * TOLERANCE,
        "the change moved logits by {moved} only"
    );

    // A step decoded one position late (a token missing from the cache) is
    // far outside the tolerance: the test can tell.
    let (_, short) = loaded.model.forward(&input(&ids[..k - 1]), None).unwrap();
    let (late, _) = loaded.model.decode_step(ids[k], &short).unwrap();
    let (right, _) = loaded.model.decode_step(ids[k], &prefix).unwrap();
    assert!(max_diff(&late, &right) > 100.0 * TOLERANCE);
}
