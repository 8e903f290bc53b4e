#!/usr/bin/env bash
# Reproduces docs/RESULTS.md's AdapterFusion section. Knowledge extraction: a Pfeiffer adapter per
# source task (movie_sentiment, trec6, sms_spam; LayerNorms frozen, so the adapters can share one
# base model). Knowledge composition: dynamic fusion over them on tweets_sentiment with 500
# training examples, against a single Pfeiffer adapter trained on those 500 alone; 3 seeds each.
# Runs go to runs/fusion/{sources,tweets}/; skips runs that are already finished.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/fetch-assets.sh >/dev/null
bin=${ADAPTERKIT_BIN:-target/release/adapterkit}  # set it to run a fixed build
[ -n "${ADAPTERKIT_BIN:-}" ] || cargo build --release -q -p adapterkit-cli
model=assets/all-MiniLM-L6-v2
root=runs/fusion
sources=(movie_sentiment trec6 sms_spam)
target=(--data tweets_sentiment --max-train-examples 500 --epochs 10 --quiet)

for source in "${sources[@]}"; do
  out="$root/sources/$source"
  [ -f "$out/results.json" ] && continue
  "$bin" train --model "$model" --data "$source" --method pfeiffer --freeze-layer-norms \
    --name "$source" --epochs 3 --seed 1 --out "$out" --quiet
done
for seed in 1 2 3; do
  out="$root/tweets/single-seed$seed"
  [ -f "$out/results.json" ] || "$bin" train --model "$model" "${target[@]}" --method pfeiffer \
    --freeze-layer-norms --name tweets_sentiment --seed "$seed" --out "$out"
  out="$root/tweets/fusion-seed$seed"
  [ -f "$out/results.json" ] || "$bin" fuse --model "$model" "${target[@]}" --seed "$seed" \
    --adapters "${sources[@]/#/$root/sources/}" --out "$out"
  [ -f "$out/weights.json" ] || "$bin" fusion-weights --model "$model" --adapter "$out" \
    --data tweets_sentiment --split test --out "$out/weights"
done
python3 scripts/summarize_results.py "$root/tweets"
