"""A small client for Tureen's operator API (``tureen.v1.SoupAdmin``), for scripts and the CLI.

    from tureen_client import SoupClient
    with SoupClient("localhost:8001", token="...") as soups:
        version = soups.push("soup.yaml", wait=True)
        print(soups.versions("digits"))

Results are plain dicts (protobuf field names); failures raise ``SoupClientError`` with the
gRPC status code and the server's message. Inference goes through ``tritonclient.grpc``.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import grpc
import yaml
from google.protobuf import json_format

from tureen.spec import resolve_paths
from tureen.v1 import admin_pb2 as pb
from tureen.v1 import admin_pb2_grpc

__all__ = ["SoupClient", "SoupClientError", "read_token"]

TOKEN_ENV = "TUREEN_ADMIN_TOKEN"


class SoupClientError(Exception):
    """A call failed; ``code`` is the gRPC status code, the message is the server's."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def read_token(token_file: str | None, env: str = TOKEN_ENV) -> str | None:
    """The bearer token from ``token_file`` (surrounding whitespace dropped), else ``$env``."""
    if token_file:
        try:
            return Path(token_file).read_text().strip()
        except OSError as exc:
            raise SoupClientError(grpc.StatusCode.INVALID_ARGUMENT, f"--token-file: {exc.strerror or exc}") from None
    return os.environ.get(env) or None


def _dict(message: Any) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


class SoupClient:
    """Calls one Tureen server's operator API over gRPC (TLS when ``root_certificates`` is given)."""

    def __init__(
        self,
        server: str = "localhost:8001",
        *,
        token: str | None = None,
        root_certificates: bytes | None = None,
        private_key: bytes | None = None,
        certificate_chain: bytes | None = None,
        timeout: float | None = None,
    ) -> None:
        """TLS when ``root_certificates`` (PEM) is given; with ``private_key`` and
        ``certificate_chain`` too, the client presents a certificate (mTLS)."""
        options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
        if root_certificates is not None:
            credentials = grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)
            self._channel = grpc.secure_channel(server, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(server, options=options)
        self._stub = admin_pb2_grpc.SoupAdminStub(self._channel)
        self._feedback = admin_pb2_grpc.SoupFeedbackStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._timeout = timeout

    def __enter__(self) -> SoupClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def push(
        self,
        spec: str | os.PathLike[str] | Mapping[str, Any],
        *,
        activate: bool = True,
        wait: bool = False,
        in_place: bool = False,
        pushed_by: str = "",
    ) -> dict[str, Any]:
        """Push a spec (a YAML/JSON file or a document); returns the stored version's info.

        Ingredient paths are read by the server; relative paths in a file are made absolute
        against the file's folder first, as ``tureen serve --spec`` would read them.
        ``in_place`` swaps with a short pause when the device has no room for a second blend.
        """
        document = load_document(spec)
        request = pb.PushSpecRequest(
            spec_json=json.dumps(document), activate=activate, wait=wait, in_place=in_place, pushed_by=pushed_by or _who()
        )
        return _dict(self._call(self._stub.PushSpec, request).version)

    def spec(self, model: str, version: int = 0) -> tuple[dict[str, Any], dict[str, Any]]:
        """(version info, spec document) of a version, or of the active one (``version=0``)."""
        reply = self._call(self._stub.GetSpec, pb.GetSpecRequest(model=model, version=version))
        return _dict(reply.version), json.loads(reply.spec_json)

    def versions(self, model: str) -> list[dict[str, Any]]:
        reply = self._call(self._stub.ListVersions, pb.ListVersionsRequest(model=model))
        return [_dict(v) for v in reply.versions]

    def activate(self, model: str, version: int) -> dict[str, Any]:
        return _dict(self._call(self._stub.Activate, pb.ActivateRequest(model=model, version=version)).version)

    def rollback(self, model: str, to: int | None = None) -> dict[str, Any]:
        return _dict(self._call(self._stub.Rollback, pb.RollbackRequest(model=model, to_version=to or 0)).version)

    def delete(self, model: str, version: int) -> None:
        self._call(self._stub.DeleteVersion, pb.DeleteVersionRequest(model=model, version=version))

    def promote_canary(self, model: str) -> dict[str, Any]:
        """End the model's canary by making its version the active one."""
        return _dict(self._call(self._stub.PromoteCanary, pb.CanaryRequest(model=model)).version)

    def abort_canary(self, model: str) -> dict[str, Any]:
        """End the model's canary by sending all traffic back to the active version."""
        return _dict(self._call(self._stub.AbortCanary, pb.CanaryRequest(model=model)).version)

    def feedback(
        self,
        model: str,
        request_id: str,
        labels: int | list[int] | None = None,
        *,
        score: float | None = None,
        thumbs_up: bool | None = None,
    ) -> int | None:
        """Report how a request sent with ``request_id`` went: its true label(s), or a reward
        (``score`` from 0 to 1, or ``thumbs_up`` True / False); returns the version that
        answered it, or None when the server does not know that request id. (With tokens
        configured, this call takes the inference token, as applications hold.)"""
        labels = [] if labels is None else [labels] if isinstance(labels, int) else list(labels)
        thumbs = pb.THUMBS_UNSPECIFIED if thumbs_up is None else pb.THUMBS_UP if thumbs_up else pb.THUMBS_DOWN
        request = pb.FeedbackRequest(model=model, request_id=request_id, labels=labels, score=score, thumbs=thumbs)
        reply = self._call(self._feedback.Feedback, request)
        return int(reply.version) if reply.matched else None

    def status(self, model: str = "") -> dict[str, Any]:
        return _dict(self._call(self._stub.GetStatus, pb.GetStatusRequest(model=model)))

    def watch(self, model: str = "") -> Iterator[dict[str, Any]]:
        """The status now and after every change, until the caller stops iterating."""
        stream = self._stub.WatchStatus(pb.GetStatusRequest(model=model), metadata=self._metadata)
        try:
            for reply in stream:
                yield _dict(reply)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                raise SoupClientError(exc.code(), exc.details() or str(exc.code())) from None
        finally:
            stream.cancel()

    def _call(self, method: Any, request: Any) -> Any:
        try:
            return method(request, metadata=self._metadata, timeout=self._timeout)
        except grpc.RpcError as exc:
            raise SoupClientError(exc.code(), exc.details() or str(exc.code())) from None


def load_document(spec: str | os.PathLike[str] | Mapping[str, Any]) -> dict[str, Any]:
    """A spec document from a file (YAML or JSON) or a mapping; file-relative paths made absolute."""
    if isinstance(spec, Mapping):
        return dict(spec)
    path = Path(spec)
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SoupClientError(grpc.StatusCode.INVALID_ARGUMENT, f"{path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise SoupClientError(grpc.StatusCode.INVALID_ARGUMENT, f"{path}: not YAML or JSON: {exc}") from None
    if not isinstance(document, dict):
        raise SoupClientError(grpc.StatusCode.INVALID_ARGUMENT, f"{path}: expected a mapping at the top level")
    return resolve_paths(document, path.parent.resolve())  # the server reads files; it has no idea of our folder


def _who() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # no user name in some containers
        user = "unknown"
    return f"{user}@{socket.gethostname()}"
