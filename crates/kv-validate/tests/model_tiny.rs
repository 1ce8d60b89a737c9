//! Our Llama against candle-transformers' own implementations on a tiny
//! random model, plus the properties the validator relies on: incremental
//! decoding through an explicit cache equals one full pass, the cache has the
//! Hugging Face layout, and each query head reads its own KV head.
//!
//! Tolerance: every implementation here runs in f32 on the same weights and
//! differs only in summation order (matmul blocking, where 1/sqrt(d) is
//! applied, additive vs filled masks), which moves logits by ~1e-6 at this
//! size. 1e-4 leaves two orders of margin, while any real mistake (a wrong
//! RoPE pairing, mask, GQA mapping or norm) moves logits of this model by
//! 0.1 or more.

mod common;

use std::path::Path;

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::{llama as candle_llama, quantized_llama};
use kv_validate::model::load::{load_model, ModelSource};
use kv_validate::model::tiny::{TinyLlama, TinyModelFiles};
use kv_validate::model::{KvCache, Llama};

const TOLERANCE: f32 = 1e-4;
const PROMPT: &str = "The key and the value cache 42 is in the tape.";

fn write_tiny(tiny: &TinyLlama, dir: &Path) -> TinyModelFiles {
    tiny.write(dir).expect("tiny model files are written")
}

fn load(source: ModelSource) -> kv_validate::model::load::LoadedModel {
    load_model(&source, &Device::Cpu, DType::F32, false).expect("tiny model loads")
}

fn prompt_tokens(tokenizer: &tokenizers::Tokenizer) -> Vec<u32> {
    let ids = tokenizer
        .encode(PROMPT, false)
        .expect("prompt encodes")
        .get_ids()
        .to_vec();
    assert!(
        ids.len() >= 12,
        "prompt should be long enough to exercise the mask: {ids:?}"
    );
    ids
}

fn as_input(ids: &[u32]) -> Tensor {
    Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    common::max_abs(&(a - b).unwrap())
}

/// Standard deviation of all logits: the scale a difference is small against.
fn spread(logits: &Tensor) -> f32 {
    let values: Vec<f32> = logits.flatten_all().unwrap().to_vec1().unwrap();
    let mean = values.iter().sum::<f32>() / values.len() as f32;
    (values.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / values.len() as f32).sqrt()
}

/// Our logits at every position `[T, vocab]`.
fn our_logits(model: &Llama, ids: &[u32]) -> Tensor {
    let (logits, _) = model.forward(&as_input(ids), None).unwrap();
    logits.squeeze(0).unwrap()
}

/// Reference logits at the last position of each prefix `ids[..end]`, from a
/// model that only returns the last position's: `[ends.len(), vocab]`.
fn logits_per_prefix(
    ids: &[u32],
    ends: &[usize],
    mut last_logits: impl FnMut(&Tensor) -> Tensor,
) -> Tensor {
    let rows: Vec<Tensor> = ends
        .iter()
        .map(|&end| last_logits(&as_input(&ids[..end])).reshape(((),)).unwrap())
        .collect();
    Tensor::stack(&rows, 0).unwrap()
}

/// Every prefix end: compares all positions.
fn all_ends(ids: &[u32]) -> Vec<usize> {
    (1..=ids.len()).collect()
}

fn candle_llama_logits(hf_dir: &Path, ids: &[u32], ends: &[usize]) -> Tensor {
    let config_json = std::fs::read_to_string(hf_dir.join("config.json")).unwrap();
    let config: candle_llama::LlamaConfig = serde_json::from_str(&config_json).unwrap();
    let config = config.into_config(false);
    let weights = [hf_dir.join("model.safetensors")];
    // SAFETY: the fixture file is not modified while mapped.
    let vb =
        unsafe { VarBuilder::from_mmaped_safetensors(&weights, DType::F32, &Device::Cpu) }.unwrap();
    let model = candle_llama::Llama::load(vb, &config).unwrap();
    logits_per_prefix(ids, ends, |input| {
        let mut cache = candle_llama::Cache::new(false, DType::F32, &config, &Device::Cpu).unwrap();
        model.forward(input, 0, &mut cache).unwrap()
    })
}

fn quantized_llama_logits(gguf: &Path, ids: &[u32], ends: &[usize]) -> Tensor {
    let mut file = std::fs::File::open(gguf).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let mut model =
        quantized_llama::ModelWeights::from_gguf(content, &mut file, &Device::Cpu).unwrap();
    // index_pos 0 makes it drop its private cache on every call.
    logits_per_prefix(ids, ends, |input| model.forward(input, 0).unwrap())
}

fn assert_close(ours: &Tensor, reference: &Tensor, what: &str) {
    let diff = max_abs_diff(ours, reference);
    let scale = spread(reference);
    eprintln!("{what}: max |logit diff| {diff:.2e}, logit std {scale:.3}");
    assert!(
        scale > 0.5,
        "{what}: logits too flat ({scale}) for the comparison to mean anything"
    );
    assert!(
        diff < TOLERANCE,
        "{what}: max |logit diff| {diff} >= {TOLERANCE}"
    );
}

/// Runs `check` on the tiny model written with untied and with tied
/// embeddings (no `output.weight` in the GGUF then).
fn for_untied_and_tied(check: impl Fn(&TinyLlama, &TinyModelFiles, &str)) {
    for tie_word_embeddings in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let mut tiny = TinyLlama::default();
        tiny.config.tie_word_embeddings = tie_word_embeddings;
        let files = write_tiny(&tiny, dir.path());
        check(
            &tiny,
            &files,
            &format!("tie_word_embeddings={tie_word_embeddings}"),
        );
    }
}

#[test]
fn matches_candle_transformers_llama_on_safetensors() {
    for_untied_and_tied(|_, files, variant| {
        let loaded = load(ModelSource::LocalDir(files.hf_dir.clone()));
        let ids = prompt_tokens(&loaded.tokenizer);
        assert_close(
            &our_logits(&loaded.model, &ids),
            &candle_llama_logits(&files.hf_dir, &ids, &all_ends(&ids)),
            &format!("llama ({variant})"),
        );
    });
}

#[test]
fn matches_candle_transformers_quantized_llama_on_gguf() {
    for_untied_and_tied(|tiny, files, variant| {
        let loaded = load(ModelSource::Gguf(files.gguf.clone()));
        assert_eq!(
            loaded.description,
            "tiny-llama.gguf (GGUF, dequantized to f32)"
        );
        assert_eq!(
            loaded.model.config(),
            &tiny.config,
            "config from GGUF metadata"
        );
        let ids = prompt_tokens(&loaded.tokenizer);
        assert_close(
            &our_logits(&loaded.model, &ids),
            &quantized_llama_logits(&files.gguf, &ids, &all_ends(&ids)),
            &format!("quantized_llama ({variant})"),
        );
    });
}

/// The GGUF stores Q/K permuted for interleaved RoPE; after loading, the
/// cache must be the Hugging Face one, not a channel-shuffled variant.
#[test]
fn gguf_and_safetensors_give_the_same_logits_and_cache() {
    let dir = tempfile::tempdir().unwrap();
    let files = write_tiny(&TinyLlama::default(), dir.path());
    let from_hf = load(ModelSource::LocalDir(files.hf_dir));
    let from_gguf = load(ModelSource::Gguf(files.gguf));
    let ids = prompt_tokens(&from_hf.tokenizer);
    assert_eq!(
        ids,
        prompt_tokens(&from_gguf.tokenizer),
        "tokenizer.json and GGUF tokenizer agree"
    );
    let (hf_logits, hf_cache) = from_hf.model.forward(&as_input(&ids), None).unwrap();
    let (gguf_logits, gguf_cache) = from_gguf.model.forward(&as_input(&ids), None).unwrap();
    assert_eq!(
        max_abs_diff(&hf_logits, &gguf_logits),
        0.0,
        "F32 GGUF holds the same weights"
    );
    for (hf, gguf) in hf_cache.layers.iter().zip(&gguf_cache.layers) {
        assert_eq!(max_abs_diff(&hf.key, &gguf.key), 0.0);
        assert_eq!(max_abs_diff(&hf.value, &gguf.value), 0.0);
    }
}

#[test]
fn incremental_forward_with_past_equals_one_full_pass() {
    let dir = tempfile::tempdir().unwrap();
    let files = write_tiny(&TinyLlama::default(), dir.path());
    let loaded = load(ModelSource::LocalDir(files.hf_dir));
    let model = &loaded.model;
    let ids = prompt_tokens(&loaded.tokenizer);
    let (full_logits, full_cache) = model.forward(&as_input(&ids), None).unwrap();

    // A 5-token prefix, then the rest in chunks of 3, 1, and what remains.
    let mut past: Option<KvCache> = None;
    let mut chunks = Vec::new();
    let mut start = 0;
    for len in [5, 3, 1, ids.len() - 9] {
        let (logits, cache) = model
            .forward(&as_input(&ids[start..start + len]), past.as_ref())
            .unwrap();
        assert_eq!(cache.seq_len(), start + len);
        chunks.push(logits);
        past = Some(cache);
        start += len;
    }
    let incremental = Tensor::cat(&chunks, 1).unwrap();
    let diff = max_abs_diff(&incremental, &full_logits);
    assert!(
        diff < TOLERANCE,
        "incremental vs full logits differ by {diff}"
    );
    for (a, b) in past.unwrap().layers.iter().zip(&full_cache.layers) {
        assert!(max_abs_diff(&a.key, &b.key) < TOLERANCE);
        assert!(max_abs_diff(&a.value, &b.value) < TOLERANCE);
    }

    // forward_last: the last row of forward, from the same body.
    let (prefix_last, prefix_cache) = model.forward_last(&as_input(&ids[..5]), None).unwrap();
    let (rest_last, _) = model
        .forward_last(&as_input(&ids[5..]), Some(&prefix_cache))
        .unwrap();
    assert_eq!(prefix_last.dims(), [1, tiny_vocab()]);
    assert!(max_abs_diff(&prefix_last, &full_logits.i((.., 4, ..)).unwrap()) < TOLERANCE);
    assert!(max_abs_diff(&rest_last, &full_logits.i((.., ids.len() - 1, ..)).unwrap()) < TOLERANCE);
}

/// Longer than the model's attention query block (256), with a past, so the
/// blocked attention's key ranges and mask slices are exercised.
#[test]
fn long_sequences_match_across_attention_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let files = write_tiny(&TinyLlama::default(), dir.path());
    let model = load(ModelSource::LocalDir(files.hf_dir.clone())).model;
    let vocab = tiny_vocab() as u32;
    let ids: Vec<u32> = (0..600u32).map(|i| (i * 7919 + 13) % vocab).collect();
    let full = our_logits(&model, &ids);

    let ends = [1, 255, 256, 257, 513, 600];
    let rows: Vec<Tensor> = ends.iter().map(|&end| full.i(end - 1).unwrap()).collect();
    let reference = candle_llama_logits(&files.hf_dir, &ids, &ends);
    assert_close(
        &Tensor::stack(&rows, 0).unwrap(),
        &reference,
        "600 tokens vs llama",
    );

    let (_, past) = model.forward(&as_input(&ids[..100]), None).unwrap();
    let (rest, _) = model.forward(&as_input(&ids[100..]), Some(&past)).unwrap();
    let diff = max_abs_diff(
        &rest.squeeze(0).unwrap(),
        &full.narrow(0, 100, 500).unwrap(),
    );
    assert!(
        diff < TOLERANCE,
        "100 + 500 with past vs 600 at once: {diff}"
    );
}

fn tiny_vocab() -> usize {
    TinyLlama::default().config.vocab_size
}

#[test]
fn cache_has_the_hugging_face_layout() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = TinyLlama::default();
    let files = write_tiny(&tiny, dir.path());
    let loaded = load(ModelSource::LocalDir(files.hf_dir));
    let (logits, cache) = loaded
        .model
        .forward(&as_input(&[5, 6, 7, 8, 9, 10, 11]), None)
        .unwrap();
    assert_eq!(logits.dims(), [1, 7, tiny.config.vocab_size]);
    assert_eq!(logits.dtype(), DType::F32);
    assert_eq!(cache.layers.len(), 3);
    assert_eq!(cache.seq_len(), 7);
    for layer in &cache.layers {
        assert_eq!(
            layer.key.dims(),
            [1, 2, 7, 16],
            "[batch, kv_heads, seq, head_dim]"
        );
        assert_eq!(layer.value.dims(), [1, 2, 7, 16]);
        assert_eq!(layer.key.dtype(), DType::F32);
    }
}

/// With 4 query heads over 2 KV heads, heads 0-1 read KV head 0 and heads
/// 2-3 read KV head 1 (Hugging Face `repeat_kv`). Silence heads 2-3 in the
/// last layer's output projection: then changing KV head 1 in that layer's
/// past cache must not move the logits, and changing KV head 0 must. An
/// interleaved mapping (head h reads h % 2) fails both ways.
#[test]
fn query_heads_read_their_own_kv_group() {
    let tiny = TinyLlama::default();
    let config = &tiny.config;
    let last = config.num_hidden_layers - 1;
    let mut weights = tiny.weights().unwrap();
    let o_proj_name = format!("model.layers.{last}.self_attn.o_proj.weight");
    let o_proj = &weights[&o_proj_name];
    let head_dim = config.head_dim;
    let keep = o_proj.narrow(1, 0, 2 * head_dim).unwrap();
    let silenced =
        Tensor::zeros((config.hidden_size, 2 * head_dim), DType::F32, &Device::Cpu).unwrap();
    weights.insert(o_proj_name, Tensor::cat(&[&keep, &silenced], 1).unwrap());
    let model = Llama::load(
        VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu),
        config,
    )
    .unwrap();

    let (_, past) = model
        .forward(&as_input(&[10, 20, 30, 40, 50]), None)
        .unwrap();
    let next = as_input(&[60]);
    let (reference, _) = model.forward(&next, Some(&past)).unwrap();
    let logits_with_value_head_scaled = |kv_head: usize| {
        let mut changed = past.clone();
        let value = &changed.layers[last].value;
        let scale: Vec<f32> = (0..2)
            .map(|h| if h == kv_head { 3.0 } else { 1.0 })
            .collect();
        let scale = Tensor::from_vec(scale, (1, 2, 1, 1), &Device::Cpu).unwrap();
        changed.layers[last].value = value.broadcast_mul(&scale).unwrap();
        model.forward(&next, Some(&changed)).unwrap().0
    };
    let moved_by_head_0 = max_abs_diff(&logits_with_value_head_scaled(0), &reference);
    let moved_by_head_1 = max_abs_diff(&logits_with_value_head_scaled(1), &reference);
    assert!(
        moved_by_head_0 > 0.01,
        "KV head 0 feeds live query heads 0-1: moved {moved_by_head_0}"
    );
    assert!(
        moved_by_head_1 < 1e-6,
        "KV head 1 feeds only silenced heads 2-3: moved {moved_by_head_1}"
    );
}

#[test]
fn forward_rejects_a_past_that_does_not_fit_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let files = write_tiny(&TinyLlama::default(), dir.path());
    let model = load(ModelSource::LocalDir(files.hf_dir)).model;
    let (_, mut past) = model.forward(&as_input(&[1, 2, 3]), None).unwrap();
    past.layers[1].key = Tensor::zeros((1, 4, 3, 16), DType::F32, &Device::Cpu).unwrap();
    let err = model
        .forward(&as_input(&[4]), Some(&past))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("past cache layer 1 key has shape [1, 4, 3, 16], expected [1, 2, 3, 16]"),
        "{err}"
    );
    past.layers.pop();
    let err = model
        .forward(&as_input(&[4]), Some(&past))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("past cache has 2 layers, the model 3"),
        "{err}"
    );
}
