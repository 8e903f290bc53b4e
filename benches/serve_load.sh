#!/usr/bin/env bash
# The serving benchmark (docs/BENCHMARKS.md, "Serving"): `adapterkit serve` with 8 Houlsby
# adapters on all-MiniLM-L6-v2, loaded by benches/serve_load.rs (bounded, loopback only) at
# concurrency 1, 8 and 64 for one adapter, 8 in random mix and parallel over 8; an overload run
# at twice the saturated rate; memory per extra loaded adapter; the Python baseline
# (benches/serve_baseline.py) at concurrency 8 and 64; and `bench --what inference` at the same
# length for reference. Prints JSON lines, also written to $OUT/results.jsonl.
#
#   bash benches/serve_load.sh                  # PYTHON=/path/to/venv/bin/python for the baseline
#
# Env: OUT (runs/serve-load), THREADS (2), REQUESTS (per run, 3000), SECONDS_CAP (per run, 40).
set -euo pipefail
cd "$(dirname "$0")/.."

model=assets/all-MiniLM-L6-v2
out=${OUT:-runs/serve-load}
threads=${THREADS:-2}
requests=${REQUESTS:-3000}
cap=${SECONDS_CAP:-40}
python=${PYTHON:-}
mkdir -p "$out"
results=$out/results.jsonl
: >"$results"

cargo build --release -p adapterkit-cli --bins --benches -q
bin=target/release/adapterkit
load=$(ls -t target/release/deps/serve_load-* | grep -v '\.d$' | head -1)

# 8 adapters, trained briefly (speed does not depend on how well): skips finished ones.
names=()
for i in 1 2 3 4 5 6 7 8; do
  dir=$out/adapters/task$i
  if [ ! -f "$dir/adapter_config.json" ]; then
    "$bin" train --model "$model" --data trec6 --method houlsby --epochs 1 \
      --max-train-examples 64 --seed "$i" --out "$dir" --quiet >/dev/null
  fi
  names+=("task$i")
done
adapters=$(IFS=,; echo "${names[*]}")

# Starts a server command in the background; sets url and pid.
start() {
  "$@" >"$out/server.out" 2>"$out/server.err" &
  pid=$!
  for _ in $(seq 600); do
    url=$(grep -o 'http://[0-9.:]*' "$out/server.out" || true)
    [ -n "$url" ] && return 0
    sleep 0.2
  done
  echo "the server did not start: $(cat "$out/server.err")" >&2
  exit 1
}

stop() {
  kill -TERM "$pid"
  wait "$pid" || true
}

run() {
  "$load" --label "$label" --url "$url" --adapters "$adapters" --server-pid "$pid" --seconds "$cap" "$@" |
    tee -a "$results"
}

# --- adapterkit serve
label=adapterkit
start "$bin" --threads "$threads" serve --model "$model" --adapter-dir "$out/adapters" --port 0
for mode in one mix parallel; do
  for c in 1 8 64; do
    run --mode "$mode" --concurrency "$c" --requests "$requests"
  done
done
# Overload: twice the saturated rate of the mix (concurrency 64), open loop.
saturated=$(grep '"label":"adapterkit"' "$results" | grep '"mode":"mix"' | grep '"concurrency":64' |
  python3 -c 'import json,sys; print(json.loads(sys.stdin.read())["requests_per_s"])')
rate=$(python3 -c "print(round(2 * $saturated))")
label=overload run --mode mix --concurrency 512 --rate "$rate" --requests $((rate * 20))

# Memory per extra loaded adapter: 56 more copies of one adapter under new names.
rss() { curl -s "$url/metrics" | awk '/^adapterkit_resident_memory_bytes/ {print $2}'; }
before=$(rss)
for i in $(seq 1 56); do
  curl -sf -X PUT "$url/v1/adapters/extra$i" -d "{\"path\": \"task1\"}" >/dev/null
done
after=$(rss)
python3 -c "print('{\"memory_per_extra_adapter_mib\": %.3f, \"adapters\": 56}' % (($after - $before) / 56 / 2**20))" |
  tee -a "$results"
stop

# --- the Python baseline, one forward pass per request
if [ -n "$python" ]; then
  label=python
  start "$python" benches/serve_baseline.py --model "$model" --adapter-dir "$out/adapters" \
    --host 127.0.0.1 --port 18089 --threads "$threads"
  for mode in one mix; do
    for c in 8 64; do
      run --mode "$mode" --concurrency "$c" --requests "$((requests / 3))"
    done
  done
  stop
fi

# --- the same model's inference alone, texts of 16 tokens, for reference
"$bin" --threads "$threads" bench --what inference --seq-len 16 --batch-size 64 --json |
  tee -a "$results"
