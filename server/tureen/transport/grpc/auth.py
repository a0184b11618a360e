"""Access on the gRPC port: each admin or inference call is admitted by ``core.access.Access``.

This module only finds what the decision needs in gRPC terms (which service a method belongs
to, the peer's address, the bearer token); the refusal is a ``SoupError`` that the error
interceptor maps to its status like any other. Health and reflection stay open, so probes and
tools work without secrets.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from tureen.core.access import Access, Kind, bearer_of

ADMIN_PREFIXES = ("/tureen.v1.SoupAdmin/", "/inference.GRPCInferenceService/Repository")
INFERENCE_PREFIXES = ("/inference.GRPCInferenceService/", "/tureen.v1.SoupFeedback/")
_PEER = re.compile(r"^ipv4:(?P<v4>[\d.]+):\d+$|^ipv6:\[(?P<v6>[0-9A-Fa-f:.]+)(?:%[^\]]*)?\]:\d+$")


class AccessInterceptor(grpc.aio.ServerInterceptor):
    """Runs ``Access.admit`` before the admin and inference methods; placed inside the error
    interceptor, so that its refusals get their status in the one place statuses are chosen."""

    def __init__(self, access: Access) -> None:
        self._access = access

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]], handler_call_details: grpc.HandlerCallDetails
    ) -> Any:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        kind: Kind | None = (
            "admin" if method.startswith(ADMIN_PREFIXES) else "inference" if method.startswith(INFERENCE_PREFIXES) else None
        )
        if handler is None or kind is None or self._access.open_to_all(kind):
            return handler
        bearer = bearer_token(handler_call_details.invocation_metadata or ())
        access = self._access

        def admit(context: Any) -> None:
            access.admit(kind, bearer, peer_address(context.peer()))

        for slot in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            behavior = getattr(handler, slot)
            if behavior is not None:
                return handler._replace(**{slot: _admitted(behavior, admit)})
        return handler


def _admitted(behavior: Callable[..., Any], admit: Callable[[Any], None]) -> Callable[..., Any]:
    """``behavior`` that first admits its caller, of the same kind (async generator, coroutine, plain)."""
    if inspect.isasyncgenfunction(behavior):

        async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
            admit(context)
            async for item in behavior(request, context):
                yield item

        return stream
    if inspect.iscoroutinefunction(behavior):

        async def call(request: Any, context: Any) -> Any:
            admit(context)
            return await behavior(request, context)

        return call

    def plain(request: Any, context: Any) -> Any:
        admit(context)
        return behavior(request, context)

    return plain


def bearer_token(metadata: Any) -> str | None:
    """The token of an ``authorization: Bearer <token>`` header; "" for another scheme; None without one."""
    for key, value in metadata:
        if key.lower() == "authorization":
            return bearer_of(value.decode() if isinstance(value, bytes) else str(value))
    return None


def peer_address(peer: str) -> str | None:
    """The IP address in a gRPC peer string (``ipv4:127.0.0.1:5000``, ``ipv6:[::1]:5000``), or None."""
    found = _PEER.match(peer or "")
    return (found.group("v4") or found.group("v6")) if found else None
