#!/usr/bin/env bash
# The main job, end to end on a fresh machine: fetch the pinned model and data, build,
# describe the model and embed a few texts with it.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/fetch-assets.sh
cargo build --release -p adapterkit-cli
bin=target/release/adapterkit
model=assets/all-MiniLM-L6-v2

"$bin" info --model "$model"
printf 'Adapters are small.\nFine-tuning everything is costly.\n' |
  "$bin" encode --model "$model" --pooling mean --normalize --json | cut -c1-120
