"""Access on the gRPC port: each admin or inference call is admitted by ``core.access.Access``.

This module only finds what the decision needs in gRPC terms (which service a method belongs
to, the peer's address, the bearer token); the refusal is a ``SoupError`` that the error
wrapper (``status.guarded``) maps to its status like any other. Health and reflection stay open, so probes and
tools work without secrets.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

from tureen.core.access import Access, Kind, bearer_of

ADMIN_PREFIXES = ("/tureen.v1.SoupAdmin/", "/inference.GRPCInferenceService/Repository")
INFERENCE_PREFIXES = ("/inference.GRPCInferenceService/", "/tureen.v1.SoupFeedback/")
_PEER = re.compile(r"^ipv4:(?P<v4>[\d.]+):\d+$|^ipv6:\[(?P<v6>[0-9A-Fa-f:.]+)(?:%[^\]]*)?\]:\d+$")


def admitting(access: Access, method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
    """``behavior`` of ``method``, admitting each caller by ``access`` first (unchanged for
    methods open to all: health and reflection)."""
    kind: Kind | None = (
        "admin" if method.startswith(ADMIN_PREFIXES) else "inference" if method.startswith(INFERENCE_PREFIXES) else None
    )
    if kind is None:
        return behavior

    def admit(context: Any) -> None:
        if not access.open_to_all(kind):  # inference without a token: nothing to look at
            access.admit(kind, bearer_token(context.invocation_metadata() or ()), peer_address(context.peer()))

    return _admitted(behavior, admit)


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
