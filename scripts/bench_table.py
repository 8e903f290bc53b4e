"""Prints `adapterkit bench --json` output as a Markdown table.

Usage: python3 scripts/bench_table.py BENCH.json
Rows of a sweep (multitask: the tasks one after another, then in parallel for each number of
dropped layers; adapter-drop: training for each number of dropped layers) get their speed-up
over the sweep's first row.
"""
import json
import sys

report = json.load(open(sys.argv[1]))
print(f"{report['shape']} shape, batch {report['batch_size']} x {report['seq_len']} tokens, "
      f"{report['threads']} threads, matmul peak {report['matmul_peak_gflop_per_second']:.0f} GFLOP/s")
print()
print("| measurement | sequences/s | seconds per batch | GFLOP/s | speed-up over the sweep's first row |")
print("|---|---|---|---|---|")
first = {}
for r in report["results"]:
    sweep = "tasks" if "tasks" in r["what"] else r["what"].split(",")[0]
    base = first.setdefault(sweep, r)
    print(f"| {r['what']} | {r['sequences_per_second']:.2f} | {r['seconds_per_step']:.2f} | "
          f"{r['gflop_per_second']:.1f} | {r['sequences_per_second'] / base['sequences_per_second']:.2f}x |")
