"""Python's `adapters` reads the adapters adapterkit trains on RoBERTa, XLM-RoBERTa, DistilBERT and
ELECTRA, and gets our scores.

    V/bin/python scripts/python_reads_ours_encoders.py [--binary target/release/adapterkit]

Needs torch, transformers and adapters 1.3 (as tests/fixtures/encoders/adapters/
make_encoder_adapter_fixtures.py pins them). On each tiny encoder of tests/fixtures/encoders/
(RoBERTa with its own byte-level BPE; the others, whose vocabularies have 99 entries, with the
tiny BERT's 99-token WordPiece copied in), it trains a Houlsby adapter and a LoRA with the binary
(`--freeze-layer-norms`, so that the files are all there is), then loads each into
`AutoAdapterModel` with its head (`load_adapter`): its class probabilities must equal
`adapterkit predict`'s within 1e-5. Exits non-zero otherwise.
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from adapters import AutoAdapterModel
from transformers import AutoTokenizer, PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parents[1]
ENCODERS = ROOT / "tests/fixtures/encoders"
TEXTS = ["the cat sat on the mat", "a dog"]


def run(binary, *args):
    return subprocess.run([binary, *map(str, args)], check=True, capture_output=True, text=True).stdout


def model_dir(arch, tmp):
    """The fixture encoder with a tokenizer: RoBERTa's own, else the tiny BERT's."""
    if arch == "roberta":
        return ENCODERS / arch
    out = tmp / arch
    shutil.copytree(ENCODERS / arch, out)
    for name in ["vocab.txt", "tokenizer.json", "tokenizer_config.json"]:
        shutil.copy(ROOT / "tests/fixtures/tiny-bert" / name, out / name)
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--binary", default=str(ROOT / "target/release/adapterkit"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "train.csv"
        rows = ["text,label"] + [f"the {w} sat on the mat,{w}" for w in ["cat", "dog"] * 8]
        data.write_text("\n".join(rows) + "\n")
        for arch in ["roberta", "xlm-roberta", "distilbert", "electra"]:
            model = model_dir(arch, tmp)
            tokenizer = AutoTokenizer.from_pretrained(model) if arch == "roberta" else \
                PreTrainedTokenizerFast(tokenizer_file=str(model / "tokenizer.json"), pad_token="[PAD]")
            for method in ["houlsby", "lora"]:
                out = tmp / f"{arch}-{method}"
                run(args.binary, "train", "--model", model, "--train", data, "--validation", data,
                    "--epochs", "3", "--batch-size", "4", "--lr", "3e-2", "--quiet", "--freeze-layer-norms",
                    "--seed", "3", "--method", method, "--out", out)
                lines = run(args.binary, "predict", "--model", model, "--adapter", out, *TEXTS).splitlines()
                ours = [json.loads(line)["scores"] for line in lines]
                python = AutoAdapterModel.from_pretrained(model, attn_implementation="eager")
                name = python.load_adapter(str(out), set_active=True, use_safetensors=True)
                python.eval()
                batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
                if arch in ("distilbert",):
                    batch.pop("token_type_ids", None)
                with torch.no_grad():
                    probs = torch.softmax(python(**batch).logits, -1)
                labels = python.heads[name].config["label2id"]
                diff = max(abs(float(row[i]) - scores[label])
                           for row, scores in zip(probs, ours) for label, i in labels.items())
                worst = max(worst, diff)
                print(f"adapters reads our {method} on {arch}: max |dp| {diff:.2e}")
    if worst > 1e-5:
        sys.exit(f"probabilities differ by {worst:.2e}, above 1e-5")


if __name__ == "__main__":
    main()
