"""The table of scripts/peft-compare.sh: one row per family, from its runs' results.json files,
plus the saved files' size and the test split's evaluation speed, measured here; and an SVG of
test accuracy against trained parameters (log scale).

Usage: python3 scripts/compare_table.py --bin BIN --model MODEL --dataset NAME runs/NAME/compare FAMILY...
Writes FOLDER/table.md and FOLDER/accuracy-vs-parameters.svg, and prints the table.
"""
import argparse
import json
import math
import statistics
import subprocess
import time
from pathlib import Path

# What a saved directory needs besides the training record.
NOT_NEEDED = {"training_log.jsonl", "training_curves.svg", "results.json", "checkpoint"}


def mean_sd(values):
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.mean(values), sd


def file_bytes(run: Path) -> int:
    return sum(p.stat().st_size for p in run.iterdir() if p.name not in NOT_NEEDED and p.is_file())


def eval_speed(binary, model, dataset, run: Path):
    """Test texts per second of `adapterkit eval` on the run (model loading included)."""
    started = time.perf_counter()
    done = subprocess.run(
        [binary, "eval", "--model", model, "--adapter", str(run), "--data", dataset, "--split", "test", "--json"],
        capture_output=True, text=True, check=True,
    )
    elapsed = time.perf_counter() - started
    return json.loads(done.stdout)["examples"] / elapsed


def svg(rows, path: Path, dataset: str):
    width, height, margin = 640, 400, 60
    points = [(r["params"], r["acc"], r["sd"], r["family"]) for r in rows if r["params"] > 0]
    xs = [math.log10(p) for p, *_ in points]
    x0, x1 = math.floor(min(xs)), math.ceil(max(xs))
    y0 = math.floor(min(a - sd for _, a, sd, _ in points) - 1)
    y1 = math.ceil(max(a + sd for _, a, sd, _ in points) + 1)
    sx = lambda x: margin + (x - x0) / max(x1 - x0, 1e-9) * (width - 2 * margin)
    sy = lambda y: height - margin - (y - y0) / max(y1 - y0, 1e-9) * (height - 2 * margin)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="14">{dataset}: test accuracy against trained parameters</text>',
           f'<line x1="{margin}" y1="{height - margin}" x2="{width - margin}" y2="{height - margin}" stroke="black"/>',
           f'<line x1="{margin}" y1="{margin}" x2="{margin}" y2="{height - margin}" stroke="black"/>',
           f'<text x="{width / 2}" y="{height - 15}" text-anchor="middle">trained parameters (log scale)</text>',
           f'<text x="15" y="{height / 2}" text-anchor="middle" transform="rotate(-90 15 {height / 2})">test accuracy (%)</text>']
    for e in range(x0, x1 + 1):
        out.append(f'<text x="{sx(e)}" y="{height - margin + 16}" text-anchor="middle">1e{e}</text>')
    for y in range(y0, y1 + 1, max(1, (y1 - y0) // 6)):
        out.append(f'<text x="{margin - 6}" y="{sy(y) + 4}" text-anchor="end">{y}</text>')
    for params, acc, sd, family in points:
        x, y = sx(math.log10(params)), sy(acc)
        out.append(f'<line x1="{x}" y1="{sy(acc - sd)}" x2="{x}" y2="{sy(acc + sd)}" stroke="#888"/>')
        out.append(f'<circle cx="{x}" cy="{y}" r="4" fill="#1f77b4"/>')
        out.append(f'<text x="{x + 6}" y="{y - 6}">{family}</text>')
    out.append("</svg>")
    path.write_text("\n".join(out) + "\n")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bin", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("folder", type=Path)
    parser.add_argument("families", nargs="+")
    args = parser.parse_args()
    rows = []
    for family in args.families:
        runs = sorted(args.folder.glob(f"{family}-seed*/results.json"))
        if not runs:
            continue
        results = [json.loads(p.read_text()) for p in runs]
        acc, sd = mean_sd([100 * r["test"]["accuracy"] for r in results])
        f1, f1_sd = mean_sd([100 * r["test"]["macro_f1"] for r in results])
        first = runs[0].parent
        rows.append({
            "family": family,
            "lr": (args.folder / "sweep" / f"{family}.lr").read_text().strip(),
            "seeds": len(results),
            "acc": acc, "sd": sd, "f1": f1, "f1_sd": f1_sd,
            "params": results[0]["trainable_parameters"],
            "share": 100 * results[0]["trainable_share"],
            "bytes": file_bytes(first),
            "train_speed": statistics.mean(r["train_examples_per_second"] for r in results),
            "rss": max(r.get("peak_rss_bytes") or 0 for r in results) / 2**20,
            "infer_speed": eval_speed(args.bin, args.model, args.dataset, first),
        })
    lines = [
        "| family | lr | seeds | test accuracy (%) | test macro-F1 (%) | trained params | share | files (KiB) | train examples/s | peak RSS (MiB) | eval texts/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['family']} | {r['lr']} | {r['seeds']} | {r['acc']:.2f} ± {r['sd']:.2f} | {r['f1']:.2f} ± {r['f1_sd']:.2f} "
            f"| {r['params']:,} | {r['share']:.2f}% | {r['bytes'] / 1024:,.0f} | {r['train_speed']:.1f} | {r['rss']:.0f} | {r['infer_speed']:.1f} |"
        )
    table = "\n".join(lines) + "\n"
    (args.folder / "table.md").write_text(table)
    svg(rows, args.folder / "accuracy-vs-parameters.svg", args.dataset)
    print(table)


if __name__ == "__main__":
    main()
