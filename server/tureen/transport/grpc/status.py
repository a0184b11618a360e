"""The one place where Tureen's errors become gRPC status codes."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import grpc

from tureen import errors

_log = logging.getLogger("tureen.transport")

STATUS_OF: dict[type[errors.SoupError], grpc.StatusCode] = {
    errors.SpecInvalid: grpc.StatusCode.INVALID_ARGUMENT,
    errors.IngredientMissing: grpc.StatusCode.NOT_FOUND,
    errors.IngredientError: grpc.StatusCode.INVALID_ARGUMENT,
    errors.ArchitectureError: grpc.StatusCode.INVALID_ARGUMENT,
    errors.MergeError: grpc.StatusCode.INVALID_ARGUMENT,
    errors.EvaluationMissing: grpc.StatusCode.NOT_FOUND,
    errors.EvaluationError: grpc.StatusCode.INVALID_ARGUMENT,
    errors.ModelNotFound: grpc.StatusCode.NOT_FOUND,
    errors.BlendNotReady: grpc.StatusCode.UNAVAILABLE,
    errors.InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    errors.InferenceFailed: grpc.StatusCode.INTERNAL,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.Cancelled: grpc.StatusCode.CANCELLED,
    errors.StoreError: grpc.StatusCode.UNAVAILABLE,
    errors.VersionConflict: grpc.StatusCode.FAILED_PRECONDITION,
    errors.OutOfMemory: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
}


def status_of(error: errors.SoupError) -> grpc.StatusCode:
    """The status for ``error``: its own class's, else the nearest ancestor's, else INTERNAL."""
    for cls in type(error).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls]
    return grpc.StatusCode.INTERNAL


class ErrorInterceptor(grpc.ServerInterceptor):
    """Turns a ``SoupError`` raised by any servicer into its status and message."""

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Any], handler_call_details: grpc.HandlerCallDetails
    ) -> Any:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        if handler.unary_unary is not None:
            return handler._replace(unary_unary=_guard(handler.unary_unary, method))
        if handler.stream_unary is not None:
            return handler._replace(stream_unary=_guard(handler.stream_unary, method))
        if handler.unary_stream is not None:
            return handler._replace(unary_stream=_guard_stream(handler.unary_stream, method))
        if handler.stream_stream is not None:
            return handler._replace(stream_stream=_guard_stream(handler.stream_stream, method))
        return handler


def _abort(context: grpc.ServicerContext, exc: Exception, method: str) -> None:
    if isinstance(exc, errors.SoupError):
        context.abort(status_of(exc), str(exc))
    if isinstance(exc, NotImplementedError):  # the generated base class for RPCs we do not serve
        context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented by this Tureen server")
    _log.exception("unexpected error in a request")
    context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")


def _guard(behavior: Callable[[Any, grpc.ServicerContext], Any], method: str) -> Callable[[Any, grpc.ServicerContext], Any]:
    def guarded(request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return behavior(request, context)
        except Exception as exc:
            if _is_abort(exc, context):
                raise
            _abort(context, exc, method)

    return guarded


def _guard_stream(
    behavior: Callable[[Any, grpc.ServicerContext], Any], method: str
) -> Callable[[Any, grpc.ServicerContext], Any]:
    def guarded(request: Any, context: grpc.ServicerContext) -> Any:
        try:
            yield from behavior(request, context)
        except Exception as exc:
            if _is_abort(exc, context):
                raise
            _abort(context, exc, method)

    return guarded


def _is_abort(exc: Exception, context: grpc.ServicerContext) -> bool:
    # context.abort() raises a bare Exception after setting the status, and a cancelled call
    # surfaces as an RpcError: both already carry their status, so let them through untouched.
    return (type(exc) is Exception and context.code() is not None) or isinstance(exc, grpc.RpcError)
