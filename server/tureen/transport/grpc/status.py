"""The one place where Tureen's errors become gRPC status codes."""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from tureen import errors

_log = logging.getLogger("tureen.transport")

STATUS_OF: dict[type[errors.SoupError], grpc.StatusCode] = {
    errors.SpecInvalid: grpc.StatusCode.INVALID_ARGUMENT,
    errors.IngredientChanged: grpc.StatusCode.ABORTED,
    errors.IngredientMissing: grpc.StatusCode.NOT_FOUND,
    errors.IngredientError: grpc.StatusCode.INVALID_ARGUMENT,
    errors.ArchitectureError: grpc.StatusCode.INVALID_ARGUMENT,
    errors.MergeError: grpc.StatusCode.INVALID_ARGUMENT,
    errors.EvaluationMissing: grpc.StatusCode.NOT_FOUND,
    errors.EvaluationError: grpc.StatusCode.INVALID_ARGUMENT,
    errors.ModelNotFound: grpc.StatusCode.NOT_FOUND,
    errors.BlendNotReady: grpc.StatusCode.UNAVAILABLE,
    errors.InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    errors.RequestTooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
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


def decide(exc: Exception, method: str) -> tuple[grpc.StatusCode, str]:
    """The status and message for an exception a servicer raised."""
    if isinstance(exc, errors.SoupError):
        return status_of(exc), str(exc)
    if isinstance(exc, NotImplementedError):  # the generated base class for RPCs we do not serve
        return grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented by this Tureen server"
    _log.exception("unexpected error in a request")
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


def guarded(behavior: Callable[..., Any], method: str, streams: bool) -> Callable[..., Any]:
    """``behavior`` of ``method`` (async or not; ``streams``: it yields responses) with any error
    it raises turned into its status and message."""
    if inspect.isasyncgenfunction(behavior):

        async def guarded_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                async for item in behavior(request, context):
                    yield item
            except Exception as exc:
                if _is_abort(exc, context):
                    raise
                await context.abort(*decide(exc, method))

        return guarded_stream
    if inspect.iscoroutinefunction(behavior):

        async def guarded_call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                return await behavior(request, context)
            except Exception as exc:
                if _is_abort(exc, context):
                    raise
                await context.abort(*decide(exc, method))

        return guarded_call
    return _guard_stream(behavior, method) if streams else _guard(behavior, method)


def _guard(behavior: Callable[[Any, grpc.ServicerContext], Any], method: str) -> Callable[[Any, grpc.ServicerContext], Any]:
    def guarded(request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return behavior(request, context)
        except Exception as exc:
            if _is_abort(exc, context):
                raise
            context.abort(*decide(exc, method))

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
            context.abort(*decide(exc, method))

    return guarded


def _is_abort(exc: Exception, context: Any) -> bool:
    # context.abort() raises after setting the status (AbortError on the asyncio server, a bare
    # Exception on a thread), and a cancelled call surfaces as an RpcError: all already carry
    # their status, so let them through untouched.
    if isinstance(exc, grpc.aio.AbortError | grpc.RpcError):
        return True
    return type(exc) is Exception and context.code() is not None
