"""PyTorch reference for kv-validate's --bench-forward (`cargo xtask bench --torch`,
and the GPU figures in docs/benchmarks.md).

Loads a model with Hugging Face transformers, a GGUF file (dequantized) or a
Hugging Face directory, and times a forward pass of N tokens from an empty
cache, as kv-validate's --bench-forward does: with the last position's logits
(a prefill) and with every position's. On a GPU each timing waits for the
device (torch.cuda.synchronize). Prints one JSON object on stdout.

usage: python torch_forward_bench.py MODEL 512,2048 [repetitions]
           [--device cpu|cuda] [--dtype float32|bfloat16|float16] [--attn eager|sdpa]

MODEL is a .gguf file or a Hugging Face model directory. Defaults: cpu,
float32, eager attention (the classic PyTorch path the original validator ran).
"""
import argparse
import json
import os
import statistics
import time

import torch
from transformers import AutoModelForCausalLM


def median_seconds(model, tokens, repetitions, logits_to_keep, device):
    times = []
    for _ in range(repetitions):
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        model(tokens, use_cache=True, logits_to_keep=logits_to_keep)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def load(path, dtype, attn, device):
    path = os.path.abspath(path)
    if path.endswith(".gguf"):
        kwargs = {"gguf_file": os.path.basename(path)}
        path = os.path.dirname(path)
    else:
        kwargs = {}
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=getattr(torch, dtype), attn_implementation=attn, **kwargs
    )
    return model.to(device).eval()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("contexts")
    parser.add_argument("repetitions", nargs="?", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--attn", default="eager", choices=["eager", "sdpa"])
    args = parser.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    if args.device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    model = load(args.model, args.dtype, args.attn, args.device)
    generator = torch.Generator().manual_seed(0)
    results = []
    for context in contexts:
        tokens = torch.randint(0, model.config.vocab_size, (1, context), generator=generator)
        tokens = tokens.to(args.device)
        with torch.inference_mode():
            model(tokens[:, :16])  # warm-up
            model(tokens)
            # logits_to_keep=1: the cache and the last position's logits, as
            # kv-validate's prefill; 0 (transformers' default): every position.
            last = median_seconds(model, tokens, args.repetitions, 1, args.device)
            every = median_seconds(model, tokens, args.repetitions, 0, args.device)
        results.append({
            "context": context,
            "seconds": last,
            "tokens_per_second": context / last,
            "all_logits_seconds": every,
            "all_logits_tokens_per_second": context / every,
        })
    print(json.dumps({
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "dtype": args.dtype,
        "attn": args.attn,
        "forward": results,
    }, indent=2))


if __name__ == "__main__":
    main()
