"""Python reads the LoRA files adapterkit writes, and gets our scores.

    V/bin/python scripts/python_reads_ours.py [--binary target/release/adapterkit] [--model DIR]

Needs torch, transformers, adapters 1.3 and peft (tests/fixtures/lora/make_lora_fixtures.py
and tests/fixtures/peft/make_peft_fixtures.py pin them). On the tiny BERT of
tests/fixtures/tiny-bert (or `--model`, e.g. assets/all-MiniLM-L6-v2), with a small CSV, it
trains with the binary:

  * a LoRA and an (IA)^3 adapter in AdapterHub's files: `adapters` loads each with its head
    (`load_adapter`) and its class probabilities must equal `adapterkit predict`'s;
  * a LoRA in PEFT's files (`--format peft`): PEFT loads it onto `BertModel`, and its last
    hidden state must equal that of the directory `adapterkit merge` writes, loaded by
    `transformers` as a plain model (which also checks that `merge` writes a model
    `transformers` loads).

Exits non-zero on any difference above 1e-5. `crates/adapterkit-cli/tests/lora_cli.rs` runs it
when ADAPTERKIT_PYTHON names such a Python.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from adapters import BertAdapterModel
from peft import PeftModel
from transformers import AutoTokenizer, BertModel

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "tests/fixtures/tiny-bert"  # --model replaces it
TEXTS = ["the cat sat on the mat", "a dog"]


def run(binary, *args):
    out = subprocess.run([binary, *map(str, args)], check=True, capture_output=True, text=True)
    return out.stdout


def train(binary, data, out, *options):
    run(binary, "train", "--model", MODEL, "--train", data, "--validation", data, "--epochs", "4",
        "--batch-size", "4", "--lr", "3e-2", "--quiet", "--freeze-layer-norms", "--seed", "3",
        "--out", out, *options)


def our_probabilities(binary, adapter):
    lines = run(binary, "predict", "--model", MODEL, "--adapter", adapter, *TEXTS).splitlines()
    return [json.loads(line)["scores"] for line in lines]


def merged_hidden(binary, adapter):
    """The last hidden state of the model `adapterkit merge` writes, loaded by `transformers`
    as a plain model."""
    merged = Path(str(adapter) + "-merged")
    run(binary, "merge", "--model", MODEL, "--adapter", adapter, "--out", merged)
    tokenizer = AutoTokenizer.from_pretrained(merged)
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        model = BertModel.from_pretrained(merged, attn_implementation="eager").eval()
        return model(**batch).last_hidden_state


def check_hidden(what, theirs, merged):
    """`theirs` (Python's, unmerged) must equal our merged model's, and differ from the bare
    model's (else the adapter changes nothing and the comparison proves nothing)."""
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        bare = BertModel.from_pretrained(MODEL, attn_implementation="eager").eval()(**batch)
    effect = float((theirs - bare.last_hidden_state).abs().max())
    diff = float((theirs - merged).abs().max())
    print(f"{what}: max |dh| {diff:.2e} against our merged model (the adapter moves it {effect:.2e})")
    if effect < 1e-3 or diff > 1e-5:
        sys.exit(f"{what}: difference {diff:.2e}, effect {effect:.2e}")


def main():
    global MODEL
    parser = argparse.ArgumentParser()
    parser.add_argument("--binary", default=str(ROOT / "target/release/adapterkit"))
    parser.add_argument("--model", default=None)
    args = parser.parse_args()
    MODEL = Path(args.model) if args.model else MODEL
    torch.set_num_threads(2)
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "train.csv"
        rows = ["text,label"] + [f"the {w} sat on the mat,{w}" for w in ["cat", "dog"] * 8]
        data.write_text("\n".join(rows) + "\n")
        for method in ["lora", "ia3"]:
            out = tmp / method
            train(args.binary, data, out, "--method", method, "--name", method)
            ours = our_probabilities(args.binary, out)
            model = BertAdapterModel.from_pretrained(MODEL, attn_implementation="eager")
            name = model.load_adapter(str(out), set_active=True, use_safetensors=True)
            model.eval()
            with torch.no_grad():
                probs = torch.softmax(model(**batch).logits, -1)
                hidden = model.bert(**batch).last_hidden_state
            check_hidden(f"adapters reads our {method}", hidden, merged_hidden(args.binary, out))
            labels = model.heads[name].config["label2id"]
            for row, scores in zip(probs, ours):
                for label, index in labels.items():
                    diff = abs(float(row[index]) - scores[label])
                    worst = max(worst, diff)
            print(f"adapters reads our {method}: max |dp| {worst:.2e}")

        out = tmp / "peft"
        train(args.binary, data, out, "--method", "lora", "--format", "peft", "--adapter-option",
              "alpha=16")
        base = BertModel.from_pretrained(MODEL, attn_implementation="eager")
        peft_model = PeftModel.from_pretrained(base, str(out)).eval()
        with torch.no_grad():
            hidden = peft_model(**batch).last_hidden_state
        check_hidden("peft reads our LoRA", hidden, merged_hidden(args.binary, out))
    if worst > 1e-5:
        sys.exit(f"probabilities differ by {worst:.2e}, above 1e-5")


if __name__ == "__main__":
    main()
