"""The standard gRPC health service, driven by blend readiness."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tureen.core.blends import BlendRepository

INFERENCE_SERVICE = "inference.GRPCInferenceService"
LIVENESS_SERVICE = "liveness"
"""SERVING from the moment the server listens until it stops: for liveness probes, which must
not restart a process that is busy building (or paused by an in-place swap) on purpose."""


def add_health(server: grpc.Server, repository: BlendRepository) -> health.HealthServicer:
    """Register health; "" and the inference service are SERVING once the models active at
    start-up are ready (``BlendRepository.all_ready``: a model pushed later, or unloaded on
    purpose, does not take a serving replica out of rotation; an in-place swap does).

    Each model name is also a health service of its own, SERVING when that model is ready, and
    ``liveness`` is SERVING for as long as the process serves at all.
    """
    servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    servicer.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)

    def refresh() -> None:
        models = repository.models()
        overall = repository.all_ready()
        for service in ("", INFERENCE_SERVICE):
            servicer.set(service, _status(overall))
        for model, blend in models.items():
            servicer.set(model, _status(blend is not None))

    repository.subscribe(refresh)
    return servicer


def _status(serving: bool) -> health_pb2.HealthCheckResponse.ServingStatus.ValueType:
    return health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
