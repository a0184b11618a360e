"""Prometheus metrics: an ``Observer`` for the core and the /metrics HTTP endpoint."""

from tureen.observability.prometheus import PrometheusObserver, serve_metrics, stop_metrics

__all__ = ["PrometheusObserver", "serve_metrics", "stop_metrics"]
