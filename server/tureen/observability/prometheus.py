"""Prometheus metrics for Tureen, named by Prometheus' rules with the ``tureen_`` prefix.

Request metrics carry ``model`` and ``version`` labels, so the latency of every blend version
can be compared side by side while a new one rolls out.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from wsgiref.simple_server import WSGIServer

import prometheus_client
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)
from prometheus_client.process_collector import ProcessCollector

from tureen.core.observer import GenerationRecord
from tureen.observability.tokens import TokenMetrics
from tureen.spec import METRICS

# The *_created series double every counter and histogram for a value nobody charts.
prometheus_client.disable_created_metrics()

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
BUILD_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class PrometheusObserver:
    """Implements the core's ``Observer`` protocol with a registry of its own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        if registry is None:
            ProcessCollector(registry=self.registry)
        labels = ("model", "version")
        self.success = Counter("tureen_request_success", "Inference requests that succeeded.", labels, registry=self.registry)
        self.failure = Counter(
            "tureen_request_failure",
            "Inference requests that failed, by reason.",
            (*labels, "reason"),
            registry=self.registry,
        )
        self.request_duration = Histogram(
            "tureen_request_duration_seconds",
            "Time from receiving an inference request to its response, in seconds.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_duration = Histogram(
            "tureen_queue_duration_seconds",
            "Time an inference request waited before its compute started, in seconds.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.compute_duration = Histogram(
            "tureen_compute_duration_seconds",
            "Time an inference request spent in input transfer, forward pass and output, in seconds.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "tureen_batch_size",
            "Rows in each forward pass: one request's, or a dynamic batch's.",
            labels,
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.queue_depth_requests = Gauge(
            "tureen_queue_depth",
            "Requests waiting in the batching queue of a version.",
            labels,
            registry=self.registry,
        )
        self.build_duration = Histogram(
            "tureen_build_duration_seconds",
            "Time to build a blend: load ingredients, check, merge and warm up, in seconds.",
            labels,
            buckets=BUILD_BUCKETS,
            registry=self.registry,
        )
        self.active_version = Gauge(
            "tureen_active_version", "The blend version serving each model.", ("model",), registry=self.registry
        )
        self.blend_memory = Gauge(
            "tureen_blend_memory_bytes",
            "Bytes of weights held by each active blend.",
            ("model",),
            registry=self.registry,
        )
        self.ingredient_memory_bytes = Gauge(
            "tureen_ingredient_memory_bytes",
            "Bytes of ingredient tensors held, per placement and device (placement disk: the checkpoint bytes merges read).",
            ("placement", "device"),
            registry=self.registry,
        )
        self.builds = Counter("tureen_builds", "Blend builds that succeeded.", ("model",), registry=self.registry)
        self.build_failures = Counter(
            "tureen_build_failures", "Blend builds that failed, by reason.", ("model", "reason"), registry=self.registry
        )
        self.swaps = Counter("tureen_swaps", "Blends swapped in to serve a model.", ("model",), registry=self.registry)
        self.swap_duration = Histogram(
            "tureen_swap_duration_seconds",
            "Time from an activation (push, activate, rollback or a replica catching up) to the swap, in seconds.",
            ("model",),
            buckets=BUILD_BUCKETS,
            registry=self.registry,
        )
        self.resident_memory_bytes = Gauge(
            "tureen_resident_blend_memory_bytes",
            "Bytes of weights held by blends kept for instant rollback, besides the active one.",
            ("model",),
            registry=self.registry,
        )
        self.eval_scores = {
            name: Gauge(
                f"tureen_eval_{name}",
                f"Held-out {metric.help} of each blend version, per evaluation split.",
                ("model", "version", "split"),
                registry=self.registry,
            )
            for name, metric in METRICS.items()
        }
        self.ingredient_scores = {
            name: Gauge(
                f"tureen_ingredient_eval_{name}",
                f"Held-out {metric.help} of each ingredient alone, per evaluation split.",
                ("model", "ingredient", "split"),
                registry=self.registry,
            )
            for name, metric in METRICS.items()
        }
        self.tokens = TokenMetrics(self.registry)
        self.online = Gauge(
            "tureen_online_accuracy",
            "Rolling accuracy of each version on live feedback: labelled rows that were right, or the mean reward.",
            ("model", "version"),
            registry=self.registry,
        )
        self.online_samples = Gauge(
            "tureen_online_labelled_samples",
            "Feedback outcomes (labelled rows, rewards) behind tureen_online_accuracy.",
            ("model", "version"),
            registry=self.registry,
        )
        self.feedback_unknown = Counter(
            "tureen_feedback_ignored",
            "Feedback for request ids the server does not know (ignored).",
            ("model",),
            registry=self.registry,
        )
        self.canary_percent = Gauge(
            "tureen_canary_percent", "Share of traffic the canary version takes (0: none).", ("model",), registry=self.registry
        )
        self.canary_version = Gauge(
            "tureen_canary_version", "The version in canary (0: none).", ("model",), registry=self.registry
        )
        self.canary_decisions = Counter(
            "tureen_canary_decisions", "Canaries ended, by decision.", ("model", "decision"), registry=self.registry
        )

        # Label lookups take a lock and build tuples; on the request path we reuse the children.
        self._children: dict[tuple[str, str], tuple[Any, Any, Any, Any]] = {}
        self._batch_children: dict[tuple[str, str], Any] = {}
        self._depth_children: dict[tuple[str, str], Any] = {}

    def request_finished(
        self, model: str, version: str, reason: str | None, total_s: float, queue_s: float, compute_s: float
    ) -> None:
        if reason is not None:
            self.failure.labels(model, version, reason).inc()
            return
        children = self._children.get((model, version))
        if children is None:
            children = self._children[(model, version)] = (
                self.success.labels(model, version),
                self.request_duration.labels(model, version),
                self.queue_duration.labels(model, version),
                self.compute_duration.labels(model, version),
            )
        success, request, queue, compute = children
        success.inc()
        request.observe(total_s)
        queue.observe(queue_s)
        compute.observe(compute_s)

    def generation_finished(self, model: str, version: str, record: GenerationRecord) -> None:
        self.tokens.finished(model, version, record)

    def generations_now(self, model: str, version: str, running: int, waiting: int) -> None:
        self.tokens.now(model, version, running, waiting)

    def batch_executed(self, model: str, version: str, size: int) -> None:
        child = self._batch_children.get((model, version))
        if child is None:
            child = self._batch_children[(model, version)] = self.batch_size.labels(model, version)
        child.observe(size)

    def queue_depth(self, model: str, version: str, depth: int) -> None:
        child = self._depth_children.get((model, version))
        if child is None:
            child = self._depth_children[(model, version)] = self.queue_depth_requests.labels(model, version)
        child.set(depth)

    def blend_built(self, model: str, version: int, seconds: float) -> None:
        self.build_duration.labels(model, str(version)).observe(seconds)
        self.builds.labels(model).inc()

    def build_failed(self, model: str, reason: str) -> None:
        self.build_failures.labels(model, reason).inc()

    def blend_swapped(self, model: str, version: int, seconds: float) -> None:
        self.swaps.labels(model).inc()
        self.swap_duration.labels(model).observe(seconds)

    def resident_memory(self, model: str, nbytes: int) -> None:
        self.resident_memory_bytes.labels(model).set(nbytes)

    def blend_activated(self, model: str, version: int, nbytes: int) -> None:
        self.active_version.labels(model).set(version)
        self.blend_memory.labels(model).set(nbytes)

    def ingredient_memory(self, placement: str, device: str, nbytes: int) -> None:
        self.ingredient_memory_bytes.labels(placement, device).set(nbytes)

    def blend_evaluated(
        self,
        model: str,
        version: int,
        scores: Mapping[str, Mapping[str, float]],
        ingredients: Mapping[str, Mapping[str, Mapping[str, float]]],
    ) -> None:
        for split, values in scores.items():
            for metric, value in values.items():
                self.eval_scores[metric].labels(model, str(version), split).set(value)
        for ingredient, by_split in ingredients.items():
            for split, values in by_split.items():
                for metric, value in values.items():
                    self.ingredient_scores[metric].labels(model, ingredient, split).set(value)

    def online_accuracy(self, model: str, version: int, accuracy: float, samples: int) -> None:
        self.online.labels(model, str(version)).set(accuracy)
        self.online_samples.labels(model, str(version)).set(samples)

    def feedback_ignored(self, model: str) -> None:
        self.feedback_unknown.labels(model).inc()

    def canary_changed(self, model: str, version: int, percent: float) -> None:
        self.canary_percent.labels(model).set(percent)
        self.canary_version.labels(model).set(version)

    def canary_decided(self, model: str, version: int, decision: str) -> None:
        self.canary_decisions.labels(model, decision).inc()


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> tuple[WSGIServer, int]:
    """Serve ``/metrics`` on ``host:port`` in a daemon thread; port 0 picks a free one."""
    try:
        server, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise OSError(f"--metrics-port: cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return server, server.server_port


def stop_metrics(server: WSGIServer) -> None:
    """Stop the endpoint and release its port."""
    server.shutdown()
    server.server_close()
