"""The composition root: wire pool, kitchen, repository, engine, metrics and gRPC together.

``App`` is what ``tureen serve`` runs, and what tests start in-process on port 0.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from tureen.core.blends import Blend, BlendRepository
from tureen.core.devices import resolve_device
from tureen.core.engine import Engine
from tureen.core.ingredients import IngredientPool
from tureen.core.kitchen import Kitchen
from tureen.core.observer import SafeObserver
from tureen.errors import SoupError, SpecInvalid
from tureen.merge.kernels import Kernels
from tureen.observability import PrometheusObserver, serve_metrics, stop_metrics
from tureen.spec import SoupSpec
from tureen.transport.server import Endpoint, create_server

_log = logging.getLogger("tureen")


@dataclass(frozen=True)
class Settings:
    """What ``tureen serve`` is configured with; defaults follow Triton's ports."""

    host: str = "0.0.0.0"
    grpc_port: int = 8001
    metrics_port: int = 8002
    device: str = "auto"
    max_message_bytes: int = 64 * 1024 * 1024
    grpc_workers: int = 8
    merge_kernels: Kernels = "auto"


class App:
    """One Tureen server process: declare the specs' models, serve, then build their blends."""

    def __init__(self, specs: Sequence[SoupSpec], settings: Settings, sources: Sequence[str] | None = None) -> None:
        """``sources`` names where each spec came from (its file), for error messages."""
        self.specs = list(specs)
        self.sources = list(sources) if sources is not None else [f"for model {spec.model!r}" for spec in specs]
        seen: dict[str, str] = {}
        for spec, source in zip(self.specs, self.sources, strict=True):
            if spec.model in seen:
                raise SpecInvalid([f"model: {spec.model!r} is also served by spec {seen[spec.model]}"], source)
            seen[spec.model] = source
        self.settings = settings
        self.device = resolve_device(settings.device)
        self.metrics = PrometheusObserver()
        observer = SafeObserver(self.metrics)
        self.pool = IngredientPool(self.device, observer)
        self.kitchen = Kitchen(self.pool, observer, settings.merge_kernels)
        self.repository = BlendRepository(observer)
        self.engine = Engine(self.repository, observer)
        for spec in self.specs:
            self.repository.declare(spec.model)
        self.grpc_port = 0
        self.metrics_port = 0
        self._grpc: Endpoint | None = None
        self._metrics_server: WSGIServer | None = None

    def start(self) -> None:
        """Start /metrics and gRPC; models answer UNAVAILABLE until ``build_all`` swaps them in."""
        s = self.settings
        self._metrics_server, self.metrics_port = serve_metrics(self.metrics.registry, s.host, s.metrics_port)
        try:
            self._grpc = create_server(
                self.engine,
                self.repository,
                host=s.host,
                port=s.grpc_port,
                max_message_bytes=s.max_message_bytes,
                workers=s.grpc_workers,
            )
        except OSError:
            self.stop()
            raise
        self.grpc_port = self._grpc.port
        self._grpc.start()
        _log.info("metrics on http://%s:%d/metrics", s.host, self.metrics_port)
        _log.info("gRPC (KServe v2 inference, health, reflection) on %s:%d, device %s", s.host, self.grpc_port, self.device)

    def build_all(self) -> list[Blend]:
        """Build every spec as version 1 and swap it in; the first failure raises."""
        blends = []
        for spec, source in zip(self.specs, self.sources, strict=True):
            try:
                blend = self.kitchen.build(spec, version=1)
            except SoupError as exc:
                raise exc.within(f"spec {source}") from None
            self.repository.swap(blend)
            blends.append(blend)
            _log.info("model %s: serving version %d", spec.model, blend.version)
        return blends

    def stop(self, grace: float = 2.0) -> None:
        """Stop both endpoints and release their ports; requests in flight get ``grace`` seconds."""
        if self._grpc is not None:
            self._grpc.stop(grace)
            self._grpc = None
        if self._metrics_server is not None:
            stop_metrics(self._metrics_server)
            self._metrics_server = None
