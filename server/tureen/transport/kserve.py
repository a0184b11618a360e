"""The KServe v2 / Open Inference Protocol servicer: decode, delegate, encode.

Triton's repository RPCs map onto the spec versions: ``RepositoryModelLoad`` with a
``config`` parameter pushes that spec (JSON) as a new version and waits until it serves,
without one it serves the model's active version again; ``RepositoryModelUnload`` stops
serving the model, keeping its versions. RPCs not overridden here (streaming, shared memory,
trace, logging) answer UNIMPLEMENTED through the generated base class.
"""

from __future__ import annotations

import time

import grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from tureen import __version__
from tureen.core.blends import BlendRepository
from tureen.core.controller import Controller
from tureen.core.engine import Engine
from tureen.errors import InferenceFailed, SoupError, SpecInvalid
from tureen.transport import codec
from tureen.transport.admin import decode_spec

EXTENSIONS = ("model_configuration", "statistics", "model_repository")


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
        return pb.ServerMetadataResponse(name="tureen", version=__version__, extensions=EXTENSIONS)

    def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.ServicerContext) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self._repository.is_ready(request.name, request.version))

    def ModelMetadata(self, request: pb.ModelMetadataRequest, context: grpc.ServicerContext) -> pb.ModelMetadataResponse:
        return codec.encode_metadata(self._repository.active(request.name, request.version))

    def ModelConfig(self, request: pb.ModelConfigRequest, context: grpc.ServicerContext) -> pb.ModelConfigResponse:
        return codec.encode_config(self._repository.active(request.name, request.version))

    def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.ServicerContext) -> pb.ModelInferResponse:
        received = time.perf_counter_ns()
        try:
            decoded = codec.decode_infer_request(request, received)
        except SoupError as exc:
            self._engine.reject(request.model_name, received, exc)
            raise
        response = self._engine.infer(decoded)
        try:
            return codec.encode_infer_response(response)
        except Exception as exc:
            failure = InferenceFailed(f"model {response.model!r}: cannot encode the response: {exc}")
            self._engine.reject(request.model_name, received, failure)
            raise failure from exc

    def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: grpc.ServicerContext) -> pb.ModelStatisticsResponse:
        return codec.encode_statistics(self._engine.statistics_of(request.name, request.version))

    def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: grpc.ServicerContext) -> pb.RepositoryIndexResponse:
        models = []
        for name, blend in sorted(self._repository.models().items()):
            if blend is not None:
                models.append(pb.RepositoryIndexResponse.ModelIndex(name=name, version=str(blend.version), state="READY"))
            elif not request.ready:
                models.append(pb.RepositoryIndexResponse.ModelIndex(name=name, state="UNAVAILABLE", reason="no active blend"))
        return pb.RepositoryIndexResponse(models=models)

    def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: grpc.ServicerContext
    ) -> pb.RepositoryModelLoadResponse:
        who = context.peer()
        if "config" in request.parameters:
            spec = decode_spec(request.parameters["config"].string_param, "parameters.config")
            if spec.model != request.model_name:
                raise SpecInvalid([f"model: {spec.model!r} in parameters.config, but model_name is {request.model_name!r}"])
            self._controller.push(spec, who, activate=True, wait=True)
        else:
            self._controller.load(request.model_name, who)
        return pb.RepositoryModelLoadResponse()

    def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: grpc.ServicerContext
    ) -> pb.RepositoryModelUnloadResponse:
        self._controller.unload(request.model_name, context.peer())
        return pb.RepositoryModelUnloadResponse()
