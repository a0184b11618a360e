"""The data plane: one inference request from the wire to the wire, and its accounting.

A transport hands ``Engine.serve`` a ``Call``: how to decode its message, how to encode the
response, its deadline. Everything in between happens here, the same for every transport:
routing (active version, a pinned version or the canary), the interface checks, the blend's
batching queue when it has one, the forward, and the accounting. A request is counted once:
as a success after its response is encoded, or as a failure of the blend it was routed to
(of the model's active version when it failed before routing).

``serve`` runs on the serving event loop that both transports share. A forward runs on the loop
itself while the blend's forwards are short (no thread hand-off per request: that is what keeps
the GIL from being passed around between threads under load), and on a worker thread once they
are slow enough that the loop should go on receiving meanwhile. A CPU blend that batches with a
queue delay of 2 ms or more keeps longer forwards on the loop (see ``INLINE_BATCHED_NS``).
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch

from tureen.core.batching import Batcher, BatchPolicy, Job
from tureen.core.blends import Blend, BlendRepository
from tureen.core.devices import CpuThreads, use_cpu_threads
from tureen.core.llm.serving import GenerateRequest, Generations, Stream
from tureen.core.observer import Observer
from tureen.core.rollout import OnlineAccuracy
from tureen.core.statistics import StatisticsBook, Timings, VersionStatistics
from tureen.errors import Cancelled, DeadlineExceeded, InferenceFailed, SoupError

T = TypeVar("T")


@dataclass(frozen=True)
class InferRequest:
    model: str
    version: str
    id: str
    inputs: Mapping[str, torch.Tensor]
    outputs: tuple[str, ...] | None
    parameters: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class InferResponse:
    model: str
    version: int
    id: str
    outputs: Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class Call(Generic[T]):
    """One request as a transport received it."""

    model: str
    """The model name as sent, for accounting a request that cannot even be decoded."""
    received_ns: int
    """``time.perf_counter_ns()`` when the transport received it: queue time counts from here."""
    decode: Callable[[], InferRequest]
    encode: Callable[[InferResponse], T]
    deadline_ns: int | None = None
    """The caller's deadline on the same clock; a request still queued then is dropped."""


@dataclass
class _Work:
    """A routed, checked request: what its batch needs, and what its accounting needs after."""

    blend: Blend
    request: InferRequest
    names: tuple[str, ...]
    rows: int
    received_ns: int
    outputs: Mapping[str, torch.Tensor] = field(default_factory=dict)
    classes: list[int] | None = None
    timings: Timings | None = None


INLINE_NS = 2_000_000
"""Batches whose compute took less than this (a moving average per blend, inputs to outputs) run
on the event loop; a blend's first batch, with nothing measured yet, runs on a worker thread."""

INLINE_BATCHED_NS = 50_000_000
"""The same bound for a CPU blend that batches with a queue delay of ``GATHERING_DELAY_NS`` or
more. Its forward's intra-op threads would use every core, so a loop receiving meanwhile only
takes cycles from it and splits the clients into two groups that alternate in half-size
batches; on the loop, the requests that arrive during a forward wait in the transport and the
queue delay gathers them into one batch. Bounded so that a slow model cannot stall health checks
and other models' requests for long."""

GATHERING_DELAY_NS = 2_000_000
"""The shortest queue delay that gathers, after a forward on the loop, the requests that arrived
during it: the transport takes them in one call per loop turn. ``python bench/peers.py --only
tureen-db tureen-d100 tureen-d1000 tureen-d2000 tureen-d5000 tureen-pb --points big:16:grpc``
(10M-parameter MLP, c=16, 2 cores) printed 746 infer/s for a delay of 0, 762 and 792 for 100 us
and 1 ms (worker threads), 784 for 2 ms and 1002 for 5 ms (the loop), 1122 for 5 ms with preferred
size 16. Before this bound the 100 us and 1 ms servers ran their batches on the loop too, and
perf_analyzer measured 250-300 and 375-465 infer/s there."""


@dataclass
class _Lane:
    """How one blend's requests run: its batcher (None: a forward per request), the longest
    forward that runs on the loop, and the moving average of its forwards so far."""

    batcher: Batcher | None
    inline_ns: int
    forward_ns: float | None = None


class Engine:
    """Runs requests on whichever blend each one is routed to when it arrives."""

    def __init__(
        self,
        repository: BlendRepository,
        observer: Observer,
        online: OnlineAccuracy | None = None,
        workers: int = 8,
        threads: CpuThreads | None = None,
    ) -> None:
        """``workers``: threads for forwards too slow to run on the event loop; ``threads``: torch's
        CPU threads for a forward on the loop and for one beside it (None: left as they are)."""
        self.repository = repository
        self.statistics = StatisticsBook()
        self.online = online if online is not None else OnlineAccuracy()
        self._observer = observer
        self._lanes: weakref.WeakKeyDictionary[Blend, _Lane] = weakref.WeakKeyDictionary()
        self._loop_threads = threads.loop if threads else None
        beside = threads.beside if threads else None
        self._threads = ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="tureen-forward", initializer=use_cpu_threads, initargs=(beside,)
        )
        self.generations = Generations(repository, self.statistics, observer, self.failed, self.online, beside)

    async def serve(self, call: Call[T]) -> T:
        """Decode, route, check, queue, compute and encode one request; count it once."""
        ledger = _Ledger(self, call)
        with ledger:
            request = call.decode()
            ledger.blend = blend = self.repository.route(request.model, request.version, request.parameters)
            work = _Work(blend, request, blend.signature.check_outputs(request.outputs), 0, call.received_ns)
            work.rows = blend.signature.check_inputs(request.inputs)
            await self._compute(work, call)
            encoded = call.encode(InferResponse(blend.model, blend.version, request.id, work.outputs))
            ledger.work = work
        return encoded

    def generate(self, model: str, received_ns: int, decode: Callable[[], GenerateRequest]) -> Stream:
        """Start the generation ``decode`` describes on the blend it routes to (a request that
        cannot be decoded is counted against ``model``); iterate the stream for its text."""
        return self.generations.start(model, received_ns, decode)

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)

    def policy_of(self, blend: Blend) -> BatchPolicy | None:
        """How ``blend`` batches requests (None: one forward per request)."""
        return BatchPolicy.of(blend.spec, blend.signature.max_batch_size)

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

    # ---- compute -----------------------------------------------------------------------------

    async def _compute(self, work: _Work, call: Call[T]) -> None:
        if call.deadline_ns is not None and time.perf_counter_ns() >= call.deadline_ns:
            raise DeadlineExceeded("the deadline passed before the request could run")
        batcher = self._lane(work.blend).batcher
        if batcher is None:
            job = Job((), work.rows, work)
            await self._run([job])
            job.outcome()
            return
        shapes = tuple((name, tuple(t.shape[1:]), t.dtype) for name, t in sorted(work.request.inputs.items()))
        await batcher.submit(Job(shapes, work.rows, work, call.deadline_ns))

    def _lane(self, blend: Blend) -> _Lane:
        try:
            return self._lanes[blend]
        except KeyError:
            pass
        policy = self.policy_of(blend)
        model, version = blend.model, str(blend.version)  # the lane must not keep the blend alive
        batcher = (
            None
            if policy is None
            else Batcher(
                policy,
                self._run,
                lambda depth: self._observer.queue_depth(model, version, depth),
                f"model {model!r} version {version}",
            )
        )
        gathers = policy is not None and policy.max_queue_delay_ns >= GATHERING_DELAY_NS and blend.device.type == "cpu"
        self._lanes[blend] = lane = _Lane(batcher, INLINE_BATCHED_NS if gathers else INLINE_NS)
        return lane

    async def _run(self, jobs: list[Job]) -> None:
        """One batch: on the loop when this blend's forwards are short, else on a worker thread."""
        lane = self._lane(jobs[0].payload.blend)
        if lane.forward_ns is not None and lane.forward_ns < lane.inline_ns:
            use_cpu_threads(self._loop_threads)
            took = self._execute(jobs)
        else:
            took = await asyncio.get_running_loop().run_in_executor(self._threads, self._execute, jobs)
        if took is not None:  # the whole compute counts: on a GPU, the forward returns at once and collecting waits
            lane.forward_ns = took if lane.forward_ns is None else 0.8 * lane.forward_ns + 0.2 * took

    def _execute(self, jobs: list[Job]) -> int | None:
        """One forward for ``jobs`` (all on one blend, inputs alike past the batch dimension);
        returns how long the compute took, None when it failed."""
        works: list[_Work] = [job.payload for job in jobs]
        blend = works[0].blend
        started = time.perf_counter_ns()
        try:
            names = tuple(dict.fromkeys(name for work in works for name in work.names))
            prepared = blend.prepare(_joined(works))
            forward_at = time.perf_counter_ns()
            result = blend.forward(prepared)
            output_at = time.perf_counter_ns()
            outputs = blend.collect(result, names)
            classes = blend.predicted_classes(result) if any(work.request.id for work in works) else None
            parts = _split(works, outputs, classes)
        except Exception as exc:
            failure = InferenceFailed(f"model {blend.model!r} version {blend.version}: inference failed: {exc}")
            for job in jobs:
                job.fail(failure)
            return None
        done = time.perf_counter_ns()
        compute = (forward_at - started, output_at - forward_at, done - output_at)
        rows = sum(work.rows for work in works)
        self.statistics.executed(blend.model, blend.version, rows, *compute)
        self._observer.batch_executed(blend.model, str(blend.version), rows)
        for job, work, (outs, cls) in zip(jobs, works, parts, strict=True):
            work.outputs, work.classes = outs, cls
            work.timings = Timings(started - work.received_ns, *compute)
            job.finish(work)
        return done - started

    # ---- accounting ----------------------------------------------------------------------------

    def succeeded(self, work: _Work) -> None:
        assert work.timings is not None
        blend, timings = work.blend, work.timings
        total = time.perf_counter_ns() - work.received_ns
        if work.request.id:  # kept so that Feedback can score this request later
            self.online.predicted(blend.model, work.request.id, blend.version, work.classes)
        self.statistics.success(blend.model, blend.version, work.rows, total, timings)
        self._observer.request_finished(
            blend.model, str(blend.version), None, total / 1e9, timings.queue / 1e9, timings.compute / 1e9
        )

    def failed(self, model: str, received_ns: int, blend: Blend | None, error: SoupError) -> None:
        """Count a failed request for ``model`` against the blend it was routed to, else the
        model's active one; tensor and text requests alike."""
        total = time.perf_counter_ns() - received_ns
        known = self.repository.models()
        if blend is None:
            blend = known.get(model)
        version = str(blend.version) if blend is not None else ""
        if blend is not None:
            self.statistics.failure(blend.model, blend.version, total)
        # Unknown model names stay out of labels: clients must not be able to grow our series.
        label = model if model in known else ""
        self._observer.request_finished(label, version, error.reason, total / 1e9, 0.0, 0.0)


class _Ledger:
    """Counts one request once, whatever way its ``serve`` ends: a non-Soup error becomes
    ``InferenceFailed``, a cancelled call counts as ``Cancelled`` and stays cancelled."""

    def __init__(self, engine: Engine, call: Call[Any]) -> None:
        self.engine, self.call = engine, call
        self.blend: Blend | None = None
        self.work: _Work | None = None

    def __enter__(self) -> _Ledger:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if exc is None:
            assert self.work is not None
            self.engine.succeeded(self.work)
            return
        if isinstance(exc, SoupError):
            self.engine.failed(self.call.model, self.call.received_ns, self.blend, exc)
            return
        if isinstance(exc, asyncio.CancelledError):
            self.engine.failed(self.call.model, self.call.received_ns, self.blend, Cancelled("the call was cancelled"))
            return
        if not isinstance(exc, Exception):
            return
        where = f"model {self.blend.model!r} version {self.blend.version}" if self.blend else f"model {self.call.model!r}"
        failure = InferenceFailed(f"{where}: cannot answer the request: {exc}")
        self.engine.failed(self.call.model, self.call.received_ns, self.blend, failure)
        raise failure from exc


def _joined(works: list[_Work]) -> Mapping[str, torch.Tensor]:
    """The batch's inputs: the one request's own tensors, or theirs joined on the batch dimension."""
    if len(works) == 1:
        return works[0].request.inputs
    return {name: torch.cat([work.request.inputs[name] for work in works]) for name in works[0].request.inputs}


def _split(
    works: list[_Work], outputs: Mapping[str, torch.Tensor], classes: list[int] | None
) -> list[tuple[dict[str, torch.Tensor], list[int] | None]]:
    """Each request's rows of the batch's outputs (and predicted classes), in batch order."""
    if len(works) == 1:
        return [({name: outputs[name] for name in works[0].names}, classes)]
    total = sum(work.rows for work in works)
    for name, tensor in outputs.items():
        if tensor.dim() == 0 or tensor.shape[0] != total:
            raise ValueError(
                f"output {name!r} has shape {list(tensor.shape)}: a batch of {total} rows needs {total} in its first dimension"
            )
    parts, start = [], 0
    for work in works:
        end = start + work.rows
        parts.append(({name: outputs[name][start:end] for name in work.names}, classes[start:end] if classes else None))
        start = end
    return parts
