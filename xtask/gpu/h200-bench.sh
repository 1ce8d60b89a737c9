#!/usr/bin/env bash
# On the GPU machine (no Rust, no network): forward-pass speed of the CUDA
# build against PyTorch on a TinyLlama-1.1B-shaped model with random weights
# made there, plus the GPU's identity. Results as JSON under $OUT.
# Expects .gpu/kv-validate.xz (cargo xtask build-cuda, stripped) and
# .gpu/kv-compress.xz (the CPU build). Figures: docs/benchmarks.md.
set -uo pipefail
. xtask/gpu/h200-setup.sh
cat "$OUT/gpu.txt"
ldd "$W/kv-validate" | grep -E 'cuda|cublas|curand|not found' | tee -a "$OUT/gpu.txt"
for dt in bf16 f32; do
  timeout 120 "$W/kv-validate" --model-dir "$W/tl" --bench-forward 512,2048 --dtype "$dt" --json "$OUT/ours-$dt.json" 2>&1 | tail -4
done
for spec in "bfloat16 eager" "bfloat16 sdpa" "float32 eager"; do
  set -- $spec
  timeout 150 python3 xtask/python/torch_forward_bench.py "$W/tl" 512,2048 5 --device cuda --dtype "$1" --attn "$2" > "$OUT/torch-$1-$2.json" 2>"$OUT/torch-$1-$2.err"
  tail -c 600 "$OUT/torch-$1-$2.json"
done
