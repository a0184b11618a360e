"""KServe's Python ModelServer serving both models from a torch function (its gRPC v2 port).

KServe has no ModelConfig RPC, which perf_analyzer calls first: ``config_rpc`` adds one to
KServe's own gRPC server. Inference and everything else stay KServe's own code.

    python serve_kserve.py --weights DIR --configs FILE --grpc_port P --http_port H
"""

from __future__ import annotations

import argparse
from pathlib import Path

import config_rpc
import grpc
import kserve
import torch
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
from models import MODELS, load


class TorchModel(Model):
    def __init__(self, name: str, work: Path) -> None:
        super().__init__(name)
        self.module = load(name, work)
        self.ready = True

    def get_input_types(self) -> list[dict]:  # what ModelMetadata lists: perf_analyzer reads it
        input_name, features, _ = MODELS[self.name]
        return [{"name": input_name, "datatype": "FP32", "shape": [-1, features]}]

    def get_output_types(self) -> list[dict]:
        return [{"name": output, "datatype": "FP32", "shape": [-1, 10]} for output in MODELS[self.name][2]]

    def predict(self, payload: InferRequest, headers=None, response_headers=None) -> InferResponse:
        with torch.inference_mode():
            result = self.module(torch.from_numpy(payload.inputs[0].as_numpy()))
        outputs = []
        for name, tensor in result.items():
            output = InferOutput(name=name, shape=list(tensor.shape), datatype="FP32")
            output.set_data_from_numpy(tensor.numpy(), binary_data=True)
            outputs.append(output)
        return InferResponse(response_id=payload.id, model_name=self.name, infer_outputs=outputs)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(parents=[kserve.model_server.parser])
    parser.add_argument("--weights", type=Path, required=True, help="the folder of the merged weights")
    parser.add_argument("--configs", type=Path, required=True)
    args, _ = parser.parse_known_args()
    register = grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server

    def with_config(servicer: object, server: grpc.aio.Server) -> None:
        register(servicer, server)
        server.add_generic_rpc_handlers((config_rpc.handler(args.configs),))

    grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server = with_config
    ModelServer(grpc_port=args.grpc_port, http_port=args.http_port, enable_latency_logging=False).start(
        [TorchModel(name, args.weights) for name in MODELS]
    )
