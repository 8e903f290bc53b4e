#!/usr/bin/env bash
# Every PEFT family on one task, each at the learning rate chosen for it on validation, then the
# given seeds, and one table (docs/RESULTS.md, "All families on one task"): accuracy ± sd,
# macro-F1, trained parameters and share, file size, training examples/s, peak RSS, inference
# texts/s; plus an SVG of accuracy against trained parameters.
#
#   scripts/peft-compare.sh DATASET "SEEDS"        e.g. scripts/peft-compare.sh trec6 "1 2 3"
#
# The sweep: {1e-4, 3e-4, 1e-3, 3e-3, 1e-2}, seed 1, 3 epochs, best validation metric wins; its
# result is cached (runs/DATASET/compare/sweep/FAMILY.lr), every finished run is skipped and a
# killed one resumes from its checkpoint, so an interrupted comparison goes on where it stopped. Adapters train with the encoder's
# LayerNorms frozen (the methods as defined, files Python reads alike).
# Env: FAMILIES (default below), GRID, EPOCHS (3), MAX_TRAIN (cap the training examples, for a
# quick check), MODEL (assets/all-MiniLM-L6-v2), ADAPTERKIT_BIN (a fixed build), OUT (the
# folder, runs/DATASET/compare).
set -euo pipefail
cd "$(dirname "$0")/.."

dataset="${1:?usage: scripts/peft-compare.sh DATASET \"SEEDS\"}"
seeds="${2:-1 2 3}"
families=${FAMILIES:-full head houlsby pfeiffer parallel lora ia3 prefix_tuning mam unipelt}
grid=${GRID:-1e-4 3e-4 1e-3 3e-3 1e-2}
epochs=${EPOCHS:-3}
model=${MODEL:-assets/all-MiniLM-L6-v2}
out=${OUT:-runs/$dataset/compare}

[ "$model" != assets/all-MiniLM-L6-v2 ] || bash scripts/fetch-assets.sh >/dev/null
bin=${ADAPTERKIT_BIN:-target/release/adapterkit}
[ -n "${ADAPTERKIT_BIN:-}" ] || cargo build --release -q -p adapterkit-cli

train() {  # train FAMILY LR SEED DIR
  [ -f "$4/results.json" ] && return
  local extra=()
  case "$1" in full | head) ;; *) extra+=(--freeze-layer-norms) ;; esac
  [ -z "${MAX_TRAIN:-}" ] || extra+=(--max-train-examples "$MAX_TRAIN")
  # A run killed half-way goes on from its checkpoint.
  [ ! -d "$4/checkpoint" ] || extra+=(--resume)
  "$bin" train --model "$model" --data "$dataset" --method "$1" --lr "$2" --seed "$3" \
    --epochs "$epochs" --out "$4" --quiet "${extra[@]}" >/dev/null
}
validation() { python3 -c "import json, sys; print(json.load(open(sys.argv[1]))['validation'])" "$1/results.json"; }

mkdir -p "$out/sweep"
for family in $families; do
  chosen=$out/sweep/$family.lr
  if [ ! -f "$chosen" ]; then
    best="" best_value=-1
    for lr in $grid; do
      train "$family" "$lr" 1 "$out/sweep/$family-lr$lr"
      value=$(validation "$out/sweep/$family-lr$lr")
      echo "$dataset $family lr $lr: validation $value"
      if python3 -c "import sys; sys.exit(0 if float(sys.argv[1]) > float(sys.argv[2]) else 1)" "$value" "$best_value"; then
        best=$lr best_value=$value
      fi
    done
    echo "$best" >"$chosen"
  fi
  lr=$(cat "$chosen")
  for seed in $seeds; do
    dir=$out/$family-seed$seed
    if [ "$seed" = 1 ] && [ ! -d "$dir" ]; then cp -r "$out/sweep/$family-lr$lr" "$dir"; fi
    train "$family" "$lr" "$seed" "$dir"
  done
done
python3 scripts/compare_table.py --bin "$bin" --model "$model" --dataset "$dataset" "$out" $families
