"""PyTorch eager reference for `cargo xtask bench --torch`.

Loads the same GGUF with Hugging Face transformers (dequantized to float32,
eager attention, the classic PyTorch path the original validator ran) and
times a forward pass of N tokens from an empty cache, as kv-validate's
--bench-forward does: with the last position's logits (a prefill) and with
every position's. Prints one JSON object on stdout.

usage: python torch_forward_bench.py MODEL.gguf 512,2048 [repetitions]
"""
import json
import os
import statistics
import sys
import time

import torch
from transformers import AutoModelForCausalLM


def median_seconds(model, tokens, repetitions, logits_to_keep):
    times = []
    for _ in range(repetitions):
        started = time.perf_counter()
        model(tokens, use_cache=True, logits_to_keep=logits_to_keep)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    gguf = os.path.abspath(sys.argv[1])
    contexts = [int(c) for c in sys.argv[2].split(",")]
    repetitions = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    torch.set_num_threads(os.cpu_count() or 1)
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf),
        gguf_file=os.path.basename(gguf),
        torch_dtype=torch.float32,
        attn_implementation="eager",
    )
    model.eval()
    generator = torch.Generator().manual_seed(0)
    results = []
    for context in contexts:
        tokens = torch.randint(0, model.config.vocab_size, (1, context), generator=generator)
        with torch.inference_mode():
            model(tokens[:, :16])  # warm-up
            # logits_to_keep=1: the cache and the last position's logits, as
            # kv-validate's prefill; 0 (transformers' default): every position.
            last = median_seconds(model, tokens, repetitions, logits_to_keep=1)
            every = median_seconds(model, tokens, repetitions, logits_to_keep=0)
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
        "forward": results,
    }, indent=2))


if __name__ == "__main__":
    main()
