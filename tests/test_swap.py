"""Hot swaps under traffic, the operator API's answers to bad input, and bearer tokens.

A real server runs in this process on a free port; clients are ``tritonclient.grpc`` for
inference and ``tureen_client`` (the operator library) for the admin API.
"""

from __future__ import annotations

import json
import shutil
import ssl
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from safetensors.torch import save_file
from tritonclient.utils import InferenceServerException
from tureen_client import SoupClient, SoupClientError

from helpers import (
    digits_spec,
    hand_average,
    infer,
    mlp_logits,
    openssl,
    running_app,
    sample,
    scrape,
    write_ingredients,
    write_spec,
)
from tureen.spec import load_spec

NAMES = ["ft-0", "ft-1", "ft-2"]


def weights_of(k: int) -> dict[str, float]:
    """Version k's blend: a different weighting of the three ingredients for every k."""
    return {"ft-0": 1.0, "ft-1": 0.1 + 0.15 * k, "ft-2": 2.0 / (1 + k)}


def bare_forward(states: dict, weights: dict[str, float], x: np.ndarray) -> np.ndarray:
    return mlp_logits(hand_average(states, weights), torch.from_numpy(x), hidden=8).numpy()


@pytest.fixture
def soup(tmp_path: Path) -> tuple[Path, dict]:
    states = write_ingredients(tmp_path, 3)
    return tmp_path, states


def spec_file(folder: Path, k: int, **extra: Any) -> Path:
    return write_spec(folder, digits_spec(NAMES, merge={"weights": weights_of(k)}, **extra), f"v{k}.yaml")


@pytest.mark.parametrize("batching", [None, {"max_queue_delay_us": 2000}], ids=["one-forward-each", "dynamic-batching"])
def test_pushes_activations_and_rollbacks_under_load_fail_no_request_and_mix_no_blends(
    soup: tuple[Path, dict], batching: dict[str, Any] | None
) -> None:
    folder, states = soup
    x = np.random.default_rng(0).uniform(0, 16, size=(4, 64)).astype(np.float32)
    extra = {"serving": {"batching": batching}} if batching else {}
    with running_app([load_spec(spec_file(folder, 1, **extra))], keep_versions=2) as app:
        address = f"127.0.0.1:{app.grpc_port}"
        stop = threading.Event()
        seen: list[list[tuple[float, int, np.ndarray]]] = [[] for _ in range(8)]
        failures: list[str] = []

        def client_loop(i: int) -> None:
            client = grpcclient.InferenceServerClient(address)
            try:
                while not stop.is_set():
                    try:
                        version, logits = infer(client, x)
                    except InferenceServerException as exc:
                        failures.append(f"{exc.status()} {exc.message()}")
                        continue
                    seen[i].append((time.monotonic(), version, logits))
            finally:
                client.close()

        threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        weights = {1: weights_of(1)}
        backwards: list[float] = []  # when a rollback or an activation of an older version began
        with SoupClient(address) as soups:
            for k in range(2, 22):  # 20 pushes
                info = soups.push(spec_file(folder, k, **extra), wait=True)
                weights[int(info["version"])] = weights_of(k)
                assert info["state"] == "active"
                if k % 5 == 0:
                    backwards.append(time.monotonic())
                    soups.rollback("digits")
                if k % 7 == 0:
                    backwards.append(time.monotonic())
                    soups.activate("digits", int(info["version"]) - 3)
                    soups.activate("digits", int(info["version"]))
            time.sleep(0.2)
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
        with grpcclient.InferenceServerClient(address) as client:
            stats = client.get_inference_statistics("digits").model_stats

    assert failures == []
    requests = sum(s.inference_stats.success.count for s in stats)
    executions = sum(s.execution_count for s in stats)
    # Batched, the concurrent requests shared forwards (each batch on one version); else one each.
    assert executions < requests if batching else executions == requests
    expected = {version: bare_forward(states, w, x) for version, w in weights.items()}
    versions_seen = set()
    for responses in seen:
        assert responses, "a client got no response at all"
        for (at, version, _), (_, before, _) in zip(responses[1:], responses, strict=False):
            if version < before:
                assert any(t <= at for t in backwards), f"version went back from {before} to {version} without a rollback"
        for _, version, logits in responses:
            np.testing.assert_allclose(logits, expected[version], rtol=1e-4, atol=1e-5)
            versions_seen.add(version)
    assert len(versions_seen) >= 5  # traffic really flowed across swaps


def test_bad_pushes_and_actions_get_clear_statuses_and_the_blend_keeps_serving(soup: tuple[Path, dict]) -> None:
    folder, states = soup
    x = np.random.default_rng(1).uniform(0, 16, size=(2, 64)).astype(np.float32)
    with running_app([load_spec(spec_file(folder, 1))], ingredient_roots=(str(folder),)) as app:
        address = f"127.0.0.1:{app.grpc_port}"
        client = grpcclient.InferenceServerClient(address)
        soups = SoupClient(address)

        def refused(call: Any, code: grpc.StatusCode, *fragments: str) -> None:
            with pytest.raises(SoupClientError) as caught:
                call()
            assert caught.value.code == code, str(caught.value)
            for fragment in fragments:
                assert fragment in str(caught.value)
            version, logits = infer(client, x)  # still version 1, still right
            assert version == 1
            np.testing.assert_allclose(logits, bare_forward(states, weights_of(1), x), rtol=1e-4, atol=1e-5)

        bad = digits_spec(NAMES, merge={"weights": {"ft-0": 1.0, "ft-9": 1.0}})
        refused(lambda: soups.push(bad), grpc.StatusCode.INVALID_ARGUMENT, "merge.weights.ft-9")
        missing = digits_spec(["ft-0", "gone"])
        refused(lambda: soups.push(write_spec(folder, missing, "gone.yaml"), wait=True), grpc.StatusCode.NOT_FOUND, "'gone'")
        save_file({k: torch.full_like(v, float("nan")) for k, v in states["ft-0"].items()}, str(folder / "nan.safetensors"))
        nan = digits_spec(["ft-1", "nan"])
        refused(lambda: soups.push(write_spec(folder, nan, "nan.yaml"), wait=True), grpc.StatusCode.INVALID_ARGUMENT, "NaN")
        write_ingredients(folder / "wide", 1, hidden=9)
        wide = {**digits_spec(["ft-0"]), "ingredients": [{"name": "w", "path": "wide/ft-0.safetensors"}]}
        refused(lambda: soups.push(write_spec(folder, wide, "wide.yaml"), wait=True), grpc.StatusCode.INVALID_ARGUMENT, "shape")
        shown = {int(v["version"]): (v["state"], v["reason"]) for v in soups.versions("digits")}
        # A missing file may be this node's problem (another replica may have it): version 2 stays
        # "stored"; NaN and a wrong shape are the checkpoints' own: failed, with the reason.
        assert shown[2] == ("stored", "") and shown[3][0] == shown[4][0] == "failed"
        assert "NaN" in shown[3][1] and "shape" in shown[4][1]
        refused(lambda: soups.activate("digits", 3), grpc.StatusCode.FAILED_PRECONDITION, "failed to build")
        refused(lambda: soups.activate("digits", 2), grpc.StatusCode.NOT_FOUND, "'gone'")
        refused(lambda: soups.delete("digits", 1), grpc.StatusCode.FAILED_PRECONDITION, "version 1 is serving")
        refused(lambda: soups.rollback("digits"), grpc.StatusCode.FAILED_PRECONDITION, "no earlier active version")
        refused(lambda: soups.activate("digits", 99), grpc.StatusCode.NOT_FOUND, "no version 99")
        refused(lambda: soups.versions("nope"), grpc.StatusCode.NOT_FOUND, "'nope'")
        soups.delete("digits", 2)
        assert [int(v["version"]) for v in soups.versions("digits")] == [1, 3, 4]
        soups.close()
        client.close()


def test_admin_calls_need_the_token_and_inference_its_own(soup: tuple[Path, dict]) -> None:
    folder, _ = soup
    x = np.zeros((1, 64), dtype=np.float32)
    with running_app([load_spec(spec_file(folder, 1))], admin_token="s3cret", inference_token="let-me-in") as app:
        address = f"127.0.0.1:{app.grpc_port}"
        for token, fragment in ((None, "need 'authorization: Bearer"), ("wrong", "not valid for admin")):
            with SoupClient(address, token=token) as soups, pytest.raises(SoupClientError) as caught:
                soups.status()
            assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED and fragment in str(caught.value)
        with SoupClient(address, token="s3cret") as soups:
            assert soups.status()["models"][0]["active_version"] == "1"
            with pytest.raises(SoupClientError) as caught:  # the inference token is not an admin token
                SoupClient(address, token="let-me-in").status()
            assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
        client = grpcclient.InferenceServerClient(address)
        with pytest.raises(InferenceServerException) as refused:
            infer(client, x)
        assert "UNAUTHENTICATED" in str(refused.value.status())
        assert infer(client, x, headers={"authorization": "Bearer let-me-in"})[0] == 1
        assert client.is_server_live(headers={"authorization": "Bearer let-me-in"})
        client.close()


def test_tritonclient_load_model_pushes_a_spec_and_unload_stops_serving(soup: tuple[Path, dict]) -> None:
    folder, states = soup
    x = np.random.default_rng(2).uniform(0, 16, size=(2, 64)).astype(np.float32)
    with running_app([load_spec(spec_file(folder, 1))]) as app:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{app.grpc_port}")
        document = load_spec(spec_file(folder, 3)).model_dump(mode="json", by_alias=True, exclude_none=True)
        client.load_model("digits", config=json.dumps(document))
        version, logits = infer(client, x)
        assert version == 2
        np.testing.assert_allclose(logits, bare_forward(states, weights_of(3), x), rtol=1e-4, atol=1e-5)
        index = client.get_model_repository_index(as_json=True)["models"]
        assert index == [{"name": "digits", "version": "2", "state": "READY"}]
        client.unload_model("digits")
        assert not client.is_model_ready("digits")
        assert client.is_server_ready()  # unloaded on purpose: the replica stays in rotation
        client.load_model("digits")
        assert infer(client, x)[0] == 2
        client.close()


def test_a_model_pushed_later_does_not_hold_up_readiness_while_its_first_blend_builds(
    soup: tuple[Path, dict], tmp_path: Path
) -> None:
    folder, _ = soup
    slow = {**load_spec(spec_file(folder, 1)).model_dump(mode="json", by_alias=True, exclude_none=True)}
    slow.update(model="slow", architecture={"factory": "archs:slow_mlp", "kwargs": {"hidden": 8, "seconds": 2.0}})
    with running_app([load_spec(spec_file(folder, 1))], allow_factories=("archs:*",)) as app:
        address = f"127.0.0.1:{app.grpc_port}"
        with (
            SoupClient(address) as soups,
            grpcclient.InferenceServerClient(address) as client,
            grpc.insecure_channel(address) as channel,
        ):
            health = health_pb2_grpc.HealthStub(channel)
            soups.push(slow)  # returns once stored; builds for 2 s
            deadline = time.monotonic() + 10
            while soups.status("slow")["models"][0].get("building") is None and time.monotonic() < deadline:
                time.sleep(0.02)
            assert not client.is_model_ready("slow") and client.is_server_ready()
            assert health.Check(health_pb2.HealthCheckRequest(service="")).status == health_pb2.HealthCheckResponse.SERVING
            assert (
                health.Check(health_pb2.HealthCheckRequest(service="slow")).status == health_pb2.HealthCheckResponse.NOT_SERVING
            )
            while not client.is_model_ready("slow") and time.monotonic() < deadline:
                time.sleep(0.05)
            assert client.is_model_ready("slow") and client.is_server_ready()


def test_a_build_reuses_the_memory_of_the_blend_it_pushes_out_unless_a_request_still_holds_it(soup: tuple[Path, dict]) -> None:
    folder, states = soup
    x = np.random.default_rng(3).uniform(0, 16, size=(2, 64)).astype(np.float32)
    with running_app([load_spec(spec_file(folder, 1))], keep_versions=1) as app:
        address = f"127.0.0.1:{app.grpc_port}"
        first = app.repository.active("digits")
        pointer = first.weights["net.0.weight"].data_ptr()
        del first
        client = grpcclient.InferenceServerClient(address)
        with SoupClient(address) as soups:
            soups.push(spec_file(folder, 2), wait=True)  # v1 stays resident for rollback
            second = app.repository.active("digits")  # held here, as a request in flight would hold it
            held = second.weights["net.0.weight"].data_ptr()
            soups.push(spec_file(folder, 3), wait=True)  # pushes v1 out: v3 is merged into its memory
            assert app.repository.active("digits").weights["net.0.weight"].data_ptr() == pointer
            np.testing.assert_allclose(infer(client, x)[1], bare_forward(states, weights_of(3), x), rtol=1e-4, atol=1e-5)
            soups.push(spec_file(folder, 4), wait=True)  # would push v2 out, but v2 is still held
            assert app.repository.active("digits").weights["net.0.weight"].data_ptr() != held
            with torch.inference_mode():
                logits = second.module(torch.from_numpy(x))["logits"].numpy()
            np.testing.assert_allclose(logits, bare_forward(states, weights_of(2), x), rtol=1e-4, atol=1e-5)
        client.close()


def test_swaps_builds_and_failures_are_counted_in_the_metrics(soup: tuple[Path, dict]) -> None:
    folder, _ = soup
    with running_app([load_spec(spec_file(folder, 1))], keep_versions=1, ingredient_roots=(str(folder),)) as app:
        with SoupClient(f"127.0.0.1:{app.grpc_port}") as soups:
            soups.push(spec_file(folder, 2), wait=True)
            soups.rollback("digits")
            with pytest.raises(SoupClientError):
                soups.push(write_spec(folder, digits_spec(["ft-0", "gone"]), "gone.yaml"), wait=True)
        text = scrape(app)
        assert sample(text, "tureen_swaps_total", model="digits") == 3  # v1 at start, v2, back to v1
        assert sample(text, "tureen_builds_total", model="digits") == 2  # the rollback was a swap, no build
        assert sample(text, "tureen_build_failures_total", model="digits", reason="ingredient_missing") == 1
        assert sample(text, "tureen_active_version", model="digits") == 1
        assert sample(text, "tureen_resident_blend_memory_bytes", model="digits") == sample(
            text, "tureen_blend_memory_bytes", model="digits"
        )
        assert sample(text, "tureen_swap_duration_seconds_count", model="digits") == 3


def make_certificates(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl."""

    openssl(
        folder,
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "1",
        "-subj",
        "/CN=test-ca",
    )
    (folder / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name in ("server", "client"):
        openssl(
            folder,
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN={name}",
        )
        extra = ["-extfile", "san.ext"] if name == "server" else []
        openssl(
            folder,
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.pem",
            "-days",
            "1",
            *extra,
        )
    return {name: folder / name for name in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make certificates")
def test_tls_with_client_certificates_serves_both_apis_and_refuses_clients_without_one(soup: tuple[Path, dict]) -> None:
    folder, _ = soup
    certs = make_certificates(folder)
    read = {name: path.read_bytes() for name, path in certs.items()}
    settings = {"tls_cert": str(certs["server.pem"]), "tls_key": str(certs["server.key"]), "tls_client_ca": str(certs["ca.pem"])}
    with running_app([load_spec(spec_file(folder, 1))], **settings) as app:
        address = f"127.0.0.1:{app.grpc_port}"
        with (
            SoupClient(address, root_certificates=read["ca.pem"], timeout=10) as anonymous,
            pytest.raises(SoupClientError) as caught,
        ):
            anonymous.status()
        assert caught.value.code == grpc.StatusCode.UNAVAILABLE  # the handshake fails without a client certificate
        mutual = {"root_certificates": read["ca.pem"], "private_key": read["client.key"], "certificate_chain": read["client.pem"]}
        with SoupClient(address, **mutual) as soups:
            assert soups.push(spec_file(folder, 2), wait=True)["state"] == "active"
        client = grpcclient.InferenceServerClient(
            address,
            ssl=True,
            root_certificates=str(certs["ca.pem"]),
            private_key=str(certs["client.key"]),
            certificate_chain=str(certs["client.pem"]),
        )
        assert infer(client, np.zeros((1, 64), dtype=np.float32))[0] == 2
        client.close()
        # The HTTP port takes the same files: HTTPS, and only for clients with a certificate.
        url = f"https://127.0.0.1:{app.http_port}/v2/models/digits"
        context = ssl.create_default_context(cafile=str(certs["ca.pem"]))
        with pytest.raises(OSError):  # the handshake (or, on TLS 1.3, the first read) fails without one
            urllib.request.urlopen(url, context=context, timeout=10).read()
        context.load_cert_chain(str(certs["client.pem"]), str(certs["client.key"]))
        with urllib.request.urlopen(url, context=context, timeout=10) as response:
            assert json.loads(response.read())["versions"] == ["2"]


def test_no_room_for_a_second_blend_fails_the_push_unless_in_place(soup: tuple[Path, dict]) -> None:
    folder, states = soup
    x = np.random.default_rng(4).uniform(0, 16, size=(2, 64)).astype(np.float32)
    blend = sum(t.numel() * t.element_size() for t in states["ft-0"].values())  # float32, as the blend
    with running_app(
        [load_spec(spec_file(folder, 1))], blend_memory_bytes=blend + blend // 2, ingredient_roots=(str(folder),)
    ) as app:  # room for one
        address = f"127.0.0.1:{app.grpc_port}"
        client = grpcclient.InferenceServerClient(address)
        with SoupClient(address) as soups:
            with pytest.raises(SoupClientError) as caught:
                soups.push(spec_file(folder, 2), wait=True)
            assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert f"the blend needs {blend / 1024:.1f} KiB" in str(caught.value) and "--blend-memory-mb" in str(caught.value)
            assert infer(client, x)[0] == 1
            assert soups.push(spec_file(folder, 3), wait=True, in_place=True)["state"] == "active"
            version, logits = infer(client, x)
            assert version == 3
            np.testing.assert_allclose(logits, bare_forward(states, weights_of(3), x), rtol=1e-4, atol=1e-5)
            with pytest.raises(SoupClientError) as caught:  # an in-place build that fails brings the previous back
                soups.push(write_spec(folder, digits_spec(["ft-0", "gone"]), "gone.yaml"), wait=True, in_place=True)
            assert caught.value.code == grpc.StatusCode.NOT_FOUND
            assert infer(client, x)[0] == 3
        client.close()


def test_an_activation_waiting_for_the_builder_does_not_block_the_builds_queued_before_it(soup: tuple[Path, dict]) -> None:
    folder, _ = soup
    slow = {
        **digits_spec(NAMES, model="slow"),
        "architecture": {"factory": "archs:slow_mlp", "kwargs": {"hidden": 8, "seconds": 1.5}},
    }
    with (
        running_app([load_spec(spec_file(folder, 1))], keep_versions=1, allow_factories=("archs:*",)) as app,
        SoupClient(f"127.0.0.1:{app.grpc_port}", timeout=60) as soups,
    ):
        soups.push(spec_file(folder, 2), wait=True)
        soups.push(spec_file(folder, 3), wait=True)  # version 1 is no longer resident
        soups.push(write_spec(folder, slow, "slow.yaml"))  # the builder is busy for 1.5 s
        soups.push(spec_file(folder, 4))  # queued behind it: builds, then takes digits' lock to swap
        started = time.monotonic()
        assert soups.activate("digits", 1)["version"] == "1"  # its build queues behind both
        assert time.monotonic() - started < 30
        # Version 4 was swapped in first (its task was queued first), then version 1.
        assert app.repository.active("digits").version == 1
        assert {v["version"]: v["state"] for v in soups.versions("digits")}["4"] == "retired"
