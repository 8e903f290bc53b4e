#!/usr/bin/env bash
# The main job, end to end on a fresh machine: fetch the pinned model and data, build, train a
# Houlsby adapter on TREC-6 (question type), evaluate it on the held-out test split, save it,
# and use it.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/fetch-assets.sh
cargo build --release -p adapterkit-cli
bin=target/release/adapterkit
model=assets/all-MiniLM-L6-v2
out=${ADAPTERKIT_OUT:-runs/main-job/trec6-houlsby}

"$bin" info --model "$model" --adapter houlsby
"$bin" train --model "$model" --data trec6 --method houlsby --epochs 3 --seed 1 --out "$out"
"$bin" eval --model "$model" --adapter "$out" --data trec6 --split test
printf 'Who wrote Hamlet?\nHow far is the moon from the earth?\n' |
  "$bin" predict --model "$model" --adapter "$out"
ls -l "$out"
