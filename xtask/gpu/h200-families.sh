#!/usr/bin/env bash
# On the GPU machine (no Rust, no network), issue 24's proof at real size: for
# each published shape (random bf16 weights made there, one at a time, since
# each is 15-19 GB on a 64 GB disk), kv-validate and transformers score the
# same text with the same protocol (xtask/python/torch_perplexity.py mirrors
# kv-validate's sliding window), then forward tokens/s at 2048 tokens against
# PyTorch eager and sdpa. Everything lands in $OUT/families.txt.
# Expects .gpu/kv-validate.xz (cargo xtask build-cuda, stripped) and
# .gpu/kv-compress.xz (the CPU build). Usage: h200-families.sh SHAPE... (default: all four)
set -uo pipefail
W=target/gpuwork; mkdir -p "$W"
for b in kv-validate kv-compress; do [ -x "$W/$b" ] || { xz -dc ".gpu/$b.xz" > "$W/$b" && chmod +x "$W/$b"; }; done
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib KV_COMPRESS_PATH=$PWD/$W/kv-compress
LOG="$OUT/families.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >> "$LOG"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" >> "$LOG"
# Real prose (Python's own documentation, PSF licence): random weights make
# its content irrelevant; about 30,000 tokens, of which --max-windows keep 6.
python3 -c "from pydoc_data import topics; print('\n\n'.join(topics.topics.values())[:150000])" > "$W/text.txt"
WINDOWS=6
for shape in "${@:-llama-3.1-8b qwen2.5-7b mistral-7b gemma-2-9b}"; do
  for s in $shape; do
    echo "=== $s" | tee -a "$LOG"
    rm -rf "$W/m"
    python3 xtask/python/random_model.py "$W/m" "$W/text.txt" --shape "$s" 2>&1 | grep -v Writing | tail -n 2 | tee -a "$LOG"
    echo "--- kv-validate bf16 --max-windows $WINDOWS" >> "$LOG"
    timeout 300 "$W/kv-validate" --model-dir "$W/m" --text-file "$W/text.txt" --dtype bf16 \
      --max-windows $WINDOWS --json "$W/ours.json" > "$W/ours.txt" 2>&1; tail -n 12 "$W/ours.txt" >> "$LOG"
    python3 -c "import json; p=json.load(open('$W/ours.json'))['perplexity']; print(json.dumps({k: p[k] for k in ('baseline', 'compressed', 'delta')}))" >> "$LOG" 2>&1
    echo "--- transformers bf16 eager" >> "$LOG"
    timeout 300 python3 xtask/python/torch_perplexity.py "$W/m" "$W/text.txt" --dtype bfloat16 --attn eager --max-windows $WINDOWS 2>/dev/null >> "$LOG"
    echo "--- forward tokens/s at 2048" >> "$LOG"
    timeout 120 "$W/kv-validate" --model-dir "$W/m" --bench-forward 2048 --dtype bf16 2>&1 | tail -n 4 >> "$LOG"
    for attn in eager sdpa; do
      timeout 150 python3 xtask/python/torch_forward_bench.py "$W/m" 2048 5 --device cuda --dtype bfloat16 --attn $attn 2>/dev/null | tr -d '\n' >> "$LOG"; echo >> "$LOG"
    done
    tail -n 30 "$LOG"
  done
done
rm -rf "$W/m"
