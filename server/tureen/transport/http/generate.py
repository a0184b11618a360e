"""Triton's generate extension: ``POST /v2/models/{m}[/versions/{v}]/generate`` and
``/generate_stream`` (server-sent events), JSON in and out.

The body's keys are the model's inputs (``text_input``, and scalar ones such as ``max_tokens``)
with request ``parameters`` beside them, as Triton maps them; the answer carries
``model_name``, ``model_version`` and ``text_output``. A stream sends one event per chunk of
text; an error after the first event is an event of its own (``{"error": ...}``), as Triton's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from tureen.core.engine import Engine
from tureen.core.llm.serving import GenerateRequest, Stream
from tureen.errors import Cancelled, InvalidRequest, SoupError
from tureen.transport.http import codec
from tureen.transport.text import TEXT_INPUT, TEXT_OUTPUT, sampling_fields


class GenerateRoutes:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    async def generate(self, request: Request) -> Response:
        stream, generate, controls = await self._start(request, streaming=False)
        text = await whole_text(request, stream)
        prefix = "" if controls.get("exclude_input_in_output") else generate.prompt or ""
        return JSONResponse(_body(stream, generate.id, prefix + text))

    async def generate_stream(self, request: Request) -> Response:
        stream, generate, _ = await self._start(request, streaming=True)
        return StreamingResponse(_events(stream, generate.id), media_type="text/event-stream")

    async def _start(self, request: Request, streaming: bool) -> tuple[Stream, GenerateRequest, dict[str, Any]]:
        received = time.perf_counter_ns()
        body = await request.body()
        decoded: list[tuple[GenerateRequest, dict[str, Any]]] = []

        def decoding() -> GenerateRequest:
            decoded.append(_decode(request, body, streaming))
            return decoded[0][0]

        stream = self._engine.generate(request.path_params["model"], received, decoding)
        return stream, *decoded[0]


async def whole_text(request: Request, stream: Stream) -> str:
    """The whole generated text; a client that leaves before it ends cancels the generation
    (counted as cancelled), as a stream's reader does by going away."""
    text = asyncio.ensure_future(stream.text())
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({text, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not text.done() and not gone.done():  # this handler itself was cancelled (a shutdown)
            text.cancel()
    if not text.done():
        text.cancel()  # closes the stream's chunks, which cancels the generation and counts it
        with contextlib.suppress(asyncio.CancelledError):
            await text
        raise Cancelled("the client went away before the generation ended")
    return text.result()


async def _disconnected(request: Request) -> None:
    # The body has been read, so the next ASGI message is the client's disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _decode(request: Request, body: bytes, stream: bool) -> tuple[GenerateRequest, dict[str, Any]]:
    document = codec.json_object(body)
    inputs = dict(document)
    parameters = inputs.pop("parameters", None) or {}
    if not isinstance(parameters, dict):
        raise InvalidRequest("parameters: expected an object")
    request_id = inputs.pop("id", "")
    prompt = inputs.pop(TEXT_INPUT, None)
    if not isinstance(prompt, str):
        raise InvalidRequest(f"{TEXT_INPUT}: expected a string")
    fields, controls = sampling_fields(inputs, parameters, "parameters")
    if fields.get("stream") and not stream:
        raise InvalidRequest("parameters.stream: /generate answers once; use /generate_stream to stream")
    if stream:
        fields["stream"] = True
    model, version = request.path_params["model"], request.path_params.get("version", "")
    routing = {name: str(value) for name, value in parameters.items()}
    generate = GenerateRequest(model, version, str(request_id), prompt=prompt, parameters=fields, routing=routing)
    return generate, controls


def _body(stream: Stream, request_id: str, text: str) -> dict[str, Any]:
    body: dict[str, Any] = {"model_name": stream.model, "model_version": str(stream.version), TEXT_OUTPUT: text}
    if request_id:
        body["id"] = request_id
    return body


async def _events(stream: Stream, request_id: str) -> AsyncIterator[bytes]:
    async with aclosing(stream.chunks()) as chunks:
        try:
            async for chunk in chunks:
                if chunk.text or chunk.finish_reason is not None:
                    yield _event(_body(stream, request_id, chunk.text))
        except SoupError as exc:
            yield _event({"error": str(exc)})


def _event(body: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(body)}\n\n".encode()
