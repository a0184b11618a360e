"""Assembling the gRPC server: servicers, error interceptor, health, reflection, limits."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health
from grpc_reflection.v1alpha import reflection
from tritonclient.grpc import service_pb2_grpc

from tureen.core.blends import BlendRepository
from tureen.core.engine import Engine
from tureen.transport.health import INFERENCE_SERVICE, add_health
from tureen.transport.kserve import InferenceServicer
from tureen.transport.status import ErrorInterceptor


@dataclass(frozen=True)
class Endpoint:
    """A bound gRPC server with its health service, so stopping can announce itself first."""

    server: grpc.Server
    port: int
    health: health.HealthServicer

    def start(self) -> None:
        self.server.start()

    def stop(self, grace: float) -> None:
        """Report NOT_SERVING to health watchers, then stop; requests in flight get ``grace`` s."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()


def create_server(
    engine: Engine,
    repository: BlendRepository,
    *,
    host: str = "0.0.0.0",
    port: int = 8001,
    max_message_bytes: int = 64 * 1024 * 1024,
    workers: int = 8,
) -> Endpoint:
    """Build (not start) the server and bind it; ``port=0`` picks a free port (``Endpoint.port``)."""
    server = grpc.server(
        ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tureen-grpc"),
        interceptors=[ErrorInterceptor()],
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.so_reuseport", 0),
        ],
    )
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(engine, repository), server)
    health_servicer = add_health(server, repository)
    reflection.enable_server_reflection((INFERENCE_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise OSError(f"--grpc-port: cannot listen on {address}: {exc}") from None
    if bound == 0:
        raise OSError(f"--grpc-port: cannot listen on {address}")
    return Endpoint(server, bound, health_servicer)
