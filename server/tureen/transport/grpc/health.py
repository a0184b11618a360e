"""The standard gRPC health service (``grpc.health.v1.Health``), driven by blend readiness.

Readiness changes in any thread (a build finishing, an unload), while the service answers on
the serving event loop: ``set`` is thread-safe and wakes the loop's watchers.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tureen.core.blends import BlendRepository

INFERENCE_SERVICE = "inference.GRPCInferenceService"
LIVENESS_SERVICE = "liveness"
"""SERVING from the moment the server listens until it stops: for liveness probes, which must
not restart a process that is busy building (or paused by an in-place swap) on purpose."""
SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
Status = int
"""A ``HealthCheckResponse.ServingStatus`` value."""
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Health(health_pb2_grpc.HealthServicer):
    """Check and Watch over a table of service statuses that any thread may ``set``."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._statuses: dict[str, Status] = {"": SERVING}
        self._changed = asyncio.Event()
        self._stopping = False

    def set(self, service: str, status: Status) -> None:
        with self._lock:
            if self._stopping or self._statuses.get(service) == status:
                return
            self._statuses[service] = status
        self._loop.call_soon_threadsafe(self._wake)

    def enter_graceful_shutdown(self) -> None:
        """Every service NOT_SERVING from now on, whatever ``set`` says later."""
        with self._lock:
            self._statuses = dict.fromkeys(self._statuses, NOT_SERVING)
            self._stopping = True
        self._loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        status = self._statuses.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)  # type: ignore[arg-type]

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        last = None
        while True:
            changed = self._changed
            status = self._statuses.get(request.service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)  # type: ignore[arg-type]
                last = status
            await changed.wait()


def add_health(server: grpc.aio.Server, repository: BlendRepository, loop: asyncio.AbstractEventLoop) -> Health:
    """Register health; "" and the inference service are SERVING once the models active at
    start-up are ready (``BlendRepository.all_ready``: a model pushed later, or unloaded on
    purpose, does not take a serving replica out of rotation; an in-place swap does).

    Each model name is also a health service of its own, SERVING when that model is ready, and
    ``liveness`` is SERVING for as long as the process serves at all.
    """
    servicer = Health(loop)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    servicer.set(LIVENESS_SERVICE, SERVING)

    def refresh() -> None:
        overall = SERVING if repository.all_ready() else NOT_SERVING
        for service in ("", INFERENCE_SERVICE):
            servicer.set(service, overall)
        for model, blend in repository.models().items():
            servicer.set(model, SERVING if blend is not None else NOT_SERVING)

    repository.subscribe(refresh)  # calls it once now
    return servicer
