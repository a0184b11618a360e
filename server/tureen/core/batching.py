"""Triton's dynamic batcher for one blend: a queue, and batches formed from it.

Every blend with batching has its own ``Batcher``, so a batch never mixes blends: requests
routed to a blend before a swap finish on it, those after go to the new blend's queue.

Nobody waits for a batcher thread when there is no queue: a request that finds its batcher
idle runs the first batch itself (with whatever queued behind it meanwhile), so a lone
request costs what an unbatched one does. Requests that arrive while a batch runs queue up;
when the running batch ends and requests are waiting, the batcher's own thread takes over and
runs batches until the queue is empty.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

from tureen.errors import Cancelled, DeadlineExceeded, InferenceFailed, QueueFull, SoupError
from tureen.spec import SoupSpec

_log = logging.getLogger("tureen.batching")

IDLE_SECONDS = 30.0
"""A batcher's thread ends after this long without work (the next queue starts another)."""


@dataclass(frozen=True)
class BatchPolicy:
    """The spec's ``serving.batching`` with the interface's largest batch."""

    max_batch_size: int
    max_queue_delay_ns: int
    preferred: tuple[int, ...]
    """Preferred batch sizes, largest first."""
    max_queue_size: int

    @classmethod
    def of(cls, spec: SoupSpec, max_batch_size: int) -> BatchPolicy | None:
        """The policy of a blend of ``spec``; None when batching is off or there is no batch dimension."""
        batching = spec.serving.batching if spec.serving is not None else None
        if batching is None or max_batch_size <= 0:
            return None
        return cls(
            max_batch_size=max_batch_size,
            max_queue_delay_ns=batching.max_queue_delay_us * 1000,
            preferred=tuple(sorted({s for s in batching.preferred_batch_sizes if s <= max_batch_size}, reverse=True)),
            max_queue_size=batching.max_queue_size,
        )

    def target(self, available: int, waited_ns: int) -> int | None:
        """How many rows to take now out of ``available``, or None to wait for more."""
        if available >= self.max_batch_size:
            return self.max_batch_size
        for size in self.preferred:
            if size <= available:
                return size
        if waited_ns >= self.max_queue_delay_ns:
            return available
        return None


class Job:
    """One request in a queue: what it needs to join a batch, and the outcome its caller waits for."""

    __slots__ = ("_batcher", "_done", "deadline_ns", "error", "key", "payload", "queued_ns", "result", "rows")

    def __init__(self, key: Hashable, rows: int, payload: Any, deadline_ns: int | None = None) -> None:
        self.key = key
        """Requests batch only with requests of the same key (their shapes past the batch dimension)."""
        self.rows = rows
        self.deadline_ns = deadline_ns
        self.queued_ns = 0
        self.payload = payload
        self.result: Any = None
        self.error: SoupError | None = None
        self._done = threading.Event()
        self._batcher: Batcher | None = None

    def finish(self, result: Any) -> None:
        self.result = result
        self._done.set()

    def fail(self, error: SoupError) -> None:
        self.error = error
        self._done.set()

    def expired(self, now_ns: int) -> bool:
        return self.deadline_ns is not None and now_ns >= self.deadline_ns

    def wait(self) -> Any:
        """The result once computed; raises the job's error. Gives up at the deadline only
        while the job is still queued: once its batch runs, it finishes."""
        if self.deadline_ns is not None and self._batcher is not None:
            timeout = min(max(0.0, (self.deadline_ns - time.perf_counter_ns()) / 1e9), threading.TIMEOUT_MAX)
            if not self._done.wait(timeout):
                self._batcher.withdraw(self, DeadlineExceeded("the deadline passed while the request was queued"))
        self._done.wait()
        if self.error is not None:
            raise self.error
        return self.result

    def cancel(self) -> None:
        """The caller went away: leave the queue if still in it (a batch already running finishes)."""
        if self._batcher is not None:
            self._batcher.withdraw(self, Cancelled("the call was cancelled while the request was queued"))


Execute = Callable[[list[Job]], None]
"""Runs one batch: finishes or fails every job in it; must not raise."""


class Batcher:
    """The queue of one blend and the batches formed from it."""

    def __init__(self, policy: BatchPolicy, execute: Execute, depth: Callable[[int], None], name: str) -> None:
        self.policy = policy
        self._execute = execute
        self._depth = depth
        self._name = name
        self._cond = threading.Condition()
        self._queue: deque[Job] = deque()
        self._busy = False
        """Someone (a caller or the thread) is forming or running a batch; False only with an empty queue."""
        self._handed = False
        self._thread: threading.Thread | None = None

    def submit(self, job: Job) -> None:
        """Queue ``job``, then run its batch here if nobody else is running one; ``job.wait()`` after."""
        with self._cond:
            if self.policy.max_queue_size and len(self._queue) >= self.policy.max_queue_size:
                raise QueueFull(f"{self._name}: the batching queue is full ({self.policy.max_queue_size} requests)")
            job.queued_ns = time.perf_counter_ns()
            job._batcher = self
            self._queue.append(job)
            self._depth(len(self._queue))
            if self._busy:
                self._cond.notify_all()  # an executor may be waiting for a fuller batch
                return
            self._busy = True
        self._run(self._take())
        with self._cond:
            if self._queue:
                self._hand_over()
            else:
                self._busy = False

    def withdraw(self, job: Job, error: SoupError) -> bool:
        """Take ``job`` out of the queue with ``error``; False if it is no longer queued."""
        with self._cond:
            try:
                self._queue.remove(job)
            except ValueError:
                return False
            self._depth(len(self._queue))
        job.fail(error)
        return True

    def _hand_over(self) -> None:
        """Let the batcher's thread run what is queued (the caller holds the lock and stays busy)."""
        self._handed = True
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name=f"tureen-batch-{self._name}", daemon=True)
            self._thread.start()
        self._cond.notify_all()

    def _work(self) -> None:
        while True:
            with self._cond:
                if not self._cond.wait_for(lambda: self._handed, IDLE_SECONDS):
                    self._thread = None
                    return
                self._handed = False
            while True:
                batch = self._take()
                with self._cond:
                    if not batch and not self._queue:
                        self._busy = False
                        break
                self._run(batch)

    def _take(self) -> list[Job]:
        """The next batch, waiting as the policy says; [] once the queue is empty."""
        with self._cond:
            while True:
                self._drop_expired()
                if not self._queue:
                    return []
                head = self._queue[0]
                alike = [job for job in self._queue if job.key == head.key]
                available = sum(job.rows for job in alike)
                now = time.perf_counter_ns()
                target = self.policy.target(available, now - head.queued_ns)
                if target is not None:
                    batch = self._fill(alike, target)
                    self._depth(len(self._queue))
                    return batch
                self._cond.wait(max(0.0, (head.queued_ns + self.policy.max_queue_delay_ns - now) / 1e9))

    def _fill(self, alike: list[Job], target: int) -> list[Job]:
        batch: list[Job] = []
        rows = 0
        for job in alike:
            if batch and rows + job.rows > target:
                break
            batch.append(job)
            rows += job.rows
        for job in batch:
            self._queue.remove(job)
        return batch

    def _drop_expired(self) -> None:
        now = time.perf_counter_ns()
        for job in [job for job in self._queue if job.expired(now)]:
            self._queue.remove(job)
            job.fail(DeadlineExceeded("the deadline passed while the request was queued"))

    def _run(self, batch: list[Job]) -> None:
        if not batch:
            return
        try:
            self._execute(batch)
        except Exception as exc:  # never leave a caller waiting on a job nobody will finish
            _log.exception("%s: a batch failed outside the forward", self._name)
            for job in batch:
                job.fail(InferenceFailed(f"{self._name}: the batch failed: {exc}"))
