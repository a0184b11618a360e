"""NVIDIA Triton (the tritonserver binary in nvidia-pytriton) serving both models from a torch
function; with ``--dynamic``, Triton's dynamic batcher in front of it.

    python serve_triton.py --weights DIR --grpc-port P --http-port H --metrics-port M [--dynamic --delay-us 100 [--preferred 16]]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from models import MODELS, load
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig


def infer_function(module: torch.nn.Module):
    @batch
    def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
        (array,) = inputs.values()
        with torch.inference_mode():
            result = module(torch.from_numpy(array))
        return {name: tensor.numpy() for name, tensor in result.items()}

    return infer


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--weights", type=Path, required=True, help="the folder of the merged weights")
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--metrics-port", type=int, required=True)
    parser.add_argument("--dynamic", action="store_true")
    parser.add_argument("--delay-us", type=int, default=100)
    parser.add_argument("--preferred", type=int, nargs="*", default=[], help="preferred batch sizes")
    args = parser.parse_args()
    batcher = (
        DynamicBatcher(max_queue_delay_microseconds=args.delay_us, preferred_batch_size=args.preferred or None)
        if args.dynamic
        else None
    )
    config = TritonConfig(
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        metrics_port=args.metrics_port,
        grpc_address="127.0.0.1",
        http_address="127.0.0.1",
    )
    # Statistics stay open: perf_analyzer reads them (pytriton 0.7 restricts them by default).
    security = TritonSecurityConfig(restricted_endpoints=["shared-memory", "model-repository", "trace", "logging"])
    triton = Triton(workspace=str(args.weights / f"triton-ws-{args.grpc_port}"), config=config, security_config=security)
    for name, (input_name, features, outputs) in MODELS.items():
        triton.bind(
            model_name=name,
            infer_func=infer_function(load(name, args.weights)),
            inputs=[Tensor(name=input_name, dtype=np.float32, shape=(features,))],
            outputs=[Tensor(name=output, dtype=np.float32, shape=(10,)) for output in outputs],
            config=ModelConfig(max_batch_size=64, batcher=batcher),
            strict=False,
        )
    triton.serve()
