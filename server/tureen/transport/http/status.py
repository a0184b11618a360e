"""The one place where Tureen's errors become HTTP status codes (KServe v2 REST: ``{"error": ...}``)."""

from __future__ import annotations

import logging

from starlette.responses import JSONResponse

from tureen import errors

_log = logging.getLogger("tureen.transport")

STATUS_OF: dict[type[errors.SoupError], int] = {
    errors.SpecInvalid: 400,
    errors.IngredientChanged: 409,
    errors.IngredientMissing: 404,
    errors.IngredientError: 400,
    errors.ArchitectureError: 400,
    errors.MergeError: 400,
    errors.EvaluationMissing: 404,
    errors.EvaluationError: 400,
    errors.ModelNotFound: 404,
    errors.BlendNotReady: 503,
    errors.InvalidRequest: 400,
    errors.RequestTooLarge: 413,
    errors.InferenceFailed: 500,
    errors.DeadlineExceeded: 504,
    errors.Cancelled: 499,  # nginx's "client closed request"; the client is gone and never reads it
    errors.StoreError: 503,
    errors.VersionConflict: 409,
    errors.OutOfMemory: 507,
    errors.PermissionDenied: 403,
    errors.Unauthenticated: 401,
}


def status_of(error: errors.SoupError) -> int:
    """The status for ``error``: its own class's, else the nearest ancestor's, else 500."""
    for cls in type(error).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls]
    return 500


def error_response(exc: Exception) -> JSONResponse:
    """The response for anything a route raised: its status and ``{"error": message}``."""
    if isinstance(exc, errors.SoupError):
        headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, errors.Unauthenticated) else None
        return JSONResponse({"error": str(exc)}, status_code=status_of(exc), headers=headers)
    _log.exception("unexpected error in an HTTP request")
    return JSONResponse({"error": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500)


def openai_error_response(exc: Exception) -> JSONResponse:
    """The same status, with OpenAI's error object: message, type, and the field at fault."""
    if not isinstance(exc, errors.SoupError):
        return error_response(exc)
    message = str(exc)
    head = message.split(":", 1)[0]
    param = head if message != head and " " not in head else None
    kind = "invalid_request_error" if status_of(exc) < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": exc.reason}}
    return JSONResponse(body, status_code=status_of(exc))
