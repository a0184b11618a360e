"""KServe v2 over HTTP/REST, with Triton's extensions: decode, delegate, encode.

The same data plane, controller and access rules as the gRPC port, route for route: health,
server and model metadata, readiness, config, statistics, inference (JSON and binary
tensors) and the model repository (index, load, unload). Health stays open; repository
routes are admin calls; everything else is inference.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tureen import __version__
from tureen.core.access import Access, Kind, bearer_of
from tureen.core.blends import BlendRepository
from tureen.core.controller import Controller
from tureen.core.engine import Call, Engine
from tureen.core.llm.serving import GenerateRequest
from tureen.core.rollout import Feedback
from tureen.errors import InvalidRequest
from tureen.spec import spec_from_json
from tureen.transport import triton
from tureen.transport.http import codec, text
from tureen.transport.http.generate import GenerateRoutes, whole_text
from tureen.transport.http.openai import OpenAIRoutes
from tureen.transport.http.status import error_response, openai_error_response

EXTENSIONS = (*triton.EXTENSIONS, "binary_tensor_data")
Handler = Callable[[Request], Awaitable[Response]]


class Routes:
    """The HTTP routes over one engine, repository and controller."""

    def __init__(self, engine: Engine, repository: BlendRepository, controller: Controller, access: Access) -> None:
        self._engine = engine
        self._repository = repository
        self._controller = controller
        self._access = access

    def app(self) -> Starlette:
        model = "/v2/models/{model}"
        generate = GenerateRoutes(self._engine)
        versioned = (model, model + "/versions/{version}")
        routes = [
            Route("/v2/health/live", self._guard(None, self.live)),
            Route("/v2/health/ready", self._guard(None, self.ready)),
            Route("/v2", self._guard("inference", self.server_metadata)),
            Route("/v2/models/stats", self._guard("inference", self.statistics)),
            Route("/v2/repository/index", self._guard("admin", self.index), methods=["POST"]),
            Route("/v2/repository/models/{model}/load", self._guard("admin", self.load), methods=["POST"]),
            Route("/v2/repository/models/{model}/unload", self._guard("admin", self.unload), methods=["POST"]),
            Route(model + "/feedback", self._guard("inference", self.feedback), methods=["POST"]),
        ]
        for prefix in versioned:
            routes += [
                Route(prefix, self._guard("inference", self.model_metadata)),
                Route(prefix + "/ready", self._guard("inference", self.model_ready)),
                Route(prefix + "/config", self._guard("inference", self.config)),
                Route(prefix + "/stats", self._guard("inference", self.statistics)),
                Route(prefix + "/infer", self._guard("inference", self.infer), methods=["POST"]),
                Route(prefix + "/generate", self._guard("inference", generate.generate), methods=["POST"]),
                Route(prefix + "/generate_stream", self._guard("inference", generate.generate_stream), methods=["POST"]),
            ]
        routes += OpenAIRoutes(self._engine, self._repository).routes(
            lambda handler: self._guard("inference", handler, openai=True)
        )

        async def unrouted(request: Request, exc: Exception) -> Response:
            assert isinstance(exc, HTTPException)
            return JSONResponse({"error": f"{request.method} {request.url.path}: {exc.detail}"}, status_code=exc.status_code)

        return Starlette(routes=routes, exception_handlers={HTTPException: unrouted})

    def _guard(self, kind: Kind | None, handler: Handler, openai: bool = False) -> Handler:
        """``handler`` behind the access rules, with every error as its status and ``{"error": ...}``
        (the OpenAI routes: OpenAI's error object)."""
        access = self._access
        checked = kind is not None and not access.open_to_all(kind)

        async def guarded(request: Request) -> Response:
            try:
                if checked:
                    peer = request.client.host if request.client is not None else None
                    access.admit(kind, bearer_of(request.headers.get("authorization")), peer)  # type: ignore[arg-type]
                return await handler(request)
            except Exception as exc:
                return openai_error_response(exc) if openai else error_response(exc)

        return guarded

    # ---- health and metadata ---------------------------------------------------------------------

    async def live(self, request: Request) -> Response:
        return Response(status_code=200)

    async def ready(self, request: Request) -> Response:
        return Response(status_code=200 if self._repository.all_ready() else 400)

    async def server_metadata(self, request: Request) -> Response:
        return JSONResponse({"name": "tureen", "version": __version__, "extensions": list(EXTENSIONS)})

    async def model_metadata(self, request: Request) -> Response:
        model, version = _names(request)
        return JSONResponse(triton.as_json(triton.metadata(self._repository.active(model, version))))

    async def model_ready(self, request: Request) -> Response:
        model, version = _names(request)
        return Response(status_code=200 if self._repository.is_ready(model, version) else 400)

    async def config(self, request: Request) -> Response:
        model, version = _names(request)
        blend = self._repository.active(model, version)
        return JSONResponse(triton.as_json(triton.model_config(blend, self._engine.policy_of(blend))))

    async def statistics(self, request: Request) -> Response:
        model, version = request.path_params.get("model", ""), request.path_params.get("version", "")
        return JSONResponse(triton.as_json(triton.statistics(self._engine.statistics_of(model, version))))

    # ---- inference -------------------------------------------------------------------------------

    async def infer(self, request: Request) -> Response:
        received = time.perf_counter_ns()
        body = await request.body()
        model, version = _names(request)
        header_length = request.headers.get(codec.HEADER_LENGTH)
        if text.is_text(body, header_length):
            return await self._infer_text(request, received, body, header_length)
        decoded: list[codec.Decoded] = []

        def decode() -> Any:
            decoded.append(codec.decode_infer(body, header_length, model, version))
            return decoded[0].request

        call = Call(model, received, decode, lambda response: codec.encode_infer(response, decoded[0]))
        encoded = await self._engine.serve(call)
        return Response(encoded.body, media_type=encoded.media_type, headers=dict(encoded.headers))

    async def feedback(self, request: Request) -> Response:
        """Tureen's feedback call over HTTP: ``{"request_id", "labels" | "score" | "thumbs"}``."""
        request_id, feedback = _feedback(await _json_body(request))
        version = await run_in_threadpool(self._controller.feedback, request.path_params["model"], request_id, feedback)
        return JSONResponse({"matched": version is not None, "version": str(version or "")})

    async def _infer_text(self, request: Request, received: int, body: bytes, header_length: str | None) -> Response:
        model, version = _names(request)
        calls: list[text.TextCall] = []

        def decode() -> GenerateRequest:
            calls.append(text.decode(body, header_length, model, version))
            return calls[0].request

        stream = self._engine.generate(model, received, decode)
        encoded = text.encode(stream, calls[0], await whole_text(request, stream))
        return Response(encoded.body, media_type=encoded.media_type, headers=dict(encoded.headers))

    # ---- the model repository --------------------------------------------------------------------

    async def index(self, request: Request) -> Response:
        document = await _json_body(request)
        ready = document.get("ready", False) is True
        rows = self._repository.index(ready)
        entries = [{"name": n, "version": v, "state": s, "reason": r} for n, v, s, r in rows]
        return JSONResponse([{k: v for k, v in entry.items() if v} for entry in entries])

    async def load(self, request: Request) -> Response:
        document = await _json_body(request)
        parameters = document.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise InvalidRequest("parameters: expected an object")
        config = parameters.get("config")
        if config is not None and not isinstance(config, str):
            raise InvalidRequest("parameters.config: expected the spec as a JSON string")
        spec = spec_from_json(config, "parameters.config") if config is not None else None
        await run_in_threadpool(self._controller.load_model, request.path_params["model"], spec, _who(request))
        return Response(status_code=200)

    async def unload(self, request: Request) -> Response:
        await run_in_threadpool(self._controller.unload, request.path_params["model"], _who(request))
        return Response(status_code=200)


def _feedback(document: dict[str, Any]) -> tuple[str, Feedback]:
    unknown = sorted(set(document) - {"request_id", "labels", "score", "thumbs"})
    if unknown:
        raise InvalidRequest(f"{unknown[0]}: not a feedback field (request_id, labels, score, thumbs)")
    request_id, labels = document.get("request_id", ""), document.get("labels", [])
    score, thumbs = document.get("score"), document.get("thumbs")
    if not isinstance(request_id, str):
        raise InvalidRequest("request_id: expected the id the request was sent with")
    if isinstance(labels, int) and not isinstance(labels, bool):
        labels = [labels]
    if not isinstance(labels, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in labels):
        raise InvalidRequest("labels: expected a class id or a list of them, one per row")
    if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float))):
        raise InvalidRequest("score: expected a number from 0 to 1")
    if thumbs not in (None, "up", "down"):
        raise InvalidRequest('thumbs: expected "up" or "down"')
    up = None if thumbs is None else thumbs == "up"
    try:
        reward = None if score is None else float(score)
    except OverflowError:
        raise InvalidRequest("score: expected a number from 0 to 1") from None
    return request_id, Feedback(tuple(labels), reward, up)


def _names(request: Request) -> tuple[str, str]:
    return request.path_params["model"], request.path_params.get("version", "")


def _who(request: Request) -> str:
    return f"http:{request.client.host}:{request.client.port}" if request.client is not None else "http"


async def _json_body(request: Request) -> dict[str, Any]:
    """The body of a route whose body is optional: an empty one is an empty object."""
    body = await request.body()
    return codec.json_object(body) if body.strip() else {}
