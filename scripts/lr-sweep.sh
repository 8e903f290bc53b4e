#!/usr/bin/env bash
# Chooses a method's learning rate on validation, then runs three seeds at it (docs/RESULTS.md's
# LoRA and (IA)³ rows): {1e-4, 5e-4, 1e-3, 3e-3} with seed 1 and 3 epochs, the best validation
# accuracy wins, then seeds 1-3 (seed 1 is the sweep's run at that rate). The encoder's
# LayerNorms stay frozen (--freeze-layer-norms): the methods as defined, files Python reads alike.
# Usage: scripts/lr-sweep.sh DATASET METHOD...   (runs go to runs/DATASET/)
# OPTIONS="--adapter-option alpha=16" LABEL=lora-alpha16 scripts/lr-sweep.sh DATASET lora
#   passes options to every run and names its runs LABEL-... instead of METHOD-...
# GRID="3e-3" scripts/lr-sweep.sh DATASET METHOD   takes the rate as given (a grid of one)
set -euo pipefail
cd "$(dirname "$0")/.."

dataset="${1:?usage: scripts/lr-sweep.sh DATASET METHOD...}"
shift
bash scripts/fetch-assets.sh >/dev/null
bin=${ADAPTERKIT_BIN:-target/release/adapterkit}  # set it to run a fixed build
[ -n "${ADAPTERKIT_BIN:-}" ] || cargo build --release -q -p adapterkit-cli
train() {  # train METHOD LR SEED OUT
  [ -f "$4/results.json" ] && return
  # shellcheck disable=SC2086 # OPTIONS holds several words
  "$bin" train --model assets/all-MiniLM-L6-v2 --data "$dataset" --method "$1" --lr "$2" \
    --seed "$3" --epochs 3 --freeze-layer-norms --out "$4" --quiet ${OPTIONS:-} >/dev/null
}
validation() { python3 -c "import json, sys; print(json.load(open(sys.argv[1]))['validation'])" "$1/results.json"; }
for method in "$@"; do
  label=${LABEL:-$method}
  best="" best_value=-1
  for lr in ${GRID:-1e-4 5e-4 1e-3 3e-3}; do
    out="runs/$dataset/sweep/$label-lr$lr"
    train "$method" "$lr" 1 "$out"
    value=$(validation "$out")
    echo "$dataset $label lr $lr: validation $value"
    if python3 -c "import sys; sys.exit(0 if float(sys.argv[1]) > float(sys.argv[2]) else 1)" "$value" "$best_value"; then
      best=$lr best_value=$value
    fi
  done
  echo "$dataset $label: learning rate $best (validation $best_value)"
  mkdir -p "runs/$dataset"
  [ -d "runs/$dataset/$label-seed1" ] || cp -r "runs/$dataset/sweep/$label-lr$best" "runs/$dataset/$label-seed1"
  for seed in 2 3; do
    train "$method" "$best" "$seed" "runs/$dataset/$label-seed$seed"
  done
done
python3 scripts/summarize_results.py "runs/$dataset"
