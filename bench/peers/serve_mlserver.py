"""Seldon MLServer serving both models from a torch runtime; with ``--adaptive``, its adaptive batching.

    python serve_mlserver.py --weights DIR --configs FILE --grpc-port P --http-port H [--adaptive]

Writes MLServer's model repository (settings.json, one model-settings.json per model) into
``DIR/mlserver-P`` and runs ``mlserver start`` on it. ``config_rpc`` adds the ModelConfig RPC
perf_analyzer needs to MLServer's own gRPC server. MLServer's inference workers import this
module again, so the runtime finds the weights through ``TUREEN_BENCH_WEIGHTS``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from models import MODELS, load


class TorchRuntime(MLModel):
    async def load(self) -> bool:
        self.module = load(self.name, Path(os.environ["TUREEN_BENCH_WEIGHTS"]))
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        array = NumpyCodec.decode_input(payload.inputs[0])
        with torch.inference_mode():
            result = self.module(torch.from_numpy(array))
        outputs = [NumpyCodec.encode_output(name, tensor.numpy()) for name, tensor in result.items()]
        return InferenceResponse(model_name=self.name, outputs=outputs)


def repository(folder: Path, grpc_port: int, http_port: int, adaptive: bool) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    server = {"host": "127.0.0.1", "grpc_port": grpc_port, "http_port": http_port, "metrics_port": grpc_port + 1, "debug": False}
    (folder / "settings.json").write_text(json.dumps(server))
    for name, (input_name, features, outputs) in MODELS.items():
        model = {
            "name": name,
            "implementation": "serve_mlserver.TorchRuntime",
            "inputs": [{"name": input_name, "datatype": "FP32", "shape": [-1, features]}],
            "outputs": [{"name": output, "datatype": "FP32", "shape": [-1, 10]} for output in outputs],
        }
        if adaptive:
            model.update(max_batch_size=64, max_batch_time=0.0005)
        (folder / name).mkdir(exist_ok=True)
        (folder / name / "model-settings.json").write_text(json.dumps(model))
    return folder


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--configs", type=Path, required=True)
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--adaptive", action="store_true")
    args = parser.parse_args()
    os.environ["TUREEN_BENCH_WEIGHTS"] = str(args.weights)
    import config_rpc
    import mlserver.grpc.server as grpc_server

    register = grpc_server.add_GRPCInferenceServiceServicer_to_server

    def with_config(servicer: object, server: object) -> None:
        register(servicer, server)
        server.add_generic_rpc_handlers((config_rpc.handler(args.configs),))  # type: ignore[attr-defined]

    grpc_server.add_GRPCInferenceServiceServicer_to_server = with_config
    from mlserver.cli.main import main

    sys.argv = [
        "mlserver",
        "start",
        str(repository(args.weights / f"mlserver-{args.grpc_port}", args.grpc_port, args.http_port, args.adaptive)),
    ]
    main()
