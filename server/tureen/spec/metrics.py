"""The one table of evaluation metrics: name, direction, the tasks that report them, help text.

The evaluator reports exactly a task's metrics, the gate and the searches read the direction,
and Prometheus names a gauge per metric with the help text, all from this table.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, get_args

Task = Literal["classification", "language-modeling", "multiple-choice"]
Metric = Literal["accuracy", "accuracy_norm", "nll", "ece", "perplexity"]
"""Spelled out for the spec's schema; ``tests/test_spec.py`` checks that it lists ``METRICS``."""


@dataclass(frozen=True)
class EvalMetric:
    """One held-out metric."""

    name: str
    higher_is_better: bool
    tasks: tuple[str, ...]
    """The tasks whose evaluation reports this metric."""
    help: str
    """What it is, as in ``Held-out <help> of each blend version`` (the Prometheus help text)."""


METRICS: Mapping[str, EvalMetric] = {
    metric.name: metric
    for metric in (
        EvalMetric("accuracy", True, ("classification", "multiple-choice"), "accuracy"),
        EvalMetric(
            "accuracy_norm",
            True,
            ("multiple-choice",),
            "accuracy when each choice's log-likelihood is divided by its length in characters",
        ),
        EvalMetric(
            "nll",
            False,
            ("classification", "language-modeling", "multiple-choice"),
            "negative log-likelihood per sample, token or question",
        ),
        EvalMetric("ece", False, ("classification",), "expected calibration error (15 bins)"),
        EvalMetric("perplexity", False, ("language-modeling",), "perplexity"),
    )
}
"""In the order the evaluator reports them and Prometheus registers their gauges."""

HIGHER_IS_BETTER: Mapping[str, bool] = {name: metric.higher_is_better for name, metric in METRICS.items()}
TASK_METRICS: Mapping[str, tuple[str, ...]] = {
    task: tuple(name for name, metric in METRICS.items() if task in metric.tasks) for task in get_args(Task)
}
DEFAULT_METRIC: Mapping[str, str] = {
    "classification": "accuracy",
    "language-modeling": "perplexity",
    "multiple-choice": "accuracy",
}
"""The metric that decides (searches, the gate) when the spec names none."""
