"""The KServe v2 / Open Inference Protocol servicer: decode, delegate, encode.

Triton's repository RPCs map onto the spec versions: ``RepositoryModelLoad`` with a
``config`` parameter pushes that spec (JSON) as a new version and waits until it serves,
without one it serves the model's active version again; ``RepositoryModelUnload`` stops
serving the model, keeping its versions. RPCs not overridden here (shared memory, trace,
logging) answer UNIMPLEMENTED through the generated base class.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from tureen import __version__
from tureen.core.blends import BlendRepository
from tureen.core.controller import Controller
from tureen.core.engine import Call, Engine
from tureen.errors import SoupError
from tureen.spec import spec_from_json
from tureen.transport import triton
from tureen.transport.grpc import codec


class InferenceServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, engine: Engine, repository: BlendRepository, controller: Controller) -> None:
        self._engine = engine
        self._repository = repository
        self._controller = controller

    def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.ServicerContext) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._repository.all_ready())

    def ServerMetadata(self, request: pb.ServerMetadataRequest, context: grpc.ServicerContext) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="tureen", version=__version__, extensions=triton.EXTENSIONS)

    def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.ServicerContext) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self._repository.is_ready(request.name, request.version))

    def ModelMetadata(self, request: pb.ModelMetadataRequest, context: grpc.ServicerContext) -> pb.ModelMetadataResponse:
        return triton.metadata(self._repository.active(request.name, request.version))

    def ModelConfig(self, request: pb.ModelConfigRequest, context: grpc.ServicerContext) -> pb.ModelConfigResponse:
        blend = self._repository.active(request.name, request.version)
        return pb.ModelConfigResponse(config=triton.model_config(blend, self._engine.policy_of(blend)))

    def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.ServicerContext) -> pb.ModelInferResponse:
        return self._engine.serve(_call(request, context))

    def ModelStreamInfer(
        self, requests: Iterator[pb.ModelInferRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.ModelStreamInferResponse]:
        """One response per request, in order; a failed request's error goes in ``error_message``
        (with the request's id) and the stream goes on, as Triton's does."""
        for request in requests:
            try:
                response = self._engine.serve(_call(request, context, stream=True))
            except SoupError as exc:
                yield pb.ModelStreamInferResponse(error_message=str(exc), infer_response=_failed_response(request))
                continue
            yield pb.ModelStreamInferResponse(infer_response=response)

    def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: grpc.ServicerContext) -> pb.ModelStatisticsResponse:
        return triton.statistics(self._engine.statistics_of(request.name, request.version))

    def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: grpc.ServicerContext) -> pb.RepositoryIndexResponse:
        return pb.RepositoryIndexResponse(
            models=[
                pb.RepositoryIndexResponse.ModelIndex(name=name, version=version, state=state, reason=reason)
                for name, version, state, reason in self._repository.index(request.ready)
            ]
        )

    def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: grpc.ServicerContext
    ) -> pb.RepositoryModelLoadResponse:
        config = request.parameters.get("config")
        spec = spec_from_json(config.string_param, "parameters.config") if config is not None else None
        self._controller.load_model(request.model_name, spec, context.peer())
        return pb.RepositoryModelLoadResponse()

    def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: grpc.ServicerContext
    ) -> pb.RepositoryModelUnloadResponse:
        self._controller.unload(request.model_name, context.peer())
        return pb.RepositoryModelUnloadResponse()


NO_DEADLINE_S = 365 * 24 * 3600.0
"""A deadline further off than this is none (gRPC reports a call without one as centuries away)."""


def _call(request: pb.ModelInferRequest, context: grpc.ServicerContext, stream: bool = False) -> Call[pb.ModelInferResponse]:
    """The data plane's view of one request. A stream's requests run one after another, so a
    cancelled stream ends at its iterator: they register no cancel hook (a hook per request
    would stay with the call until the stream ends)."""
    received = time.perf_counter_ns()
    remaining = context.time_remaining()  # without a deadline: None, or "forever" as a huge number
    if remaining is not None and remaining > NO_DEADLINE_S:
        remaining = None
    return Call(
        model=request.model_name,
        received_ns=received,
        decode=lambda: codec.decode_infer_request(request),
        encode=codec.encode_infer_response,
        deadline_ns=None if remaining is None else received + int(remaining * 1e9),
        on_cancel=None if stream else lambda cancel: _on_cancel(context, cancel),
    )


def _on_cancel(context: grpc.ServicerContext, cancel: Callable[[], None]) -> None:
    # add_callback runs when the call ends for any reason; a finished request is no longer
    # queued, so the cancel then does nothing.
    if not context.add_callback(cancel):
        cancel()  # the call ended already


def _failed_response(request: pb.ModelInferRequest) -> pb.ModelInferResponse:
    return pb.ModelInferResponse(model_name=request.model_name, model_version=request.model_version, id=request.id)
