"""The PyTorch side of `adapterkit bench`: the same measurements with PyTorch + transformers +
AdapterHub's `adapters`, on the same random-weight shapes, printed as the same JSON.

    python3 -m venv V && V/bin/pip install -r benches/requirements.txt
    V/bin/python benches/pytorch_baseline.py --shape minilm --seq-len 128 --batch-size 32 --threads 2 --what adapter

Measurements (median seconds per step of --steps timed steps, after one untimed step):
  inference  eval forward + classification head, under torch.inference_mode (the model
             computes the last layer at every position, so this is also the measurement that
             adapterkit's inference-all-positions matches; both names are accepted)
  adapter    a Houlsby (double_seq_bn) adapter training step: model.train_adapter (encoder and
             its LayerNorms frozen), forward with dropout, cross-entropy, backward, AdamW step
  full       full fine-tuning step: every weight trained, same loop
Peak RSS is the process's high-water mark (ru_maxrss), so measure one --what per process.
"""

import argparse
import json
import resource
import statistics
import time

import torch
from adapters import AutoAdapterModel, IA3Config, LoRAConfig
from adapters.composition import Stack
from transformers import AutoConfig

BERT = dict(model_type="bert", vocab_size=30522, max_position_embeddings=512)
SHAPES = {
    "minilm": dict(BERT, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
    "bert-base": dict(BERT, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    # The sizes of roberta-base's and distilbert-base-uncased's config.json.
    "roberta-base": dict(model_type="roberta", vocab_size=50265, max_position_embeddings=514, type_vocab_size=1,
                         layer_norm_eps=1e-5, pad_token_id=1, hidden_size=768, num_hidden_layers=12,
                         num_attention_heads=12, intermediate_size=3072),
    "distilbert": dict(model_type="distilbert", vocab_size=30522, dim=768, n_layers=6, n_heads=12,
                       hidden_dim=3072),
}


def forward_flops(config, batch, seq):
    h, i, l = config.hidden_size, config.intermediate_size if hasattr(config, "intermediate_size") else config.hidden_dim, config.num_hidden_layers
    return 2.0 * batch * seq * l * (4 * h * h + 2 * h * i + 2 * seq * h)


def time_per_step(steps, step):
    step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_peak(n=1024):
    a, b = torch.randn(n, n), torch.randn(n, n)
    seconds = time_per_step(5, lambda: (a @ b).sum().item())
    return 2.0 * n**3 / seconds


def shape_arguments():
    """The arguments every baseline shares with `adapterkit bench`."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="minilm", choices=SHAPES)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    return parser


def main():
    parser = shape_arguments()
    parser.add_argument("--what", default="inference,adapter,full")
    # bf16: PyTorch's fastest CPU mode, `torch.autocast("cpu", dtype=torch.bfloat16)` around
    # each forward pass (its products in bf16, reductions in f32; weights stay f32).
    parser.add_argument("--dtype", default="f32", choices=["f32", "bf16"])
    # Also train the encoder's LayerNorms in the adapter, lora and ia3 measurements (as
    # `adapterkit bench --train-layer-norms`); off: AdapterHub's `train_adapter` freezes them.
    parser.add_argument("--train-layer-norms", action="store_true")
    args = parser.parse_args()
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    torch.set_num_threads(args.threads)
    torch.manual_seed(1)
    config = AutoConfig.for_model(**SHAPES[args.shape])
    ids = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len))
    mask = torch.ones_like(ids)
    labels = torch.randint(0, 2, (args.batch_size,))
    flops = forward_flops(config, args.batch_size, args.seq_len)
    peak = matmul_peak()
    rows = []
    for what in args.what.split(","):
        model = AutoAdapterModel.from_config(config)
        model.add_classification_head("bench", num_labels=2)
        if what in ("inference", "inference-all-positions"):
            model.eval()

            def step():
                with torch.inference_mode(), autocast():
                    model(input_ids=ids, attention_mask=mask).logits.sum().item()

            step_flops = flops
        elif what == "lora-stack":
            # Two LoRAs composed unmerged, as adapterkit's `lora-stack`.
            for name in ("a", "b"):
                model.add_adapter(name, config=LoRAConfig(r=8, alpha=16))
            model.set_active_adapters(Stack("a", "b"))
            model.eval()

            def step():
                with torch.inference_mode(), autocast():
                    model(input_ids=ids, attention_mask=mask).logits.sum().item()

            step_flops = flops
        elif what in ("adapter", "full", "lora", "ia3"):
            adapter_configs = {"adapter": "double_seq_bn", "lora": LoRAConfig(r=8, alpha=16),
                               "ia3": IA3Config()}
            if what in adapter_configs:
                model.add_adapter("bench", config=adapter_configs[what])
                model.train_adapter("bench")
                if args.train_layer_norms:
                    for name, parameter in model.named_parameters():
                        if "LayerNorm" in name or "layer_norm" in name:
                            parameter.requires_grad = True
            model.train()
            trainable = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.01)

            def step():
                with autocast():
                    logits = model(input_ids=ids, attention_mask=mask).logits
                loss = torch.nn.functional.cross_entropy(logits.float(), labels)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            step_flops = flops * (3.0 if what == "full" else 2.0)
        else:
            raise SystemExit(
                f"unknown measurement {what!r} (inference, inference-all-positions, adapter, full, "
                "lora, ia3, lora-stack)")
        seconds = time_per_step(args.steps, step)
        rows.append({
            "what": what,
            "sequences_per_second": args.batch_size / seconds,
            "seconds_per_step": seconds,
            "gflop_per_second": step_flops / seconds / 1e9,
            "share_of_matmul_peak": step_flops / seconds / peak,
            "peak_rss_mib_so_far": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        })
    print(json.dumps({
        "engine": f"torch {torch.__version__}", "dtype": args.dtype,
        "shape": args.shape, "seq_len": args.seq_len, "batch_size": args.batch_size,
        "threads": args.threads, "matmul_peak_gflop_per_second": peak / 1e9, "results": rows,
    }, indent=2))


if __name__ == "__main__":
    main()
