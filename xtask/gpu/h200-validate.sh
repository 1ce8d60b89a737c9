#!/usr/bin/env bash
# On the GPU machine, after h200-bench.sh on the same (still warm) machine:
# SmolLM2 on testdata/prose.txt on the GPU in f32 and bf16 and on that
# machine's CPU, then the full-size validation (TinyLlama-shaped model, the
# default sliding window and compressor, ~400,000 tokens). The 98 MB GGUF
# travels in two halves (.gpu/smollm2.part-a from the call before, -b now).
set -uo pipefail
W=target/gpuwork
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib KV_COMPRESS_PATH=$PWD/$W/kv-compress
if [ -f .gpu/smollm2.part-b ]; then cat "$W/smollm2.part-a" .gpu/smollm2.part-b > "$W/smollm2.gguf"; fi
sha256sum "$W/smollm2.gguf" | tee "$OUT/smollm2.sha256"
# The CUDA kernels against the CPU's (kernels.rs's GPU unit test; the stripped
# `cargo test --release -p kv-validate --features cuda --lib --no-run` binary of the kv-validate library).
if [ -f .gpu/kv-validate-test.xz ]; then
  xz -dc .gpu/kv-validate-test.xz > "$W/kv-validate-test" && chmod +x "$W/kv-validate-test"
  timeout 120 "$W/kv-validate-test" cuda_kernels --nocapture 2>&1 | tail -n 8 | tee "$OUT/kernel-test.txt"
fi
run() { local name=$1; shift; timeout 300 "$W/kv-validate" --gguf "$W/smollm2.gguf" --text-file testdata/prose.txt --json "$OUT/$name.json" "$@" > "$OUT/$name.txt" 2>&1; tail -n 25 "$OUT/$name.txt"; }
run smollm2-gpu-f32 --device cuda --dtype f32
run smollm2-gpu-bf16 --device cuda --dtype bf16
run smollm2-cpu-f32 --cpu
timeout 500 "$W/kv-validate" --model-dir "$W/tl" --text-file "$W/text.txt" --json "$OUT/full.json" > "$OUT/full.txt" 2>&1
tail -n 40 "$OUT/full.txt"
