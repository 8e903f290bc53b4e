"""The ONNX Runtime side of `adapterkit bench --what inference-all-positions`: a random-weight
encoder of the same shape (transformers' model built from the shape's config, with a 2-label
classification head) exported with `torch.onnx.export`, in f32 or quantised by ONNX Runtime's
`quantize_dynamic` (QInt8 weights; ORT quantises the activations per tensor, dynamically, where
ours quantises them per row), timed with `InferenceSession`, printed as the same JSON as
`benches/pytorch_baseline.py`.

    V/bin/pip install onnxruntime==1.32.0 onnx==1.23.2 onnxscript
    V/bin/python benches/onnx_baseline.py --dtype int8 [--shape minilm] [--threads 2]

`benches/side_by_side.py --baseline benches/onnx_baseline.py --what inference-all-positions
--dtype int8` runs it beside ours (`adapterkit bench --dtype int8`).
"""

import json
import resource
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic
from transformers import AutoConfig, AutoModelForSequenceClassification

from pytorch_baseline import SHAPES, forward_flops, matmul_peak, shape_arguments, time_per_step


def main():
    parser = shape_arguments()
    parser.add_argument("--what", default="inference-all-positions")
    parser.add_argument("--dtype", default="int8", choices=["f32", "int8"])
    args = parser.parse_args()
    if args.what not in ("inference", "inference-all-positions"):
        raise SystemExit(f"ONNX Runtime measures inference only, not {args.what!r}")
    torch.manual_seed(1)
    torch.set_num_threads(args.threads)
    config = AutoConfig.for_model(**SHAPES[args.shape], num_labels=2)
    model = AutoModelForSequenceClassification.from_config(config).eval()
    ids = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len))
    mask = torch.ones_like(ids)
    with tempfile.TemporaryDirectory() as folder:
        f32_path, int8_path = Path(folder) / "model.onnx", Path(folder) / "model-int8.onnx"
        torch.onnx.export(
            model, (ids, mask), f32_path, input_names=["input_ids", "attention_mask"],
            output_names=["logits"], dynamo=False,
            dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}},
        )
        path = f32_path
        if args.dtype == "int8":
            quantize_dynamic(f32_path, int8_path, weight_type=QuantType.QInt8)
            path = int8_path
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.inter_op_num_threads = 1
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {"input_ids": ids.numpy().astype(np.int64), "attention_mask": mask.numpy().astype(np.int64)}
    seconds = time_per_step(args.steps, lambda: session.run(["logits"], feed))
    flops = forward_flops(config, args.batch_size, args.seq_len)
    peak = matmul_peak()
    print(json.dumps({
        "engine": f"onnxruntime {onnxruntime.__version__}", "dtype": args.dtype,
        "shape": args.shape, "seq_len": args.seq_len, "batch_size": args.batch_size,
        "threads": args.threads, "matmul_peak_gflop_per_second": peak / 1e9,
        "results": [{
            "what": args.what,
            "sequences_per_second": args.batch_size / seconds,
            "seconds_per_step": seconds,
            "gflop_per_second": flops / seconds / 1e9,
            "share_of_matmul_peak": flops / seconds / peak,
            "peak_rss_mib_so_far": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }],
    }, indent=2))


if __name__ == "__main__":
    main()
