#!/usr/bin/env bash
# Reproduces docs/RESULTS.md's AdapterFusion section. Knowledge extraction: a Pfeiffer adapter per
# source task (movie_sentiment, trec6, sms_spam; LayerNorms frozen, so the adapters can share one
# base model). Knowledge composition: dynamic fusion over them on tweets_sentiment with 500
# training examples, against a single Pfeiffer adapter trained on those 500 alone; and "ST-A +
# fusion" (the paper's setting): fusion over the sources and that seed's single target adapter.
# Seeds 1-5 (SEEDS="1 2 3" runs fewer). VARIANTS picks the fusion variants: fusion, fusion_st
# and fusion_static (`--fusion static` over the sources); the default is "fusion fusion_st".
# TRAIN_EXAMPLES=100 trains the target on fewer examples and EPOCHS=30 for longer (the runs then
# go to runs/fusion/tweets-100-e30/ rather than runs/fusion/tweets/). Source adapters go to
# runs/fusion/sources/. Runs already finished are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/fetch-assets.sh >/dev/null
bin=${ADAPTERKIT_BIN:-target/release/adapterkit}  # set it to run a fixed build
[ -n "${ADAPTERKIT_BIN:-}" ] || cargo build --release -q -p adapterkit-cli
model=assets/all-MiniLM-L6-v2
root=runs/fusion
sources=(movie_sentiment trec6 sms_spam)
examples=${TRAIN_EXAMPLES:-500}
epochs=${EPOCHS:-10}
tweets=$root/tweets
[ "$examples" = 500 ] || tweets=$tweets-$examples
[ "$epochs" = 10 ] || tweets=$tweets-e$epochs
target=(--data tweets_sentiment --max-train-examples "$examples" --epochs "$epochs" --quiet)

for source in "${sources[@]}"; do
  out="$root/sources/$source"
  [ -f "$out/results.json" ] && continue
  "$bin" train --model "$model" --data "$source" --method pfeiffer --freeze-layer-norms \
    --name "$source" --epochs 3 --seed 1 --out "$out" --quiet
done
for seed in ${SEEDS:-1 2 3 4 5}; do
  single="$tweets/single-seed$seed"
  [ -f "$single/results.json" ] || "$bin" train --model "$model" "${target[@]}" --method pfeiffer \
    --freeze-layer-norms --name tweets_sentiment --seed "$seed" --out "$single"
  for variant in ${VARIANTS:-fusion fusion_st}; do
    adapters=("${sources[@]/#/$root/sources/}")
    [ "$variant" = fusion_st ] && adapters+=("$single")
    kind=dynamic
    [ "$variant" = fusion_static ] && kind=static
    out="$tweets/$variant-seed$seed"
    [ -f "$out/results.json" ] || "$bin" fuse --model "$model" "${target[@]}" --seed "$seed" \
      --fusion "$kind" --adapters "${adapters[@]}" --out "$out"
    [ -f "$out/weights.json" ] || "$bin" fusion-weights --model "$model" --adapter "$out" \
      --data tweets_sentiment --split test --out "$out/weights"
  done
done
python3 scripts/summarize_results.py "$tweets"
