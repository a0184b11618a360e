"""The generation loop of one causal-LM blend: batches of generations on a thread of its own.

Generations that wait when the loop is free start together as one batch; generations that
arrive while it runs join it between two steps (``batch.py``), up to ``MAX_GENERATIONS`` rows.
The loop runs while its blend has generations and holds the module only: a blend swapped out
finishes what it runs and the thread ends. Per-request sampling parameters and seeds hold in
any batch: transformers' own continuous batching takes one sampling configuration and one seed
for all requests, and paged-attention kernels, so it is not used.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

import torch
from torch import nn

from tureen.core.devices import use_cpu_threads
from tureen.core.llm.batch import Batch, Stepper
from tureen.core.llm.generation import Generation
from tureen.errors import InferenceFailed

IDLE_S = 5.0
"""How long the loop's thread waits for more work before it ends."""

MAX_GENERATIONS = 16
"""Rows in one batch at most."""

GATHER_S = 0.005
"""How long a new batch waits for the previous batch's callers to come back, at most. Callers of
a batch that ends together send their next requests within a few milliseconds; the wait only
happens while fewer generations are pending than the last batch ran, so a lone caller never waits."""


class Generator:
    """The generations of one blend, run in batches on a thread while there are any."""

    def __init__(
        self,
        module: nn.Module,
        device: torch.device,
        name: str,
        counts: Callable[[int, int], None] = lambda r, w: None,
        cpu_threads: int | None = None,
    ) -> None:
        """``counts(running, waiting)`` hears each change of the numbers of generations;
        ``cpu_threads``: torch's CPU threads on the loop's thread (None: torch's own choice)."""
        self._stepper = Stepper(module, device, lambda ended: self._running_now(self.active - ended))
        self._name = name
        self._counts = counts
        self._cpu_threads = cpu_threads
        self._pending: deque[Generation] = deque()
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._running = False
        self._last_rows = 1
        self.active = 0
        """Generations in the batch being run."""

    def submit(self, generation: Generation) -> None:
        with self._lock:
            self._pending.append(generation)
            self._counts(self.active, len(self._pending))
            self._arrived.notify()
            if self._running:
                return
            self._running = True
        threading.Thread(target=self._work, name=f"tureen-generate {self._name}", daemon=True).start()

    def _work(self) -> None:
        try:
            use_cpu_threads(self._cpu_threads)
            self._serve_batches()
        finally:  # whatever escaped, the next submit starts a thread again
            with self._lock:
                self._running = False

    def _serve_batches(self) -> None:
        while True:
            with self._lock:
                if not self._pending:  # stay a while: a new thread starts torch's thread pools cold
                    self._arrived.wait(IDLE_S)
                self._gather()
                batch = self._take(MAX_GENERATIONS)
                if not batch:
                    return
                self._last_rows = len(batch)
            members = list(batch)
            try:
                self._run(batch, members)
            except Exception as exc:  # a failed batch fails its own generations, never the loop
                failure = InferenceFailed(f"{self._name}: generation failed: {exc}")
                for generation in members:
                    generation.fail(failure)
            finally:
                self._running_now(0)

    def _run(self, rows: list[Generation], members: list[Generation]) -> None:
        """Run ``rows`` to their ends, letting newcomers join between steps (added to ``members``)."""
        with torch.inference_mode():
            batch: Batch | None = self._stepper.start(rows)
            while batch is not None:
                if self._pending and self._stepper.can_join(batch):
                    with self._lock:
                        joining = self._take(MAX_GENERATIONS - len(batch.rows))
                    members[:] = [g for g in members if not g.finished] + joining
                    fresh = self._stepper.start(joining) if joining else None
                    if fresh is not None:
                        batch = self._stepper.join(batch, fresh)
                batch = self._stepper.step(batch)

    def _take(self, room: int) -> list[Generation]:
        """Up to ``room`` waiting generations (lock held); cancelled ones are dropped."""
        live = [g for g in self._pending if not g.cancelled]
        taken, self._pending = live[:room], deque(live[room:])
        started = time.perf_counter_ns()
        for g in taken:
            g.started_ns = started
        if taken:
            self._running_now(self.active + len(taken))
        return taken

    def _gather(self) -> None:
        """Wait (lock held) up to ``GATHER_S`` while fewer are pending than the last batch ran."""
        deadline = time.monotonic() + GATHER_S
        while self._pending and len(self._pending) < min(self._last_rows, MAX_GENERATIONS):
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._arrived.wait(left)

    def _running_now(self, rows: int) -> None:
        self.active = rows
        self._counts(rows, len(self._pending))
