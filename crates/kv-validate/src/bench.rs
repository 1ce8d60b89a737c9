//! `--bench-forward`: forward-pass tokens/s at given context lengths, the
//! figure `cargo xtask bench` compares with PyTorch on the same model.

use std::time::Instant;

use candle_core::Tensor;
use serde::Serialize;

use crate::evaluate::{token_tensor, EvalError};
use crate::model::Llama;

/// Forward-pass speed at one context length.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ForwardSpeed {
    pub context: usize,
    /// Median over runs of a prefill's wall time: the cache and the last
    /// position's logits, what a window's context costs.
    pub seconds: f64,
    pub tokens_per_second: f64,
    /// The same with logits at every position (what scoring costs, and what
    /// a plain `model(tokens)` computes in PyTorch).
    pub all_logits_seconds: f64,
    pub all_logits_tokens_per_second: f64,
    pub runs: usize,
}

/// Times a forward pass of `context` tokens from an empty cache, with the
/// last position's logits and with all of them, `runs` times each per
/// length, after one untimed warm-up at the shortest. Token ids cycle
/// through the vocabulary: speed does not depend on which tokens they are.
pub fn bench_forward(
    model: &Llama,
    contexts: &[usize],
    runs: usize,
) -> Result<Vec<ForwardSpeed>, EvalError> {
    let vocab = model.config().vocab_size as u32;
    let tokens: Vec<u32> = (0..contexts.iter().copied().max().unwrap_or(0) as u32)
        .map(|i| (i * 7919 + 1) % vocab)
        .collect();
    if let Some(&shortest) = contexts.iter().min() {
        model.forward(&token_tensor(model, &tokens[..shortest])?, None)?;
    }
    let median_seconds = |tokens: &Tensor, all_logits: bool| -> Result<f64, EvalError> {
        let mut seconds = (0..runs.max(1))
            .map(|_| {
                let started = Instant::now();
                if all_logits {
                    model.forward(tokens, None)?;
                } else {
                    model.forward_last(tokens, None)?;
                }
                // A GPU runs the pass asynchronously: wait for it.
                model.device().synchronize()?;
                Ok(started.elapsed().as_secs_f64())
            })
            .collect::<Result<Vec<f64>, EvalError>>()?;
        seconds.sort_by(f64::total_cmp);
        Ok(seconds[seconds.len() / 2])
    };
    contexts
        .iter()
        .map(|&context| {
            let tokens = token_tensor(model, &tokens[..context])?;
            let seconds = median_seconds(&tokens, false)?;
            let all_logits_seconds = median_seconds(&tokens, true)?;
            Ok(ForwardSpeed {
                context,
                seconds,
                tokens_per_second: context as f64 / seconds,
                all_logits_seconds,
                all_logits_tokens_per_second: context as f64 / all_logits_seconds,
                runs: runs.max(1),
            })
        })
        .collect()
}

/// The benchmark as a text table, one row per context length.
pub fn render_table(model_description: &str, speeds: &[ForwardSpeed]) -> String {
    let mut table = format!(
        "{model_description}\n{:>8}  {:>10}  {:>10}  {:>12}\n",
        "context", "seconds", "tokens/s", "(all logits)"
    );
    for speed in speeds {
        table += &format!(
            "{:>8}  {:>10.3}  {:>10.1}  {:>12.1}\n",
            speed.context,
            speed.seconds,
            speed.tokens_per_second,
            speed.all_logits_tokens_per_second
        );
    }
    table
}
