#!/usr/bin/env bash
# Sourced by the other h200-*.sh scripts on the GPU machine (no Rust, no
# network): unpacks the carried binaries (.gpu/kv-validate.xz from
# `cargo xtask build-cuda`, .gpu/kv-compress.xz from the CPU build, both
# stripped), records the GPU's identity, and makes the evaluation text and
# the TinyLlama-shaped random model (not with NO_RANDOM_MODEL=1) in
# target/gpuwork once per machine, so a
# call that finds the machine warm skips what the call before it made.
W=target/gpuwork; mkdir -p "$W"
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib KV_COMPRESS_PATH=$PWD/$W/kv-compress
for b in kv-validate kv-compress; do
  [ -f ".gpu/$b.xz" ] && xz -dc ".gpu/$b.xz" > "$W/$b" && chmod +x "$W/$b"
done
[ -f .gpu/smollm2.part-a ] && cp .gpu/smollm2.part-a "$W/"
if [ ! -f "$W/gpu.txt" ]; then
  { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; nproc; lscpu | grep 'Model name'; } > "$W/gpu.txt"
fi
cp "$W/gpu.txt" "$OUT/gpu.txt"
# Real prose (Python's own documentation, PSF licence), four times over: about
# 400,000 tokens for the full-size validation. Random weights: content is irrelevant to speed.
[ -f "$W/text.txt" ] || python3 -c "from pydoc_data import topics; t='\n\n'.join(topics.topics.values()); print('\n\n'.join([t]*4))" > "$W/text.txt"
[ -n "${NO_RANDOM_MODEL:-}" ] || [ -f "$W/tl/model.safetensors" ] || python3 xtask/python/random_model.py "$W/tl" "$W/text.txt" --shape tinyllama-1.1b | tail -n 2
