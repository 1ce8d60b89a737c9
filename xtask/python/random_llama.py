"""A Llama with random weights in TinyLlama-1.1B's shape, as a Hugging Face
directory kv-validate and transformers both load (config.json,
model.safetensors, tokenizer.json).

For GPU benchmarks on machines that reach no network and take 64 MiB of
files per call: real 1.1B weights cannot travel there, so they are made
there. Speed and the cache's size do not depend on the weights' values.
The tokenizer is a byte-level BPE trained on TEXT with TinyLlama's vocabulary
size, so a token stands for about as much text as it does in TinyLlama.

usage: python random_llama.py OUT_DIR TEXT [--dtype bfloat16] [--seed 0]
"""
import argparse
import os

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM

TINYLLAMA_1_1B = dict(
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("text")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)

    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**TINYLLAMA_1_1B))
    model.to(getattr(torch, args.dtype)).save_pretrained(args.out_dir, safe_serialization=True)

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINYLLAMA_1_1B["vocab_size"],
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train([args.text], trainer)
    tokenizer.save(os.path.join(args.out_dir, "tokenizer.json"))
    text = open(args.text, encoding="utf-8").read()
    print(f"{args.out_dir}: {sum(p.numel() for p in model.parameters()):,} parameters "
          f"in {args.dtype}; {len(tokenizer.encode(text).ids):,} tokens in {args.text}")


if __name__ == "__main__":
    main()
