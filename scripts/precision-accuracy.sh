#!/usr/bin/env bash
# bf16 and int8 against f32 on one task, paired by seed (docs/RESULTS.md, "bf16 and int8
# against f32"): the Houlsby adapter of the family comparison (scripts/peft-compare.sh, which
# must have run for DATASET and SEEDS: its f32 runs, learning rate and settings are reused)
# trained again with --dtype bf16, and the f32-trained adapter evaluated with --dtype bf16 and
# --dtype int8; test accuracy per seed and the differences.
#
#   scripts/precision-accuracy.sh DATASET "SEEDS"   e.g. scripts/precision-accuracy.sh trec6 "1 2 3"
#
# Env: ADAPTERKIT_BIN (a fixed build), MODEL (assets/all-MiniLM-L6-v2), EPOCHS (3, as the
# comparison), COMPARE (runs/DATASET/compare), OUT (runs/DATASET/bf16). Finished runs are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

dataset="${1:?usage: scripts/precision-accuracy.sh DATASET \"SEEDS\"}"
seeds="${2:-1 2 3}"
model=${MODEL:-assets/all-MiniLM-L6-v2}
compare=${COMPARE:-runs/$dataset/compare}
out=${OUT:-runs/$dataset/bf16}
bin=${ADAPTERKIT_BIN:-target/release/adapterkit}
[ -n "${ADAPTERKIT_BIN:-}" ] || cargo build --release -q -p adapterkit-cli
lr=$(cat "$compare/sweep/houlsby.lr")

mkdir -p "$out"
for seed in $seeds; do
  f32_run=$compare/houlsby-seed$seed
  [ -f "$f32_run/results.json" ] || { echo "no f32 run in $f32_run: run scripts/peft-compare.sh first" >&2; exit 1; }
  bf16_run=$out/houlsby-seed$seed
  if [ ! -f "$bf16_run/results.json" ]; then
    resume=()
    [ ! -d "$bf16_run/checkpoint" ] || resume=(--resume)
    "$bin" train --model "$model" --data "$dataset" --method houlsby --lr "$lr" --seed "$seed" \
      --epochs "${EPOCHS:-3}" --freeze-layer-norms --dtype bf16 --out "$bf16_run" --quiet "${resume[@]}" >/dev/null
  fi
  for dtype in bf16 int8; do
    [ -f "$out/f32-adapter-in-$dtype-seed$seed.json" ] ||
      "$bin" eval --model "$model" --adapter "$f32_run" --data "$dataset" --dtype $dtype --json \
        >"$out/f32-adapter-in-$dtype-seed$seed.json"
  done
done

python3 - "$dataset" "$compare" "$out" $seeds <<'EOF'
import json, statistics, sys
dataset, compare, out, seeds = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
test = lambda path: 100 * json.load(open(path))["test"]["accuracy"]
rows = []
for seed in seeds:
    f32 = test(f"{compare}/houlsby-seed{seed}/results.json")
    trained = test(f"{out}/houlsby-seed{seed}/results.json")
    evaluated = [100 * json.load(open(f"{out}/f32-adapter-in-{d}-seed{seed}.json"))["accuracy"]
                 for d in ("bf16", "int8")]
    rows.append((seed, f32, trained, *evaluated))
print(f"| {dataset}, Houlsby, seed | f32 (trained and evaluated) | trained in bf16 | difference "
      "| f32-trained, evaluated in bf16 | difference | f32-trained, evaluated in int8 | difference |")
print("|---|---|---|---|---|---|---|---|")
for seed, f32, *others in rows:
    cells = " | ".join(f"{v:.2f} | {v - f32:+.2f}" for v in others)
    print(f"| {seed} | {f32:.2f} | {cells} |")
mean = lambda i: statistics.mean(r[i] - r[1] for r in rows)
print(f"| mean difference | | | {mean(2):+.2f} | | {mean(3):+.2f} | | {mean(4):+.2f} |")
EOF
