#!/usr/bin/env bash
# End to end on real data: a Houlsby adapter trained on TREC-6 for 3 epochs by adapterkit and by
# AdapterHub's AdapterTrainer (benches/pytorch_trec6.py), same splits and settings, one after
# the other; wall time and peak RSS of each whole process from /usr/bin/time, test accuracy
# from each. Usage: benches/trec6_end_to_end.sh PYTHON [SEED]   (PYTHON has
# benches/requirements.txt installed). Writes runs/e2e/.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${1:?usage: benches/trec6_end_to_end.sh PYTHON [SEED]}"
seed="${2:-1}"
bin=target/release/adapterkit
model=assets/all-MiniLM-L6-v2
out=runs/e2e/seed$seed
mkdir -p "$out"
"$bin" export --data trec6 --out "$out/data" >/dev/null

measure() { # NAME COMMAND...: runs it under /usr/bin/time, keeps stdout and the time report
  local name=$1; shift
  /usr/bin/time -v -o "$out/$name.time" "$@" > "$out/$name.json"
  local wall rss
  wall=$(awk -F': ' '/Elapsed \(wall clock\)/ {print $2}' "$out/$name.time")
  rss=$(awk -F': ' '/Maximum resident set size/ {printf "%.0f", $2 / 1024}' "$out/$name.time")
  echo "$name: wall $wall, peak RSS $rss MiB"
}
measure adapterkit "$bin" train --model "$model" --data trec6 --method houlsby --freeze-layer-norms \
  --epochs 3 --seed "$seed" --out "$out/adapterkit" --quiet --json
measure pytorch "$python" benches/pytorch_trec6.py --model "$model" --data "$out/data" \
  --out "$out/pytorch" --seed "$seed"
python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
ours = json.load(open(f"{out}/adapterkit.json"))
theirs = json.loads(open(f"{out}/pytorch.json").read().strip().splitlines()[-1])
print(f"adapterkit: test accuracy {100 * ours['test']['accuracy']:.2f}")
print(f"pytorch:    test accuracy {100 * theirs['test_accuracy']:.2f}, train {theirs['train_seconds']:.0f} s")
PY
