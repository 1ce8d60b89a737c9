"""PyTorch/transformers reference for kv-validate's baseline perplexity.

Scores a text with a Hugging Face model directory the way kv-validate does
(crates/kv-validate/src/perplexity.rs): the tokens of `tokenizer.json`
(special tokens added as its post-processor says, as kv-validate encodes),
the original's sliding window (the model's context capped at 2048 tokens,
stride 512; tokens an earlier window scored are context only), and the
token-weighted mean NLL. Prints one JSON object on stdout.

usage: python torch_perplexity.py MODEL_DIR TEXT [--device cuda] [--dtype bfloat16]
           [--attn eager|sdpa] [--max-windows N]
"""
import argparse
import json
import math
import os

import torch
from tokenizers import Tokenizer
from transformers import AutoConfig, AutoModelForCausalLM

MAX_SLIDING_CONTEXT = 2048
SLIDING_STRIDE = 512


def windows(tokens, max_len, stride, max_windows):
    """(begin, context_end, end) as perplexity::plan_windows cuts them."""
    out, begin, previous_end = [], 0, 0
    while max_windows is None or len(out) < max_windows:
        end = min(begin + max_len, tokens)
        out.append((begin, max(previous_end, begin), end))
        previous_end = end
        if end == tokens:
            break
        begin += stride
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("text")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--attn", default="eager", choices=["eager", "sdpa"])
    parser.add_argument("--max-windows", type=int)
    args = parser.parse_args()

    tokenizer = Tokenizer.from_file(os.path.join(args.model_dir, "tokenizer.json"))
    with open(args.text, encoding="utf-8") as f:
        ids = tokenizer.encode(f.read(), add_special_tokens=True).ids
    config = AutoConfig.from_pretrained(args.model_dir)
    max_len = min(config.max_position_embeddings, MAX_SLIDING_CONTEXT)
    stride = max(1, min(SLIDING_STRIDE, max_len // 2))
    model = AutoModelForCausalLM.from_pretrained(
        args.model_dir, dtype=getattr(torch, args.dtype), attn_implementation=args.attn
    ).to(args.device).eval()

    total_nll, scored = 0.0, 0
    tokens = torch.tensor(ids, device=args.device)
    plan = windows(len(ids), max_len, stride, args.max_windows)
    with torch.no_grad():
        for begin, context_end, end in plan:
            logits = model(tokens[begin:end].unsqueeze(0), use_cache=False).logits[0].double()
            # Position p predicts token p + 1; targets are [context_end, end),
            # and a window with no context cannot score its first token.
            first = max(context_end, begin + 1)
            log_probs = torch.log_softmax(logits[first - begin - 1 : end - begin - 1], dim=-1)
            targets = tokens[first:end].unsqueeze(1)
            total_nll -= log_probs.gather(1, targets).sum().item()
            scored += end - first
    print(json.dumps({
        "model_dir": args.model_dir,
        "model_type": config.model_type,
        "dtype": args.dtype,
        "attn": args.attn,
        "tokens": len(ids),
        "windows": len(plan),
        "scored_tokens": scored,
        "baseline_perplexity": math.exp(total_nll / scored),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
    }, indent=2))


if __name__ == "__main__":
    main()
