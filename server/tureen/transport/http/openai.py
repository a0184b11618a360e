"""OpenAI-compatible routes on the HTTP port: ``/v1/models``, ``/v1/completions`` and
``/v1/chat/completions``, streamed as server-sent events when ``stream`` is true.

The ``model`` field names a served soup (``name`` or ``name:version`` to pin a version), and
``system_fingerprint`` names the blend version that answered. Sampling fields take OpenAI's
names and vLLM's extras (``top_k``, ``ignore_eos``); a field this server does not honour is
refused by name rather than ignored.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tureen.core.blends import BlendRepository
from tureen.core.engine import Engine
from tureen.core.llm.serving import GenerateRequest, Stream, generative
from tureen.errors import InvalidRequest, SoupError
from tureen.transport.http import codec
from tureen.transport.http.generate import whole_text

Guard = Callable[[Callable[[Request], Any]], Callable[[Request], Any]]
IGNORED = ("user", "stream_options", "n", "logprobs", "presence_penalty", "frequency_penalty", "echo")
"""Fields taken at their defaults only (checked in ``_fields``); ``user`` is taken and ignored."""


class OpenAIRoutes:
    def __init__(self, engine: Engine, repository: BlendRepository) -> None:
        self._engine = engine
        self._repository = repository

    def routes(self, guard: Guard) -> list[Route]:
        return [
            Route("/v1/models", guard(self.models)),
            Route("/v1/completions", guard(self.completions), methods=["POST"]),
            Route("/v1/chat/completions", guard(self.chat), methods=["POST"]),
        ]

    async def models(self, request: Request) -> Response:
        served = [(name, blend) for name, blend in self._repository.models().items() if blend is not None]
        data = [
            {"id": name, "object": "model", "created": 0, "owned_by": "tureen", "version": str(blend.version)}
            for name, blend in served
            if generative(blend) is not None
        ]
        return JSONResponse({"object": "list", "data": data})

    async def completions(self, request: Request) -> Response:
        return await self._answer(request, "text_completion", _completion)

    async def chat(self, request: Request) -> Response:
        return await self._answer(request, "chat.completion", _chat)

    async def _answer(self, request: Request, kind: str, decode: Callable[[dict[str, Any]], GenerateRequest]) -> Response:
        received = time.perf_counter_ns()
        body = await request.body()
        document: dict[str, Any] = {}
        # The response's id is the request id that feedback names later.
        ident = f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex}"

        def decoding() -> GenerateRequest:
            document.update(codec.json_object(body))
            return dataclasses.replace(decode(document), id=ident)

        model = _model_name(body)
        stream = self._engine.generate(model, received, decoding)
        generate_stream = bool(document.get("stream"))
        if generate_stream:
            options = document.get("stream_options") or {}
            usage = isinstance(options, dict) and options.get("include_usage") is True
            return StreamingResponse(_events(stream, ident, kind, usage), media_type="text/event-stream")
        text = await whole_text(request, stream)
        if kind == "chat.completion":
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text}}
        else:
            choice = {"index": 0, "text": text, "logprobs": None}
        choice["finish_reason"] = stream.finish_reason
        return JSONResponse({**_head(stream, ident, kind), "choices": [choice], "usage": _usage(stream)})


def _completion(document: dict[str, Any]) -> GenerateRequest:
    prompt = document.pop("prompt", None)
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise InvalidRequest("prompt: expected a string (one prompt per request)")
    return _request(document, prompt=prompt)


def _chat(document: dict[str, Any]) -> GenerateRequest:
    messages = document.pop("messages", None)
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise InvalidRequest("messages: expected a non-empty list of {role, content} objects")
    if "max_completion_tokens" in document:
        document["max_tokens"] = document.pop("max_completion_tokens")
    return _request(document, fill_context=True, messages=messages)


def _model_name(body: bytes) -> str:
    """The body's ``model`` for counting a request that cannot be decoded ("" when unreadable)."""
    try:
        model = json.loads(body).get("model", "")
    except (ValueError, AttributeError):
        return ""
    return model.partition(":")[0] if isinstance(model, str) else ""


def _request(document: dict[str, Any], fill_context: bool = False, **prompt: Any) -> GenerateRequest:
    model = document.pop("model", None)
    if not isinstance(model, str) or not model:
        raise InvalidRequest("model: expected the name of a served model")
    name, _, version = model.partition(":")
    fields = {k: v for k, v in _fields(document).items() if v is not None}  # OpenAI's nullable fields: null is the default
    return GenerateRequest(
        name,
        version,
        prompt_field="messages" if "messages" in prompt else "prompt",
        parameters=fields,
        parameters_field="",
        fill_context=fill_context,
        **prompt,
    )


def _fields(document: dict[str, Any]) -> dict[str, Any]:
    """The sampling fields of a body, refusing the OpenAI fields this server does not honour."""
    fields = {k: v for k, v in document.items() if k not in IGNORED}
    defaults = {"n": 1, "logprobs": False, "presence_penalty": 0, "frequency_penalty": 0, "echo": False}
    for name, default in defaults.items():
        if document.get(name) not in (default, None):
            raise InvalidRequest(f"{name}: only {json.dumps(default)} is supported")
    if "stream_options" in document and not isinstance(document["stream_options"], dict | type(None)):
        raise InvalidRequest("stream_options: expected an object")
    return fields


def _head(stream: Stream, ident: str, kind: str) -> dict[str, Any]:
    return {
        "id": ident,
        "object": kind,
        "created": int(time.time()),
        "model": stream.model,
        "system_fingerprint": f"{stream.model}-v{stream.version}",
    }


def _usage(stream: Stream) -> dict[str, int]:
    return {
        "prompt_tokens": stream.prompt_tokens,
        "completion_tokens": stream.completion_tokens,
        "total_tokens": stream.prompt_tokens + stream.completion_tokens,
    }


async def _events(stream: Stream, ident: str, kind: str, usage: bool) -> AsyncIterator[bytes]:
    chat = kind == "chat.completion"
    head = _head(stream, ident, f"{kind}.chunk" if chat else kind)
    async with aclosing(stream.chunks()) as chunks:  # entered first: closing this generator anywhere cancels
        if chat:
            role = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
            yield _event({**head, "choices": [role]})
        try:
            async for chunk in chunks:
                if not chunk.text and chunk.finish_reason is None:
                    continue
                piece: dict[str, Any] = {"delta": {"content": chunk.text}} if chat else {"text": chunk.text, "logprobs": None}
                yield _event({**head, "choices": [{"index": 0, **piece, "finish_reason": chunk.finish_reason}]})
        except SoupError as exc:
            yield _event({"error": {"message": str(exc), "type": exc.reason, "param": None, "code": None}})
            return
    if usage:
        yield _event({**head, "choices": [], "usage": _usage(stream)})
    yield b"data: [DONE]\n\n"


def _event(body: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(body)}\n\n".encode()
