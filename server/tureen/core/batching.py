"""Triton's dynamic batcher for one blend, on the serving event loop: a queue, and batches formed from it.

Every blend with batching has its own ``Batcher``, so a batch never mixes blends: requests
routed to a blend before a swap finish on it, those after go to the new blend's queue.

Both transports receive requests on one event loop, and a batch runs on that loop (or, for a
blend whose forwards are slow, on a worker thread while the loop goes on receiving). Requests
that arrive while a batch runs queue up and form the next batch, with no thread hand-off per
request. A request that finds its batcher idle runs at once in its own coroutine, so a lone
request costs what an unbatched one does.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Any

from tureen.errors import Cancelled, DeadlineExceeded, QueueFull, SoupError
from tureen.spec import SoupSpec


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
    """One request in a queue: what it needs to join a batch, and the outcome its caller awaits."""

    __slots__ = ("deadline_ns", "error", "key", "payload", "queued_ns", "result", "rows")

    def __init__(self, key: Hashable, rows: int, payload: Any, deadline_ns: int | None = None) -> None:
        self.key = key
        """Requests batch only with requests of the same key (their shapes past the batch dimension)."""
        self.rows = rows
        self.deadline_ns = deadline_ns
        self.queued_ns = 0
        self.payload = payload
        self.result: Any = None
        self.error: SoupError | None = None

    def finish(self, result: Any) -> None:
        self.result = result

    def fail(self, error: SoupError) -> None:
        self.error = error

    def outcome(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.result


Run = Callable[[list[Job]], Awaitable[None]]
"""Runs one batch: finishes or fails every job in it; must not raise."""


class Batcher:
    """The queue of one blend and the batches formed from it; used from one event loop."""

    def __init__(self, policy: BatchPolicy, run: Run, depth: Callable[[int], None], name: str) -> None:
        self.policy = policy
        self._run = run
        self._depth = depth
        self._name = name
        self._queue: deque[tuple[Job, asyncio.Future[None]]] = deque()
        self._busy = False
        """A batch is being formed or run; False only with an empty queue."""
        self._arrived = asyncio.Event()

    async def submit(self, job: Job) -> Any:
        """Queue ``job`` and return its result once its batch ran (raising its error). A full
        queue refuses it at once; its deadline, or its caller's cancellation, take it out of the
        queue if its batch has not started."""
        if self.policy.max_queue_size and len(self._queue) >= self.policy.max_queue_size:
            raise QueueFull(f"{self._name}: the batching queue is full ({self.policy.max_queue_size} requests)")
        if not self._busy and self.policy.max_queue_delay_ns == 0:
            self._busy = True  # a lone request: no queue to wait in, no task to wake
            try:
                await self._run([job])
            finally:
                self._after()
            return job.outcome()
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        job.queued_ns = time.perf_counter_ns()
        self._queue.append((job, done))
        self._depth(len(self._queue))
        self._arrived.set()
        if not self._busy:
            self._busy = True
            asyncio.get_running_loop().create_task(self._drain(), name=f"tureen-batch {self._name}")
        await self._wait(job, done)
        return job.outcome()

    async def _wait(self, job: Job, done: asyncio.Future[None]) -> None:
        timeout = None if job.deadline_ns is None else max(0.0, (job.deadline_ns - time.perf_counter_ns()) / 1e9)
        try:
            await asyncio.wait_for(asyncio.shield(done), timeout)
        except TimeoutError:
            if self._withdraw(job):
                raise DeadlineExceeded("the deadline passed while the request was queued") from None
            await done  # its batch is running: it finishes
        except asyncio.CancelledError:
            if self._withdraw(job):
                job.fail(Cancelled("the call was cancelled while the request was queued"))
            raise

    def _withdraw(self, job: Job) -> bool:
        for entry in self._queue:
            if entry[0] is job:
                self._queue.remove(entry)
                self._depth(len(self._queue))
                return True
        return False

    def _after(self) -> None:
        """A batch ended: drain what queued meanwhile, or go idle."""
        if self._queue:
            asyncio.get_running_loop().create_task(self._drain(), name=f"tureen-batch {self._name}")
        else:
            self._busy = False

    async def _drain(self) -> None:
        try:
            while self._queue:
                await asyncio.sleep(0)  # requests received during the last batch join this one
                batch = await self._take()
                try:
                    if batch:
                        await self._run([job for job, _ in batch])
                finally:  # never leave a caller waiting on a job nobody will finish
                    for _, done in batch:
                        if not done.done():
                            done.set_result(None)
        finally:
            self._busy = False

    async def _take(self) -> list[tuple[Job, asyncio.Future[None]]]:
        """The next batch, waiting as the policy says; [] once the queue is empty."""
        while True:
            self._drop_expired()
            if not self._queue:
                return []
            head = self._queue[0][0]
            alike = [entry for entry in self._queue if entry[0].key == head.key]
            now = time.perf_counter_ns()
            target = self.policy.target(sum(job.rows for job, _ in alike), now - head.queued_ns)
            if target is not None:
                return self._fill(alike, target)
            self._arrived.clear()
            wait = max(0.0, (head.queued_ns + self.policy.max_queue_delay_ns - now) / 1e9)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), wait)

    def _fill(self, alike: list[tuple[Job, asyncio.Future[None]]], target: int) -> list[tuple[Job, asyncio.Future[None]]]:
        batch: list[tuple[Job, asyncio.Future[None]]] = []
        rows = 0
        for entry in alike:
            if batch and rows + entry[0].rows > target:
                break
            batch.append(entry)
            rows += entry[0].rows
        for entry in batch:
            self._queue.remove(entry)
        self._depth(len(self._queue))
        return batch

    def _drop_expired(self) -> None:
        """Jobs whose deadline passed never join a batch, even before their callers' timers fire."""
        now = time.perf_counter_ns()
        expired = [e for e in self._queue if e[0].deadline_ns is not None and now >= e[0].deadline_ns]
        for job, done in expired:
            self._queue.remove((job, done))
            job.fail(DeadlineExceeded("the deadline passed while the request was queued"))
            done.set_result(None)
        if expired:
            self._depth(len(self._queue))
