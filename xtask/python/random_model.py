"""A model with random weights in a published shape, as a Hugging Face
directory kv-validate and transformers both load (config.json,
model.safetensors, tokenizer.json).

For GPU benchmarks on machines that reach no network and take 64 MiB of
files per call: real weights cannot travel there, so they are made there.
Speed, the cache's size and whether two implementations agree do not depend
on the weights' values. The configs are the published ones (every field that
changes the math: RoPE scaling, soft-caps, sliding windows, biases, norms).
The tokenizer is a byte-level BPE trained on TEXT with at most the model's
vocabulary (32,000 at most, so training stays quick); its ids are valid for
the model, whose larger embedding rows simply go unused.

usage: python random_model.py OUT_DIR TEXT [--shape tinyllama-1.1b] [--dtype bfloat16] [--seed 0]
"""
import argparse
import os

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM

SHAPES = {
    # TinyLlama/TinyLlama-1.1B-Chat-v1.0
    "tinyllama-1.1b": dict(
        model_type="llama", vocab_size=32000, hidden_size=2048, intermediate_size=5632,
        num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
        max_position_embeddings=2048, rope_theta=10000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    ),
    # meta-llama/Llama-2-7b-hf (MHA: 32 KV heads, 1 GiB of bf16 cache per 2048-token window)
    "llama-2-7b": dict(
        model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
        max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    ),
    # meta-llama/Llama-3.1-8B
    "llama-3.1-8b": dict(
        model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=8192),
        tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001,
    ),
    # Qwen/Qwen2.5-7B
    "qwen2.5-7b": dict(
        model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
        num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
        max_position_embeddings=131072, rope_theta=1000000.0, rms_norm_eps=1e-6,
        sliding_window=131072, use_sliding_window=False, max_window_layers=28,
        tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151643,
    ),
    # mistralai/Mistral-7B-v0.3
    "mistral-7b": dict(
        model_type="mistral", vocab_size=32768, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-5,
        sliding_window=None, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    ),
    # google/gemma-2-9b
    "gemma-2-9b": dict(
        model_type="gemma2", vocab_size=256000, hidden_size=3584, intermediate_size=14336,
        num_hidden_layers=42, num_attention_heads=16, num_key_value_heads=8, head_dim=256,
        max_position_embeddings=8192, rope_theta=10000.0, rms_norm_eps=1e-6,
        hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=256,
        sliding_window=4096, final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
        tie_word_embeddings=True, bos_token_id=2, eos_token_id=1, pad_token_id=0,
    ),
}
TOKENIZER_VOCAB_CAP = 32000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("text")
    parser.add_argument("--shape", default="tinyllama-1.1b", choices=sorted(SHAPES))
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)

    shape = dict(SHAPES[args.shape])
    config = AutoConfig.for_model(shape.pop("model_type"), **shape)
    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    torch.set_default_dtype(dtype)  # an 8B model initialised in f32 would double the memory
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config)
    model.to(dtype).save_pretrained(args.out_dir, safe_serialization=True)

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=min(config.vocab_size, TOKENIZER_VOCAB_CAP),
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train([args.text], trainer)
    tokenizer.save(os.path.join(args.out_dir, "tokenizer.json"))
    text = open(args.text, encoding="utf-8").read()
    print(f"{args.out_dir}: {args.shape} ({config.model_type}), "
          f"{sum(p.numel() for p in model.parameters()):,} parameters in {args.dtype}; "
          f"{len(tokenizer.encode(text).ids):,} tokens in {args.text}")


if __name__ == "__main__":
    main()
