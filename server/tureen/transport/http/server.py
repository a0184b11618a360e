"""Assembling the HTTP/REST server: the routes on uvicorn, on the serving loop beside gRPC.

The socket is bound here, before uvicorn starts, so ``port=0`` gives a free port at once and a
port in use fails start-up with the flag's name. TLS takes the same files as gRPC's.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from concurrent.futures import Future

import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tureen.core.access import Access
from tureen.core.blends import BlendRepository
from tureen.core.controller import Controller
from tureen.core.engine import Engine
from tureen.errors import RequestTooLarge
from tureen.transport.http.routes import Routes
from tureen.transport.loop import ServingLoop
from tureen.transport.tls import Tls

_log = logging.getLogger("tureen.transport")


class HttpEndpoint:
    """A bound HTTP server; ``start`` serves it on the serving loop, ``stop`` ends it."""

    def __init__(self, server: uvicorn.Server, sock: socket.socket, loop: ServingLoop) -> None:
        self._server = server
        self._socket = sock
        self._loop = loop
        self.port: int = sock.getsockname()[1]
        self._serving: Future[None] | None = None

    def start(self) -> None:
        self._serving = asyncio.run_coroutine_threadsafe(self._server.serve(sockets=[self._socket]), self._loop.loop)

    def stop(self, grace: float) -> None:
        """Stop taking connections; requests in flight get ``grace`` seconds."""
        self._server.should_exit = True
        if self._serving is not None:
            try:
                self._serving.result(grace + 1.0)
            except TimeoutError:
                self._server.force_exit = True
                self._serving.result(2.0)
        self._socket.close()


def create_http_server(
    engine: Engine,
    repository: BlendRepository,
    controller: Controller,
    loop: ServingLoop,
    *,
    host: str = "0.0.0.0",
    port: int = 8000,
    access: Access | None = None,
    tls: Tls | None = None,
    max_body_bytes: int = 64 * 1024 * 1024,
) -> HttpEndpoint:
    """Build (not start) the server and bind it; ``port=0`` picks a free port (``HttpEndpoint.port``)."""
    app = Routes(engine, repository, controller, access or Access()).app()
    config = uvicorn.Config(
        _limited(app, max_body_bytes),
        log_level="warning",
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=5,
        ssl_certfile=tls.cert if tls else None,
        ssl_keyfile=tls.key if tls else None,
        ssl_ca_certs=tls.client_ca if tls else None,
        ssl_cert_reqs=ssl.CERT_REQUIRED if tls and tls.client_ca else ssl.CERT_NONE,
    )
    try:
        config.load()  # reads the TLS files now, so a bad one fails start-up
    except (OSError, ssl.SSLError) as exc:
        raise OSError(f"--tls-cert/--tls-key: cannot use them for HTTP: {exc}") from None
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"--http-port: cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(1024)
    return HttpEndpoint(uvicorn.Server(config), sock, loop)


def _limited(app: ASGIApp, limit: int) -> ASGIApp:
    """Refuse bodies over ``limit`` bytes (the gRPC port's message limit) while reading them: at
    the first read when Content-Length says so, else as soon as a chunked body passes it."""

    async def limited(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        declared = next((int(v) for k, v in scope.get("headers", ()) if k == b"content-length" and v.isdigit()), 0)
        read = 0

        async def counted() -> Message:
            nonlocal read
            message = await receive()
            read += len(message.get("body", b""))
            if max(read, declared) > limit:
                raise RequestTooLarge(f"the request body is over {limit} bytes (--max-message-mb)")
            return message

        await app(scope, counted, send)

    return limited
