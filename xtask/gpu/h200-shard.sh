#!/usr/bin/env bash
# On the GPU machine (h200-setup.sh makes the binaries, text and
# TinyLlama-shaped model in target/gpuwork, once per warm machine): issue
# 22's proof that `--devices` spreads one validation over the GPUs of a host
# and reports what one GPU reports. The full validation (~400,000 tokens)
# runs once on cuda:0, once with --devices all (or, with one GPU only,
# --devices cuda:0,cuda:0: two workers sharing it prove the mechanism).
# The JSON reports must be identical but for the times and the device
# names (checked here: `identical` or DIFFERENT, in $OUT/shard-compare.txt);
# both wall times are printed.
#   bash xtask/gpu/h200-shard.sh
set -uo pipefail
. xtask/gpu/h200-setup.sh
# MODEL_ARGS: another model or a shorter run, e.g. MODEL_ARGS="--gguf $W/smollm2.gguf
# --text-file $W/text.txt --max-windows 300" after h200-long-context.sh.
MODEL_ARGS=${MODEL_ARGS:-"--model-dir $W/tl --text-file $W/text.txt"}
gpus=$(nvidia-smi -L | wc -l)
if [ "$gpus" -gt 1 ]; then devices=all; else devices=cuda:0,cuda:0; fi
# A run's stdout and --json under $OUT/NAME.*, its wall time in seconds.
run() {
  local name=$1; shift
  local start=$(date +%s.%N)
  # shellcheck disable=SC2086
  timeout 280 "$W/kv-validate" $MODEL_ARGS --json "$OUT/$name.json" "$@" > "$OUT/$name.txt" 2> "$OUT/$name.err"
  local rc=$? end=$(date +%s.%N)
  echo "$name ($*): exit $rc, wall $(python3 -c "print(f'{$end - $start:.1f}')") s"
  grep -E '^(Wall time|Windows|Compressed perplexity|Device)' "$OUT/$name.txt"
  tail -n 2 "$OUT/$name.err"
}
echo "$gpus GPU(s); workers: --devices $devices"
run one-gpu --device cuda:0
run workers --devices "$devices"
python3 - "$OUT/one-gpu.json" "$OUT/workers.json" > "$OUT/shard-compare.txt" <<'PY'
import json, sys
SKIP = ("timing", "timings", "wall_seconds", "processing_time_ms", "device")
def strip(v):
    if isinstance(v, dict):
        return {k: strip(x) for k, x in v.items() if k not in SKIP}
    if isinstance(v, list):
        return [strip(x) for x in v]
    return v
a, b = (strip(json.load(open(p))) for p in sys.argv[1:])
print("identical" if a == b else "DIFFERENT")
if a != b:
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            print(k, json.dumps(a.get(k))[:300], json.dumps(b.get(k))[:300])
PY
cat "$OUT/shard-compare.txt"
