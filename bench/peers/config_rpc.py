"""A ModelConfig RPC for KServe v2 servers that lack it (KServe, MLServer), so perf_analyzer can run.

perf_analyzer first asks ``inference.GRPCInferenceService/ModelConfig`` for max_batch_size and
dims; these servers answer UNIMPLEMENTED. This handler answers Triton's ModelConfigResponse,
serialized beforehand by bench/peers.py (tritonclient's protos cannot be imported beside the
peers' own ``inference`` protos). Inference and everything else stay the peer's own code.
"""

from __future__ import annotations

import json
from pathlib import Path

import grpc


def handler(configs_file: Path) -> grpc.GenericRpcHandler:
    configs = {name: bytes.fromhex(text) for name, text in json.loads(configs_file.read_text()).items()}

    def model_name(request: bytes) -> str:  # ModelConfigRequest field 1 (name), a short string
        return request[2 : 2 + request[1]].decode() if request[:1] == b"\x0a" else ""

    async def config(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        name = model_name(request)
        if name not in configs:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model {name}")
        return configs[name]

    method = grpc.unary_unary_rpc_method_handler(config)
    return grpc.method_handlers_generic_handler("inference.GRPCInferenceService", {"ModelConfig": method})
