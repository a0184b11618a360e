"""Bearer tokens: the admin RPCs require one when configured, inference optionally its own.

Health and reflection stay open, so probes and tools work without secrets. Tokens are
compared in constant time.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any

import grpc

ADMIN_PREFIXES = ("/tureen.v1.SoupAdmin/", "/inference.GRPCInferenceService/Repository")
INFERENCE_PREFIXES = ("/inference.GRPCInferenceService/", "/tureen.v1.SoupFeedback/")


class TokenInterceptor(grpc.ServerInterceptor):
    """Refuses calls without the right ``authorization: Bearer <token>`` with UNAUTHENTICATED."""

    def __init__(self, admin_token: str | None, inference_token: str | None) -> None:
        self._admin = admin_token
        self._inference = inference_token

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Any], handler_call_details: grpc.HandlerCallDetails
    ) -> Any:
        method = handler_call_details.method
        if method.startswith(ADMIN_PREFIXES):
            expected, what = self._admin, "admin"
        elif method.startswith(INFERENCE_PREFIXES):
            expected, what = self._inference, "inference"
        else:
            expected, what = None, ""
        handler = continuation(handler_call_details)
        if expected is None or handler is None:
            return handler
        given = _bearer(handler_call_details.invocation_metadata or ())
        if given is not None and hmac.compare_digest(given.encode(), expected.encode()):
            return handler
        message = (
            f"{what} calls need 'authorization: Bearer <token>' metadata"
            if given is None
            else f"the bearer token is not valid for {what} calls"
        )
        return _refusing(handler, message)


def _bearer(metadata: Any) -> str | None:
    for key, value in metadata:
        if key.lower() == "authorization":
            text = value.decode() if isinstance(value, bytes) else str(value)
            scheme, _, token = text.partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else ""
    return None


def _refusing(handler: Any, message: str) -> Any:
    def refuse(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    if handler.unary_unary is not None:
        return handler._replace(unary_unary=refuse)
    if handler.unary_stream is not None:
        return handler._replace(unary_stream=refuse)
    if handler.stream_unary is not None:
        return handler._replace(stream_unary=refuse)
    return handler._replace(stream_stream=refuse)
