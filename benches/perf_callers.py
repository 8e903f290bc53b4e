"""Where a profile's time goes, by leaf function or by caller, for `docs/BENCHMARKS.md`.

    perf record -F 499 --call-graph dwarf,32768 -o perf.data \
        target/release/adapterkit bench --what adapter --steps 6 --threads 1
    perf script -i perf.data > perf.txt
    python3 benches/perf_callers.py perf.txt              # leaf functions, share of the step
    python3 benches/perf_callers.py perf.txt vec_add      # who calls leaves matching a regex

Counts only samples inside `training_step` (so start-up and weight initialisation are left
out). Uses only the standard library.
"""
import collections
import re
import sys


def frames(sample):
    lines = [line.strip() for line in sample.strip().split("\n")[1:]]
    names = [re.sub(r"^[0-9a-f]+ ", "", line) for line in lines]
    return [re.sub(r"\+0x[0-9a-f]+.*$", "", name) for name in names]


def main():
    leaf_pattern = sys.argv[2] if len(sys.argv) > 2 else None
    in_step = 0
    counts = collections.Counter()
    for sample in open(sys.argv[1]).read().split("\n\n"):
        stack = frames(sample)
        if not stack or not any("training_step" in f for f in stack):
            continue
        in_step += 1
        if leaf_pattern is None:
            counts[stack[0]] += 1
        elif re.search(leaf_pattern, stack[0]):
            ours = [f for f in stack if "adapterkit::" in f or "backprop" in f or "Tensor::" in f]
            counts[" <- ".join(ours[:4])] += 1
    print(f"{in_step} samples in training_step")
    for name, n in counts.most_common(30):
        print(f"{100 * n / max(in_step, 1):5.1f}% {name[:400]}")


if __name__ == "__main__":
    main()
