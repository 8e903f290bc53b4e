#!/usr/bin/env bash
# Reproduces docs/RESULTS.md's table: every method on a built-in dataset, three seeds each.
# Usage: scripts/results.sh DATASET [EPOCHS] [METHODS...]   (runs go to runs/DATASET/)
set -euo pipefail
cd "$(dirname "$0")/.."

dataset="${1:?usage: scripts/results.sh DATASET [EPOCHS] [METHODS...]}"
epochs="${2:-3}"
shift $(( $# >= 2 ? 2 : 1 ))
methods=("$@")
[ ${#methods[@]} -gt 0 ] || methods=(houlsby pfeiffer head full)

bash scripts/fetch-assets.sh >/dev/null
bin=${ADAPTERKIT_BIN:-target/release/adapterkit}  # set it to run a fixed build
[ -n "${ADAPTERKIT_BIN:-}" ] || cargo build --release -q -p adapterkit-cli
for method in "${methods[@]}"; do
  for seed in 1 2 3; do
    out="runs/$dataset/$method-seed$seed"
    if [ -f "$out/results.json" ]; then echo "have $out"; continue; fi
    echo "run $out"
    "$bin" train --model assets/all-MiniLM-L6-v2 --data "$dataset" \
      --method "$method" --epochs "$epochs" --seed "$seed" --out "$out" --quiet
  done
done
python3 scripts/summarize_results.py "runs/$dataset"
