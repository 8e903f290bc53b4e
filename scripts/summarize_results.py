"""Mean and spread over seeds of the runs under a folder (scripts/results.sh writes them).

Usage: python3 scripts/summarize_results.py runs/DATASET
Prints a Markdown table: one row per method.
"""
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

runs = defaultdict(list)
for path in sorted(Path(sys.argv[1]).glob("*/results.json")):
    result = json.loads(path.read_text())
    # Runs are folders named METHOD-seedN; the name keeps variants of one method apart.
    runs[path.parent.name.rsplit("-seed", 1)[0]].append(result)


def mean_sd(values):
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.2f} ± {100 * sd:.2f}"


print("| method | seeds | test accuracy (%) | test macro-F1 (%) | trainable params | share of model | train examples/s | peak RSS (MiB) |")
print("|---|---|---|---|---|---|---|---|")
for method, results in runs.items():
    acc = [r["test"]["accuracy"] for r in results]
    f1 = [r["test"]["macro_f1"] for r in results]
    speed = statistics.mean(r["train_examples_per_second"] for r in results)
    rss = max(r.get("peak_rss_bytes") or 0 for r in results) / 2**20
    r0 = results[0]
    print(
        f"| {method} | {len(results)} | {mean_sd(acc)} | {mean_sd(f1)} | {r0['trainable_parameters']:,} "
        f"| {100 * r0['trainable_share']:.2f}% | {speed:.1f} | {rss:.0f} |"
    )
