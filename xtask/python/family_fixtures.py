"""Tiny random models of every family kv-validate supports, with what
transformers computes for them, recorded under testdata/families/<case>/.

kv-validate's tests load each case through kv-validate's own loaders and
compare against the recording; CI never needs torch, because the recordings
are committed. Each case is a Hugging Face directory plus the reference:

  config.json             the family's config in the form its published
                          checkpoints have (top-level rope_theta, rope_scaling;
                          no head_dim or layer_types where they lack them, so
                          a loader must derive them); the *-rope-parameters
                          cases hold the same model with the config as
                          transformers 5 writes it (under rope_parameters)
  model.safetensors       f32 weights under the checkpoint's names
  tokenizer.json          a byte-level BPE trained on testdata/prose.txt, its
  tokenizer_config.json   BOS added (or not) as the family's checkpoints do
  reference.safetensors   input_ids I64 [T]; logits F32 [T, vocab] of one fresh
                          prefill; layer_{i}_key / layer_{i}_value F32
                          [1, kv_heads, S_i, head_dim]: what transformers'
                          cache holds after that prefill (post-RoPE keys; a
                          sliding-window layer keeps its last window-1 tokens)
  reference.json          versions, seed, T, the text, features, notes, the
                          per-layer S_i and layer types, the self-checks' figures
  model.gguf              (cases with a llama.cpp arch) the same model as
                          llama.cpp's convert_hf_to_gguf.py writes it

Cases: llama, llama3 (+ -rope-parameters), llama-linear, llama-dynamic,
llama-yarn, llama-bias, mistral, mistral-nemo (head_dim != hidden/heads), qwen2,
qwen2-sliding-yarn, qwen3, qwen3-sliding-yarn, gemma2, gemma3_text (+ -rope-parameters),
gemma2-gguf and gemma3_text-gguf (shaped so that a GGUF can describe them:
llama.cpp has no query_pre_attn_scalar and fixes Gemma 3's layer pattern),
phi3 (long factors), phi3-short (short factors), phi3-sliding, phi4-mini (partial rotary),
mixtral, qwen3_moe. `python family_fixtures.py --help` runs nothing.

Why the models look the way they do: weights are drawn with std 0.2 (not
transformers' 0.02) and norm weights and biases are random, so attention is
far from uniform and every feature changes the logits; windows, original
context lengths and RoPE bases are chosen so that the window drops tokens and
the scaled-RoPE regime is reached within T. Each run checks, and fails
otherwise: a second prefill gives the same logits bit for bit; the directory
loaded back through transformers (config.json as written) gives the same
logits and cache; turning each feature off (window, RoPE scaling, soft-caps,
partial rotary, biases, top-k routing) changes the logits by more than 1% of
their scale, and what transformers ignores (Gemma 3's attention soft-cap)
changes nothing; MoE routers never nearly tie; and each model.gguf, run by a forward
pass written here from llama.cpp's reading of GGUF (not transformers'), gives
the recorded logits and cache within 1e-5.

Regenerate (needs torch, transformers, tokenizers, safetensors, gguf; the
recordings depend on the transformers/torch versions in reference.json; the
output is bit-identical from run to run):

  python xtask/python/family_fixtures.py [--out testdata/families] [CASE ...]
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import tokenizers
import torch
import transformers
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parents[2]
PROSE = ROOT / "testdata" / "prose.txt"
SEED = 24
WEIGHT_STD = 0.2
TOKENIZER_VOCAB = 288

# Shapes every case shares unless it says otherwise: 4 query heads over 2 KV
# heads (GQA), head_dim 8 = hidden/heads as in real Llama, Mistral, Qwen2 and
# Phi-3 checkpoints (Qwen3 and Gemma cases set head_dim 16 != hidden/heads).
# Small enough that a case is a few hundred KiB.
BASE = dict(
    vocab_size=TOKENIZER_VOCAB,
    hidden_size=32,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    rms_norm_eps=1e-5,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)


@dataclass
class Special:
    """A family's special tokens (ids 0.. in this order) and whether its
    tokenizer puts BOS in front of every text, as its checkpoints do."""

    tokens: list[str]
    bos: str | None
    eos: str
    add_bos: bool
    config_bos: str | None = None  # config.json's bos_token_id where it differs


LLAMA2_SPECIAL = Special(["<unk>", "<s>", "</s>"], bos="<s>", eos="</s>", add_bos=True)
LLAMA3_SPECIAL = Special(
    ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"],
    bos="<|begin_of_text|>", eos="<|end_of_text|>", add_bos=True,
)
# Qwen's tokenizer adds no BOS, although config.json names <|endoftext|> as bos_token_id.
QWEN_SPECIAL = Special(
    ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    bos=None, eos="<|endoftext|>", add_bos=False, config_bos="<|endoftext|>",
)
GEMMA_SPECIAL = Special(["<pad>", "<eos>", "<bos>", "<unk>"], bos="<bos>", eos="<eos>", add_bos=True)
# Phi-3's tokenizer.json adds no BOS (add_bos_token false), though <s> exists.
PHI3_SPECIAL = Special(["<unk>", "<s>", "</s>", "<|endoftext|>"], bos="<s>", eos="<|endoftext|>", add_bos=False)


@dataclass
class Case:
    """One recorded model: a family, its config on top of BASE, the sequence
    length, and how to turn each feature off for the self-checks."""

    name: str
    model_type: str
    config: dict
    special: Special
    seq_len: int = 40
    features: list[str] = field(default_factory=list)
    # Config changes that switch one feature off; each must change the logits.
    ablations: dict[str, dict] = field(default_factory=dict)
    # Config changes transformers ignores; each must leave the logits as they are.
    inert: dict[str, dict] = field(default_factory=dict)
    # classic: the config as checkpoints published before transformers 5 have
    # it; rope_parameters: as transformers 5 writes it.
    config_form: str = "classic"
    # Keys of the classic rope_scaling spelled as some checkpoints spell them.
    classic_rope_type_key: str = "rope_type"
    classic_rope_type_alias: str | None = None
    # Extra config.json keys, classic form only (e.g. Qwen2's unused sliding_window).
    classic_extra: dict = field(default_factory=dict)
    # Keys transformers 5 writes that the family's published configs lack, so
    # a loader must derive them (head_dim = hidden/heads, layer_types from
    # the window settings); classic form only.
    classic_omit: tuple = ()
    # Keys transformers 5 writes under another name than the published configs.
    classic_rename: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # llama.cpp's arch name when a model.gguf is written: only where the GGUF
    # that convert_hf_to_gguf.py writes describes this same model.
    gguf_arch: str | None = None


PLAIN_ROPE = {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}


def llama_cases() -> list[Case]:
    llama3_rope = {
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
        "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 160,
    }
    llama3_config = dict(rope_parameters=llama3_rope, tie_word_embeddings=True)
    llama3_notes = [
        "llama3 scaling with original_max_position_embeddings 160 over head_dim 8 and theta 1e4: "
        "frequency 0 (wavelength 6.3 < 160/4) is kept, 1 (63) is smoothed halfway (divided by 1.73), "
        "2-3 (628, 6283 > 160) are divided by 8",
        "tied embeddings: model.safetensors has no lm_head.weight",
    ]
    return [
        Case("llama", "llama", dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                                    attention_bias=False, mlp_bias=False),
             LLAMA2_SPECIAL, features=["plain RoPE", "GQA", "untied lm_head", "no head_dim key (Llama 2 style)"],
             classic_omit=("head_dim",), gguf_arch="llama"),
        Case("llama3", "llama", llama3_config, LLAMA3_SPECIAL,
             features=["rope_scaling llama3", "tied embeddings"],
             ablations={"rope scaling off": PLAIN_ROPE}, notes=llama3_notes, gguf_arch="llama"),
        Case("llama3-rope-parameters", "llama", llama3_config, LLAMA3_SPECIAL,
             features=["rope_scaling llama3 under rope_parameters (transformers 5 form)", "tied embeddings"],
             ablations={"rope scaling off": PLAIN_ROPE}, config_form="rope_parameters",
             notes=["the same model as the llama3 case; only config.json's form differs"] + llama3_notes),
        Case("llama-linear", "llama",
             dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}),
             LLAMA2_SPECIAL, features=["rope_scaling linear (spelled with 'type')"],
             ablations={"rope scaling off": PLAIN_ROPE}, classic_rope_type_key="type", classic_omit=("head_dim",),
             gguf_arch="llama"),
        Case("llama-dynamic", "llama",
             dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0},
                  max_position_embeddings=32),
             LLAMA2_SPECIAL, features=["rope_scaling dynamic (spelled with 'type')", "T > max_position_embeddings"],
             ablations={"rope scaling off": PLAIN_ROPE}, classic_rope_type_key="type", classic_omit=("head_dim",),
             notes=["dynamic NTK: transformers recomputes the base from the prefill's length T (40) "
                    "since T > max_position_embeddings (32): base * (factor*T/max_pos - (factor-1))^(d/(d-2)), "
                    "for every position of the prefill"]),
        Case("llama-yarn", "llama",
             dict(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                   "original_max_position_embeddings": 256},
                  max_position_embeddings=1024),
             LLAMA2_SPECIAL, features=["rope_scaling yarn (default beta_fast 32, beta_slow 1, truncate)"],
             ablations={"rope scaling off": PLAIN_ROPE}, gguf_arch="llama",
             notes=["yarn with original_max_position_embeddings 256: correction range [0, 2] of the 4 "
                    "frequencies (0 kept, 1 half, 2-3 interpolated); attention_factor 0.1*ln(4)+1 multiplies cos and sin"]),
        Case("llama-bias", "llama",
             dict(attention_bias=True, mlp_bias=True, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
             LLAMA2_SPECIAL, features=["attention_bias: q/k/v/o biases", "mlp_bias: gate/up/down biases"],
             ablations={"biases off": dict(attention_bias=False, mlp_bias=False)}, gguf_arch="llama",
             notes=["LlamaConfig's attention_bias puts a bias on o_proj too; model.gguf permutes the "
                    "q/k biases as it permutes their rows"]),
    ]


def other_cases() -> list[Case]:
    gemma2_config = dict(
        num_hidden_layers=4, head_dim=16, sliding_window=16, query_pre_attn_scalar=24,
        attn_logit_softcapping=4.0, final_logit_softcapping=2.5, tie_word_embeddings=True,
        hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    gemma3_rope = {
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
    }
    gemma3_layers = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]
    gemma3_config = dict(
        hidden_size=32, head_dim=16, num_hidden_layers=4, layer_types=gemma3_layers, sliding_window=16,
        rope_parameters=gemma3_rope, query_pre_attn_scalar=24, tie_word_embeddings=True,
        hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6,
    )
    # Soft-caps and biases on, although Gemma 3's checkpoints have them off. transformers applies the
    # final soft-cap and the biases but never the attention soft-cap: its Gemma 3 attention passes none.
    gemma3_on = dict(gemma3_config, attn_logit_softcapping=5.0, final_logit_softcapping=3.0, attention_bias=True)
    gemma3_inert = {"attn_logit_softcapping off": dict(attn_logit_softcapping=None)}
    gemma3_ablations = {
        "window off": dict(sliding_window=4096),
        "final soft-cap off": dict(final_logit_softcapping=None),
        "biases off": dict(attention_bias=False),
        "rope scaling off": dict(rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
        "one rope base": dict(rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1000000.0}}),
    }
    gemma3_notes = [
        "layers 0, 1, 3 slide over 16 tokens with rope_theta 1e4 (classic: rope_local_base_freq); "
        "layer 2 is global with rope_theta 1e6 and linear scaling 8 (classic: rope_scaling), as Gemma 3 4B+",
        "sliding layers' cache holds the last sliding_window-1 = 15 tokens",
        "hidden_size 32 with head_dim 16 and 4 heads: head_dim is not hidden/heads",
        "attn_logit_softcapping is set but transformers 5's Gemma 3 attention does not apply it "
        "(checked: setting it to null leaves the logits bit-identical)",
    ]
    phi3_factors_short = [1.0, 1.1, 1.4, 2.2]
    phi3_factors_long = [1.0, 1.8, 4.0, 16.0]
    phi3_config = dict(
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                         "short_factor": phi3_factors_short, "long_factor": phi3_factors_long},
        original_max_position_embeddings=32, max_position_embeddings=128,
        sliding_window=None, pad_token_id=3,
    )
    phi3_short_only = copy.deepcopy(phi3_config)
    phi3_short_only["rope_parameters"]["long_factor"] = phi3_factors_short
    phi3_notes = [
        "longrope: factors per frequency; transformers uses long_factor when the prefill's "
        "length T > original_max_position_embeddings (32), short_factor otherwise, for all positions; "
        "attention_factor sqrt(1 + ln(128/32)/ln(32)) multiplies cos and sin either way",
    ]
    return [
        Case("mistral", "mistral", dict(sliding_window=16, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
             LLAMA2_SPECIAL, features=["sliding_window 16 < T on every layer"],
             ablations={"window off": dict(sliding_window=None)}, classic_omit=("head_dim",),
             notes=["every layer slides: its cache holds the last sliding_window-1 = 15 tokens"]),
        Case("mistral-nemo", "mistral",
             dict(head_dim=16, sliding_window=None, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
             LLAMA2_SPECIAL, features=["head_dim 16 != hidden/heads 8 (as Mistral Nemo: 128 vs 160)", "no window"],
             gguf_arch="llama",
             notes=["model.gguf: arch llama with key_length 16 and rope.dimension_count 16"]),
        Case("qwen2", "qwen2",
             dict(use_sliding_window=False, max_window_layers=2, tie_word_embeddings=True,
                  vocab_size=304, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                  rms_norm_eps=1e-6),
             QWEN_SPECIAL, features=["q/k/v biases", "tied embeddings", "vocab_size 304 > tokenizer's 288",
                                    "use_sliding_window false with a sliding_window < T in config.json"],
             classic_extra=dict(sliding_window=32), classic_omit=("head_dim", "layer_types"), gguf_arch="qwen2",
             notes=["config.json has sliding_window 32 < T but use_sliding_window false, as Qwen2.5 "
                    "checkpoints have it (sliding_window 32768/131072, unused): no layer slides",
                    "the tokenizer adds no BOS although config.json has bos_token_id"]),
        Case("qwen2-sliding-yarn", "qwen2",
             dict(use_sliding_window=True, sliding_window=16, max_window_layers=1, tie_word_embeddings=False,
                  rope_parameters={"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0,
                                   "original_max_position_embeddings": 256},
                  max_position_embeddings=1024, rms_norm_eps=1e-6),
             QWEN_SPECIAL,
             features=["q/k/v biases", "use_sliding_window: layers from max_window_layers (1) on slide over 16",
                       "rope_scaling yarn spelled with 'type', as Qwen2.5's long-context instructions write it"],
             ablations={"window off": dict(use_sliding_window=False), "rope scaling off": dict(
                 rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})},
             classic_rope_type_key="type", classic_omit=("head_dim", "layer_types"),
             notes=["layer 0 is global, layer 1 slides (cache holds the last sliding_window-1 = 15 tokens)",
                    "no model.gguf: the converter writes no sliding window for qwen2"]),
        Case("qwen3-sliding-yarn", "qwen3",
             dict(head_dim=16, use_sliding_window=True, sliding_window=16, max_window_layers=1, attention_bias=True,
                  rope_parameters={"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0,
                                   "original_max_position_embeddings": 256, "beta_fast": 8.0, "beta_slow": 1.0,
                                   "attention_factor": 1.2},
                  max_position_embeddings=1024, rms_norm_eps=1e-6),
             QWEN_SPECIAL,
             features=["q/k RMSNorm per head", "attention_bias: q/k/v/o biases (off in Qwen3's checkpoints)",
                       "use_sliding_window: layer 1 slides over 16",
                       "rope_scaling yarn with beta_fast 8, beta_slow 1 and attention_factor 1.2 given"],
             ablations={"window off": dict(use_sliding_window=False), "biases off": dict(attention_bias=False),
                        "rope scaling off": dict(rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})},
             classic_omit=("layer_types",),
             notes=["yarn correction range [0, 3] of 8 frequencies with beta_fast 8; attention_factor 1.2 "
                    "as given (not derived from the factor)",
                    "layer 0 is global, layer 1 slides (cache holds the last sliding_window-1 = 15 tokens)"]),
        Case("qwen3", "qwen3",
             dict(head_dim=16, use_sliding_window=False, tie_word_embeddings=True,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, rms_norm_eps=1e-6,
                  attention_bias=False),
             QWEN_SPECIAL, features=["q/k RMSNorm per head", "head_dim != hidden/heads", "tied embeddings"],
             classic_omit=("layer_types",), gguf_arch="qwen3",
             notes=["hidden_size 32 with head_dim 16 and 4 heads: head_dim is not hidden/heads"]),
        Case("gemma2", "gemma2", gemma2_config, GEMMA_SPECIAL,
             features=["(1 + w) RMSNorm, pre and post norms", "GeGLU (gelu tanh)", "embedding * sqrt(hidden)",
                       "attention soft-cap 4", "final logit soft-cap 2.5", "query_pre_attn_scalar 24 != head_dim",
                       "sliding_window 16 < T on layers 0 and 2", "tied embeddings"],
             ablations={"window off": dict(sliding_window=4096),
                        "attention soft-cap off": dict(attn_logit_softcapping=None),
                        "final soft-cap off": dict(final_logit_softcapping=None)},
             classic_omit=("layer_types",), classic_extra=dict(hidden_act="gelu_pytorch_tanh"),
             notes=["even layers slide (cache holds the last sliding_window-1 = 15 tokens), odd layers are global",
                    "the embedding scale sqrt(hidden) is rounded to the activations' dtype as transformers does"]),
        Case("gemma3_text", "gemma3_text", gemma3_on, GEMMA_SPECIAL,
             features=["q/k (1 + w) RMSNorm", "sliding and global layers with their own rope bases",
                       "linear rope scaling on global layers", "query_pre_attn_scalar 24 != head_dim",
                       "sliding_window 16 < T", "tied embeddings",
                       "final soft-cap 3 and q/k/v/o biases (off in Gemma 3's checkpoints)",
                       "attn_logit_softcapping 5, which transformers reads but never applies for Gemma 3"],
             ablations=gemma3_ablations, inert=gemma3_inert, notes=gemma3_notes, classic_omit=("layer_types",)),
        Case("gemma3_text-rope-parameters", "gemma3_text", gemma3_on, GEMMA_SPECIAL,
             features=["as gemma3_text, config.json in transformers 5 form (rope_parameters per layer type)"],
             ablations=gemma3_ablations, inert=gemma3_inert, config_form="rope_parameters",
             notes=["the same model as the gemma3_text case; only config.json's form differs"] + gemma3_notes),
        Case("gemma2-gguf", "gemma2", dict(gemma2_config, query_pre_attn_scalar=16), GEMMA_SPECIAL,
             features=["as gemma2 but query_pre_attn_scalar = head_dim, which a GGUF can express", "model.gguf"],
             ablations={"window off": dict(sliding_window=4096)},
             classic_omit=("layer_types",), classic_extra=dict(hidden_act="gelu_pytorch_tanh"), gguf_arch="gemma2",
             notes=["even layers slide (cache holds the last sliding_window-1 = 15 tokens), odd layers are global"]),
        Case("gemma3_text-gguf", "gemma3_text",
             dict(gemma3_config, num_hidden_layers=6, query_pre_attn_scalar=16,
                  layer_types=["sliding_attention"] * 5 + ["full_attention"]),
             GEMMA_SPECIAL,
             features=["as gemma3_text with Gemma 3's own layer pattern (5 sliding, 1 global) and "
                       "query_pre_attn_scalar = head_dim, which a GGUF can express", "model.gguf"],
             ablations={"window off": dict(sliding_window=4096)},
             classic_omit=("layer_types",), gguf_arch="gemma3",
             notes=["layers 0-4 slide over 16 tokens with rope_theta 1e4, layer 5 is global with "
                    "rope_theta 1e6 and linear scaling 8"]),
        Case("phi3", "phi3", phi3_config, PHI3_SPECIAL,
             features=["fused qkv_proj and gate_up_proj", "longrope, T > original_max_position_embeddings: long factors"],
             ablations={"rope scaling off": PLAIN_ROPE, "long factors = short factors": phi3_short_only},
             classic_rope_type_key="type", classic_omit=("head_dim",), notes=phi3_notes, gguf_arch="phi3"),
        Case("phi3-short", "phi3", phi3_config, PHI3_SPECIAL, seq_len=24,
             features=["fused qkv_proj and gate_up_proj",
                       "longrope spelled 'su' (early Phi-3 checkpoints), T <= original_max_position_embeddings: short factors"],
             ablations={"rope scaling off": PLAIN_ROPE}, classic_rope_type_key="type",
             classic_rope_type_alias="su", classic_omit=("head_dim",), notes=phi3_notes, gguf_arch="phi3"),
        Case("phi3-sliding", "phi3", dict(phi3_config, sliding_window=16), PHI3_SPECIAL,
             features=["fused qkv_proj and gate_up_proj", "longrope long factors",
                       "sliding_window 16 < T on every layer (as Phi-3-mini-4k: 2047)"],
             ablations={"window off": dict(sliding_window=None)},
             classic_rope_type_key="type", classic_omit=("head_dim",),
             notes=phi3_notes + ["every layer slides: its cache holds the last sliding_window-1 = 15 tokens"]),
        Case("phi4-mini", "phi3",
             dict(phi3_config, partial_rotary_factor=0.75, tie_word_embeddings=True, sliding_window=262144,
                  rope_parameters=dict(phi3_config["rope_parameters"], short_factor=phi3_factors_short[:3],
                                       long_factor=phi3_factors_long[:3], partial_rotary_factor=0.75)),
             PHI3_SPECIAL,
             features=["fused qkv_proj and gate_up_proj", "partial_rotary_factor 0.75: RoPE on 6 of 8 channels",
                       "longrope long factors (T > original_max_position_embeddings)", "tied embeddings",
                       "sliding_window 262144 > T (as Phi-4-mini: present, never reached)"],
             ablations={"rope scaling off": dict(PLAIN_ROPE, partial_rotary_factor=0.75),
                        "full rotary": dict(rope_parameters=dict(phi3_config["rope_parameters"]),
                                            partial_rotary_factor=1.0)},
             classic_rope_type_key="type", classic_omit=("head_dim",), gguf_arch="phi3",
             notes=phi3_notes + ["Phi-4-mini's shape: transformers rotates the first 6 channels of each head "
                                 "(halves of 3) and passes the last 2 through; 3 factors per list"]),
    ]


def moe_cases() -> list[Case]:
    return [
        Case("mixtral", "mixtral",
             dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=None,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
             LLAMA2_SPECIAL,
             features=["4 experts, top-2 routing (softmax over the chosen two)", "block_sparse_moe.experts.{e}.w1/w2/w3"],
             ablations={"top-1 routing": dict(num_experts_per_tok=1)}, classic_omit=("head_dim",), gguf_arch="llama",
             notes=["attention and cache as Mistral without a window (Mixtral 8x7B has sliding_window null)",
                    "model.gguf: arch llama, experts stacked per layer as the converter merges them "
                    "(ffn_gate_exps = w1, ffn_down_exps = w2, ffn_up_exps = w3), router ffn_gate_inp"]),
        Case("qwen3_moe", "qwen3_moe",
             dict(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                  norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], use_sliding_window=False,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, rms_norm_eps=1e-6),
             QWEN_SPECIAL,
             features=["4 experts, top-2 routing, norm_topk_prob", "q/k RMSNorm per head",
                       "mlp.experts.{e}.gate_proj/up_proj/down_proj", "head_dim != hidden/heads"],
             ablations={"top-1 routing": dict(num_experts_per_tok=1)},
             classic_rename={"num_local_experts": "num_experts"}, gguf_arch="qwen3moe",
             notes=["config.json names the expert count num_experts as Qwen3-MoE checkpoints do "
                    "(transformers 5 writes num_local_experts)"]),
    ]


def all_cases() -> list[Case]:
    return llama_cases() + other_cases() + moe_cases()


# --- tokenizer ---------------------------------------------------------------

def train_tokenizer(special: Special) -> Tokenizer:
    """A byte-level BPE of TOKENIZER_VOCAB tokens trained on prose.txt, with the
    family's special tokens first and BOS added by the post-processor where
    the family's tokenizer adds it."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=special.tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train([str(PROSE)], trainer)
    assert tokenizer.get_vocab_size() == TOKENIZER_VOCAB
    if special.add_bos:
        bos_id = tokenizer.token_to_id(special.bos)
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{special.bos} $A", pair=f"{special.bos} $A {special.bos} $B",
            special_tokens=[(special.bos, bos_id)],
        )
    return tokenizer


def tokenizer_config(special: Special) -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": special.bos,
        "eos_token": special.eos,
        "add_bos_token": special.add_bos,
        "add_eos_token": False,
        "model_max_length": 1 << 20,
        "clean_up_tokenization_spaces": False,
    }


def token_prefix(tokenizer: Tokenizer, text: str, length: int) -> str:
    """The shortest prefix of `text` that encodes (with special tokens) to
    exactly `length` tokens."""
    for end in range(1, len(text) + 1):
        n = len(tokenizer.encode(text[:end]).ids)
        if n == length:
            return text[:end]
        if n > length:
            break
    raise ValueError(f"no prefix of the text encodes to {length} tokens")


# --- model -------------------------------------------------------------------

def build_config(case: Case, special: Special, tokenizer: Tokenizer, overrides: dict | None = None):
    kwargs = {**BASE, **copy.deepcopy(case.config), **copy.deepcopy(overrides or {})}
    bos = special.config_bos or special.bos
    kwargs["bos_token_id"] = tokenizer.token_to_id(bos) if bos else None
    kwargs["eos_token_id"] = tokenizer.token_to_id(special.eos)
    if "pad_token_id" not in kwargs and "<pad>" in special.tokens:
        kwargs["pad_token_id"] = tokenizer.token_to_id("<pad>")
    return AutoConfig.for_model(case.model_type, **kwargs)


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Re-draws every parameter from a seeded generator, in name order: matrices
    and biases N(0, WEIGHT_STD^2); norm weights around their identity (1 for
    x*w norms, 0 for Gemma's x*(1+w)) with the same spread, so no norm is
    trivial."""
    generator = torch.Generator().manual_seed(seed)
    gemma_norm = model.config.model_type.startswith("gemma")
    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32) * WEIGHT_STD
            if "norm" in name and param.dim() == 1:
                centre = 0.0 if gemma_norm else 1.0
                param.copy_(centre + noise)
            else:
                param.copy_(noise)


def make_model(config, seed: int):
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    randomize(model, seed)
    return model.eval()


def prefill(model, input_ids: torch.Tensor):
    """Logits [T, vocab] and the cache's (keys, values) per layer after one
    fresh prefill."""
    with torch.no_grad():
        out = model(input_ids=input_ids[None, :], use_cache=True)
    cache = out.cache
    layers = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
    return out.logits[0].clone(), layers


def router_margin(model, input_ids: torch.Tensor) -> float | None:
    """The smallest gap, over tokens and MoE layers, between the router logits
    of the last chosen expert and the first unchosen one: a gap this large
    means an f32 implementation picks the same experts. None without MoE."""
    gaps = []

    def record_gap(module, args):
        logits = args[0].reshape(-1, args[0].shape[-1]) @ module.gate.weight.T
        top = logits.topk(model.config.num_experts_per_tok + 1, dim=-1).values
        gaps.append(float((top[:, -2] - top[:, -1]).min()))

    hooks = [m.register_forward_pre_hook(record_gap) for m in model.modules()
             if hasattr(m, "gate") and hasattr(m, "experts")]
    if not hooks:
        return None
    prefill(model, input_ids)
    for hook in hooks:
        hook.remove()
    return min(gaps)


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


# --- config forms ------------------------------------------------------------

def classic_form(config: dict, case: Case) -> dict:
    """config.json as checkpoints written before transformers 5 have it:
    rope_theta (and Gemma 3's rope_local_base_freq) at the top level, the
    scaling under rope_scaling (null when plain)."""
    config = copy.deepcopy(config)
    rope = config.pop("rope_parameters")
    if "full_attention" in rope:  # Gemma 3: one dict per layer type
        full, sliding = rope["full_attention"], rope["sliding_attention"]
        config["rope_theta"] = full.pop("rope_theta")
        config["rope_local_base_freq"] = sliding.pop("rope_theta")
        assert sliding == {"rope_type": "default"}, sliding
        config["rope_scaling"] = None if full == {"rope_type": "default"} else full
        if "layer_types" in config:
            full_layers = [i for i, t in enumerate(config["layer_types"]) if t == "full_attention"]
            config["sliding_window_pattern"] = full_layers[0] + 1
        config.pop("_sliding_window_pattern", None)
    else:
        config["rope_theta"] = rope.pop("rope_theta")
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            config["partial_rotary_factor"] = rope["partial_rotary_factor"]
        rope.pop("partial_rotary_factor", None)
        if case.model_type == "phi3":  # Phi-3 keeps it at the top level only
            rope.pop("original_max_position_embeddings", None)
        if rope == {"rope_type": "default"}:
            config["rope_scaling"] = None
        else:
            rope_type = rope.pop("rope_type")
            config["rope_scaling"] = {case.classic_rope_type_key: case.classic_rope_type_alias or rope_type, **rope}
    config["torch_dtype"] = config.pop("dtype")  # the name before transformers 5
    for key in case.classic_omit:
        config.pop(key)
    for new, old in case.classic_rename.items():
        config[old] = config.pop(new)
    config.update(case.classic_extra)
    return dict(sorted(config.items()))


# --- GGUF --------------------------------------------------------------------
# What llama.cpp's convert_hf_to_gguf.py writes for these architectures (read
# from its LlamaModel, Qwen2Model, Qwen3Model, Phi3MiniModel and TextModel;
# none of its code is copied here): tensor names from gguf-py's map, Q/K rows
# permuted for llama (its RoPE rotates adjacent pairs, transformers' rotates
# halves), Llama 3 scaling as a rope_freqs tensor, Phi-3's longrope as
# rope_factors_long/short tensors, f32 throughout.

GGUF_NOTES = {
    "llama": [
        "Q/K rows permuted as convert_hf_to_gguf.py does for llama (pairs instead of halves): a loader "
        "either un-permutes them or rotates adjacent pairs; the cache of the latter holds each head's "
        "channels in the permuted order",
        "rope_freqs.weight (llama3 only) holds the converter's per-frequency divisors; it reads "
        "original_max_position_embeddings from the config's top level (default 8192, rope_scaling's "
        "value in published Llama 3.x); here rope_scaling's 160 is used so the GGUF is the same model",
    ],
    "qwen2": ["no Q/K permutation (llama.cpp rotates halves for qwen2)"],
    "qwen3": ["no Q/K permutation (llama.cpp rotates halves for qwen3)"],
    "gemma2": [
        "norm weights stored as 1 + w (llama.cpp multiplies by w); no RoPE keys (llama.cpp's default base 10000)",
        "llama.cpp has no query_pre_attn_scalar: it scales by 1/sqrt(head_dim) except for 27B (by layer "
        "count, 1/sqrt(hidden/heads)); this case sets query_pre_attn_scalar = head_dim so that the GGUF "
        "is the recorded model; even layers slide (llama.cpp's swa pattern 2)",
    ],
    "gemma3": [
        "norm weights (q/k norms too) stored as 1 + w; freq_base is the global layers' base, "
        "freq_base_swa the sliding layers'; linear scaling applies to global layers only",
        "llama.cpp fixes gemma3's pattern at 5 sliding layers then 1 global and has no "
        "query_pre_attn_scalar (1/sqrt(head_dim) but for 27B): this case is built to match both",
    ],
    "qwen3moe": [
        "experts stacked per layer as the converter merges them: ffn_gate_exps/ffn_up_exps/ffn_down_exps "
        "[n_expert, out, in] (GGUF dims reversed), router ffn_gate_inp; no Q/K permutation",
    ],
    "phi3": [
        "qkv_proj and gate_up_proj stay fused (attn_qkv, ffn_up holds gate then up); no permutation",
        "tokenizer written the gpt2 way, as the converter does for Phi-4-mini (tokenizer_class "
        "GPT2Tokenizer); Phi-3's own checkpoints carry a sentencepiece tokenizer.model",
    ],
}


# Why a case has no model.gguf: the converter would write a different model.
NO_GGUF = {
    "llama-dynamic": "the converter writes nothing for rope_type dynamic: its GGUF would be plain RoPE",
    "llama3-rope-parameters": "the same model as llama3, whose model.gguf it would be",
    "mistral": "the converter (LlamaModel, arch llama) writes no sliding window: its GGUF attends to every token",
    "qwen2-sliding-yarn": "the converter writes no sliding window for qwen2",
    "qwen3-sliding-yarn": "the converter writes no sliding window for qwen3",
    "gemma2": "llama.cpp has no query_pre_attn_scalar (1/sqrt(head_dim) but for 27B): see gemma2-gguf",
    "gemma3_text": "llama.cpp has no query_pre_attn_scalar and fixes the 5:1 layer pattern: see gemma3_text-gguf",
    "gemma3_text-rope-parameters": "see gemma3_text-gguf",
    "phi3-sliding": "not written: whether llama.cpp slides every phi3 layer as transformers does is not checked here",
}


def permute_rows(weights: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of each head reordered from halves [x0..x(d/2-1), y0..] to pairs
    [x0, y0, x1, y1, ...], as the converter's LlamaModel.permute does."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def llama3_rope_freqs(rope: dict, head_dim: int) -> torch.Tensor:
    base = rope["rope_theta"]
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_context_len = rope["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_context_len / low, old_context_len / high
    divisors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            divisors.append(1)
        elif wavelen > low_freq_wavelen:
            divisors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low) / (high - low)
            divisors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(divisors, dtype=torch.float32)


def gguf_metadata(writer: gguf.GGUFWriter, arch: str, config) -> None:
    """The converter's hyperparameter keys for `arch`: TextModel's common ones,
    or the family's own set where its class writes one (Phi3MiniModel,
    Gemma2Model)."""
    rope = config.rope_parameters
    full = rope.get("full_attention", rope)  # Gemma 3 nests them per layer type
    head_dim = config.to_dict().get("head_dim")  # written only where the config has it
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if n_experts := getattr(config, "num_local_experts", None):
        writer.add_expert_count(n_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
        if moe_ff := getattr(config, "moe_intermediate_size", None):
            writer.add_expert_feed_forward_length(moe_ff)
    if arch == "phi3":
        writer.add_rope_freq_base(full["rope_theta"])
        writer.add_rope_scaling_orig_ctx_len(config.original_max_position_embeddings)
        partial = rope.get("partial_rotary_factor", 1.0)
        writer.add_rope_dimension_count(int(partial * config.hidden_size) // config.num_attention_heads)
        writer.add_sliding_window(config.sliding_window or 0)
        scale = config.max_position_embeddings / config.original_max_position_embeddings
        writer.add_rope_scaling_attn_factors(
            math.sqrt(1 + math.log(scale) / math.log(config.original_max_position_embeddings)) if scale > 1 else 1.0)
    elif arch == "gemma2":  # no RoPE keys: llama.cpp's default base 10000
        assert full["rope_type"] == "default" and full["rope_theta"] == 10000.0
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
        writer.add_sliding_window(config.sliding_window)
    else:
        writer.add_rope_freq_base(full["rope_theta"])
        if "sliding_attention" in rope:
            writer.add_rope_freq_base_swa(rope["sliding_attention"]["rope_theta"])
        if head_dim is not None:
            writer.add_key_length(head_dim)
            writer.add_value_length(head_dim)
        if full["rope_type"] == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(full["factor"])
        elif full["rope_type"] == "yarn":
            writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            writer.add_rope_scaling_factor(full["factor"])
            writer.add_rope_scaling_orig_ctx_len(full["original_max_position_embeddings"])
        else:
            assert full["rope_type"] in ("default", "llama3"), full
        if arch == "llama":
            writer.add_vocab_size(config.vocab_size)
            writer.add_rope_dimension_count(head_dim or config.hidden_size // config.num_attention_heads)
        if arch == "gemma3":
            if config.final_logit_softcapping:
                writer.add_final_logit_softcapping(config.final_logit_softcapping)
            writer.add_sliding_window(config.sliding_window)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def gguf_vocab(writer: gguf.GGUFWriter, case_dir: Path, tokenizer: Tokenizer, vocab_size: int) -> None:
    """The converter's byte-level BPE ("gpt2") vocabulary: every id up to the
    model's vocab_size, special tokens as CONTROL, ids past the tokenizer as
    UNUSED [PADi]; merges, BOS/EOS ids and add_bos_token via gguf-py's
    SpecialVocab, as the converter does."""
    by_id = {i: t for t, i in tokenizer.get_vocab(with_added_tokens=True).items()}
    special = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if by_id[i] in special else gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(case_dir, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)


EXPERT_WEIGHT = re.compile(r"model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(\w+)\.weight")
EXPERT_KINDS = {
    "w1": gguf.MODEL_TENSOR.FFN_GATE_EXP, "w2": gguf.MODEL_TENSOR.FFN_DOWN_EXP, "w3": gguf.MODEL_TENSOR.FFN_UP_EXP,
    "gate_proj": gguf.MODEL_TENSOR.FFN_GATE_EXP, "down_proj": gguf.MODEL_TENSOR.FFN_DOWN_EXP,
    "up_proj": gguf.MODEL_TENSOR.FFN_UP_EXP,
}


def gguf_tensors(arch: str, config, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """GGUF name -> f32 tensor, in the checkpoint's order."""
    names = gguf.get_tensor_name_map(gguf_arch_enum(arch), config.num_hidden_layers)
    out, experts = {}, {}
    for hf_name, tensor in state.items():
        if match := EXPERT_WEIGHT.fullmatch(hf_name):  # stacked per layer below, as the converter merges them
            layer, expert, kind = int(match[1]), int(match[2]), EXPERT_KINDS[match[3]]
            experts.setdefault((layer, kind), {})[expert] = tensor
            continue
        if arch == "llama" and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            tensor = permute_rows(tensor, config.num_attention_heads)
        if arch == "llama" and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            tensor = permute_rows(tensor, config.num_key_value_heads)
        if arch.startswith("gemma") and hf_name.endswith("norm.weight"):
            tensor = tensor + 1  # llama.cpp's norms multiply by w; Gemma's by (1 + w)
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        assert name is not None, f"no GGUF name for {hf_name}"
        out[name] = tensor.contiguous()
    for (layer, kind), by_expert in sorted(experts.items()):
        out[gguf.TENSOR_NAMES[kind].format(bid=layer) + ".weight"] = torch.stack(
            [by_expert[e] for e in range(len(by_expert))])
    rope = config.rope_parameters
    if rope.get("rope_type") == "llama3":
        out["rope_freqs.weight"] = llama3_rope_freqs(rope, config.head_dim)
    if arch == "phi3":
        out["rope_factors_long.weight"] = torch.tensor(rope["long_factor"], dtype=torch.float32)
        out["rope_factors_short.weight"] = torch.tensor(rope["short_factor"], dtype=torch.float32)
    return out


def gguf_arch_enum(arch: str) -> gguf.MODEL_ARCH:
    return next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)


def write_gguf(case: Case, case_dir: Path, tokenizer: Tokenizer) -> list[str]:
    """model.gguf beside the checkpoint, then read back: every checkpoint
    tensor is there (un-permuted, equal) and nothing else but the RoPE tables."""
    arch = case.gguf_arch
    config = AutoConfig.from_pretrained(case_dir)  # what the converter reads
    state = load_file(str(case_dir / "model.safetensors"))
    path = case_dir / "model.gguf"
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(case.name)
    gguf_metadata(writer, arch, config)
    gguf_vocab(writer, case_dir, tokenizer, config.vocab_size)
    tensors = gguf_tensors(arch, config, state)
    for name, tensor in tensors.items():
        writer.add_tensor(name, tensor.numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    reader = gguf.GGUFReader(str(path))
    read = {t.name: torch.from_numpy(np.array(t.data)).reshape([int(d) for d in reversed(t.shape)]) for t in reader.tensors}
    assert read.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert torch.equal(read[name], tensor), name
    return GGUF_NOTES[arch]


def gguf_forward(path: Path, input_ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits and per-layer cached keys (in transformers' channel order)
    computed from model.gguf alone with llama.cpp's reading of it: llama
    rotates adjacent pairs of its permuted Q/K, the others rotate halves;
    rope_freqs divide the frequencies; linear and yarn scaling from the
    rope.scaling keys; Phi-3's factor tensors (long above the original context,
    as transformers picks them by the prefill's length; llama.cpp picks by its
    context size); Gemma's sliding layers (every other for gemma2, five of six
    for gemma3, whose sliding layers use freq_base_swa unscaled), soft-caps and
    attention scale 1/sqrt(head_dim) (llama.cpp's rule but for 27B). An
    implementation independent of transformers, to prove the GGUF is the
    recorded model."""
    reader = gguf.GGUFReader(str(path))
    fields = {f.name: f for f in reader.fields.values()}

    def meta(key, default=None):
        if key not in fields:
            return default
        value = fields[key].parts[fields[key].data[0]]
        return value.tobytes().decode() if fields[key].types[0] == gguf.GGUFValueType.STRING else value[0].item()

    w = {t.name: torch.from_numpy(np.array(t.data)).reshape([int(d) for d in reversed(t.shape)]) for t in reader.tensors}
    arch = meta("general.architecture")
    key = lambda name: f"{arch}.{name}"
    gemma = arch.startswith("gemma")
    n_embd, n_head, n_kv = meta(key("embedding_length")), meta(key("attention.head_count")), meta(key("attention.head_count_kv"))
    eps = meta(key("attention.layer_norm_rms_epsilon"))
    head_dim = meta(key("attention.key_length"), n_embd // n_head)
    rot = meta(key("rope.dimension_count"), head_dim)
    window = meta(key("attention.sliding_window"), 0) if gemma else 0
    swa_period = {"gemma2": 2, "gemma3": 6}.get(arch)
    attn_cap, final_cap = meta(key("attn_logit_softcapping")), meta(key("final_logit_softcapping"))
    seq = len(input_ids)
    positions = torch.arange(seq, dtype=torch.float64)[:, None]

    def rope_table(base, scaling):
        theta_extrap = base ** (-torch.arange(0, rot, 2, dtype=torch.float64) / rot)
        theta, mscale = theta_extrap, 1.0
        if scaling == "linear":
            theta = theta_extrap / meta(key("rope.scaling.factor"))
        elif scaling == "yarn":
            factor, n_ctx_orig = meta(key("rope.scaling.factor")), meta(key("rope.scaling.original_context_length"))
            corr = lambda beta: rot * math.log(n_ctx_orig / (beta * 2 * math.pi)) / (2 * math.log(base))
            low, high = max(0, math.floor(corr(32.0))), min(rot - 1, math.ceil(corr(1.0)))
            ramp = 1 - ((torch.arange(rot // 2, dtype=torch.float64) - low) / max(0.001, high - low)).clamp(0, 1)
            theta = theta_extrap / factor * (1 - ramp) + theta_extrap * ramp
            mscale = 1 + 0.1 * math.log(factor)
        if "rope_freqs.weight" in w:
            theta = theta / w["rope_freqs.weight"].double()
        if "rope_factors_long.weight" in w:
            long = seq > meta(key("rope.scaling.original_context_length"))
            theta = theta / w["rope_factors_long.weight" if long else "rope_factors_short.weight"].double()
            mscale = meta(key("rope.scaling.attn_factor"))
        angles = positions * theta[None]
        return (angles.cos() * mscale).float(), (angles.sin() * mscale).float()

    base = meta(key("rope.freq_base"), 10000.0)
    global_rope = rope_table(base, meta(key("rope.scaling.type")))
    sliding_rope = rope_table(meta(key("rope.freq_base_swa"), 10000.0), None) if arch == "gemma3" else global_rope

    def rope(x, table):  # [heads, T, head_dim]; channels past `rot` pass through
        cos, sin = table
        x, rest = x[..., :rot], x[..., rot:]
        if arch == "llama":
            a, b = x[..., 0::2], x[..., 1::2]
            x = torch.stack([a * cos - b * sin, a * sin + b * cos], -1).flatten(-2)
        else:
            a, b = x[..., :rot // 2], x[..., rot // 2:]
            x = torch.cat([a * cos - b * sin, a * sin + b * cos], -1)
        return torch.cat([x, rest], -1)

    def rms(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    def linear(x, name):
        return x @ w[name + ".weight"].T + w.get(name + ".bias", 0)

    def softcap(x, cap):
        return torch.tanh(x / cap) * cap if cap else x

    q_pos, k_pos = torch.arange(seq)[:, None], torch.arange(seq)[None, :]
    causal = torch.zeros(seq, seq).masked_fill(k_pos > q_pos, float("-inf"))
    windowed = causal.masked_fill(q_pos - k_pos >= max(window, 1), float("-inf"))
    act = (lambda x: torch.nn.functional.gelu(x, approximate="tanh")) if gemma else torch.nn.functional.silu
    h = w["token_embd.weight"][input_ids]
    if gemma:
        h = h * torch.tensor(n_embd ** 0.5, dtype=h.dtype)
    keys = []
    for i in range(meta(key("block_count"))):
        p = f"blk.{i}."
        sliding = bool(window) and i % swa_period < swa_period - 1
        x = rms(h, w[p + "attn_norm.weight"])
        if p + "attn_qkv.weight" in w:
            q, k, v = linear(x, p + "attn_qkv").split([n_head * head_dim, n_kv * head_dim, n_kv * head_dim], -1)
        else:
            q, k, v = (linear(x, p + name) for name in ("attn_q", "attn_k", "attn_v"))
        q, k, v = (t.view(seq, -1, head_dim).transpose(0, 1) for t in (q, k, v))
        if p + "attn_q_norm.weight" in w:
            q, k = rms(q, w[p + "attn_q_norm.weight"]), rms(k, w[p + "attn_k_norm.weight"])
        table = sliding_rope if sliding else global_rope
        q, k = rope(q, table), rope(k, table)
        halves = torch.cat([torch.arange(0, rot, 2), torch.arange(1, rot, 2), torch.arange(rot, head_dim)])
        cached = k[..., halves] if arch == "llama" else k
        keys.append(cached[:, -(window - 1):] if sliding else cached)
        group = n_head // n_kv
        scores = softcap(q @ k.repeat_interleave(group, 0).transpose(1, 2) / math.sqrt(head_dim), attn_cap)
        attn = torch.softmax(scores + (windowed if sliding else causal), -1) @ v.repeat_interleave(group, 0)
        out = linear(attn.transpose(0, 1).reshape(seq, -1), p + "attn_output")
        h = h + (rms(out, w[p + "post_attention_norm.weight"]) if gemma else out)
        x = rms(h, w[p + "ffn_norm.weight"])
        if p + "ffn_gate_inp.weight" in w:  # softmax router, top-k, weights renormalised
            probs = torch.softmax(linear(x, p + "ffn_gate_inp"), -1)
            top, chosen = probs.topk(meta(key("expert_used_count")), -1)
            top = top / top.sum(-1, keepdim=True)
            out = torch.zeros_like(x)
            for slot in range(chosen.shape[1]):
                for e in chosen[:, slot].unique().tolist():
                    rows = chosen[:, slot] == e
                    expert = lambda kind: w[p + f"ffn_{kind}_exps.weight"][e]
                    y = (act(x[rows] @ expert("gate").T) * (x[rows] @ expert("up").T)) @ expert("down").T
                    out[rows] += top[rows, slot, None] * y
        else:
            if p + "ffn_gate.weight" in w:
                gate, up = linear(x, p + "ffn_gate"), linear(x, p + "ffn_up")
            else:  # Phi-3: gate and up fused in ffn_up
                gate, up = linear(x, p + "ffn_up").chunk(2, -1)
            out = linear(act(gate) * up, p + "ffn_down")
        h = h + (rms(out, w[p + "post_ffw_norm.weight"]) if gemma else out)
    h = rms(h, w["output_norm.weight"])
    return softcap(h @ w.get("output.weight", w["token_embd.weight"]).T, final_cap), keys


# --- recording ---------------------------------------------------------------

def record(case: Case, out_dir: Path) -> dict:
    torch.manual_seed(SEED)
    special = case.special
    tokenizer = train_tokenizer(special)
    text = token_prefix(tokenizer, PROSE.read_text(encoding="utf-8"), case.seq_len)
    config = build_config(case, special, tokenizer)
    model = make_model(config, SEED)

    case_dir = out_dir / case.name
    if case_dir.exists():
        shutil.rmtree(case_dir)
    case_dir.mkdir(parents=True)
    model.save_pretrained(case_dir, safe_serialization=True)
    (case_dir / "generation_config.json").unlink(missing_ok=True)
    native = json.loads((case_dir / "config.json").read_text())
    written = native if case.config_form == "rope_parameters" else classic_form(native, case)
    (case_dir / "config.json").write_text(json.dumps(written, indent=2) + "\n")
    tokenizer.save(str(case_dir / "tokenizer.json"))
    (case_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(special), indent=2) + "\n")

    # The ids transformers' own tokenizer gives for the text must be the raw tokenizer's.
    hf_tokenizer = AutoTokenizer.from_pretrained(case_dir)
    ids = hf_tokenizer(text)["input_ids"]
    assert ids == tokenizer.encode(text).ids, (ids, tokenizer.encode(text).ids)
    assert len(ids) == case.seq_len
    bos_id = tokenizer.token_to_id(special.bos) if special.bos else None
    assert (ids[0] == bos_id) == special.add_bos, "BOS is added exactly when the family adds it"
    input_ids = torch.tensor(ids, dtype=torch.int64)

    logits, layers = prefill(model, input_ids)
    checks = self_checks(case, special, tokenizer, model, case_dir, input_ids, logits, layers)

    tensors = {"input_ids": input_ids, "logits": logits.contiguous()}
    for i, (keys, values) in enumerate(layers):
        tensors[f"layer_{i}_key"] = keys.contiguous()
        tensors[f"layer_{i}_value"] = values.contiguous()
    save_file(tensors, str(case_dir / "reference.safetensors"))

    layer_types = getattr(model.config, "layer_types", None)
    reference = {
        "case": case.name,
        "model_type": case.model_type,
        "config_form": case.config_form,
        "features": case.features,
        "notes": case.notes,
        "seq_len": case.seq_len,
        "text": text,
        "add_bos": special.add_bos,
        "bos_token_id": bos_id,
        "cache_seq_len": [int(k.shape[2]) for k, _ in layers],
        "layer_types": layer_types,
        "sliding_window": getattr(model.config, "sliding_window", None),
        "attn_implementation": "eager",
        "dtype": "float32",
        "seed": SEED,
        "weight_std": WEIGHT_STD,
        "checks": checks,
        "versions": {
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "tokenizers": tokenizers.__version__,
            "python": platform.python_version(),
        },
    }
    if case.gguf_arch:
        reference["gguf"] = record_gguf(case, case_dir, tokenizer, input_ids, logits, layers)
    elif case.name in NO_GGUF:
        reference["gguf"] = {"none": NO_GGUF[case.name]}
    (case_dir / "reference.json").write_text(json.dumps(reference, indent=2) + "\n")
    return reference


def record_gguf(case, case_dir, tokenizer, input_ids, logits, layers) -> dict:
    """Writes model.gguf and proves it is the recorded model: gguf_forward's
    logits and cache from it alone are within 1e-5 of transformers'."""
    notes = write_gguf(case, case_dir, tokenizer)
    gguf_logits, gguf_keys = gguf_forward(case_dir / "model.gguf", input_ids)
    diff = max_rel_diff(logits, gguf_logits)
    assert diff < 1e-5, f"{case.name}: model.gguf's logits differ by {diff:.2e} of their scale"
    for i, ((keys, _), again) in enumerate(zip(layers, gguf_keys)):
        assert keys[0].shape == again.shape and max_rel_diff(keys[0], again) < 1e-5, f"{case.name}: layer {i} keys"
    return {"arch": case.gguf_arch, "notes": notes,
            "independent forward from the GGUF: max |diff| / max |logits|": float(f"{diff:.2e}")}


def self_checks(case, special, tokenizer, model, case_dir, input_ids, logits, layers) -> dict:
    """What must hold for the recording to prove anything; fails loudly."""
    checks = {}
    again, _ = prefill(model, input_ids)
    assert torch.equal(again, logits), "a second prefill differs"
    checks["second_prefill_identical"] = True

    loaded = AutoModelForCausalLM.from_pretrained(case_dir, attn_implementation="eager", dtype=torch.float32).eval()
    reloaded, reloaded_layers = prefill(loaded, input_ids)
    assert torch.equal(reloaded, logits), f"{case.name}: config.json as written loads a different model"
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(layers, reloaded_layers))
    checks["directory_reloaded_identical"] = True

    logit_std = float(logits.std())
    position_spread = float((logits - logits.mean(0)).std())
    assert position_spread > 0.3 * logit_std, "logits barely differ by position"
    checks["logits_std"] = round(logit_std, 4)

    for what, overrides in case.ablations.items():
        off = make_model(build_config(case, special, tokenizer, overrides), SEED)
        off_logits, _ = prefill(off, input_ids)
        diff = max_rel_diff(logits, off_logits)
        assert diff > 1e-2, f"{case.name}: {what} changes the logits by only {diff:.2e} of their scale"
        checks[f"{what}: max |diff| / max |logits|"] = round(diff, 4)

    for what, overrides in case.inert.items():
        same = make_model(build_config(case, special, tokenizer, overrides), SEED)
        assert torch.equal(prefill(same, input_ids)[0], logits), f"{case.name}: {what} changes the logits"
        checks[f"{what}: logits unchanged"] = True

    margin = router_margin(model, input_ids)
    if margin is not None:
        assert margin > 1e-3, f"{case.name}: a token's k-th and next expert are {margin:.1e} apart"
        checks["router_margin"] = round(margin, 4)

    if getattr(model.config, "sliding_window", None):
        window = model.config.sliding_window
        for i, (keys, _) in enumerate(layers):
            sliding = (getattr(model.config, "layer_types", None) or ["sliding_attention"] * len(layers))[i]
            expected = min(case.seq_len, window - 1) if sliding == "sliding_attention" else case.seq_len
            assert keys.shape[2] == expected, (i, keys.shape, expected)
    return checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cases", nargs="*", help="case names (default: all)")
    parser.add_argument("--out", default=str(ROOT / "testdata" / "families"))
    args = parser.parse_args()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    cases = {case.name: case for case in all_cases()}
    unknown = [name for name in args.cases if name not in cases]
    if unknown:
        sys.exit(f"unknown case(s) {unknown}; known: {sorted(cases)}")
    out_dir = Path(args.out)
    for name in args.cases or cases:
        reference = record(cases[name], out_dir)
        size = sum(f.stat().st_size for f in (out_dir / name).iterdir())
        print(f"{name}: T={reference['seq_len']} cache {reference['cache_seq_len']} "
              f"{size / 1024:.0f} KiB {reference['checks']}")


if __name__ == "__main__":
    main()
