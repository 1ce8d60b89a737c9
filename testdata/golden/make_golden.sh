#!/bin/sh
# Regenerates the golden packed files with the kv-compress given as $1.
# Only for a deliberate format change: the point of the files is that they
# were made by an older binary.
set -eu
bin=$1
cd "$(dirname "$0")"
grep -v '^#' cases.txt | while read -r name flags; do
  # shellcheck disable=SC2086
  "$bin" -input kv_cache.safetensors -output "$name.safetensors" $flags > /dev/null
  rm -f "$name.metadata.json"
done
