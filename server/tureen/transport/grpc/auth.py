"""Access on the gRPC port: each admin or inference call is admitted by ``core.access.Access``.

This module only finds what the decision needs in gRPC terms (which service a method belongs
to, the peer's address, the bearer token); the refusal is a ``SoupError`` that the error
interceptor maps to its status like any other. Health and reflection stay open, so probes and
tools work without secrets.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import grpc

from tureen.core.access import Access, Kind, bearer_of

ADMIN_PREFIXES = ("/tureen.v1.SoupAdmin/", "/inference.GRPCInferenceService/Repository")
INFERENCE_PREFIXES = ("/inference.GRPCInferenceService/", "/tureen.v1.SoupFeedback/")
_PEER = re.compile(r"^ipv4:(?P<v4>[\d.]+):\d+$|^ipv6:\[(?P<v6>[0-9A-Fa-f:.]+)(?:%[^\]]*)?\]:\d+$")


class AccessInterceptor(grpc.ServerInterceptor):
    """Runs ``Access.admit`` before the admin and inference methods; placed inside the error
    interceptor, so that its refusals get their status in the one place statuses are chosen."""

    def __init__(self, access: Access) -> None:
        self._access = access

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Any], handler_call_details: grpc.HandlerCallDetails
    ) -> Any:
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        kind: Kind | None = (
            "admin" if method.startswith(ADMIN_PREFIXES) else "inference" if method.startswith(INFERENCE_PREFIXES) else None
        )
        if handler is None or kind is None or self._access.open_to_all(kind):
            return handler
        bearer = bearer_token(handler_call_details.invocation_metadata or ())
        access = self._access

        def admitted(behavior: Callable[[Any, grpc.ServicerContext], Any]) -> Callable[[Any, grpc.ServicerContext], Any]:
            def call(request: Any, context: grpc.ServicerContext) -> Any:
                access.admit(kind, bearer, peer_address(context.peer()))
                return behavior(request, context)

            return call

        for slot in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            behavior = getattr(handler, slot)
            if behavior is not None:
                return handler._replace(**{slot: admitted(behavior)})
        return handler


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
