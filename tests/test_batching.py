"""Dynamic batching, deadlines, cancellation and streaming, over a real server and real clients.

The batcher's policy (when a batch forms, and how big) is checked on its own with real jobs;
everything else goes through tritonclient against a server on free ports.
"""

from __future__ import annotations

import asyncio
import os
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc
from tritonclient.utils import InferenceServerException

from archs import Gated
from helpers import digits_spec, hand_average, infer, mlp_logits, running_app, sample, scrape, write_ingredients
from tureen.core.batching import Batcher, BatchPolicy, Job
from tureen.spec import parse_spec

NAMES = ["ft-0", "ft-1"]


def policy(delay_us: int = 0, preferred: tuple[int, ...] = (), largest: int = 16) -> BatchPolicy:
    spec = parse_spec(
        digits_spec(NAMES, serving={"batching": {"max_queue_delay_us": delay_us, "preferred_batch_sizes": list(preferred)}})
    )
    made = BatchPolicy.of(spec, largest)
    assert made is not None
    return made


def test_a_batch_forms_at_the_largest_preferred_size_at_the_maximum_or_after_the_delay() -> None:
    delayed = policy(delay_us=500, preferred=(4, 8))
    assert delayed.target(available=20, waited_ns=0) == 16  # full: at once
    assert delayed.target(available=9, waited_ns=0) == 8  # the largest preferred size that fits
    assert delayed.target(available=5, waited_ns=0) == 4
    assert delayed.target(available=3, waited_ns=0) is None  # wait for more ...
    assert delayed.target(available=3, waited_ns=500_000) == 3  # ... until the delay has passed
    assert policy().target(available=1, waited_ns=0) == 1  # no delay: never wait
    off = parse_spec(digits_spec(NAMES))
    assert BatchPolicy.of(off, 16) is None  # no serving.batching
    assert BatchPolicy.of(parse_spec(digits_spec(NAMES, serving={"batching": {}})), 0) is None  # no batch dimension


def test_a_lone_request_runs_at_once_in_its_own_coroutine_and_later_ones_join_one_batch() -> None:
    async def scenario() -> tuple[list[tuple[Any, list[int]]], list[int], Any]:
        ran: list[tuple[Any, list[int]]] = []
        release = asyncio.Event()

        async def run(jobs: list[Job]) -> None:
            ran.append((asyncio.current_task(), [job.payload for job in jobs]))
            if jobs[0].payload == 0:
                await release.wait()  # the first batch runs until the others have queued
            for job in jobs:
                job.finish(job.payload * 10)

        batcher = Batcher(policy(), run, lambda depth: None, "test")
        first = asyncio.create_task(batcher.submit(Job((), 1, 0)))
        await asyncio.sleep(0)
        later = [asyncio.create_task(batcher.submit(Job((), 1, i))) for i in (1, 2, 3)]
        await asyncio.sleep(0)
        release.set()
        results = await asyncio.gather(first, *later)
        return ran, list(results), first

    ran, results, first = asyncio.run(scenario())
    assert results == [0, 10, 20, 30]
    assert ran[0] == (first, [0])  # in the request's own coroutine: no queue, no task to wake
    assert ran[1][1] == [1, 2, 3] and ran[1][0].get_name() == "tureen-batch test"


def test_requests_of_other_shapes_wait_for_a_batch_of_their_own() -> None:
    async def scenario() -> list[list[Any]]:
        batches: list[list[Any]] = []

        async def run(jobs: list[Job]) -> None:
            batches.append([job.payload for job in jobs])
            for job in jobs:
                job.finish(None)

        batcher = Batcher(policy(delay_us=100_000, preferred=(2,)), run, lambda depth: None, "test")
        jobs = [Job(("short",), 1, "a"), Job(("long",), 1, "b"), Job(("short",), 1, "c")]
        tasks = []
        for job in jobs:
            tasks.append(asyncio.create_task(batcher.submit(job)))
            await asyncio.sleep(0.01)
        await asyncio.gather(*tasks)
        return batches

    assert sorted(asyncio.run(scenario())) == [["a", "c"], ["b"]]


@pytest.fixture
def soup(tmp_path: Path) -> tuple[Path, dict]:
    return tmp_path, write_ingredients(tmp_path, 2)


def batched(folder: Path, **batching: Any) -> Any:
    return parse_spec(digits_spec(NAMES, serving={"batching": batching}), base_dir=folder)


def test_concurrent_requests_share_forwards_and_each_gets_its_own_rows(soup: tuple[Path, dict]) -> None:
    folder, states = soup
    expected_state = hand_average(states, {"ft-0": 1.0, "ft-1": 1.0})
    rng = np.random.default_rng(0)
    sent = [rng.uniform(0, 16, size=(1 + i % 3, 64)).astype(np.float32) for i in range(160)]
    with running_app([batched(folder, max_queue_delay_us=20_000, preferred_batch_sizes=[8])]) as app:
        answers: dict[int, np.ndarray] = {}

        def client_loop(start: int) -> None:
            with grpcclient.InferenceServerClient(f"127.0.0.1:{app.grpc_port}") as client:
                for i in range(start, len(sent), 16):
                    answers[i] = infer(client, sent[i])[1]

        threads = [threading.Thread(target=client_loop, args=(t,)) for t in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        with grpcclient.InferenceServerClient(f"127.0.0.1:{app.grpc_port}") as client:
            stats = client.get_inference_statistics("digits").model_stats[0]
            config = client.get_model_config("digits").config
        text = scrape(app)
    assert len(answers) == len(sent)
    for i, rows in enumerate(sent):
        # The same rows' forward on their own: equal up to float32 rounding, since BLAS sums a
        # row in another order inside a larger matrix product (a 1-row product is a gemv).
        reference = mlp_logits(expected_state, torch.from_numpy(rows), hidden=8).numpy()
        np.testing.assert_allclose(answers[i], reference, rtol=1e-5, atol=1e-5)
    assert stats.inference_stats.success.count == len(sent)
    assert stats.inference_count == sum(len(rows) for rows in sent)
    assert stats.execution_count < len(sent)  # requests shared forwards
    sizes = {b.batch_size: b.compute_infer.count for b in stats.batch_stats}
    assert sum(sizes.values()) == stats.execution_count and max(sizes) > 3  # more rows than one request sends
    assert config.dynamic_batching.preferred_batch_size == [8]
    assert config.dynamic_batching.max_queue_delay_microseconds == 20_000
    assert sample(text, "tureen_batch_size_count", model="digits", version="1") == stats.execution_count
    assert sample(text, "tureen_batch_size_sum", model="digits", version="1") == stats.inference_count
    assert sample(text, "tureen_queue_depth", model="digits", version="1") == 0  # drained


@pytest.fixture
def gate() -> Iterator[None]:
    Gated.OPEN.set()
    Gated.ENTERED.clear()
    yield
    Gated.OPEN.set()  # never leave a forward waiting


def until(condition: Any, what: str, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.01)


def test_a_full_queue_answers_unavailable_and_expired_or_cancelled_requests_never_run(
    soup: tuple[Path, dict], gate: None
) -> None:
    folder, _ = soup
    document = digits_spec(NAMES, serving={"batching": {"max_queue_size": 2}})
    document["architecture"] = {"factory": "archs:gated", "kwargs": {"hidden": 8}}
    spec = parse_spec(document, base_dir=folder)
    x = np.ones((1, 64), dtype=np.float32)
    with running_app([spec], allow_factories=("archs:*",)) as app:
        address = f"127.0.0.1:{app.grpc_port}"
        outcomes: queue.Queue[tuple[str, Any]] = queue.Queue()
        depth = lambda: sample(scrape(app), "tureen_queue_depth", model="digits", version="1")  # noqa: E731
        failed = lambda reason: sample(scrape(app), "tureen_request_failure_total", model="digits", version="1", reason=reason)  # noqa: E731

        def send(label: str, **kwargs: Any) -> threading.Thread:
            def run() -> None:
                with grpcclient.InferenceServerClient(address) as client:
                    try:
                        outcomes.put((label, infer(client, x, **kwargs)[0]))
                    except InferenceServerException as exc:
                        outcomes.put((label, exc.status()))

            thread = threading.Thread(target=run)
            thread.start()
            return thread

        Gated.OPEN.clear()
        running = send("running")
        until(Gated.ENTERED.is_set, "the first batch runs")
        queued = send("queued")
        until(lambda: depth() == 1, "one request queues")
        send("expires", client_timeout=0.5).join(30)
        until(lambda: failed("deadline_exceeded") == 1, "the expired request is counted")
        channel = grpc.insecure_channel(address)
        cancelled = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer.future(request(x))
        until(lambda: depth() == 2, "the request to cancel queues")
        cancelled.cancel()
        until(lambda: failed("cancelled") == 1, "the cancelled request is counted")
        also_queued = send("also queued")
        until(lambda: depth() == 2, "the queue is full again")
        with grpcclient.InferenceServerClient(address) as client, pytest.raises(InferenceServerException) as refused:
            infer(client, x)
        assert refused.value.status() == "StatusCode.UNAVAILABLE" and "the batching queue is full (2 requests)" in str(
            refused.value
        )
        Gated.OPEN.set()
        for thread in (running, queued, also_queued):
            thread.join(30)
        channel.close()
        with grpcclient.InferenceServerClient(address) as client:
            stats = client.get_inference_statistics("digits").model_stats[0]
        assert failed("queue_full") == 1
    results = dict(outcomes.queue)
    assert results == {"running": 1, "queued": 1, "expires": "StatusCode.DEADLINE_EXCEEDED", "also queued": 1}
    assert stats.inference_stats.success.count == 3 and stats.inference_stats.fail.count == 3
    # The expired and the cancelled request never ran: the first ran alone, the two queued ones together.
    assert stats.execution_count == 2 and {b.batch_size: b.compute_infer.count for b in stats.batch_stats} == {1: 1, 2: 1}


def request(x: np.ndarray) -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(model_name="digits")
    message.inputs.add(name="pixels", datatype="FP32", shape=list(x.shape))
    message.raw_input_contents.append(x.tobytes())
    return message


def test_model_stream_infer_answers_each_request_in_order_and_reports_errors_in_the_stream(
    soup: tuple[Path, dict],
) -> None:
    folder, states = soup
    expected_state = hand_average(states, {"ft-0": 1.0, "ft-1": 1.0})
    rows = np.random.default_rng(1).uniform(0, 16, size=(2, 64)).astype(np.float32)
    with running_app([batched(folder)]) as app:
        results: queue.Queue[tuple[Any, Any]] = queue.Queue()
        with grpcclient.InferenceServerClient(f"127.0.0.1:{app.grpc_port}") as client:
            client.start_stream(callback=lambda result, error: results.put((result, error)))
            for i, shape in enumerate([(1, 64), (1, 32), (1, 64)]):
                tensor = grpcclient.InferInput("pixels", list(shape), "FP32")
                tensor.set_data_from_numpy(rows[i % 2 : i % 2 + 1, : shape[1]].copy())
                client.async_stream_infer("digits", [tensor], request_id=f"r{i}")
            replies = [results.get(timeout=30) for _ in range(3)]
            client.stop_stream()
    (first, none0), (bad, error), (third, none2) = replies
    assert none0 is None and none2 is None and bad is None
    assert "input 'pixels': shape [1, 32] does not match the model's [-1, 64]" in str(error)
    for result, i in ((first, 0), (third, 2)):
        assert result.get_response().id == f"r{i}"
        reference = mlp_logits(expected_state, torch.from_numpy(rows[i % 2 : i % 2 + 1]), hidden=8).numpy()
        np.testing.assert_allclose(result.as_numpy("logits"), reference, rtol=1e-5, atol=1e-5)


def test_a_failure_after_routing_is_booked_on_the_version_that_served_it(soup: tuple[Path, dict]) -> None:
    folder, _ = soup
    first = parse_spec(digits_spec(NAMES), base_dir=folder)
    canary = digits_spec(NAMES, merge={"weights": {"ft-0": 1.0, "ft-1": 3.0}})
    canary["rollout"] = {"canary": {"percent": 50}}
    wrong = np.ones((1, 32), dtype=np.float32)
    with running_app([first]) as app:
        app.controller.push(parse_spec(canary, base_dir=folder), "test", wait=True)
        with grpcclient.InferenceServerClient(f"127.0.0.1:{app.grpc_port}") as client:
            for version in ("2", "2", "1"):
                with pytest.raises(InferenceServerException, match="does not match the model's"):
                    infer(client, wrong, model_version=version)
            stats = {s.version: s for s in client.get_inference_statistics("digits").model_stats}
        text = scrape(app)
    assert stats["2"].inference_stats.fail.count == 2 and stats["1"].inference_stats.fail.count == 1
    assert sample(text, "tureen_request_failure_total", model="digits", version="2", reason="invalid_argument") == 2
    assert sample(text, "tureen_request_failure_total", model="digits", version="1", reason="invalid_argument") == 1


GATHERING = {"batching": {"max_queue_delay_us": 2000}}
QUICK = {"batching": {"max_queue_delay_us": 100}}


@pytest.mark.parametrize(
    ("pause", "serving", "where"),
    [
        (0.0, None, "tureen-serve"),
        (0.01, None, "tureen-forward"),
        (0.01, QUICK, "tureen-forward"),
        (0.01, GATHERING, "tureen-serve"),
        (0.08, GATHERING, "tureen-forward"),
    ],
    ids=["short", "slow", "slow-quick-delay", "slow-gathered", "slower-gathered"],
)
def test_short_forwards_run_on_the_serving_loop_and_slow_ones_on_worker_threads(
    soup: tuple[Path, dict], pause: float, serving: dict | None, where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CPU blend that batches with a queue delay of 2 ms or more keeps forwards of up to 50 ms
    on the loop (a shorter delay could not gather what arrived during them). A
    forward on the loop gets every core (the loop waits for it); one on a worker thread leaves a
    core to the loop."""
    from archs import Recorder

    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # the cores counted are this machine's
        monkeypatch.delenv(name, raising=False)
    folder, _ = soup
    document = digits_spec(NAMES, architecture={"factory": "archs:recorder", "kwargs": {"hidden": 8, "pause": pause}})
    if serving is not None:
        document["serving"] = serving
    with running_app([parse_spec(document, base_dir=folder)], allow_factories=("archs:*",)) as app:
        Recorder.THREADS.clear()
        with grpcclient.InferenceServerClient(f"127.0.0.1:{app.grpc_port}") as client:
            for _ in range(4):
                infer(client, np.ones((1, 64), dtype=np.float32))
    first, *later = Recorder.THREADS
    assert first[0].startswith("tureen-forward")  # nothing measured yet: never risk blocking the loop
    assert len(later) == 3 and all(name.startswith(where) for name, _ in later)
    cores = len(os.sched_getaffinity(0))
    for name, threads in Recorder.THREADS:
        assert threads == (cores if name.startswith("tureen-serve") else max(1, cores - 1)), (name, threads)


def test_cpu_threads_give_a_forward_on_the_loop_every_core_and_work_beside_it_one_less() -> None:
    from tureen.core.devices import CpuThreads, cpu_threads

    cores = len(os.sched_getaffinity(0))
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert cpu_threads(None, cpu, {}, 7) == CpuThreads(cores, max(1, cores - 1))
    assert cpu_threads(3, cpu, {}, 7) == CpuThreads(3, 3)  # --cpu-threads holds everywhere
    assert cpu_threads(None, cpu, {"OMP_NUM_THREADS": "4"}, 7) == CpuThreads(4, 3)  # a pod's CPU limit, as the chart sets it
    assert cpu_threads(None, cpu, {"MKL_NUM_THREADS": "1"}, 7) == CpuThreads(1, 1)
    assert cpu_threads(None, cpu, {"OMP_NUM_THREADS": "4,2"}, 7) == CpuThreads(4, 3)  # one count per nesting level
    assert cpu_threads(None, cpu, {"OMP_NUM_THREADS": "all"}, 7) == CpuThreads(7, 7)  # torch reads it its own way
    assert cpu_threads(None, cuda, {}, 7) == CpuThreads(7, 7)
