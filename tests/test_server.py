"""The real server on port 0, called over a real channel with Triton's own client."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from tritonclient.grpc import model_config_pb2, service_pb2_grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.utils import InferenceServerException

from helpers import digits_spec, hand_average, running_app, sample, scrape, write_ingredients, write_spec
from tureen.app import App
from tureen.demo.models import DigitsMLP
from tureen.spec import load_spec

WEIGHTS = {"ft-0": 0.5, "ft-1": 0.3, "ft-2": 0.2}


@pytest.fixture(scope="module")
def soup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[App, dict]]:
    folder = tmp_path_factory.mktemp("soup")
    states = write_ingredients(folder, 3)
    spec = load_spec(write_spec(folder, digits_spec(list(states), merge={"weights": WEIGHTS})))
    with running_app([spec], max_message_bytes=1024 * 1024) as app:
        yield app, states


@pytest.fixture()
def client(soup: tuple[App, dict]) -> Iterator[grpcclient.InferenceServerClient]:
    app, _ = soup
    with grpcclient.InferenceServerClient(f"127.0.0.1:{app.grpc_port}") as c:
        yield c


@pytest.fixture()
def stub(soup: tuple[App, dict]) -> Iterator[service_pb2_grpc.GRPCInferenceServiceStub]:
    app, _ = soup
    with grpc.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def pixels(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 16, size=(batch, 64)).astype(np.float32)


def infer_input(array: np.ndarray, name: str = "pixels", datatype: str = "FP32") -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def bare_forward(states: dict, x: np.ndarray) -> dict[str, np.ndarray]:
    """A plain torch forward of the hand-merged weights: what the server must reproduce."""
    module = DigitsMLP(hidden=8)
    module.load_state_dict({k: v.float() for k, v in hand_average(states, WEIGHTS).items()})
    with torch.inference_mode():
        return {k: v.numpy() for k, v in module(torch.from_numpy(x)).items()}


def status_of(call, *args, **kwargs) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(InferenceServerException) as caught:
        call(*args, **kwargs)
    return f"{caught.value.status()} {caught.value.message()}"


def test_server_and_model_metadata(client: grpcclient.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("digits") and client.is_model_ready("digits", "1")
    assert not client.is_model_ready("digits", "2") and not client.is_model_ready("nope")
    server = client.get_server_metadata()
    assert server.name == "tureen" and "statistics" in server.extensions
    meta = client.get_model_metadata("digits")
    assert meta.name == "digits" and list(meta.versions) == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("pixels", "FP32", [-1, 64])]
    assert [(t.name, list(t.shape)) for t in meta.outputs] == [("logits", [-1, 10]), ("probabilities", [-1, 10])]


def test_model_config_carries_what_perf_analyzer_reads(client: grpcclient.InferenceServerClient) -> None:
    config = client.get_model_config("digits").config
    assert config.name == "digits" and config.max_batch_size == 1024
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [("pixels", model_config_pb2.TYPE_FP32, [64])]
    assert [(o.name, list(o.dims)) for o in config.output] == [("logits", [10]), ("probabilities", [10])]


def test_served_outputs_equal_a_bare_forward_of_the_merged_weights(
    soup: tuple[App, dict], client: grpcclient.InferenceServerClient
) -> None:
    _, states = soup
    x = pixels(5)
    result = client.infer("digits", [infer_input(x)], request_id="req-42")
    response = result.get_response()
    assert response.id == "req-42" and response.model_version == "1"
    expected = bare_forward(states, x)
    for name in ("logits", "probabilities"):
        served = result.as_numpy(name)
        assert served.shape == (5, 10)
        assert np.abs(served - expected[name]).max() < 1e-5


def test_only_requested_outputs_come_back(client: grpcclient.InferenceServerClient) -> None:
    wanted = [grpcclient.InferRequestedOutput("probabilities")]
    response = client.infer("digits", [infer_input(pixels(2))], outputs=wanted).get_response()
    assert [o.name for o in response.outputs] == ["probabilities"]
    assert "no such output" in status_of(
        client.infer, "digits", [infer_input(pixels(2))], outputs=[grpcclient.InferRequestedOutput("nope")]
    )


def test_typed_contents_give_the_same_answer_as_raw(soup: tuple[App, dict], stub) -> None:  # type: ignore[no-untyped-def]
    _, states = soup
    x = pixels(3, seed=1)
    request = pb.ModelInferRequest(model_name="digits", id="typed")
    tensor = request.inputs.add(name="pixels", datatype="FP32", shape=[3, 64])
    tensor.contents.fp32_contents.extend(x.reshape(-1).tolist())
    response = stub.ModelInfer(request)
    logits = np.frombuffer(response.raw_output_contents[0], dtype=np.float32).reshape(3, 10)
    assert response.outputs[0].name == "logits"
    assert np.abs(logits - bare_forward(states, x)["logits"]).max() < 1e-5


def test_bad_requests_get_their_status_and_the_server_keeps_serving(client: grpcclient.InferenceServerClient, stub) -> None:  # type: ignore[no-untyped-def]
    x = pixels(2)
    assert status_of(client.infer, "nope", [infer_input(x)]).startswith("StatusCode.NOT_FOUND model 'nope'")
    assert status_of(client.infer, "digits", [infer_input(x)], model_version="7").startswith("StatusCode.NOT_FOUND")
    assert "StatusCode.INVALID_ARGUMENT input 'pixel': the model has no such input" in status_of(
        client.infer, "digits", [infer_input(x, name="pixel")]
    )
    assert "INVALID_ARGUMENT input 'pixels': datatype FP64 does not match the model's FP32" in status_of(
        client.infer, "digits", [infer_input(x.astype(np.float64), datatype="FP64")]
    )
    assert "INVALID_ARGUMENT input 'pixels': shape [2, 63] does not match the model's [-1, 64]" in status_of(
        client.infer, "digits", [infer_input(x[:, :63])]
    )
    assert "exceeds the model's max_batch_size 1024" in status_of(client.infer, "digits", [infer_input(pixels(1025))])
    request = pb.ModelInferRequest(model_name="digits", raw_input_contents=[b"\x00" * 12])
    request.inputs.add(name="pixels", datatype="FP32", shape=[1, 64])
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "raw data is 12 bytes, shape [1, 64] of FP32 needs 256" in caught.value.details()
    # 1 MiB is this server's message limit; 5000 x 64 floats is 1.28 MB.
    assert "RESOURCE_EXHAUSTED" in status_of(client.infer, "digits", [infer_input(pixels(5000))])
    assert client.infer("digits", [infer_input(x)]).as_numpy("logits").shape == (2, 10)


def test_rpcs_not_implemented_yet_say_so(client: grpcclient.InferenceServerClient, stub) -> None:  # type: ignore[no-untyped-def]
    assert status_of(client.get_cuda_shared_memory_status).startswith("StatusCode.UNIMPLEMENTED")
    # The stream is served: a bad request's error comes back in error_message and the stream goes on.
    replies = list(stub.ModelStreamInfer(iter([pb.ModelInferRequest(model_name="digits", id="empty")])))
    assert [(r.error_message, r.infer_response.id) for r in replies] == [
        ("input 'pixels': required by the model but not sent", "empty")
    ]


def test_statistics_count_requests_per_model_and_version(client: grpcclient.InferenceServerClient) -> None:
    before = client.get_inference_statistics("digits").model_stats[0]
    for _ in range(3):
        client.infer("digits", [infer_input(pixels(4))])
    after = client.get_inference_statistics("digits").model_stats[0]
    assert (after.name, after.version) == ("digits", "1")
    assert after.execution_count - before.execution_count == 3
    assert after.inference_count - before.inference_count == 12
    assert after.inference_stats.success.count - before.inference_stats.success.count == 3
    assert after.inference_stats.compute_infer.ns > before.inference_stats.compute_infer.ns
    assert status_of(client.get_inference_statistics, "nope").startswith("StatusCode.NOT_FOUND")


def test_health_and_reflection(soup: tuple[App, dict]) -> None:
    app, _ = soup
    with grpc.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService", "digits"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
            assert status == health_pb2.HealthCheckResponse.SERVING, service
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
        assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= services


def test_metrics_count_requests_by_model_version_and_reason(
    soup: tuple[App, dict], client: grpcclient.InferenceServerClient
) -> None:
    app, _ = soup
    before = scrape(app)
    for _ in range(2):
        client.infer("digits", [infer_input(pixels(1))])
    status_of(client.infer, "digits", [infer_input(pixels(1), name="wrong")])
    after = scrape(app)
    labels = {"model": "digits", "version": "1"}
    success = "tureen_request_success_total"
    assert sample(after, success, **labels) - sample(before, success, **labels) == 2
    failure = "tureen_request_failure_total"
    bad = {**labels, "reason": "invalid_argument"}
    assert sample(after, failure, **bad) - sample(before, failure, **bad) == 1
    count = "tureen_request_duration_seconds_count"
    assert sample(after, count, **labels) - sample(before, count, **labels) == 2
    assert sample(after, "tureen_compute_duration_seconds_sum", **labels) > 0
    assert sample(after, "tureen_active_version", model="digits") == 1
    assert sample(after, "tureen_build_duration_seconds_count", **labels) == 1
    assert sample(after, "tureen_ingredient_memory_bytes", placement="device", device="cpu") == 3 * sum(
        t.numel() * 4 for t in DigitsMLP(hidden=8).state_dict().values()
    )


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed (apt-get install prometheus)")
def test_promtool_finds_nothing_to_lint(soup: tuple[App, dict], client: grpcclient.InferenceServerClient) -> None:
    app, _ = soup
    client.infer("digits", [infer_input(pixels(1))])
    checked = subprocess.run(["promtool", "check", "metrics"], input=scrape(app), capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_a_model_without_a_blend_is_unavailable_until_built(tmp_path: Path) -> None:
    write_ingredients(tmp_path, 2)
    spec = load_spec(write_spec(tmp_path, digits_spec(["ft-0", "ft-1"])))
    with running_app([spec], build=False) as app:
        address = f"127.0.0.1:{app.grpc_port}"
        with grpcclient.InferenceServerClient(address) as c, grpc.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            check = health_pb2.HealthCheckRequest(service="")
            assert health.Check(check).status == health_pb2.HealthCheckResponse.NOT_SERVING
            alive = health_pb2.HealthCheckRequest(service="liveness")  # busy building, not dead
            assert health.Check(alive).status == health_pb2.HealthCheckResponse.SERVING
            assert c.is_server_live() and not c.is_server_ready() and not c.is_model_ready("digits")
            assert status_of(c.infer, "digits", [infer_input(pixels(1))]).startswith(
                "StatusCode.UNAVAILABLE model 'digits' has no ready blend yet"
            )
            app.build_all()
            assert health.Check(check).status == health_pb2.HealthCheckResponse.SERVING
            assert c.infer("digits", [infer_input(pixels(1))]).get_response().model_version == "1"
