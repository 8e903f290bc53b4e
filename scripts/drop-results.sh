#!/usr/bin/env bash
# Reproduces docs/RESULTS.md's AdapterDrop section: TREC-6 test accuracy when the adapters of the
# lowest k layers are dropped at inference, k = 0..5, for Houlsby adapters trained normally
# (runs/trec6/houlsby-seed*, from scripts/results.sh) and trained with robust AdapterDrop
# (--robust-drop 5, runs/adapter-drop/trec6-robust-seed*). Prints a Markdown table.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/fetch-assets.sh >/dev/null
bin=${ADAPTERKIT_BIN:-target/release/adapterkit}  # set it to run a fixed build
[ -n "${ADAPTERKIT_BIN:-}" ] || cargo build --release -q -p adapterkit-cli
model=assets/all-MiniLM-L6-v2

for seed in 1 2 3; do
  normal="runs/trec6/houlsby-seed$seed"
  [ -f "$normal/results.json" ] || "$bin" train --model "$model" --data trec6 --method houlsby \
    --epochs 3 --seed "$seed" --out "$normal" --quiet
  robust="runs/adapter-drop/trec6-robust-seed$seed"
  [ -f "$robust/results.json" ] || "$bin" train --model "$model" --data trec6 --method houlsby \
    --robust-drop 5 --epochs 3 --seed "$seed" --out "$robust" --quiet
done

echo "| training | seeds |$(printf ' k=%s |' 0 1 2 3 4 5)"
echo "|---|---|$(printf '%s' '---|---|---|---|---|---|')"
for kind in runs/trec6/houlsby runs/adapter-drop/trec6-robust; do
  row="| ${kind##*/} | 3 |"
  for k in 0 1 2 3 4 5; do
    accs=()
    for seed in 1 2 3; do
      accs+=("$("$bin" eval --model "$model" --adapter "$kind-seed$seed" --data trec6 \
        --split test --drop-lower "$k" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["accuracy"])')")
    done
    row+=" $(python3 -c 'import statistics as s,sys; v=[100*float(a) for a in sys.argv[1:]]; print(f"{s.mean(v):.2f} ± {s.stdev(v):.2f}")' "${accs[@]}") |"
  done
  echo "$row"
done
