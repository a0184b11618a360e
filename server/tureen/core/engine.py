"""The data plane: one inference request from decoded tensors to output tensors.

Transports decode their wire format into an ``InferRequest``, call ``Engine.infer`` and encode
the ``InferResponse``; everything in between (validation, device placement, the one forward
pass, statistics and metrics) happens here, the same for every transport.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from tureen.core.blends import BlendRepository
from tureen.core.observer import Observer
from tureen.core.rollout import OnlineAccuracy
from tureen.core.statistics import StatisticsBook, Timings, VersionStatistics
from tureen.errors import InferenceFailed, SoupError


@dataclass(frozen=True)
class InferRequest:
    model: str
    version: str
    id: str
    inputs: Mapping[str, torch.Tensor]
    outputs: tuple[str, ...] | None
    received_ns: int
    parameters: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class InferResponse:
    model: str
    version: int
    id: str
    outputs: Mapping[str, torch.Tensor]


class Engine:
    """Runs requests on whichever blend is active when each request starts."""

    def __init__(self, repository: BlendRepository, observer: Observer, online: OnlineAccuracy | None = None) -> None:
        self.repository = repository
        self.statistics = StatisticsBook()
        self.online = online if online is not None else OnlineAccuracy()
        self._observer = observer

    def infer(self, request: InferRequest) -> InferResponse:
        try:
            blend = self.repository.route(request.model, request.version, request.parameters)
            started = time.perf_counter_ns()
            names = blend.signature.check_outputs(request.outputs)
            batch = blend.signature.check_inputs(request.inputs)
        except SoupError as exc:
            self.reject(request.model, request.received_ns, exc)
            raise
        # Past validation, whatever goes wrong is the server's or the model's fault, never the caller's.
        try:
            prepared = blend.prepare(request.inputs)
            forward_at = time.perf_counter_ns()
            result = blend.forward(prepared)
            output_at = time.perf_counter_ns()
            outputs = blend.collect(result, names)
            classes = blend.predicted_classes(result) if request.id else None
        except Exception as exc:
            failure = InferenceFailed(f"model {blend.model!r} version {blend.version}: inference failed: {exc}")
            self.reject(request.model, request.received_ns, failure)
            raise failure from exc
        done = time.perf_counter_ns()
        timings = Timings(
            queue=started - request.received_ns,
            compute_input=forward_at - started,
            compute_infer=output_at - forward_at,
            compute_output=done - output_at,
        )
        total = done - request.received_ns
        if classes is not None:  # kept so that Feedback can score this request later
            self.online.predicted(blend.model, request.id, blend.version, classes)
        self.statistics.success(blend.model, blend.version, batch, total, timings)
        self._observer.request_finished(
            blend.model, str(blend.version), None, total / 1e9, timings.queue / 1e9, timings.compute / 1e9
        )
        return InferResponse(model=blend.model, version=blend.version, id=request.id, outputs=outputs)

    def statistics_of(self, model: str = "", version: str = "") -> list[tuple[str, int, VersionStatistics]]:
        """Statistics of every served blend (zeros before its first request), filtered when asked.

        Raises ``ModelNotFound`` for a model, or a version of it, that is not served here.
        """
        served = [(name, blend) for name, blend in self.repository.models().items() if blend is not None]
        served += [(name, route.blend) for name, _ in served if (route := self.repository.canary(name)) is not None]
        if model:
            self.repository.active(model, version)  # NOT_FOUND / UNAVAILABLE, as for inference
        recorded = {(m, v): stats for m, v, stats in self.statistics.snapshot(model, version)}
        for name, blend in served:
            if (not model or name == model) and (not version or str(blend.version) == version):
                recorded.setdefault((name, blend.version), VersionStatistics())
        return [(m, v, recorded[(m, v)]) for m, v in sorted(recorded)]

    def reject(self, model: str, received_ns: int, error: SoupError) -> None:
        """Count a request that failed, including one the transport could not even decode."""
        total = time.perf_counter_ns() - received_ns
        known = self.repository.models()
        blend = known.get(model)
        version = str(blend.version) if blend is not None else ""
        if blend is not None:
            self.statistics.failure(model, blend.version, total)
        # Unknown model names stay out of labels: clients must not be able to grow our series.
        label = model if model in known else ""
        self._observer.request_finished(label, version, error.reason, total / 1e9, 0.0, 0.0)
