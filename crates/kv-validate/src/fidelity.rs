//! How far a compressed cache moves the model's output distribution, token by
//! token, against the baseline (llama.cpp's `llama-perplexity
//! --kl-divergence` figures): KL(baseline ‖ compressed) over the vocabulary,
//! whether the top-1 token is the same, and Δp, the change in the correct
//! token's probability. Then the statistics the reports print: mean ±
//! standard error, percentiles, and the standard error of the perplexity
//! delta from the paired per-token NLL differences.
//!
//! The per-row math runs on the model's device in f64 (from
//! [`crate::perplexity::log_probs`]); only one number per row comes back.

use candle_core::{Tensor, D};
use serde::Serialize;

use crate::perplexity::{log_probs, picked_nlls, target_index};

/// The baseline's rows of one window, kept on the model's device while each
/// variant's rows for the same targets are compared with them: the baseline
/// is scored once per window, not once per variant. Only the f64
/// log-probabilities are held (`[targets, vocab]`); probabilities are
/// recomputed per variant rather than held twice.
pub struct BaselineRows {
    log_probs: Tensor,
    top1: Tensor,
    targets: Tensor,
    /// The baseline's NLL of each row's target (nats).
    pub nll: Vec<f64>,
}

/// One variant's rows against the baseline's (host side, one value per row).
#[derive(Clone, Debug, PartialEq)]
pub struct RowComparison {
    pub nll: Vec<f64>,
    /// KL(baseline ‖ variant) in nats.
    pub kld: Vec<f64>,
    pub top1_agrees: Vec<bool>,
}

impl BaselineRows {
    /// `logits`: `[n, vocab]` (any float dtype) predicting `targets` (n of them).
    pub fn new(logits: &Tensor, targets: &[u32]) -> candle_core::Result<Self> {
        let log_probs = log_probs(logits)?;
        let targets = target_index(targets, logits.device())?;
        Ok(BaselineRows {
            top1: log_probs.argmax(D::Minus1)?,
            nll: picked_nlls(&log_probs, &targets)?,
            log_probs,
            targets,
        })
    }

    /// A variant's `[n, vocab]` logits for the same rows, compared with the baseline's.
    pub fn compare(&self, logits: &Tensor) -> candle_core::Result<RowComparison> {
        let log_probs = log_probs(logits)?;
        let kld = (self.log_probs.exp()? * (&self.log_probs - &log_probs)?)?
            .sum(D::Minus1)?
            .to_vec1::<f64>()?;
        let top1_agrees = log_probs
            .argmax(D::Minus1)?
            .eq(&self.top1)?
            .to_vec1::<u8>()?
            .into_iter()
            .map(|same| same != 0)
            .collect();
        Ok(RowComparison {
            nll: picked_nlls(&log_probs, &self.targets)?,
            kld,
            top1_agrees,
        })
    }
}

/// Δp of a token from its two NLLs: p(compressed) − p(baseline).
pub fn delta_p(nll_baseline: f64, nll_compressed: f64) -> f64 {
    (-nll_compressed).exp() - (-nll_baseline).exp()
}

/// A sample mean and its standard error (sample standard deviation, n − 1
/// degrees of freedom, over √n; `None` below two values).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct MeanWithError {
    pub mean: f64,
    pub standard_error: Option<f64>,
    pub count: usize,
}

impl MeanWithError {
    /// Two passes (mean, then squared deviations) so tiny spreads around a
    /// large mean keep their digits.
    pub fn of(values: &[f64]) -> Self {
        let count = values.len();
        let mean = values.iter().sum::<f64>() / count as f64;
        let standard_error = (count >= 2).then(|| {
            let squares: f64 = values.iter().map(|v| (v - mean) * (v - mean)).sum();
            (squares / (count - 1) as f64 / count as f64).sqrt()
        });
        MeanWithError {
            mean,
            standard_error,
            count,
        }
    }
}

/// The `q`-quantile (0..=1) of ascending `sorted` values, interpolated
/// linearly between the two nearest ranks (numpy's default method).
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    let position = q * (sorted.len() - 1) as f64;
    let below = position.floor() as usize;
    let above = position.ceil() as usize;
    sorted[below] + (sorted[above] - sorted[below]) * (position - below as f64)
}

/// The perplexity delta's standard error from the paired per-token NLL
/// differences d = NLL_compressed − NLL_baseline. delta = PPL_c − PPL_b =
/// PPL_b·(exp(mean d) − 1) with the baseline's tokens fixed, whose
/// derivative in mean d is PPL_b·exp(mean d) = PPL_c; so by the delta method
/// SE(delta) ≈ PPL_c · SE(mean d). Pairing cancels the tokens' own spread of
/// difficulty, which dominates the unpaired error.
pub fn delta_standard_error(
    compressed_perplexity: f64,
    differences: &MeanWithError,
) -> Option<f64> {
    differences
        .standard_error
        .map(|se| compressed_perplexity * se)
}

/// A delta is within noise when it is under two standard errors.
pub fn within_noise(delta: f64, standard_error: Option<f64>) -> Option<bool> {
    standard_error.map(|se| delta.abs() < 2.0 * se)
}

/// KL divergence over a set of tokens, nats.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct KldFigures {
    pub mean: f64,
    pub standard_error: Option<f64>,
    pub median: f64,
    pub p99: f64,
    pub max: f64,
}

/// Δp of the correct token, in percentage points (100 · probability).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DeltaPFigures {
    pub mean_percent: f64,
    pub standard_error_percent: Option<f64>,
    pub rms_percent: f64,
    pub min_percent: f64,
    pub p1_percent: f64,
    pub p99_percent: f64,
    pub max_percent: f64,
}

/// The fidelity figures of one set of scored tokens.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TokenFigures {
    pub tokens: usize,
    pub kld: KldFigures,
    /// Share of tokens whose most likely next token is the baseline's.
    pub top1_agreement_percent: f64,
    /// Binomial: 100 · √(p(1 − p)/(n − 1)); `None` for one token.
    pub top1_standard_error_percent: Option<f64>,
    pub delta_p: DeltaPFigures,
}

impl TokenFigures {
    /// From per-token KLDs, top-1 agreement and Δp (same length); `None` for no token.
    pub fn of(kld: &[f64], top1_agrees: &[bool], delta_p: &[f64]) -> Option<Self> {
        if kld.is_empty() {
            return None;
        }
        let sorted = |values: &[f64]| {
            let mut sorted = values.to_vec();
            sorted.sort_by(f64::total_cmp);
            sorted
        };
        let kld_sorted = sorted(kld);
        let kld_mean = MeanWithError::of(kld);
        let agreements: Vec<f64> = top1_agrees
            .iter()
            .map(|&same| f64::from(u8::from(same)))
            .collect();
        let agreement = MeanWithError::of(&agreements);
        let percent: Vec<f64> = delta_p.iter().map(|dp| 100.0 * dp).collect();
        let dp_sorted = sorted(&percent);
        let dp_mean = MeanWithError::of(&percent);
        Some(TokenFigures {
            tokens: kld.len(),
            kld: KldFigures {
                mean: kld_mean.mean,
                standard_error: kld_mean.standard_error,
                median: quantile(&kld_sorted, 0.5),
                p99: quantile(&kld_sorted, 0.99),
                max: kld_sorted[kld_sorted.len() - 1],
            },
            top1_agreement_percent: 100.0 * agreement.mean,
            top1_standard_error_percent: agreement.standard_error.map(|se| 100.0 * se),
            delta_p: DeltaPFigures {
                mean_percent: dp_mean.mean,
                standard_error_percent: dp_mean.standard_error,
                rms_percent: (percent.iter().map(|p| p * p).sum::<f64>() / percent.len() as f64)
                    .sqrt(),
                min_percent: dp_sorted[0],
                p1_percent: quantile(&dp_sorted, 0.01),
                p99_percent: quantile(&dp_sorted, 0.99),
                max_percent: dp_sorted[dp_sorted.len() - 1],
            },
        })
    }
}

/// A variant's fidelity over the two token sets the reports distinguish.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FidelityFigures {
    /// Tokens scored on top of a compressed cache: the ones compression can
    /// change. `None` when no window had one.
    pub on_compressed_cache: Option<TokenFigures>,
    /// Every scored token; those predicted by the uncompressed prefill (the
    /// first target of a window, all of a window with no context) have KLD
    /// exactly 0, top-1 agreement and Δp 0 by construction.
    pub all_tokens: Option<TokenFigures>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn kld_top1_and_delta_p_match_a_hand_computed_case() {
        // Row 0: baseline [0, ln 3, -1e4] -> p = [1/4, 3/4, 0]; variant
        // [ln 2, 0, -1e4] -> q = [2/3, 1/3, 0]. KL(p‖q) = 1/4 ln(3/8) +
        // 3/4 ln(9/4); top-1 1 against 0. Row 1: the same [0, ln 4, 0] on
        // both sides -> KL exactly 0, top-1 agrees.
        let baseline = Tensor::new(
            &[[0f32, 3f32.ln(), -1e4], [0.0, 4f32.ln(), 0.0]],
            &Device::Cpu,
        )
        .unwrap();
        let variant = Tensor::new(
            &[[2f32.ln(), 0.0, -1e4], [0.0, 4f32.ln(), 0.0]],
            &Device::Cpu,
        )
        .unwrap();
        let rows = BaselineRows::new(&baseline, &[1, 0]).unwrap();
        let compared = rows.compare(&variant).unwrap();
        let kl0 = 0.25 * (0.25f64 / (2.0 / 3.0)).ln() + 0.75 * (0.75f64 / (1.0 / 3.0)).ln();
        assert!(
            (compared.kld[0] - kl0).abs() < 1e-7,
            "{compared:?} vs {kl0}"
        );
        assert_eq!(compared.kld[1], 0.0);
        assert_eq!(compared.top1_agrees, [false, true]);
        // NLLs: baseline -ln(3/4), -ln(1/6); variant -ln(1/3), -ln(1/6).
        assert!((rows.nll[0] - (4.0f64 / 3.0).ln()).abs() < 1e-7);
        assert!((compared.nll[0] - 3f64.ln()).abs() < 1e-7);
        assert!((rows.nll[1] - 6f64.ln()).abs() < 1e-7);
        // Δp of the correct token 1 in row 0: 1/3 − 3/4.
        let dp = delta_p(rows.nll[0], compared.nll[0]);
        assert!((dp - (1.0 / 3.0 - 0.75)).abs() < 1e-7, "{dp}");
        assert!(delta_p(rows.nll[1], compared.nll[1]).abs() < 1e-15);
    }

    /// KL(p‖q), NLL and argmax of one row by hand, in f64 loops.
    fn by_hand(baseline: &[f32], variant: &[f32], target: usize) -> (f64, f64, bool) {
        let log_softmax = |row: &[f32]| {
            let max = row
                .iter()
                .fold(f64::NEG_INFINITY, |m, &x| m.max(f64::from(x)));
            let sum: f64 = row.iter().map(|&x| (f64::from(x) - max).exp()).sum();
            row.iter()
                .map(|&x| f64::from(x) - max - sum.ln())
                .collect::<Vec<f64>>()
        };
        let (p, q) = (log_softmax(baseline), log_softmax(variant));
        let kld = p.iter().zip(&q).map(|(lp, lq)| lp.exp() * (lp - lq)).sum();
        let argmax = |row: &[f64]| {
            (0..row.len())
                .max_by(|&a, &b| row[a].total_cmp(&row[b]).then(b.cmp(&a)))
                .unwrap()
        };
        (kld, -q[target], argmax(&p) == argmax(&q))
    }

    #[test]
    fn random_rows_match_a_hand_written_reference_in_every_dtype() {
        let (rows, vocab) = (6, 301);
        let mut state = 12345u64;
        let mut random = || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
            ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 12.0
        };
        let baseline: Vec<f32> = (0..rows * vocab).map(|_| random()).collect();
        // A perturbed copy; row 0 identical, so its KLD is exactly 0.
        let variant: Vec<f32> = baseline
            .iter()
            .enumerate()
            .map(|(i, &x)| if i < vocab { x } else { x + 0.3 * random() })
            .collect();
        let targets: Vec<u32> = (0..rows as u32).map(|r| r * 37 % vocab as u32).collect();
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let tensor = |values: &[f32]| {
                Tensor::from_slice(values, (rows, vocab), &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap()
            };
            let (b, v) = (tensor(&baseline), tensor(&variant));
            // The reference sees the same values the dtype holds.
            let held = |t: &Tensor| -> Vec<Vec<f32>> {
                t.to_dtype(DType::F32).unwrap().to_vec2().unwrap()
            };
            let (b_held, v_held) = (held(&b), held(&v));
            let compared = BaselineRows::new(&b, &targets)
                .unwrap()
                .compare(&v)
                .unwrap();
            for row in 0..rows {
                let (kld, nll, agrees) = by_hand(&b_held[row], &v_held[row], targets[row] as usize);
                let tolerance = 1e-12 * kld.abs().max(1.0);
                assert!(
                    (compared.kld[row] - kld).abs() < tolerance,
                    "{dtype:?} row {row}"
                );
                assert!(
                    (compared.nll[row] - nll).abs() < 1e-12,
                    "{dtype:?} row {row}"
                );
                assert_eq!(compared.top1_agrees[row], agrees, "{dtype:?} row {row}");
            }
            assert_eq!(compared.kld[0], 0.0);
            assert!(
                compared.kld[1..].iter().all(|&k| k > 1e-4),
                "{:?}",
                compared.kld
            );
        }
    }

    #[test]
    fn quantiles_interpolate_like_numpy() {
        // np.quantile([1, 2, 3, 4, 10], [0, 0.5, 0.99, 1]) = [1, 3, 9.76, 10]
        let sorted = [1.0, 2.0, 3.0, 4.0, 10.0];
        assert_eq!(quantile(&sorted, 0.0), 1.0);
        assert_eq!(quantile(&sorted, 0.5), 3.0);
        assert!((quantile(&sorted, 0.99) - 9.76).abs() < 1e-12);
        assert_eq!(quantile(&sorted, 1.0), 10.0);
        assert_eq!(quantile(&[7.0], 0.99), 7.0);
    }

    #[test]
    fn token_figures_follow_from_hand_computed_values() {
        let figures = TokenFigures::of(
            &[0.0, 0.1, 0.2, 0.3],
            &[true, true, false, true],
            &[0.01, -0.02, 0.0, 0.03],
        )
        .unwrap();
        assert_eq!(figures.tokens, 4);
        assert!((figures.kld.mean - 0.15).abs() < 1e-15);
        // sd (n-1) of 0, .1, .2, .3 = sqrt(0.05/3); SE = sd / 2.
        let se = (0.05f64 / 3.0).sqrt() / 2.0;
        assert!((figures.kld.standard_error.unwrap() - se).abs() < 1e-15);
        assert!((figures.kld.median - 0.15).abs() < 1e-15);
        assert!((figures.kld.p99 - 0.297).abs() < 1e-12);
        assert_eq!(figures.kld.max, 0.3);
        assert_eq!(figures.top1_agreement_percent, 75.0);
        // sd of [1, 1, 0, 1] = 0.5, SE 0.25.
        assert!((figures.top1_standard_error_percent.unwrap() - 25.0).abs() < 1e-12);
        assert!((figures.delta_p.mean_percent - 0.5).abs() < 1e-12);
        assert!((figures.delta_p.rms_percent - (14f64 / 4.0).sqrt()).abs() < 1e-12);
        assert!((figures.delta_p.min_percent + 2.0).abs() < 1e-12);
        assert!((figures.delta_p.max_percent - 3.0).abs() < 1e-12);
        assert_eq!(TokenFigures::of(&[], &[], &[]), None);
    }

    #[test]
    fn a_delta_under_two_standard_errors_is_within_noise() {
        let d = MeanWithError::of(&[0.01, -0.01, 0.03, -0.03]);
        assert_eq!(d.mean, 0.0);
        let se = delta_standard_error(20.0, &d).unwrap();
        // sd = sqrt((2·1e-4 + 2·9e-4)/3), SE(mean) = sd/2, times PPL 20.
        let expected = 20.0 * (0.002f64 / 3.0).sqrt() / 2.0;
        assert!((se - expected).abs() < 1e-12, "{se} vs {expected}");
        assert_eq!(within_noise(1.9 * expected, Some(se)), Some(true));
        assert_eq!(within_noise(-2.1 * expected, Some(se)), Some(false));
        assert_eq!(within_noise(0.1, None), None);
        assert_eq!(MeanWithError::of(&[1.0]).standard_error, None);
    }
}
