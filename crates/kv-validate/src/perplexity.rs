//! Which tokens are context and which are scored (window plans), and the
//! negative log-likelihood bookkeeping that turns scores into perplexity.
//!
//! Two plans exist. The original's sliding window (Hugging Face's perplexity
//! recipe): windows of `max_len` tokens start every `stride` tokens, and the
//! tokens an earlier window already scored are context only (label -100).
//! And issue 5's protocol: back-to-back windows of `context + targets`
//! tokens, the cache of the first `context` is compressed and the last
//! `targets` are scored on it, which is what the reference numbers used.
//!
//! Either way a window is `[begin, context_end)` context (prefilled, and the
//! cache that gets compressed) followed by `[context_end, end)` targets.

use candle_core::{DType, Device, Tensor, D};

/// The original capped the model's context at this many tokens.
pub const MAX_SLIDING_CONTEXT: usize = 2048;
/// The original's stride between sliding windows.
pub const SLIDING_STRIDE: usize = 512;

/// One window of the token stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub begin: usize,
    /// First target token; `[begin, context_end)` is context only.
    pub context_end: usize,
    pub end: usize,
}

impl Window {
    pub fn context_len(&self) -> usize {
        self.context_end - self.begin
    }

    pub fn target_len(&self) -> usize {
        self.end - self.context_end
    }

    /// Targets that get a score. With no context the first target has no
    /// preceding token to be predicted from (the labels are shifted by one),
    /// so, as in the original, it is not scored.
    pub fn scored_len(&self) -> usize {
        self.target_len() - usize::from(self.context_len() == 0)
    }
}

/// How the token stream is cut into windows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// The original's sliding window.
    Sliding { max_len: usize, stride: usize },
    /// Issue 5: back-to-back windows, `context` tokens compressed, `targets` scored.
    ContextTargets { context: usize, targets: usize },
}

impl Protocol {
    /// The original's sliding window for a model: its context capped at
    /// [`MAX_SLIDING_CONTEXT`], stride [`SLIDING_STRIDE`]. A model whose
    /// context is under twice the stride (the tiny test models) gets half its
    /// context as stride, so windows still overlap and carry context.
    pub fn sliding_for_model(max_position_embeddings: usize) -> Self {
        let max_len = max_position_embeddings.min(MAX_SLIDING_CONTEXT);
        Protocol::Sliding {
            max_len,
            stride: SLIDING_STRIDE.min(max_len / 2).max(1),
        }
    }

    /// How reports name it: `sliding window of 2048 tokens, stride 512`.
    pub fn describe(&self) -> String {
        match *self {
            Protocol::Sliding { max_len, stride } => {
                format!("sliding window of {max_len} tokens, stride {stride}")
            }
            Protocol::ContextTargets { context, targets } => {
                format!("back-to-back windows of {context} context + {targets} scored tokens")
            }
        }
    }

    /// Tokens of one full window.
    pub fn window_len(&self) -> usize {
        match *self {
            Protocol::Sliding { max_len, .. } => max_len,
            Protocol::ContextTargets { context, targets } => context + targets,
        }
    }
}

/// A window plan that cannot be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error(
        "the text has {tokens} tokens; it needs at least {needed} (one window of {window} tokens \
         plus one more, so a second window has a cache to compress): use a longer text"
    )]
    TextTooShortForSliding {
        tokens: usize,
        needed: usize,
        window: usize,
    },
    #[error(
        "the text has {tokens} tokens, shorter than one window of {window} \
         (--context + --targets): use a longer text or a smaller window"
    )]
    TextTooShort { tokens: usize, window: usize },
    #[error("{what} must be at least 1")]
    Zero { what: &'static str },
    #[error(
        "the stride ({stride}) is larger than the window ({max_len}); tokens would be skipped"
    )]
    StrideLargerThanWindow { stride: usize, max_len: usize },
    #[error("--max-windows must be at least 1")]
    NoWindows,
}

/// Cuts `tokens` tokens into windows; `max_windows` keeps only the first ones.
pub fn plan_windows(
    tokens: usize,
    protocol: Protocol,
    max_windows: Option<usize>,
) -> Result<Vec<Window>, PlanError> {
    if max_windows == Some(0) {
        return Err(PlanError::NoWindows);
    }
    let limit = max_windows.unwrap_or(usize::MAX);
    let mut windows = Vec::new();
    match protocol {
        Protocol::Sliding { max_len, stride } => {
            if max_len == 0 {
                return Err(PlanError::Zero {
                    what: "the window length",
                });
            }
            if stride == 0 {
                return Err(PlanError::Zero { what: "the stride" });
            }
            if stride > max_len {
                return Err(PlanError::StrideLargerThanWindow { stride, max_len });
            }
            if tokens <= max_len {
                return Err(PlanError::TextTooShortForSliding {
                    tokens,
                    needed: max_len + 1,
                    window: max_len,
                });
            }
            let mut previous_end = 0;
            let mut begin = 0;
            while windows.len() < limit {
                let end = (begin + max_len).min(tokens);
                windows.push(Window {
                    begin,
                    context_end: previous_end.max(begin),
                    end,
                });
                previous_end = end;
                if end == tokens {
                    break;
                }
                begin += stride;
            }
        }
        Protocol::ContextTargets { context, targets } => {
            if context == 0 {
                return Err(PlanError::Zero { what: "--context" });
            }
            if targets == 0 {
                return Err(PlanError::Zero { what: "--targets" });
            }
            let window = context + targets;
            if tokens < window {
                return Err(PlanError::TextTooShort { tokens, window });
            }
            windows.extend((0..tokens / window).take(limit).map(|k| Window {
                begin: k * window,
                context_end: k * window + context,
                end: (k + 1) * window,
            }));
        }
    }
    Ok(windows)
}

/// Log-probabilities of `logits` (`[n, vocab]`, any float dtype, any device)
/// in f64: the one softmax behind every NLL, KL divergence and top-1 token
/// this crate reports, so f32 rounding of a near-1 probability never shows
/// up as a spurious divergence.
pub fn log_probs(logits: &Tensor) -> candle_core::Result<Tensor> {
    candle_nn::ops::log_softmax(&logits.to_dtype(DType::F64)?, D::Minus1)
}

/// `-log_probs[i, targets[i]]` for each row, from `[n, vocab]` log-probabilities
/// and the `[n, 1]` u32 targets on the same device.
pub fn picked_nlls(log_probs: &Tensor, targets: &Tensor) -> candle_core::Result<Vec<f64>> {
    log_probs
        .gather(targets, 1)?
        .squeeze(1)?
        .neg()?
        .to_vec1::<f64>()
}

/// `targets` as the `[n, 1]` index tensor [`picked_nlls`] takes.
pub fn target_index(targets: &[u32], device: &Device) -> candle_core::Result<Tensor> {
    Tensor::new(targets, device)?.unsqueeze(1)
}

/// Rows of logits [`token_nlls`] turns into f64 log-probabilities at once:
/// a context-free sliding window scores 2047 targets, and a 128k vocabulary
/// would otherwise make gigabytes of f64 temporaries.
const NLL_ROWS_AT_ONCE: usize = 256;

/// Negative log-likelihood of each `targets[i]` under `logits[i]`, in nats.
/// `logits` is `[n, vocab]` (any float dtype); the softmax runs in f64, a
/// block of rows at a time (rows are independent: same values).
pub fn token_nlls(logits: &Tensor, targets: &[u32]) -> candle_core::Result<Vec<f64>> {
    let mut nlls = Vec::with_capacity(targets.len());
    for start in (0..targets.len()).step_by(NLL_ROWS_AT_ONCE) {
        let rows = NLL_ROWS_AT_ONCE.min(targets.len() - start);
        nlls.extend(picked_nlls(
            &log_probs(&logits.narrow(0, start, rows)?)?,
            &target_index(&targets[start..start + rows], logits.device())?,
        )?);
    }
    Ok(nlls)
}

/// Running NLL totals over windows, for both averages the project reports.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NllTotals {
    /// Sum of every scored token's NLL (nats).
    pub nll_sum: f64,
    pub tokens: usize,
    /// Sum over windows of each window's mean NLL (the original's average).
    pub window_mean_sum: f64,
    pub windows: usize,
}

impl NllTotals {
    /// Adds one window's scored tokens. A window with no scored tokens adds nothing.
    pub fn add_window(&mut self, nlls: &[f64]) {
        if nlls.is_empty() {
            return;
        }
        let sum: f64 = nlls.iter().sum();
        self.nll_sum += sum;
        self.tokens += nlls.len();
        self.window_mean_sum += sum / nlls.len() as f64;
        self.windows += 1;
    }

    /// Token-weighted mean NLL: every scored token counts once (the correct estimate).
    pub fn mean_nll(&self) -> f64 {
        self.nll_sum / self.tokens as f64
    }

    /// exp of the token-weighted mean NLL: the perplexity this project reports.
    pub fn perplexity(&self) -> f64 {
        self.mean_nll().exp()
    }

    /// exp of the mean of per-window mean NLLs: what the original printed.
    /// It over-weights short windows (the last one, usually).
    pub fn per_window_perplexity(&self) -> f64 {
        (self.window_mean_sum / self.windows as f64).exp()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(begin: usize, context_end: usize, end: usize) -> Window {
        Window {
            begin,
            context_end,
            end,
        }
    }

    #[test]
    fn sliding_plan_matches_the_hugging_face_recipe() {
        // max_len 8, stride 4, 17 tokens: begins 0, 4, 8, 12 (end 17 stops it).
        // trg_len = end - prev_end: 8, 4, 4, 1.
        let plan = plan_windows(
            17,
            Protocol::Sliding {
                max_len: 8,
                stride: 4,
            },
            None,
        )
        .unwrap();
        assert_eq!(
            plan,
            vec![
                window(0, 0, 8),
                window(4, 8, 12),
                window(8, 12, 16),
                window(12, 16, 17)
            ]
        );
        let targets: Vec<usize> = plan.iter().map(Window::target_len).collect();
        assert_eq!(targets, [8, 4, 4, 1]);
        // Token 0 is never predicted; every other token exactly once.
        let scored: usize = plan.iter().map(Window::scored_len).sum();
        assert_eq!(scored, 16);
    }

    #[test]
    fn sliding_plan_stops_at_the_window_that_reaches_the_end() {
        // 12 tokens, max_len 8, stride 4: [0,8) then [4,12) reaches the end.
        let plan = plan_windows(
            12,
            Protocol::Sliding {
                max_len: 8,
                stride: 4,
            },
            None,
        )
        .unwrap();
        assert_eq!(plan, vec![window(0, 0, 8), window(4, 8, 12)]);
    }

    #[test]
    fn max_windows_keeps_the_first_windows() {
        let plan = plan_windows(
            17,
            Protocol::Sliding {
                max_len: 8,
                stride: 4,
            },
            Some(2),
        )
        .unwrap();
        assert_eq!(plan, vec![window(0, 0, 8), window(4, 8, 12)]);
        let plan = plan_windows(
            100,
            Protocol::ContextTargets {
                context: 3,
                targets: 2,
            },
            Some(3),
        )
        .unwrap();
        assert_eq!(
            plan,
            vec![window(0, 3, 5), window(5, 8, 10), window(10, 13, 15)]
        );
    }

    #[test]
    fn context_targets_plan_is_back_to_back_and_drops_the_tail() {
        // 384 + 128 = 512; 1100 tokens hold two whole windows.
        let plan = plan_windows(
            1100,
            Protocol::ContextTargets {
                context: 384,
                targets: 128,
            },
            None,
        )
        .unwrap();
        assert_eq!(plan, vec![window(0, 384, 512), window(512, 896, 1024)]);
        assert!(plan.iter().all(|w| w.scored_len() == 128));
    }

    #[test]
    fn short_texts_and_bad_parameters_are_errors() {
        assert_eq!(
            plan_windows(
                8,
                Protocol::Sliding {
                    max_len: 8,
                    stride: 4
                },
                None
            ),
            Err(PlanError::TextTooShortForSliding {
                tokens: 8,
                needed: 9,
                window: 8
            })
        );
        assert_eq!(
            plan_windows(
                4,
                Protocol::ContextTargets {
                    context: 3,
                    targets: 2
                },
                None
            ),
            Err(PlanError::TextTooShort {
                tokens: 4,
                window: 5
            })
        );
        assert_eq!(
            plan_windows(
                40,
                Protocol::Sliding {
                    max_len: 4,
                    stride: 5
                },
                None
            ),
            Err(PlanError::StrideLargerThanWindow {
                stride: 5,
                max_len: 4
            })
        );
        assert_eq!(
            plan_windows(
                40,
                Protocol::ContextTargets {
                    context: 0,
                    targets: 2
                },
                None
            ),
            Err(PlanError::Zero { what: "--context" })
        );
        assert_eq!(
            plan_windows(
                40,
                Protocol::ContextTargets {
                    context: 3,
                    targets: 2
                },
                Some(0)
            ),
            Err(PlanError::NoWindows)
        );
    }

    #[test]
    fn sliding_for_model_caps_context_and_keeps_windows_overlapping() {
        assert_eq!(
            Protocol::sliding_for_model(2048),
            Protocol::Sliding {
                max_len: 2048,
                stride: 512
            }
        );
        assert_eq!(
            Protocol::sliding_for_model(8192),
            Protocol::Sliding {
                max_len: 2048,
                stride: 512
            }
        );
        assert_eq!(
            Protocol::sliding_for_model(64),
            Protocol::Sliding {
                max_len: 64,
                stride: 32
            }
        );
    }

    #[test]
    fn token_nlls_match_hand_computed_softmax() {
        // Row 0: logits [0, ln 3] -> p = [1/4, 3/4]; target 1 -> -ln(3/4).
        // Row 1: logits [0, 0] -> p = [1/2, 1/2]; target 0 -> ln 2.
        let logits = Tensor::new(&[[0f32, 3f32.ln()], [0.0, 0.0]], &Device::Cpu).unwrap();
        let nlls = token_nlls(&logits, &[1, 0]).unwrap();
        assert!((nlls[0] - (4.0f64 / 3.0).ln()).abs() < 1e-7, "{nlls:?}");
        assert!((nlls[1] - 2f64.ln()).abs() < 1e-12, "{nlls:?}");
    }

    #[test]
    fn token_nlls_over_several_blocks_of_rows_match_a_hand_written_log_softmax() {
        let (rows, vocab) = (2 * NLL_ROWS_AT_ONCE + 37, 7);
        let values: Vec<f32> = (0..rows * vocab)
            .map(|i| ((i * 7919 % 1013) as f32 / 101.3) - 5.0)
            .collect();
        let targets: Vec<u32> = (0..rows).map(|r| (r * 3 % vocab) as u32).collect();
        let logits = Tensor::from_slice(&values, (rows, vocab), &Device::Cpu).unwrap();
        let nlls = token_nlls(&logits, &targets).unwrap();
        assert_eq!(nlls.len(), rows);
        for (row, (&nll, &target)) in nlls.iter().zip(&targets).enumerate() {
            let row_values = &values[row * vocab..(row + 1) * vocab];
            let max = row_values
                .iter()
                .fold(f64::NEG_INFINITY, |m, &x| m.max(f64::from(x)));
            let log_sum = max
                + row_values
                    .iter()
                    .map(|&x| (f64::from(x) - max).exp())
                    .sum::<f64>()
                    .ln();
            let expected = log_sum - f64::from(row_values[target as usize]);
            assert!(
                (nll - expected).abs() < 1e-12,
                "row {row}: {nll} vs {expected}"
            );
        }
    }

    #[test]
    fn token_weighted_and_per_window_means_differ_as_computed_by_hand() {
        let mut totals = NllTotals::default();
        totals.add_window(&[1.0, 1.0, 1.0]); // mean 1
        totals.add_window(&[4.0]); // mean 4
        totals.add_window(&[]); // ignored
        assert_eq!(totals.tokens, 4);
        assert_eq!(totals.windows, 2);
        // Token-weighted: (1+1+1+4)/4 = 1.75. Per-window: (1+4)/2 = 2.5.
        assert!((totals.mean_nll() - 1.75).abs() < 1e-12);
        assert!((totals.perplexity() - 1.75f64.exp()).abs() < 1e-9);
        assert!((totals.per_window_perplexity() - 2.5f64.exp()).abs() < 1e-9);
    }
}
