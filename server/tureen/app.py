"""The composition root: wire pool, kitchen, repository, engine, metrics and gRPC together.

``App`` is what ``tureen serve`` runs, and what tests start in-process on port 0.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from wsgiref.simple_server import WSGIServer

from tureen.core.access import Access, networks
from tureen.core.blends import Blend, BlendRepository
from tureen.core.controller import Controller
from tureen.core.devices import limit_cpu_threads, resolve_device
from tureen.core.engine import Engine
from tureen.core.ingredients import IngredientPool, Placement
from tureen.core.kitchen import Kitchen
from tureen.core.observer import SafeObserver
from tureen.core.policy import SpecPolicy
from tureen.core.store import SpecStore
from tureen.errors import SoupError, SpecInvalid
from tureen.merge.kernels import Kernels
from tureen.observability import PrometheusObserver, serve_metrics, stop_metrics
from tureen.spec import SoupSpec
from tureen.transport.grpc.server import Endpoint, create_server
from tureen.transport.http.server import HttpEndpoint, create_http_server
from tureen.transport.loop import ServingLoop
from tureen.transport.tls import Tls

_log = logging.getLogger("tureen")


@dataclass(frozen=True)
class Settings:
    """What ``tureen serve`` is configured with; defaults follow Triton's ports."""

    host: str = "0.0.0.0"
    grpc_port: int = 8001
    http_port: int | None = 8000
    """KServe v2 over HTTP/REST; None serves gRPC only."""
    metrics_port: int = 8002
    device: str = "auto"
    max_message_bytes: int = 64 * 1024 * 1024
    grpc_workers: int = 8
    cpu_threads: int | None = None
    """Threads of torch's CPU operators; None, on a CPU device: every core (``OMP_NUM_THREADS`` when
    set) for a forward on the serving loop and for builds, the cores less one for work beside it."""
    merge_kernels: Kernels = "auto"
    ingredient_placement: Placement | Literal["auto"] = "auto"
    """Where ingredients of specs that name no placement live between merges."""
    store: str | None = None
    """The spec store's directory; None keeps specs in a temporary directory, gone at exit."""
    keep_versions: int = 1
    """Earlier blends per model kept in memory for instant rollback."""
    blend_memory_bytes: int | None = None
    """A cap on what all blends (active and kept) may hold together; None: the device's free memory."""
    poll_seconds: float = 1.0
    """How often the store is read for versions other replicas activated."""
    admin_token: str | None = None
    """Bearer token the admin RPCs require; None: they are served to ``admin_allow_from`` only."""
    inference_token: str | None = None
    """Bearer token inference requires; None leaves it open."""
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    """With a client CA, clients must present a certificate it signed (mTLS)."""
    admin_allow_from: tuple[str, ...] | None = None
    """CIDRs admin calls are served to; None: loopback, and only when there is no admin token."""
    insecure_open_admin: bool = False
    """Without an admin token, serve admin calls to every peer (how Tureen served them before this flag existed)."""
    allow_factories: tuple[str, ...] = ()
    """``module:callable`` globs a pushed spec may name, besides Tureen's own and the start-up specs'."""
    ingredient_roots: tuple[str, ...] = ()
    """Folders a pushed spec may read files from, besides those of the start-up specs."""


class App:
    """One Tureen server process: seed the store with the specs, serve, then build the active versions."""

    def __init__(self, specs: Sequence[SoupSpec], settings: Settings, sources: Sequence[str] | None = None) -> None:
        """``sources`` names where each spec came from (its file), for error messages.

        The specs seed the store: a model with no stored version gets the spec as version 1;
        a stored model keeps its active version, whatever the flags say.
        """
        self.specs = list(specs)
        self.sources = list(sources) if sources is not None else [f"for model {spec.model!r}" for spec in specs]
        seen: dict[str, str] = {}
        for spec, source in zip(self.specs, self.sources, strict=True):
            if spec.model in seen:
                raise SpecInvalid([f"model: {spec.model!r} is also served by spec {seen[spec.model]}"], source)
            seen[spec.model] = source
        self.settings = settings
        self.access = _access(settings)
        self.policy = _policy(settings, self.specs, self.sources)
        self.device = resolve_device(settings.device)
        threads = limit_cpu_threads(settings.cpu_threads, self.device)
        _log.info(
            "torch CPU threads: %s for forwards on the serving loop and builds, %s beside the loop", threads.loop, threads.beside
        )
        self.metrics = PrometheusObserver()
        observer = SafeObserver(self.metrics)
        self.pool = IngredientPool(self.device, observer, settings.ingredient_placement)
        self.kitchen = Kitchen(self.pool, observer, settings.merge_kernels)
        self.repository = BlendRepository(observer)
        self.engine = Engine(self.repository, observer, workers=settings.grpc_workers, threads=threads)
        self._scratch: tempfile.TemporaryDirectory[str] | None = None
        if settings.store is None:
            self._scratch = tempfile.TemporaryDirectory(prefix="tureen-store-")
            _log.warning("no --store: pushed specs live in %s and are lost at exit", self._scratch.name)
        self.store = SpecStore(settings.store or self._scratch.name)  # type: ignore[union-attr]
        self.controller = Controller(
            self.store,
            self.kitchen,
            self.repository,
            observer,
            keep=settings.keep_versions,
            poll_seconds=settings.poll_seconds,
            memory_limit=settings.blend_memory_bytes,
            online=self.engine.online,
            policy=self.policy,
            build_threads=threads.loop,
        )
        for spec, source in zip(self.specs, self.sources, strict=True):
            self.controller.seed(spec, source)
        self.controller.declare_stored()
        self.grpc_port = 0
        self.http_port = 0
        self.metrics_port = 0
        self._grpc: Endpoint | None = None
        self._http: HttpEndpoint | None = None
        self._loop: ServingLoop | None = None
        self._metrics_server: WSGIServer | None = None

    def start(self) -> None:
        """Start /metrics and gRPC; models answer UNAVAILABLE until ``build_all`` swaps them in."""
        s = self.settings
        self._metrics_server, self.metrics_port = serve_metrics(self.metrics.registry, s.host, s.metrics_port)
        self._loop = ServingLoop()
        self._loop.start()
        try:
            self._grpc = create_server(
                self.engine,
                self.repository,
                self.controller,
                self._loop,
                host=s.host,
                port=s.grpc_port,
                max_message_bytes=s.max_message_bytes,
                workers=s.grpc_workers,
                access=self.access,
                tls=_tls(s),
            )
            if s.http_port is not None:
                self._http = create_http_server(
                    self.engine,
                    self.repository,
                    self.controller,
                    self._loop,
                    host=s.host,
                    port=s.http_port,
                    access=self.access,
                    tls=_tls(s),
                    max_body_bytes=s.max_message_bytes,
                )
        except OSError:
            self.stop()
            raise
        self.grpc_port = self._grpc.port
        self._grpc.start()
        if self._http is not None:
            self.http_port = self._http.port
            self._http.start()
            _log.info("HTTP/REST (KServe v2) on %s:%d", s.host, self.http_port)
        _log.info("metrics on http://%s:%d/metrics", s.host, self.metrics_port)
        _log.info("gRPC (KServe v2 inference, health, reflection) on %s:%d, device %s", s.host, self.grpc_port, self.device)
        if self.access.admin_open_to_all:
            _log.warning(
                "--insecure-open-admin: admin calls (push, activate, delete...) are served to every peer that "
                "reaches port %d, with no token; anyone there can change what this server serves",
                self.grpc_port,
            )

    def build_all(self) -> list[Blend]:
        """Build every stored model's active version and swap it in (the first failure raises),
        then follow the store for versions other replicas activate."""
        where = {spec.model: f"spec {source}" for spec, source in zip(self.specs, self.sources, strict=True)}
        blends = self.controller.restore(where)
        self.controller.start_watching()
        return blends

    def stop(self, grace: float = 2.0) -> None:
        """Stop both endpoints and release their ports; requests in flight get ``grace`` seconds."""
        self.controller.stop()
        if self._http is not None:
            self._http.stop(grace)
            self._http = None
        if self._grpc is not None:
            self._grpc.stop(grace)
            self._grpc = None
        if self._loop is not None:
            self._loop.stop()
            self._loop = None
        self.engine.close()
        if self._metrics_server is not None:
            stop_metrics(self._metrics_server)
            self._metrics_server = None
        if self._scratch is not None:
            self._scratch.cleanup()
            self._scratch = None


def _access(settings: Settings) -> Access:
    allow_from = networks(settings.admin_allow_from) if settings.admin_allow_from is not None else None
    return Access(settings.admin_token, settings.inference_token, allow_from, settings.insecure_open_admin)


def _policy(settings: Settings, specs: Sequence[SoupSpec], sources: Sequence[str]) -> SpecPolicy:
    """The operator's flags, plus the start-up specs' factories and the folders of their files."""
    folders = [str(Path(source).parent) for source in sources if Path(source).is_file()]
    return SpecPolicy.of(settings.allow_factories, settings.ingredient_roots, specs, folders)


def _tls(settings: Settings) -> Tls | None:
    if settings.tls_cert is None and settings.tls_key is None:
        return None
    if settings.tls_cert is None or settings.tls_key is None:
        raise SoupError("--tls-cert and --tls-key go together")
    return Tls(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
