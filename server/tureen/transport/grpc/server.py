"""Assembling the gRPC server (``grpc.aio``, on the serving loop): servicers with their access and error
wrappers, health, reflection, limits."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
from grpc_reflection.v1alpha import reflection
from tritonclient.grpc import service_pb2_grpc

from tureen.core.access import Access
from tureen.core.blends import BlendRepository
from tureen.core.controller import Controller
from tureen.core.engine import Engine
from tureen.transport.grpc.admin import AdminServicer, FeedbackServicer
from tureen.transport.grpc.handlers import register
from tureen.transport.grpc.health import INFERENCE_SERVICE, Health, add_health
from tureen.transport.grpc.health import SERVICE_NAME as HEALTH_SERVICE
from tureen.transport.grpc.kserve import InferenceServicer
from tureen.transport.loop import ServingLoop
from tureen.transport.tls import Tls, read_file
from tureen.v1 import admin_pb2, admin_pb2_grpc

ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["SoupAdmin"].full_name
FEEDBACK_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["SoupFeedback"].full_name


def credentials(tls: Tls) -> grpc.ServerCredentials:
    pair = [(read_file(tls.key, "--tls-key"), read_file(tls.cert, "--tls-cert"))]
    if tls.client_ca is None:
        return grpc.ssl_server_credentials(pair)
    return grpc.ssl_server_credentials(pair, read_file(tls.client_ca, "--tls-client-ca"), require_client_auth=True)


@dataclass(frozen=True)
class Endpoint:
    """A bound gRPC server on the serving loop, with its health service, so stopping can announce itself first."""

    server: grpc.aio.Server
    port: int
    health: Health
    loop: ServingLoop

    def start(self) -> None:
        self.loop.call(self.server.start())

    def stop(self, grace: float) -> None:
        """Report NOT_SERVING to health watchers, then stop; requests in flight get ``grace`` s."""
        self.health.enter_graceful_shutdown()
        self.loop.call(self.server.stop(grace))


def create_server(
    engine: Engine,
    repository: BlendRepository,
    controller: Controller,
    loop: ServingLoop,
    *,
    host: str = "0.0.0.0",
    port: int = 8001,
    max_message_bytes: int = 64 * 1024 * 1024,
    workers: int = 8,
    access: Access | None = None,
    tls: Tls | None = None,
) -> Endpoint:
    """Build (not start) the server on ``loop`` and bind it; ``port=0`` picks a free port
    (``Endpoint.port``). ``workers``: threads for the blocking calls (admin, repository loads).
    ``access``: tokens and admin peers (default: no tokens, admin calls from loopback only)."""

    async def build() -> Endpoint:
        server = grpc.aio.server(
            migration_thread_pool=ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tureen-grpc"),
            options=[
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
                ("grpc.so_reuseport", 0),
            ],
        )
        rules = access or Access()
        inference = InferenceServicer(engine, repository, controller)
        register(server, service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server, inference, rules)
        register(
            server, admin_pb2_grpc.add_SoupAdminServicer_to_server, AdminServicer(controller, controller.kitchen.pool), rules
        )
        register(server, admin_pb2_grpc.add_SoupFeedbackServicer_to_server, FeedbackServicer(controller), rules)
        health = add_health(server, repository, loop.loop)
        services = (INFERENCE_SERVICE, ADMIN_SERVICE, FEEDBACK_SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(services, server)
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            bound = server.add_secure_port(address, credentials(tls)) if tls else server.add_insecure_port(address)
        except RuntimeError as exc:
            raise OSError(f"--grpc-port: cannot listen on {address}: {exc}") from None
        if bound == 0:
            raise OSError(f"--grpc-port: cannot listen on {address}")
        return Endpoint(server, bound, health, loop)

    return loop.call(build())
