#!/bin/sh
# Byte-for-byte proof for a refactoring (issue 18): records every output of
# both binaries on fixed inputs, so that two builds can be compared.
#
#   xtask/house-proof.sh record OUT [BIN]   outputs of BIN's binaries into OUT
#   xtask/house-proof.sh compare A B        diff -r of two records; empty = same
#
# BIN (default target/release) holds kv-compress, kv-validate and
# examples/tiny_model (`cargo build --release --workspace --example
# tiny_model`). Run from the repository root. What is recorded:
#   - kv-validate on the tiny test model and testdata/prose.txt, as
#     crates/kv-validate/tests/sweep.rs runs it: one validation, a sweep of
#     three variants and the built-in matrix (text, --json, --records, CSV,
#     plots), two --windows slices and their merge, a sensitivity sweep and
#     allocate, capacity with the sweep's JSON, --quick-test;
#   - kv-compress on testdata/golden/kv_cache.safetensors with every case of
#     testdata/golden/cases.txt: packed bytes, -reconstruct and -decompress
#     files, -metrics-only, and each JSON;
#   - the Python reader's and bridge's tests (tests/python), their output.
# Wall times differ run to run: a JSON line whose key names seconds, a rate (_per_s),
# milliseconds or the compressor's share, and the text's "Wall time:" line,
# have their value replaced by T. Everything else is compared as written.
# The runs happen in one fixed directory (paths appear in the reports), one
# record at a time.
set -eu

usage() {
  sed -n '2,6p' "$0" >&2
  exit 2
}

# Each file under $1 with its timing values masked, in place.
mask_timings() {
  find "$1" -type f \( -name '*.json' -o -name '*.txt' \) | while read -r file; do
    sed -E -i \
      -e 's/^( *"[a-z_]*(seconds|_ms|compressor_share|_per_s)[a-z_]*": )[-0-9.eE+]+/\1T/' \
      -e 's/^(Wall time: +).*/\1T/' \
      -e 's/^( *"(secs|nanos)": )[0-9]+/\1T/' \
      "$file"
  done
}

record() {
  out=$1
  bin=$(cd "${2:-target/release}" && pwd)
  root=$(pwd)
  work=${TMPDIR:-/tmp}/house-proof-run
  rm -rf "$work" "$out"
  mkdir -p "$work/bin" "$out"
  cp "$bin/kv-compress" "$bin/kv-validate" "$work/bin/"
  cp "$root/testdata/prose.txt" "$work/prose.txt"
  cp "$root/testdata/golden/kv_cache.safetensors" "$root/testdata/golden/kv_cache.metadata.json" "$work/"
  "$bin/examples/tiny_model" "$work/model" > /dev/null
  cd "$work"
  mkdir v c
  validate() { # NAME ARGS...: stdout to v/NAME.txt, exit status to v/NAME.status
    name=$1
    shift
    status=0
    env -u KV_COMPRESS_PATH bin/kv-validate "$@" > "v/$name.txt" 2> "v/$name.stderr" || status=$?
    echo "$status" > "v/$name.status"
  }
  run="--model-dir model/hf --text-file prose.txt --context 32 --targets 16 --max-windows 2 --quiet"
  # shellcheck disable=SC2086
  {
    validate single $run --json v/single.json --records v/single.records.json
    validate single_kld $run --max-kld 0.01 --group-size 32 --compress-arg=-bits --compress-arg=8 --json v/single_kld.json
    validate sweep $run --variant "int8=-bits 8" --variant "kivi4=-method kivi -bits 4" \
      --variant "int2=-bits 2" --threshold 1000 --json v/sweep.json --records v/sweep.records.json \
      --sweep-csv v/sweep.csv --sweep-plot v/sweep.svg --sweep-kld-plot v/sweep_kld.svg
    validate matrix $run --sweep --max-kld 0.05 --json v/matrix.json --sweep-csv v/matrix.csv \
      --sweep-plot v/matrix.svg
    validate slice_a $run --windows 0..1 --records v/slice_a.json --variant "int8=-bits 8" --variant "int2=-bits 2"
    validate slice_b $run --windows 1..2 --records v/slice_b.json --variant "int8=-bits 8" --variant "int2=-bits 2"
    validate merge merge v/slice_b.json v/slice_a.json --json v/merge.json --sweep-csv v/merge.csv
    validate single_a $run --windows 0..1 --records v/single_a.json
    validate single_b $run --windows 1..2 --records v/single_b.json
    validate single_merge merge v/single_a.json v/single_b.json --json v/single_merge.json
    validate sensitivity $run --sensitivity --json v/sensitivity.json
    validate allocate allocate --sweep-json v/sensitivity.json --bits 3.4 --json v/allocate.json \
      --flags-file v/allocate.flags
    validate capacity capacity --model-dir model/hf --gpu-memory 24GiB --sweep-json v/sweep.json \
      --json v/capacity.json --plot v/capacity.svg
    validate capacity_default capacity --model-dir model/hf
    validate quick --quick-test --json v/quick.json
  }
  grep -v '^#' "$root/testdata/golden/cases.txt" | while read -r name flags; do
    [ -n "$name" ] || continue
    # shellcheck disable=SC2086
    {
      bin/kv-compress -input kv_cache.safetensors -output "c/$name.kvc.safetensors" $flags > "c/$name.json"
      bin/kv-compress -input kv_cache.safetensors -output "c/$name.rec.safetensors" $flags -reconstruct > "c/$name.reconstruct.json"
      bin/kv-compress -input kv_cache.safetensors -metrics-only $flags > "c/$name.metrics.json"
      bin/kv-compress -decompress -input "c/$name.kvc.safetensors" -output "c/$name.dec.safetensors" > "c/$name.decompress.json"
    }
  done
  for suite in test_kvformat_reader test_kv_compress; do
    status=0
    KV_COMPRESS_BIN="$work/bin/kv-compress" PYTHONPATH="$root/crates/kv-compress/python" \
      python3 "$root/tests/python/$suite.py" > "python_$suite.txt" 2>&1 || status=$?
    echo "$status" >> "python_$suite.txt"
  done
  cd "$root"
  cp -r "$work/v" "$work/c" "$work"/python_*.txt "$out/"
  mask_timings "$out"
  echo "recorded $(find "$out" -type f | wc -l) files into $out"
}

case "${1:-}" in
  record)
    [ $# -ge 2 ] || usage
    record "$2" "${3:-}"
    ;;
  compare)
    [ $# -eq 3 ] || usage
    diff -r "$2" "$3" && echo "identical: $2 and $3"
    ;;
  *) usage ;;
esac
