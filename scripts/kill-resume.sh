#!/usr/bin/env bash
# Kills `adapterkit train` (SIGKILL) KILLS times at seeded random moments, resuming it after
# each, then checks that the finished files equal an uninterrupted run's byte for byte and that
# no kill left a folder that loads as a finished adapter while half written.
#   bash scripts/kill-resume.sh [KILLS=50] [SEED=1]
# Runs a Houlsby adapter on 400 TREC-6 examples for 3 epochs on the real MiniLM; needs
# scripts/fetch-assets.sh and `cargo build --release`. Prints one line per kill and a verdict.
set -euo pipefail
cd "$(dirname "$0")/.."
kills="${1:-50}"
RANDOM="${2:-1}"
bin=target/release/adapterkit
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
args=(train --model assets/all-MiniLM-L6-v2 --data trec6 --method houlsby --epochs 3
      --max-train-examples 400 --seed 1 --threads 2 --save-steps 5 --quiet)

start=$(date +%s%N)
"$bin" "${args[@]}" --out "$work/reference" > /dev/null 2>&1
whole_ms=$(( ($(date +%s%N) - start) / 1000000 ))
echo "uninterrupted run: ${whole_ms} ms"

compare() { # the finished folder against the uninterrupted run
  local different=0
  for f in adapter.safetensors adapter_config.json model_head.safetensors head_config.json \
           base_weights.safetensors; do
    cmp -s "$work/reference/$f" "$1/$f" || { echo "$1/$f differs" >&2; different=$((different + 1)); }
  done
  echo "$different"
}

# Series of runs, each killed and resumed until it finishes; then the next series.
broken=0; different=0; killed=0; series=1; started=0
while [ "$killed" -lt "$kills" ]; do
  out="$work/series-$series"
  resume=(); [ "$started" -eq 1 ] && resume=(--resume)
  "$bin" "${args[@]}" --out "$out" "${resume[@]}" > /dev/null 2>&1 &
  pid=$!; started=1
  # Somewhere in the first 40% of a whole run: a resumed run has less left to do.
  sleep_ms=$(( RANDOM % (whole_ms * 4 / 10 + 1) ))
  sleep "$(printf '%d.%03d' $((sleep_ms / 1000)) $((sleep_ms % 1000)))"
  if kill -9 "$pid" 2> /dev/null; then
    wait "$pid" 2> /dev/null || true
    killed=$((killed + 1))
    latest="$(cat "$out/checkpoint/LATEST" 2> /dev/null || echo none)"
    # A folder with an adapter in it must either load or say it was being written.
    if [ -e "$out/adapter_config.json" ] && [ ! -e "$out/.adapterkit-saving" ]; then
      "$bin" info --model assets/all-MiniLM-L6-v2 --adapter "$out" > /dev/null 2>&1 \
        || { echo "kill $killed: the folder neither loads nor says it was being written"; broken=$((broken + 1)); }
    fi
    echo "kill $killed (series $series) after ${sleep_ms} ms; checkpoint $latest"
  else
    wait "$pid"  # finished before the kill: it must be the uninterrupted run's result
    d="$(compare "$out")"
    echo "series $series finished: $d files differ from the uninterrupted run"
    different=$((different + d)); series=$((series + 1)); started=0
  fi
done
# The last series, to its end.
if [ "$started" -eq 1 ]; then
  "$bin" "${args[@]}" --out "$out" --resume > /dev/null 2>&1
  d="$(compare "$out")"
  echo "series $series finished: $d files differ from the uninterrupted run"
  different=$((different + d))
fi
echo "kills: $killed in $series series; broken folders: $broken; files that differ: $different"
[ "$broken" -eq 0 ] && [ "$different" -eq 0 ]
