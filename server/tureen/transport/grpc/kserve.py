"""The KServe v2 / Open Inference Protocol servicer: decode, delegate, encode.

The inference RPCs are coroutines on the serving loop; the repository's load and unload block
(a push waits for its build) and run on the server's thread pool.

Triton's repository RPCs map onto the spec versions: ``RepositoryModelLoad`` with a
``config`` parameter pushes that spec (JSON) as a new version and waits until it serves,
without one it serves the model's active version again; ``RepositoryModelUnload`` stops
serving the model, keeping its versions. RPCs not overridden here (shared memory, trace,
logging) answer UNIMPLEMENTED through the generated base class.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any, TypeAlias

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
from tureen.transport.grpc import codec, text

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]


class InferenceServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, engine: Engine, repository: BlendRepository, controller: Controller) -> None:
        self._engine = engine
        self._repository = repository
        self._controller = controller

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._repository.all_ready())

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Context) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="tureen", version=__version__, extensions=triton.EXTENSIONS)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Context) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self._repository.is_ready(request.name, request.version))

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Context) -> pb.ModelMetadataResponse:
        return triton.metadata(self._repository.active(request.name, request.version))

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Context) -> pb.ModelConfigResponse:
        blend = self._repository.active(request.name, request.version)
        return pb.ModelConfigResponse(config=triton.model_config(blend, self._engine.policy_of(blend)))

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Context) -> pb.ModelInferResponse:
        if text.is_text(request):
            return await text.infer(self._engine, request)
        return await self._engine.serve(_call(request, context))

    async def ModelStreamInfer(
        self, requests: AsyncIterator[pb.ModelInferRequest], context: Context
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """One response per request, in order (a streamed text request: one per chunk of text);
        a failed request's error goes in ``error_message`` (with the request's id) and the stream
        goes on, as Triton's does."""
        async for request in requests:
            try:
                if text.is_text(request):
                    async for response in text.stream_infer(self._engine, request):
                        yield pb.ModelStreamInferResponse(infer_response=response)
                    continue
                response = await self._engine.serve(_call(request, context))
            except SoupError as exc:
                yield pb.ModelStreamInferResponse(error_message=str(exc), infer_response=_failed_response(request))
                continue
            yield pb.ModelStreamInferResponse(infer_response=response)

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: Context) -> pb.ModelStatisticsResponse:
        return triton.statistics(self._engine.statistics_of(request.name, request.version))

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: Context) -> pb.RepositoryIndexResponse:
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


def _call(request: pb.ModelInferRequest, context: Context) -> Call[pb.ModelInferResponse]:
    """The data plane's view of one request (a cancelled call cancels the coroutine serving it)."""
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
    )


def _failed_response(request: pb.ModelInferRequest) -> pb.ModelInferResponse:
    return pb.ModelInferResponse(model_name=request.model_name, model_version=request.model_version, id=request.id)
