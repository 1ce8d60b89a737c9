//! `--passkey`: can the model still find a key in a long context after its
//! cache went through kv-compress? A random 5-digit key is hidden at a
//! depth of a filler haystack ("The pass key is 12345. Remember it. 12345
//! is the pass key."); the haystack is prefilled once, its cache goes
//! through kv-compress per method, then the question is fed on top of the
//! original (baseline) or the reconstructed cache and the answer decoded
//! greedily with [`Llama::decode_step`]. A trial is correct when the first
//! digits the model writes are the key.
//!
//! With a tokenizer that has `<|im_start|>` (an instruct model such as
//! SmolLM2-Instruct), the prompt is a ChatML user turn and the assistant's
//! turn starts with "The pass key is". The keys come from `--passkey-seed`;
//! the texts, keys and answers are all in the JSON, so a run repeats.

use std::path::Path;

use anyhow::{bail, Context};
use candle_core::{DType, Tensor, D};
use kvformat::codec::SplitMix64;
use kvformat::{CacheDtype, Report};
use serde::Serialize;
use tokenizers::Tokenizer;

use crate::bridge::KvCompress;
use crate::cleanup::ScratchDir;
use crate::evaluate::{reconstruct, rounded_to, token_tensor, EvalOptions};
use crate::model::load::LoadedModel;
use crate::model::{KvCache, Llama};
use crate::plan::PasskeyPlan;
use crate::run_types::Variant;

/// The default haystack: the project's own prose fixture, repeated.
pub const DEFAULT_HAYSTACK: &str = include_str!("../../../testdata/prose.txt");
pub const INSTRUCTION: &str = "There is a pass key hidden inside a lot of irrelevant text. \
     Find it and memorize it. I will quiz you about the pass key.\n\n";
/// `{KEY}` is replaced by the key.
pub const NEEDLE: &str = " The pass key is {KEY}. Remember it. {KEY} is the pass key. ";
pub const QUESTION: &str = "\n\nWhat is the pass key?";
pub const ANSWER_PREFIX: &str = "The pass key is";
/// Tokens decoded for an answer: enough for " 12345." however digits tokenize.
const ANSWER_TOKENS: usize = 10;
const BASELINE: &str = "baseline";

/// One (length, depth) cell of one method.
#[derive(Clone, Debug, Serialize)]
pub struct Cell {
    pub length: usize,
    pub depth: u8,
    pub correct: usize,
    pub trials: usize,
    pub accuracy_percent: f64,
}

/// One method's accuracies (the baseline is a method without flags).
#[derive(Clone, Debug, Serialize)]
pub struct MethodResult {
    pub label: String,
    pub flags: Option<String>,
    /// Mean over its round trips; `None` for the baseline.
    pub bits_per_value: Option<f64>,
    pub cells: Vec<Cell>,
    /// Correct trials where the baseline was correct, of those trials.
    pub correct_where_baseline_correct: usize,
}

/// One trial: what was asked and what each method answered.
#[derive(Clone, Debug, Serialize)]
pub struct Trial {
    pub length: usize,
    pub depth: u8,
    pub key: String,
    /// Token index where the needle starts.
    pub needle_token: usize,
    /// Tokens of the haystack whose cache went through kv-compress.
    pub haystack_tokens: usize,
    /// Per method, baseline first: the decoded answer and whether it is right.
    pub answers: Vec<String>,
    pub correct: Vec<bool>,
}

/// The texts a run's prompts were made of.
#[derive(Clone, Debug, Serialize)]
pub struct PromptTexts {
    pub chat_template: bool,
    pub instruction: String,
    pub needle: String,
    pub question: String,
    pub answer_prefix: String,
    /// `--haystack`'s path, or the prose fixture's name.
    pub haystack: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct PasskeyReport {
    pub model: String,
    pub device: String,
    pub cache_dtype: String,
    pub compressor: String,
    pub seed: u64,
    pub trials: usize,
    pub lengths: Vec<usize>,
    pub depths: Vec<u8>,
    pub prompt: PromptTexts,
    /// Baseline first.
    pub methods: Vec<MethodResult>,
    /// (length, depth) cells where the uncompressed model missed a key:
    /// compression there is scored against noise.
    pub baseline_misses: Vec<(usize, u8)>,
    pub trial_log: Vec<Trial>,
}

/// The prompt's pieces as token ids.
struct Pieces {
    prefix: Vec<u32>,
    filler: Vec<u32>,
    question: Vec<u32>,
    stop: Vec<u32>,
    chat: bool,
}

impl Pieces {
    fn new(tokenizer: &Tokenizer, haystack: &str) -> anyhow::Result<Self> {
        let chat = tokenizer.token_to_id("<|im_start|>").is_some();
        let encode = |text: &str, special: bool| -> anyhow::Result<Vec<u32>> {
            Ok(tokenizer
                .encode(text, special)
                .map_err(|e| anyhow::anyhow!("cannot tokenize the passkey prompt: {e}"))?
                .get_ids()
                .to_vec())
        };
        let (prefix, question) = if chat {
            (
                format!("<|im_start|>user\n{INSTRUCTION}"),
                format!("{QUESTION}<|im_end|>\n<|im_start|>assistant\n{ANSWER_PREFIX}"),
            )
        } else {
            (
                INSTRUCTION.to_string(),
                format!("{QUESTION} {ANSWER_PREFIX}"),
            )
        };
        let filler = encode(haystack, false)?;
        if filler.is_empty() {
            bail!("the passkey haystack has no tokens");
        }
        let stop = ["<|im_end|>", "<|endoftext|>", "</s>", "<eos>"]
            .iter()
            .filter_map(|t| tokenizer.token_to_id(t))
            .collect();
        Ok(Pieces {
            prefix: encode(&prefix, true)?,
            filler,
            question: encode(&question, false)?,
            stop,
            chat,
        })
    }

    /// The haystack (prefix, filler with the needle at `depth`%) of a
    /// trial of `length` tokens in all (haystack, question and the
    /// [`ANSWER_TOKENS`] an answer may take, so a length of the model's
    /// context fits it), and the needle's first token.
    fn haystack(
        &self,
        needle: &[u32],
        length: usize,
        depth: u8,
    ) -> anyhow::Result<(Vec<u32>, usize)> {
        let fixed = self.prefix.len() + needle.len() + self.question.len() + ANSWER_TOKENS;
        if length <= fixed {
            bail!(
                "--passkey-lengths {length}: the prompt's instruction, needle and question \
                 and the answer's {ANSWER_TOKENS} tokens alone take {fixed} tokens"
            );
        }
        let filler_len = length - fixed;
        let before = (filler_len * usize::from(depth) + 50) / 100;
        let filler =
            |range: std::ops::Range<usize>| range.map(|i| self.filler[i % self.filler.len()]);
        let mut tokens = self.prefix.clone();
        tokens.extend(filler(0..before));
        let needle_token = tokens.len();
        tokens.extend_from_slice(needle);
        tokens.extend(filler(before..filler_len));
        Ok((tokens, needle_token))
    }
}

/// A 5-digit key.
fn next_key(rng: &mut SplitMix64) -> String {
    (10_000 + rng.next_u64() % 90_000).to_string()
}

/// The first run of digits in `answer`, if any.
fn first_number(answer: &str) -> Option<&str> {
    let start = answer.find(|c: char| c.is_ascii_digit())?;
    let rest = &answer[start..];
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    Some(&rest[..end])
}

/// The question fed on top of `cache`, then up to [`ANSWER_TOKENS`]
/// greedy tokens decoded one step at a time; the answer's text.
fn answer(
    model: &Llama,
    tokenizer: &Tokenizer,
    cache: &KvCache,
    pieces: &Pieces,
) -> anyhow::Result<String> {
    let argmax = |logits: &Tensor| -> candle_core::Result<u32> {
        logits
            .to_dtype(DType::F32)?
            .argmax(D::Minus1)?
            .flatten_all()?
            .to_vec1::<u32>()
            .map(|v| v[0])
    };
    let (logits, mut cache) =
        model.forward_last(&token_tensor(model, &pieces.question)?, Some(cache))?;
    let mut next = argmax(&logits)?;
    let mut decoded = Vec::new();
    while decoded.len() < ANSWER_TOKENS && !pieces.stop.contains(&next) {
        decoded.push(next);
        if decoded.len() == ANSWER_TOKENS {
            break;
        }
        let (logits, grown) = model.decode_step(next, &cache)?;
        cache = grown;
        next = argmax(&logits)?;
    }
    tokenizer
        .decode(&decoded, true)
        .map_err(|e| anyhow::anyhow!("cannot decode the answer {decoded:?}: {e}"))
}

/// What the run needs besides the plan.
pub struct PasskeyRun<'a> {
    pub loaded: &'a LoadedModel,
    pub device: String,
    pub cache_dtype: CacheDtype,
    pub status: &'a dyn Fn(&str),
}

impl PasskeyRun<'_> {
    pub fn run(&self, plan: &PasskeyPlan) -> anyhow::Result<PasskeyReport> {
        let model = &self.loaded.model;
        let max = model.config().max_position_embeddings;
        if let Some(&too_long) = plan.lengths.iter().find(|&&l| l > max) {
            bail!(
                "--passkey-lengths {too_long} exceeds the model's maximum context of {max} tokens"
            );
        }
        let (haystack_text, haystack_name) = match &plan.haystack {
            Some(path) => (
                std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read --haystack {}", path.display()))?,
                path.display().to_string(),
            ),
            None => (
                DEFAULT_HAYSTACK.to_string(),
                "testdata/prose.txt (built in)".to_string(),
            ),
        };
        let pieces = Pieces::new(&self.loaded.tokenizer, &haystack_text)?;
        let scratch =
            ScratchDir::new("kv-validate-passkey-", &plan.scratch_parent).with_context(|| {
                format!(
                    "cannot create a scratch directory in {}",
                    plan.scratch_parent.display()
                )
            })?;
        let options = EvalOptions {
            cache_dtype: self.cache_dtype,
            model_name: self.loaded.description.clone(),
            show_progress: false,
            scratch_parent: plan.scratch_parent.clone(),
            slice_start: None,
            pipeline_depth: 1,
        };
        let mut rng = SplitMix64(plan.seed);
        let mut trials = Vec::new();
        let mut bits: Vec<Vec<f64>> = vec![Vec::new(); plan.variants.len()];
        for &length in &plan.lengths {
            for &depth in &plan.depths {
                (self.status)(&format!("passkey: {length} tokens, depth {depth}%"));
                for _ in 0..plan.trials {
                    let key = next_key(&mut rng);
                    let trial = self.trial(
                        &pieces,
                        &plan.compressor,
                        &plan.variants,
                        scratch.path(),
                        &options,
                        length,
                        depth,
                        key,
                        &mut bits,
                    )?;
                    trials.push(trial);
                }
            }
        }
        let labels: Vec<(String, Option<String>, Option<f64>)> =
            std::iter::once((BASELINE.to_string(), None, None))
                .chain(plan.variants.iter().zip(&bits).map(|(variant, bits)| {
                    let mean =
                        (!bits.is_empty()).then(|| bits.iter().sum::<f64>() / bits.len() as f64);
                    (variant.label.clone(), Some(variant.settings.label()), mean)
                }))
                .collect();
        let methods = labels
            .into_iter()
            .enumerate()
            .map(|(m, (label, flags, bits_per_value))| MethodResult {
                cells: cells(&plan.lengths, &plan.depths, &trials, m),
                correct_where_baseline_correct: trials
                    .iter()
                    .filter(|t| t.correct[0] && t.correct[m])
                    .count(),
                label,
                flags,
                bits_per_value,
            })
            .collect::<Vec<_>>();
        let baseline_misses = methods[0]
            .cells
            .iter()
            .filter(|c| c.correct < c.trials)
            .map(|c| (c.length, c.depth))
            .collect();
        Ok(PasskeyReport {
            model: self.loaded.description.clone(),
            device: self.device.clone(),
            cache_dtype: self.cache_dtype.torch_name().to_string(),
            compressor: plan.compressor.program().display().to_string(),
            seed: plan.seed,
            trials: plan.trials,
            lengths: plan.lengths.clone(),
            depths: plan.depths.clone(),
            prompt: PromptTexts {
                chat_template: pieces.chat,
                instruction: INSTRUCTION.to_string(),
                needle: NEEDLE.to_string(),
                question: QUESTION.to_string(),
                answer_prefix: ANSWER_PREFIX.to_string(),
                haystack: haystack_name,
            },
            methods,
            baseline_misses,
            trial_log: trials,
        })
    }

    /// One key at one (length, depth): one prefill, the baseline's answer,
    /// each variant's on its reconstruction.
    #[allow(clippy::too_many_arguments)]
    fn trial(
        &self,
        pieces: &Pieces,
        compressor: &KvCompress,
        variants: &[Variant],
        scratch: &Path,
        options: &EvalOptions,
        length: usize,
        depth: u8,
        key: String,
        bits: &mut [Vec<f64>],
    ) -> anyhow::Result<Trial> {
        let model = &self.loaded.model;
        let tokenizer = &self.loaded.tokenizer;
        let needle = tokenizer
            .encode(NEEDLE.replace("{KEY}", &key), false)
            .map_err(|e| anyhow::anyhow!("cannot tokenize the needle: {e}"))?
            .get_ids()
            .to_vec();
        let (haystack, needle_token) = pieces.haystack(&needle, length, depth)?;
        let (_, cache) = model.forward_last(&token_tensor(model, &haystack)?, None)?;
        let baseline = rounded_to(&cache, options.cache_dtype)?;
        let mut answers = vec![answer(model, tokenizer, &baseline, pieces)?];
        drop(baseline);
        for (index, variant) in variants.iter().enumerate() {
            let (metrics, reconstructed) = reconstruct(
                model,
                &cache,
                compressor,
                &variant.settings,
                scratch,
                options,
            )?;
            bits[index].push(bits_per_value(&metrics, options.cache_dtype));
            answers.push(answer(model, tokenizer, &reconstructed, pieces)?);
        }
        let correct = answers
            .iter()
            .map(|a| first_number(a) == Some(key.as_str()))
            .collect();
        Ok(Trial {
            length,
            depth,
            key,
            needle_token,
            haystack_tokens: haystack.len(),
            answers,
            correct,
        })
    }
}

/// Stored bits per value of a round trip (every byte kv-compress keeps).
fn bits_per_value(metrics: &Report, cache_dtype: CacheDtype) -> f64 {
    8.0 * metrics.figures.compressed_size_bytes as f64 * cache_dtype.size_bytes() as f64
        / metrics.figures.original_size_bytes.max(1) as f64
}

/// Method `m`'s cells, lengths outer, depths inner.
fn cells(lengths: &[usize], depths: &[u8], trials: &[Trial], m: usize) -> Vec<Cell> {
    lengths
        .iter()
        .flat_map(|&length| depths.iter().map(move |&depth| (length, depth)))
        .map(|(length, depth)| {
            let here: Vec<&Trial> = trials
                .iter()
                .filter(|t| t.length == length && t.depth == depth)
                .collect();
            let correct = here.iter().filter(|t| t.correct[m]).count();
            Cell {
                length,
                depth,
                correct,
                trials: here.len(),
                accuracy_percent: 100.0 * correct as f64 / here.len().max(1) as f64,
            }
        })
        .collect()
}

impl PasskeyReport {
    /// The text report: a grid per method, then the baseline's misses.
    pub fn render_text(&self) -> String {
        let mut out =
            format!(
            "Passkey retrieval\n  model: {}\n  device: {}, cache dtype {}\n  haystack: {}{}\n  \
             {} trials per cell, seed {}\n",
            self.model,
            self.device,
            self.cache_dtype,
            self.prompt.haystack,
            if self.prompt.chat_template { " (ChatML prompt)" } else { "" },
            self.trials,
            self.seed
        );
        for method in &self.methods {
            out += &format!(
                "\n{}{}\n  {:>7}",
                method.label,
                method
                    .bits_per_value
                    .map_or_else(String::new, |b| format!(" ({b:.2} bits/value)")),
                "length"
            );
            for depth in &self.depths {
                out += &format!("  {:>6}", format!("{depth}%"));
            }
            out += "\n";
            for &length in &self.lengths {
                out += &format!("  {length:>7}");
                for cell in method.cells.iter().filter(|c| c.length == length) {
                    out += &format!("  {:>6}", format!("{}/{}", cell.correct, cell.trials));
                }
                out += "\n";
            }
        }
        out += &if self.baseline_misses.is_empty() {
            "\nThe uncompressed model retrieved every key.\n".to_string()
        } else {
            format!(
                "\nThe uncompressed model itself missed keys at (length, depth%) {}: \
                 a method's misses there are not compression's.\n",
                self.baseline_misses
                    .iter()
                    .map(|(l, d)| format!("({l}, {d})"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_answer_is_the_first_number_written() {
        assert_eq!(first_number(" 12345. Remember"), Some("12345"));
        assert_eq!(first_number(" is 1234 5"), Some("1234"));
        assert_eq!(first_number(" none"), None);
    }

    #[test]
    fn keys_are_five_digits_and_repeat_with_the_seed() {
        let keys = |seed| {
            let mut rng = SplitMix64(seed);
            (0..50).map(|_| next_key(&mut rng)).collect::<Vec<_>>()
        };
        assert_eq!(keys(7), keys(7));
        assert_ne!(keys(7), keys(8));
        assert!(keys(7)
            .iter()
            .all(|k| k.len() == 5 && k.parse::<u32>().is_ok()));
    }

    #[test]
    fn the_needle_sits_at_its_depth_of_the_filler() {
        let pieces = Pieces {
            prefix: vec![1, 2],
            filler: vec![10, 11, 12],
            question: vec![3, 4, 5],
            stop: vec![],
            chat: false,
        };
        // 2 prefix + 2 needle + 3 question + 10 answer: 13 filler tokens in a length of 30.
        let (tokens, at) = pieces.haystack(&[90, 91], 30, 0).unwrap();
        assert_eq!((at, tokens.len()), (2, 17));
        assert_eq!(&tokens[2..4], &[90, 91]);
        let (tokens, at) = pieces.haystack(&[90, 91], 30, 100).unwrap();
        assert_eq!(at, 15);
        assert_eq!(&tokens[15..], &[90, 91]);
        let (tokens, at) = pieces.haystack(&[90, 91], 30, 50).unwrap();
        assert_eq!(at, 2 + 7); // round(13 / 2)
        assert_eq!(&tokens[2..9], &[10, 11, 12, 10, 11, 12, 10]);
        let error = pieces.haystack(&[90, 91], 17, 50).unwrap_err().to_string();
        assert!(error.contains("alone take 17 tokens"), "{error}");
    }
}
