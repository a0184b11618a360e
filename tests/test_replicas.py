"""Server processes sharing one store: replicas converge, and kill -9 loses nothing."""

from __future__ import annotations

import contextlib
import threading
import time
import zlib
from pathlib import Path

import grpc
import numpy as np
import tritonclient.grpc as grpcclient
from tureen_client import SoupClient, SoupClientError

from helpers import digits_spec, serve_process, write_ingredients, write_spec

NAMES = ["ft-0", "ft-1"]


def version_served(port: int, user: str | None = None) -> int:
    """The version answering a request (sent with parameter ``user`` when given)."""
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        tensor = grpcclient.InferInput("pixels", [1, 64], "FP32")
        tensor.set_data_from_numpy(np.zeros((1, 64), dtype=np.float32))
        parameters = {"user": user} if user is not None else None
        return int(client.infer("digits", [tensor], parameters=parameters).get_response().model_version)
    finally:
        client.close()


def wait_for_version(port: int, version: int, timeout: float = 20.0, user: str | None = None) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if version_served(port, user) == version:
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(f"port {port} still serves version {version_served(port, user)}, not {version}")


def test_three_replicas_sharing_a_store_converge_on_a_push_to_one(tmp_path: Path) -> None:
    write_ingredients(tmp_path, 2)
    first = write_spec(tmp_path, digits_spec(NAMES), "v1.yaml")
    second = write_spec(tmp_path, digits_spec(NAMES, merge={"weights": {"ft-0": 3.0, "ft-1": 1.0}}), "v2.yaml")
    store = str(tmp_path / "store")
    args = ["--spec", str(first), "--store", store, "--store-poll-seconds", "0.2"]
    with contextlib.ExitStack() as stack:
        ports = [stack.enter_context(serve_process(args))[1]]  # the first one seeds the store
        ports += [stack.enter_context(serve_process(args))[1] for _ in range(2)]
        assert [version_served(port) for port in ports] == [1, 1, 1]
        with SoupClient(f"127.0.0.1:{ports[1]}") as soups:
            assert soups.push(second, wait=True)["version"] == "2"
        lags = [wait_for_version(port, 2) for port in ports]
        assert max(lags) < 10.0
        with SoupClient(f"127.0.0.1:{ports[2]}") as soups:
            soups.rollback("digits")
        for port in ports:
            wait_for_version(port, 1)


def test_kill_9_during_a_push_and_a_build_loses_no_version_and_keeps_the_active_one(tmp_path: Path) -> None:
    write_ingredients(tmp_path, 2)
    fast = write_spec(tmp_path, digits_spec(NAMES), "fast.yaml")
    slow_arch = {"factory": "archs:slow_mlp", "kwargs": {"hidden": 8, "seconds": 5}}
    slow = write_spec(tmp_path, {**digits_spec(NAMES), "architecture": slow_arch}, "slow.yaml")
    other = write_spec(tmp_path, digits_spec(NAMES, merge={"weights": {"ft-0": 1.0, "ft-1": 4.0}}), "other.yaml")
    store = str(tmp_path / "store")
    args = ["--spec", str(fast), "--store", store, "--allow-factory", "archs:*"]

    with serve_process(args) as (process, port, _, _):
        errors: list[SoupClientError] = []

        def push_and_wait() -> None:
            try:
                with SoupClient(f"127.0.0.1:{port}") as soups:
                    soups.push(slow, wait=True)
            except SoupClientError as exc:
                errors.append(exc)

        pusher = threading.Thread(target=push_and_wait)
        pusher.start()
        time.sleep(1.5)  # stored, and building (the architecture takes 5 s to build)
        process.kill()
        process.wait()
        pusher.join(timeout=30)
        assert errors, "the push should have been cut off by the kill"
        assert errors[0].code == grpc.StatusCode.UNAVAILABLE, errors[0]

    with serve_process(args) as (process, port, _, _):
        assert version_served(port) == 1
        with SoupClient(f"127.0.0.1:{port}") as soups:
            listed = {int(v["version"]): v["state"] for v in soups.versions("digits")}
            assert listed == {1: "active", 2: "stored"}
            assert soups.push(other, wait=True)["version"] == "3"
        process.kill()  # right after the swap: the pointer to version 3 must have been durable
        process.wait()

    with serve_process(args) as (process, port, _, _):
        assert version_served(port) == 3
        with SoupClient(f"127.0.0.1:{port}") as soups:
            assert [int(v["version"]) for v in soups.versions("digits")] == [1, 2, 3]
            assert soups.rollback("digits")["version"] == "1"
        assert version_served(port) == 1


def test_a_store_that_cannot_be_written_is_a_one_line_error(tmp_path: Path) -> None:
    import subprocess
    import sys

    write_ingredients(tmp_path, 2)
    spec = write_spec(tmp_path, digits_spec(NAMES), "spec.yaml")
    store = tmp_path / "a-file"
    store.write_text("not a directory")  # unwritable as a store even for root, unlike a chmod
    result = subprocess.run(
        [sys.executable, "-m", "tureen", "serve", "--spec", str(spec), "--store", str(store)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith("tureen: error:")]
    assert len(lines) == 1 and f"--store {store}: not a writable directory" in lines[0], result.stderr


def test_a_canary_started_on_one_replica_routes_on_the_others_and_survives_a_restart(tmp_path: Path) -> None:
    write_ingredients(tmp_path, 2)
    first = write_spec(tmp_path, digits_spec(NAMES), "v1.yaml")
    sticky = {"rollout": {"canary": {"percent": 50, "sticky": "user"}}}
    canary = write_spec(tmp_path, digits_spec(NAMES, merge={"weights": {"ft-0": 3.0, "ft-1": 1.0}}, **sticky), "v2.yaml")
    # Sticky routing hashes the key (CRC-32, 10,000 buckets): one user the canary takes, one it leaves.
    taken = next(f"u{i}" for i in range(100) if zlib.crc32(f"u{i}".encode()) % 10_000 < 5_000)
    left = next(f"u{i}" for i in range(100) if zlib.crc32(f"u{i}".encode()) % 10_000 >= 5_000)
    store = str(tmp_path / "store")
    args = ["--spec", str(first), "--store", store, "--store-poll-seconds", "0.2"]
    with contextlib.ExitStack() as stack:
        ports = [stack.enter_context(serve_process(args))[1] for _ in range(2)]
        with SoupClient(f"127.0.0.1:{ports[0]}") as soups:
            assert soups.push(canary, wait=True)["version"] == "2"
        for port in ports:
            wait_for_version(port, 2, user=taken)
            assert version_served(port, user=left) == 1
        with SoupClient(f"127.0.0.1:{ports[1]}") as soups:
            status = soups.status("digits")["models"][0]
            assert (status["active_version"], status["canary_version"]) == ("1", "2")
    # Both gone; a fresh process on the same store routes to the canary again, until it is aborted.
    with serve_process(args) as (_process, port, _, _):
        assert (version_served(port, user=taken), version_served(port, user=left)) == (2, 1)
        with SoupClient(f"127.0.0.1:{port}") as soups:
            soups.abort_canary("digits")
            assert {v["version"]: v["state"] for v in soups.versions("digits")} == {"1": "active", "2": "ready"}
        assert version_served(port, user=taken) == 1
