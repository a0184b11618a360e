"""Per model and version request statistics, as Triton's ModelStatistics reports them."""

from __future__ import annotations

import copy
import threading
import time
from dataclasses import dataclass, field


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int) -> None:
        self.count += 1
        self.ns += ns


@dataclass
class BatchDurations:
    """Executions of one batch size, as Triton's ``batch_stats`` reports them."""

    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass
class VersionStatistics:
    """Cumulative counts and nanoseconds for one blend version."""

    last_inference_ms: int = 0
    inference_count: int = 0
    execution_count: int = 0
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    batches: dict[int, BatchDurations] = field(default_factory=dict)
    """Executions by batch size (rows in one forward)."""


@dataclass(frozen=True)
class Timings:
    """Nanoseconds one successful request spent in each phase."""

    queue: int
    compute_input: int
    compute_infer: int
    compute_output: int

    @property
    def compute(self) -> int:
        return self.compute_input + self.compute_infer + self.compute_output


class StatisticsBook:
    """Thread-safe ledger of request statistics keyed by (model, version)."""

    def __init__(self) -> None:
        self._stats: dict[tuple[str, int], VersionStatistics] = {}
        self._lock = threading.Lock()

    def success(self, model: str, version: int, rows: int, total_ns: int, timings: Timings) -> None:
        """A request answered: ``rows`` inferences, with the durations of its own phases."""
        with self._lock:
            stats = self._entry(model, version)
            stats.inference_count += rows
            stats.success.add(total_ns)
            stats.queue.add(timings.queue)
            stats.compute_input.add(timings.compute_input)
            stats.compute_infer.add(timings.compute_infer)
            stats.compute_output.add(timings.compute_output)

    def executed(self, model: str, version: int, size: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
        """One forward ran for a batch of ``size`` rows."""
        with self._lock:
            stats = self._entry(model, version)
            stats.execution_count += 1
            batch = stats.batches.get(size)
            if batch is None:
                batch = stats.batches[size] = BatchDurations()
            batch.compute_input.add(input_ns)
            batch.compute_infer.add(infer_ns)
            batch.compute_output.add(output_ns)

    def failure(self, model: str, version: int, total_ns: int) -> None:
        with self._lock:
            self._entry(model, version).fail.add(total_ns)

    def snapshot(self, model: str = "", version: str = "") -> list[tuple[str, int, VersionStatistics]]:
        """Copies of the statistics, filtered by model and version when given, sorted."""
        with self._lock:
            rows = [
                (m, v, copy.deepcopy(stats))
                for (m, v), stats in self._stats.items()
                if (not model or m == model) and (not version or str(v) == version)
            ]
        return sorted(rows, key=lambda row: (row[0], row[1]))

    def _entry(self, model: str, version: int) -> VersionStatistics:
        stats = self._stats.get((model, version))
        if stats is None:
            stats = self._stats[(model, version)] = VersionStatistics()
        stats.last_inference_ms = int(time.time() * 1000)
        return stats
