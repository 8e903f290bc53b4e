"""The Python side of the serving benchmark: the HTTP server a Python user would write with
FastAPI + uvicorn + AdapterHub's `adapters`, to compare requests/s against `adapterkit serve`.
Same routes and JSON shapes; one forward pass per request, no batching across requests.

    python3 -m venv V && V/bin/pip install -r benches/requirements.txt
    V/bin/python benches/serve_baseline.py --model assets/all-MiniLM-L6-v2 --adapter-dir ADAPTERS \
        --host 127.0.0.1 --port 8080 --threads 2

ADAPTERS holds one AdapterHub `save_adapter(..., with_head=True)` folder per adapter; the folder
name is the adapter's name in the routes:
    POST /v1/adapters/{name}/predict   {"inputs": ["text", ...]}
    POST /v1/predict                   {"adapter": name, "inputs": ["text", ...]}
    -> {"predictions": [{"label": str, "scores": {label: prob}}, ...]}
    GET  /health
"""

import argparse
import os
import threading
from typing import List

import torch
import uvicorn
from adapters import AutoAdapterModel
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from transformers import AutoTokenizer


class AdapterInputs(BaseModel):
    inputs: List[str]


class PredictRequest(AdapterInputs):
    adapter: str


class ApiError(Exception):
    def __init__(self, code, message):
        self.code, self.message = code, message


def build_app(model, tokenizer, labels):
    app = FastAPI()
    # set_active_adapters mutates the shared model, and a fast tokenizer called with
    # padding/truncation mutates its own state ("Already borrowed" under concurrency), so one
    # request at a time does both. FastAPI runs sync endpoints in a threadpool, hence the lock.
    lock = threading.Lock()

    def predict(name, texts):
        if name not in labels:
            raise ApiError(404, f"unknown adapter {name!r}")
        if not texts:
            raise ApiError(400, "inputs must not be empty")
        with lock, torch.inference_mode():
            batch = tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
            model.set_active_adapters(name)  # also makes the head of the same name active
            logits = model(**batch, head=name).logits
        probs = logits.softmax(-1).tolist()
        names = labels[name]
        return {
            "predictions": [
                {"label": names[p.index(max(p))], "scores": dict(zip(names, p))}
                for p in probs
            ]
        }

    @app.exception_handler(ApiError)
    def api_error(request, exc):
        return JSONResponse({"error": exc.message, "code": exc.code}, status_code=exc.code)

    @app.exception_handler(RequestValidationError)
    def bad_request(request, exc):
        return JSONResponse({"error": str(exc.errors()), "code": 400}, status_code=400)

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.post("/v1/adapters/{name}/predict")
    def predict_named(name: str, body: AdapterInputs):
        return predict(name, body.inputs)

    @app.post("/v1/predict")
    def predict_body(body: PredictRequest):
        return predict(body.adapter, body.inputs)

    return app


class ReadyServer(uvicorn.Server):
    """uvicorn.run(app, ...) with one worker, but prints the banner once the socket is listening
    (a startup event would fire before uvicorn binds it)."""

    def __init__(self, config, banner):
        super().__init__(config)
        self.banner = banner

    async def startup(self, sockets=None):
        await super().startup(sockets)
        if self.started:
            print(self.banner, flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True, help="local BERT model directory")
    parser.add_argument("--adapter-dir", required=True, help="one AdapterHub save_adapter folder per adapter")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoAdapterModel.from_pretrained(args.model).eval()
    labels = {}
    for name in sorted(os.listdir(args.adapter_dir)):
        path = os.path.join(args.adapter_dir, name)
        if not os.path.isdir(path):
            continue
        # A folder may also hold base_weights.safetensors (adapterkit's extra LayerNorm weights);
        # the baseline ignores it: it changes values, not the work done, so not the timings.
        # adapterkit writes safetensors; adapters 1.3 looks for its .bin files unless told.
        safetensors = os.path.exists(os.path.join(path, "adapter.safetensors"))
        model.load_adapter(path, load_as=name, with_head=True, use_safetensors=safetensors)
        id2label = model.get_labels_dict(name) or {}
        num_labels = model.heads[name].config["num_labels"]
        labels[name] = [str(id2label.get(i, f"LABEL_{i}")) for i in range(num_labels)]
    app = build_app(model, tokenizer, labels)
    config = uvicorn.Config(app, host=args.host, port=args.port, workers=1, log_level="warning", access_log=False)
    ReadyServer(config, f"listening on http://{args.host}:{args.port}").run()


if __name__ == "__main__":
    main()
