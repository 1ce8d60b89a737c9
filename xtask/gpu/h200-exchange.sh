#!/usr/bin/env bash
# On the GPU machine (h200-setup.sh makes the binaries, text and
# TinyLlama-shaped model in target/gpuwork, once per warm machine): issue
# 23's proof that the validation is bound by the model, not by the file
# exchange. One step per call (each fits the 10-minute limit of a call):
#   bash xtask/gpu/h200-exchange.sh tinyllama   # full size (~400,000 tokens), --pipeline-depth 1 vs the default (3)
#   bash xtask/gpu/h200-exchange.sh llama2-7b   # Llama-2-7B shape (MHA), 48 windows, depth 1 vs 3
#   bash xtask/gpu/h200-exchange.sh ecsq        # the TinyLlama run with the 4.35-bit ecsq method, overlapped
# Each pair's reports must be identical but for the times (checked here:
# `identical` or the difference, in $OUT/<step>-compare.txt); the goal is
# wall <= 1.5x model time for TinyLlama and <= 3x for the 7B shape (the
# `Wall time:` line has both, each exchange step's GB/s and the overlap).
set -uo pipefail
. xtask/gpu/h200-setup.sh
step=${1:?usage: h200-exchange.sh tinyllama|llama2-7b|ecsq}
# A run's stdout, --json and --records under $OUT/NAME.*, its Wall time line shown.
run() {
  local name=$1 limit=$2; shift 2
  /usr/bin/time -v timeout "$limit" "$W/kv-validate" --json "$OUT/$name.json" --records "$W/$name.records.json" "$@" \
    > "$OUT/$name.txt" 2> "$OUT/$name.err"
  echo "$name: exit $?"; grep -E '^(Wall time|Windows|Compressed perplexity)' "$OUT/$name.txt"
  grep -E 'Maximum resident' "$OUT/$name.err"
}
# The two runs' text and JSON reports and records, times left out.
compare() {
  python3 - "$OUT/$1" "$OUT/$2" "$W/$1.records.json" "$W/$2.records.json" > "$OUT/$3-compare.txt" <<'PY'
import json, sys
def strip(v):
    if isinstance(v, dict):
        return {k: strip(x) for k, x in v.items() if k not in ("timing", "timings", "wall_seconds", "processing_time_ms")}
    if isinstance(v, list):
        return [strip(x) for x in v]
    return v
a, b, ra, rb = sys.argv[1:]
text = lambda p: [l for l in open(p + ".txt") if not l.startswith("Wall time:")]
same = text(a) == text(b) and strip(json.load(open(a + ".json"))) == strip(json.load(open(b + ".json"))) \
    and strip(json.load(open(ra))) == strip(json.load(open(rb)))
print("identical" if same else "DIFFERENT")
PY
  cat "$OUT/$3-compare.txt"
}
case "$step" in
  tinyllama)
    run tl-sequential 300 --model-dir "$W/tl" --text-file "$W/text.txt" --pipeline-depth 1
    run tl-overlapped 160 --model-dir "$W/tl" --text-file "$W/text.txt"
    compare tl-sequential tl-overlapped tinyllama ;;
  llama2-7b)
    [ -f "$W/l2/model.safetensors" ] || python3 xtask/python/random_model.py "$W/l2" "$W/text.txt" --shape llama-2-7b | tail -n 2
    run l2-sequential 150 --model-dir "$W/l2" --text-file "$W/text.txt" --max-windows 48 --pipeline-depth 1
    run l2-overlapped 100 --model-dir "$W/l2" --text-file "$W/text.txt" --max-windows 48
    compare l2-sequential l2-overlapped llama2-7b ;;
  ecsq)
    run tl-ecsq 580 --model-dir "$W/tl" --text-file "$W/text.txt" \
      --compress-arg=-method --compress-arg=kivi --compress-arg=-grid --compress-arg=ecsq \
      --compress-arg=-rate --compress-arg=4.35 --compress-arg=-key-group-size --compress-arg=1024 \
      --compress-arg=-value-axis --compress-arg=channel --compress-arg=-value-group-size \
      --compress-arg=1024 --compress-arg=-sink-tokens --compress-arg=1 ;;
  *) echo "unknown step $step" >&2; exit 2 ;;
esac
