"""Hot swaps: push-to-serving time, and request latency while blends are swapped, in one run.

    python bench/swap.py [--hidden 9950] [--steady 5] [--swaps 10]

Two models are served by one server process (started here, on a free port; the clients run
in this process, as they would in another program): the demo's architecture
(``digits``, hidden 128) and the same MLP at ``--hidden`` (about 100M float32 parameters at
the default), each from 4 ingredients already loaded into the pool. It prints:

- push-to-serving: from the PushSpec call until a request is answered by the new version
  (the blend is merged, warmed up and swapped in);
- request latency (p50, p99) of one closed-loop client calling ``digits`` during --steady
  seconds of quiet, then during a burst of --swaps pushes of the big model, and their ratio;
- the same latency while another process spins one core at the lowest priority the OS offers
  (SCHED_IDLE on Linux) for as long as the burst took: the floor that any background CPU work
  sets on this machine, with nothing of Tureen's running beside the requests.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
import tritonclient.grpc as grpcclient
from safetensors.torch import save_file
from tureen_client import SoupClient

from tureen.app import App, Settings
from tureen.demo.models import DigitsMLP


def write_ingredients(folder: Path, hidden: int, count: int = 4) -> list[str]:
    paths = []
    for i in range(count):
        torch.manual_seed(i)
        state = {k: v.contiguous() for k, v in DigitsMLP(hidden=hidden).state_dict().items()}
        path = folder / f"h{hidden}-{i}.safetensors"
        save_file(state, str(path))
        paths.append(str(path))
    return paths


def document(model: str, hidden: int, paths: list[str], k: int) -> dict:
    return {
        "apiVersion": "tureen/v1",
        "model": model,
        "architecture": {"factory": "tureen.demo.models:mlp", "kwargs": {"hidden": hidden}},
        "ingredients": [{"name": f"ft-{i}", "path": p} for i, p in enumerate(paths)],
        "merge": {"method": "linear", "weights": {f"ft-{i}": 1.0 + ((i + k) % 4) for i in range(len(paths))}},
    }


def serve(documents: list[dict], store: str, ports: multiprocessing.Queue[int]) -> None:
    """The server process: build both models, report the port, serve until terminated."""
    from tureen.spec import parse_spec

    settings = Settings(host="127.0.0.1", grpc_port=0, http_port=None, metrics_port=0, device="cpu", store=store)
    app = App([parse_spec(d) for d in documents], settings)
    app.start()
    app.build_all()
    ports.put(app.grpc_port)
    threading.Event().wait()


def spin(seconds: float, ready: multiprocessing.Event) -> None:  # type: ignore[valid-type]
    """Background CPU work at the lowest priority: one core, pure Python, no memory traffic."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        os.nice(19)
    ready.set()  # type: ignore[attr-defined]
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def infer_version(client: grpcclient.InferenceServerClient, model: str) -> int:
    tensor = grpcclient.InferInput("pixels", [1, 64], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 64), dtype=np.float32))
    return int(client.infer(model, [tensor]).get_response().model_version)


def push_to_serving(soups: SoupClient, client: grpcclient.InferenceServerClient, spec: dict) -> float:
    started = time.perf_counter()
    version = int(soups.push(spec, wait=True)["version"])
    while infer_version(client, spec["model"]) != version:
        pass
    return time.perf_counter() - started


def percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered) * 1e3, ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description="Push-to-serving time and latency under swaps.")
    parser.add_argument("--hidden", type=int, default=9950, help="hidden width of the big MLP (9950: about 100M parameters)")
    parser.add_argument("--steady", type=float, default=5.0, help="seconds of quiet traffic measured")
    parser.add_argument("--swaps", type=int, default=10, help="pushes of the big model in the burst")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        small, big = write_ingredients(folder, 128), write_ingredients(folder, args.hidden)
        params = sum(t.numel() for t in DigitsMLP(hidden=args.hidden).state_dict().values())
        documents = [document("digits", 128, small, 0), document("big", args.hidden, big, 0)]
        context = multiprocessing.get_context("spawn")
        ports: multiprocessing.Queue[int] = context.Queue()
        server = context.Process(target=serve, args=(documents, str(folder / "store"), ports), daemon=True)
        server.start()
        try:
            port = ports.get(timeout=300)
            address = f"127.0.0.1:{port}"
            soups, client = SoupClient(address), grpcclient.InferenceServerClient(address)
            print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; big model: {params / 1e6:.1f}M float32")
            demo = [push_to_serving(soups, client, document("digits", 128, small, k)) for k in range(1, 4)]
            large = [push_to_serving(soups, client, document("big", args.hidden, big, k)) for k in range(1, 4)]
            for label, times in (("demo model", demo), (f"{params / 1e6:.0f}M model", large)):
                best, median = min(times) * 1e3, statistics.median(times) * 1e3
                print(f"push-to-serving, {label} (4 ingredients): best {best:7.1f} ms, median {median:7.1f} ms")

            samples: list[float] = []
            recording = threading.Event()
            stop = threading.Event()

            def traffic() -> None:
                caller = grpcclient.InferenceServerClient(address)
                while not stop.is_set():
                    started = time.perf_counter()
                    infer_version(caller, "digits")
                    if recording.is_set():
                        samples.append(time.perf_counter() - started)
                caller.close()

            thread = threading.Thread(target=traffic)
            thread.start()
            time.sleep(0.5)
            recording.set()
            time.sleep(args.steady)
            recording.clear()
            steady = list(samples)
            samples.clear()
            recording.set()
            burst_started = time.perf_counter()
            for k in range(args.swaps):
                soups.push(document("big", args.hidden, big, 10 + k), wait=True)
            burst_s = time.perf_counter() - burst_started
            recording.clear()
            burst = list(samples)
            samples.clear()
            ready = context.Event()
            spinner = context.Process(target=spin, args=(burst_s, ready), daemon=True)
            spinner.start()
            ready.wait(60)
            recording.set()
            spinner.join()
            recording.clear()
            stop.set()
            thread.join()
            background = list(samples)
            (s50, s99), (b50, b99), (g50, g99) = percentiles(steady), percentiles(burst), percentiles(background)
            print(f"latency of 'digits', steady:           p50 {s50:6.2f} ms  p99 {s99:6.2f} ms  ({len(steady)} requests)")
            print(
                f"latency of 'digits', during {args.swaps} swaps:  p50 {b50:6.2f} ms  p99 {b99:6.2f} ms  "
                f"({len(burst)} requests in {burst_s:.1f} s)"
            )
            print(
                f"latency of 'digits', idle-priority spin: p50 {g50:6.2f} ms  p99 {g99:6.2f} ms  "
                f"({len(background)} requests, one core busy in another process)"
            )
            print(f"p99 during swaps / steady p99: {b99 / s99:.2f}")
            print(f"p99 beside the idle-priority spin / steady p99: {g99 / s99:.2f} (this machine's floor)")
            soups.close()
            client.close()
        finally:
            server.terminate()
            server.join(timeout=10)


if __name__ == "__main__":
    main()
