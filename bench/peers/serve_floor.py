"""The floor: a bare KServe v2 gRPC server in Python (grpcio's thread-pool server, 8 threads) that
decodes the raw input, runs the bare forward and returns raw outputs. Nothing unbatched in Python
does less per request; it implements only what perf_analyzer calls.

    python serve_floor.py --weights DIR --port P
"""

from __future__ import annotations

import argparse
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import torch
from models import MODELS, load
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

warnings.filterwarnings("ignore", "The given buffer is not writable")


class Floor(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, work: Path) -> None:
        self.modules = {name: load(name, work) for name in MODELS}

    def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=True)

    def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=request.name in MODELS)

    def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="floor", version="0")

    def ModelMetadata(self, request, context):
        name, features, outputs = MODELS[request.name]
        reply = pb.ModelMetadataResponse(name=request.name, versions=["1"], platform="floor")
        reply.inputs.add(name=name, datatype="FP32", shape=[-1, features])
        for output in outputs:
            reply.outputs.add(name=output, datatype="FP32", shape=[-1, 10])
        return reply

    def ModelConfig(self, request, context):
        name, features, outputs = MODELS[request.name]
        config = mc.ModelConfig(name=request.name, max_batch_size=64)
        config.input.add(name=name, data_type=mc.TYPE_FP32, dims=[features])
        for output in outputs:
            config.output.add(name=output, data_type=mc.TYPE_FP32, dims=[10])
        return pb.ModelConfigResponse(config=config)

    def ModelStatistics(self, request, context):
        return pb.ModelStatisticsResponse()

    def ModelInfer(self, request, context):
        _, features, outputs = MODELS[request.model_name]
        rows = int(request.inputs[0].shape[0])
        x = torch.from_numpy(np.frombuffer(request.raw_input_contents[0], dtype=np.float32).reshape(rows, features))
        with torch.inference_mode():
            result = self.modules[request.model_name](x)
        reply = pb.ModelInferResponse(model_name=request.model_name, model_version="1", id=request.id)
        for output in outputs:
            reply.outputs.add(name=output, datatype="FP32", shape=[rows, 10])
            reply.raw_output_contents.append(result[output].numpy().tobytes())
        return reply


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--weights", type=Path, required=True, help="the folder of the merged weights")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    server = grpc.server(ThreadPoolExecutor(max_workers=8), options=[("grpc.max_receive_message_length", 64 << 20)])
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(Floor(args.weights), server)
    server.add_insecure_port(f"127.0.0.1:{args.port}")
    server.start()
    server.wait_for_termination()
