"""Runs `adapterkit bench` and `benches/pytorch_baseline.py` (or `--baseline`) alternately (A, B, A, B, ...),
one process per measurement (so peak RSS is that measurement's), and prints both sides and the
ratios as a Markdown table.

    python3 benches/side_by_side.py --python V/bin/python [--shape minilm] [--rounds 2] [--steps 3]
        [--dtype bf16]

`--dtype bf16` runs ours with `--dtype bf16` and PyTorch under bf16 autocast; `--baseline
benches/onnx_baseline.py --what inference-all-positions --dtype int8` runs ours in int8 beside
ONNX Runtime's dynamic int8 quantisation.

By default it measures inference (ours as `predict` runs it: the last layer at the first token
alone), inference-all-positions (every position, the work PyTorch does), adapter and full.

Needs `cargo build --release` first (target/release/adapterkit) and a Python with
benches/requirements.txt installed. Uses only the standard library itself.
"""

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(command):
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out[out.index("{"):])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--binary", default=str(ROOT / "target/release/adapterkit"))
    parser.add_argument("--shape", default="minilm")
    parser.add_argument("--seq-len", default="128")
    parser.add_argument("--batch-size", default="32")
    parser.add_argument("--threads", default="2")
    parser.add_argument("--steps", default="3")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--what", default="inference,inference-all-positions,adapter,full")
    parser.add_argument("--dtype", default="f32", choices=["f32", "bf16", "int8"])
    # The other side: PyTorch (benches/pytorch_baseline.py), or ONNX Runtime
    # (benches/onnx_baseline.py, inference only, f32 or int8).
    parser.add_argument("--baseline", default=str(ROOT / "benches/pytorch_baseline.py"))
    # Train the encoder's LayerNorms too, on both sides, in the training measurements.
    parser.add_argument("--train-layer-norms", action="store_true")
    args = parser.parse_args()
    common = ["--shape", args.shape, "--seq-len", args.seq_len, "--batch-size", args.batch_size,
              "--threads", args.threads, "--steps", args.steps, "--dtype", args.dtype]
    if args.train_layer_norms:
        common.append("--train-layer-norms")
    sides = {
        "adapterkit": lambda what: [args.binary, "bench", *common, "--what", what, "--json"],
        "baseline": lambda what: [args.python, args.baseline, *common, "--what", what],
    }
    results = {(side, what): [] for side in sides for what in args.what.split(",")}
    engines = {}
    for round_ in range(args.rounds):
        for what in args.what.split(","):
            for side, command in sides.items():
                report = run(command(what))
                engines[side] = report.get("engine", "adapterkit")
                row = report["results"][0]
                results[(side, what)].append(row)
                print(f"round {round_ + 1} {side:<10} {what:<9} {row['sequences_per_second']:7.2f} seq/s "
                      f"{row['peak_rss_mib_so_far']:7.0f} MiB", file=sys.stderr)

    def median(side, what, key):
        return statistics.median(r[key] for r in results[(side, what)])

    baseline = engines["baseline"]
    print(f"| {args.shape}, seq {args.seq_len}, batch {args.batch_size}, {args.threads} threads, {args.dtype}, "
          f"median of {args.rounds} rounds | adapterkit seq/s | {baseline} seq/s | ratio | adapterkit peak RSS MiB "
          f"| {baseline} peak RSS MiB | ratio |")
    print("|---|---|---|---|---|---|---|")
    for what in args.what.split(","):
        ours, theirs = (median(s, what, "sequences_per_second") for s in sides)
        our_rss, their_rss = (median(s, what, "peak_rss_mib_so_far") for s in sides)
        print(f"| {what} | {ours:.2f} | {theirs:.2f} | {ours / theirs:.2f}x | {our_rss:.0f} | {their_rss:.0f} "
              f"| {our_rss / their_rss:.2f}x |")


if __name__ == "__main__":
    main()
