"""Parallel composition on the real all-MiniLM-L6-v2 against Python's `adapters` 1.3 (issue 13).

Makes four adapters with adapters 1.3 on MiniLM (Houlsby `double_seq_bn`, two Pfeiffer `seq_bn`,
a parallel `par_bn`), each with its own 2-class head and weights drawn far from their
initialisation, saves them in AdapterHub's layout, and takes Python's probabilities for each
adapter alone. Then runs `adapterkit predict --setup 'parallel(...)'` over every mix of them in
several orders and prints, per setup, the largest difference between a task's probabilities and
Python's for that adapter alone. (adapters 1.3 itself crashes on these mixed setups.)

How to run (from the repository root, after `bash scripts/fetch-assets.sh` and
`cargo build --release`):

    python3 -m venv V && V/bin/pip install torch==2.15.0 transformers==4.57.6 adapters==1.3.0
    V/bin/python scripts/parallel_minilm_check.py
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from adapters import BertAdapterModel
from transformers import AutoTokenizer

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "assets" / "all-MiniLM-L6-v2"
BINARY = Path(os.environ.get("ADAPTERKIT_BIN", REPO / "target" / "release" / "adapterkit"))
ADAPTERS = {"houlsby": "double_seq_bn", "pfeiffer_a": "seq_bn", "pfeiffer_b": "seq_bn", "par_bn": "par_bn"}
SETUPS = [
    ["houlsby", "pfeiffer_a"],
    ["pfeiffer_a", "houlsby"],
    ["pfeiffer_a", "pfeiffer_b"],
    ["houlsby", "par_bn"],
    ["par_bn", "pfeiffer_a"],
    ["houlsby", "pfeiffer_a", "pfeiffer_b", "par_bn"],
    ["par_bn", "pfeiffer_b", "houlsby", "pfeiffer_a"],
]
TEXTS = [
    "Adapters are small.",
    "A much longer sentence, so that the shorter ones in this batch are padded to its length.",
    "Ünïcödé and punctuation!?",
    "Short",
]


def main():
    torch.manual_seed(13)
    torch.set_num_threads(2)
    model = BertAdapterModel.from_pretrained(MODEL, attn_implementation="eager")
    for name, config in ADAPTERS.items():
        model.add_adapter(name, config=config)
        model.add_classification_head(name, num_labels=2, id2label={0: "neg", 1: "pos"})
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if f"adapters.{name}." in param_name:
                    param.add_(torch.randn_like(param) * 0.05)
    model.eval()
    alone = {}
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with tempfile.TemporaryDirectory() as tmp:
        for name in ADAPTERS:
            model.set_active_adapters(name)
            with torch.no_grad():
                logits = model(**batch, head=name).logits
            alone[name] = torch.softmax(logits, -1)
            model.save_adapter(str(Path(tmp) / name), name, with_head=True)
        worst = 0.0
        for names in SETUPS:
            setup = f"parallel({','.join(names)})"
            args = [str(BINARY), "predict", "--model", str(MODEL), "--setup", setup]
            for name in names:
                args += ["--adapter", str(Path(tmp) / name)]
            out = subprocess.run(args + TEXTS, capture_output=True, text=True, check=True).stdout
            lines = [json.loads(line) for line in out.splitlines()]
            diff = 0.0
            for row, line in enumerate(lines):
                for name in names:
                    scores = line["tasks"][name]["scores"]
                    ours = torch.tensor([scores["neg"], scores["pos"]])
                    diff = max(diff, (ours - alone[name][row]).abs().max().item())
            worst = max(worst, diff)
            print(f"{setup}: max |probability - Python's for the adapter alone| = {diff:.2e}")
        spread = max((alone[a] - alone[b]).abs().max().item() for a in ADAPTERS for b in ADAPTERS)
        print(f"worst {worst:.2e}; the tasks' own probabilities differ by up to {spread:.3f}")
        sys.exit(0 if worst < 1e-5 else 1)


if __name__ == "__main__":
    main()
