"""The Python side of the end-to-end comparison: a Houlsby adapter trained on TREC-6 with
AdapterHub's AdapterTrainer, on the same splits, with adapterkit's settings, then evaluated on
the test split. Prints one JSON object on its last line (seconds, peak RSS, test accuracy).

    target/release/adapterkit export --data trec6 --out runs/e2e/trec6-data
    V/bin/python benches/pytorch_trec6.py --model assets/all-MiniLM-L6-v2 --data runs/e2e/trec6-data --out runs/e2e/pytorch

Settings as `adapterkit train --method houlsby --freeze-layer-norms` defaults: 3 epochs, batch 32,
AdamW lr 1e-3 with weight decay 0.01, 10% linear warm-up then linear decay, gradient clipping at
1.0, evaluation after each epoch and the best epoch (validation accuracy) kept; texts truncated
to the model's 512 positions and padded per batch (DataCollatorWithPadding).
"""

import argparse
import json
import resource
import time

import numpy as np
import torch
from adapters import AdapterTrainer, BertAdapterModel
from transformers import AutoTokenizer, DataCollatorWithPadding, TrainingArguments


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, help="directory with train/validation/test.jsonl")
    parser.add_argument("--out", required=True)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    splits = {}
    for split in ["train", "validation", "test"]:
        with open(f"{args.data}/{split}.jsonl", encoding="utf-8") as f:
            splits[split] = [json.loads(line) for line in f]
    labels = sorted({row["label"] for row in splits["train"]})
    label_id = {label: i for i, label in enumerate(labels)}
    tokenizer = AutoTokenizer.from_pretrained(args.model)

    def encode(rows):
        encoded = tokenizer([row["text"] for row in rows], truncation=True, max_length=512)
        return [{"input_ids": ids, "attention_mask": mask, "labels": label_id[row["label"]]}
                for ids, mask, row in zip(encoded["input_ids"], encoded["attention_mask"], rows)]

    data = {split: encode(rows) for split, rows in splits.items()}
    model = BertAdapterModel.from_pretrained(args.model)
    model.add_adapter("trec6", config="double_seq_bn")
    model.add_classification_head("trec6", num_labels=len(labels))
    model.train_adapter("trec6")

    def accuracy(prediction):
        return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}

    training = TrainingArguments(
        output_dir=args.out, num_train_epochs=args.epochs, per_device_train_batch_size=32,
        per_device_eval_batch_size=64, learning_rate=1e-3, weight_decay=0.01, warmup_ratio=0.1,
        lr_scheduler_type="linear", max_grad_norm=1.0, eval_strategy="epoch", save_strategy="epoch",
        load_best_model_at_end=True, metric_for_best_model="accuracy", save_total_limit=1,
        seed=args.seed, report_to=[], use_cpu=True, dataloader_num_workers=0, disable_tqdm=True,
        logging_strategy="no",
    )
    trainer = AdapterTrainer(
        model=model, args=training, train_dataset=data["train"], eval_dataset=data["validation"],
        data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=accuracy,
    )
    train_start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - train_start
    test = trainer.evaluate(data["test"], metric_key_prefix="test")
    print(json.dumps({
        "engine": f"adapters {__import__('adapters').__version__}, torch {torch.__version__}",
        "train_seconds": train_seconds,
        "total_seconds": time.perf_counter() - start,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "test_accuracy": test["test_accuracy"],
        "train_examples": len(data["train"]),
    }))


if __name__ == "__main__":
    main()
