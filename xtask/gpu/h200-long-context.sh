#!/usr/bin/env bash
# On the GPU machine (no Rust, no network): issue 20's long-context runs of
# SmolLM2-135M-Instruct (context 8,192) at full settings, on the GPU in bf16.
# Carried as for h200-validate.sh: .gpu/kv-validate.xz (the CUDA build of
# `cargo xtask build-cuda`, stripped), .gpu/kv-compress.xz, and the 98 MB
# GGUF in two halves (.gpu/smollm2.part-a on one call, .gpu/smollm2.part-b
# on the next, on the same warm machine; the carry limit is 64 MiB a call).
# The length sweep scores Python's documentation (h200-setup.sh makes it);
# the passkey haystack is kv-validate's built-in prose fixture.
# Methods: docs/fidelity.md's best at 4.35, 3.35 and 2.35 bits/value, the
# entropy-coded one rate (ecsq) and the best fixed-width layout per budget.
# Every part runs under `timeout ${PART_LIMIT:-280}` and writes its JSON, text and SVG to $OUT.
# A call has 600 s, so the parts go in separate calls on the warm machine:
#   bash xtask/gpu/h200-long-context.sh lengths            # 2 parts
#   bash xtask/gpu/h200-long-context.sh passkey 1024,2048  # a part per length
#   bash xtask/gpu/h200-long-context.sh passkey 4096
#   bash xtask/gpu/h200-long-context.sh passkey 8192
# or, where the GPU is fast enough, everything in one call:
#   PART_LIMIT=150 bash xtask/gpu/h200-long-context.sh all
set -uo pipefail
. xtask/gpu/h200-setup.sh
W=target/gpuwork
if [ -f .gpu/smollm2.part-b ]; then cat "$W/smollm2.part-a" .gpu/smollm2.part-b > "$W/smollm2.gguf"; fi
sha256sum "$W/smollm2.gguf" | tee "$OUT/smollm2.sha256"
E='-method kivi -grid ecsq -key-group-size 1024 -value-axis channel -value-group-size 1024 -sink-tokens 1'
K='-method kivi -rotate -fit mse -key-group-size 128 -value-axis flat -value-group-size 256'
VARIANTS=(
  --variant "ecsq-r4.35-sink1=$E -rate 4.35"
  --variant "ecsq-r3.35-sink1=$E -rate 3.35"
  --variant "ecsq-r2.35-sink1=$E -rate 2.35"
  --variant "kivi4-rot-mse-k128-vf256-sink4=$K -bits 4 -sink-tokens 4"
  --variant "kivi3-rot-mse-k128-vf256-sink1=$K -bits 3 -sink-tokens 1"
  --variant "kivi2-rot-mse-k128-vf256-sink1=$K -bits 2 -sink-tokens 1"
)
# part NAME ARGS...: one kv-validate run on the GPU, peak RSS recorded where GNU time exists.
part() {
  local name=$1; shift; local timer=()
  [ -x /usr/bin/time ] && timer=(/usr/bin/time -v -o "$OUT/$name.time")
  echo "== $name"
  "${timer[@]}" timeout "${PART_LIMIT:-280}" "$W/kv-validate" --gguf "$W/smollm2.gguf" --device cuda --quiet "$@" > "$OUT/$name.txt" 2>&1
  echo "exit $?"; tail -n 45 "$OUT/$name.txt"
  [ -f "$OUT/$name.time" ] && grep -E 'Elapsed|Maximum resident' "$OUT/$name.time"
}
lengths() {
  # Windows of L + 128 tokens: 8064 + 128 = 8192, the model's context.
  part lengths-short --text-file "$W/text.txt" --context-lengths 512,1024,2048 --targets 128 --max-windows 4 \
    "${VARIANTS[@]}" --json "$OUT/lengths-short.json" --context-plot "$OUT/lengths-short.svg"
  part lengths-long --text-file "$W/text.txt" --context-lengths 4096,8064 --targets 128 --max-windows 4 \
    "${VARIANTS[@]}" --json "$OUT/lengths-long.json" --context-plot "$OUT/lengths-long.svg"
}
passkey() {
  for L in ${1//,/ }; do
    part "passkey-$L" --passkey --passkey-lengths "$L" --passkey-depths 0,25,50,75,100 --passkey-trials 2 \
      --passkey-seed 20 "${VARIANTS[@]}" --json "$OUT/passkey-$L.json" --passkey-plot "$OUT/passkey-$L.svg"
  done
}
case "${1:-lengths}" in
  lengths) lengths ;;
  all) lengths; passkey "${2:-1024,2048,4096,8192}" ;;
  passkey) passkey "${2:-1024,2048,4096,8192}" ;;
esac
