"""Faults of the model, the request or the spec: each gets its status and nothing else breaks."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import save_file
from tritonclient.grpc import service_pb2 as pb
from tritonclient.utils import InferenceServerException

from helpers import digits_spec, running_app, write_ingredients, write_spec
from tureen.errors import ArchitectureError, InvalidRequest, SoupError
from tureen.spec import load_spec
from tureen.transport.grpc.codec import decode_infer_request


def tiny_spec(folder: Path, factory: str, model: str) -> Path:
    for i in range(2):
        save_file({"scale": torch.full((3,), 1.0 + i)}, str(folder / f"s{i}.safetensors"))
    document = {
        "apiVersion": "tureen/v1",
        "model": model,
        "architecture": {"factory": factory},
        "ingredients": [{"name": f"s{i}", "path": f"s{i}.safetensors"} for i in range(2)],
    }
    return write_spec(folder, document, f"{model}.yaml")


def call(client: grpcclient.InferenceServerClient, model: str, x: np.ndarray) -> np.ndarray:
    tensor = grpcclient.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return client.infer(model, [tensor]).as_numpy("y")


def failures(port: int, **labels: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "tureen_request_failure_total" and all(s.labels.get(k) == v for k, v in labels.items())
    )


def test_a_forward_that_writes_into_its_inputs_gets_copies(tmp_path: Path) -> None:
    spec = load_spec(tiny_spec(tmp_path, "archs:inplace", "inplace"))
    with running_app([spec]) as app, grpcclient.InferenceServerClient(f"127.0.0.1:{app.grpc_port}") as client:
        assert app.repository.active("inplace").copy_inputs
        x = np.array([[1.0, 2.0, 3.0]], dtype=np.float32)
        for _ in range(3):  # the mean scale is 1.5, and x doubles once per request, never twice
            assert call(client, "inplace", x).tolist() == [[3.0, 6.0, 9.0]]


def test_a_model_that_raises_is_internal_counted_and_keeps_serving(tmp_path: Path) -> None:
    spec = load_spec(tiny_spec(tmp_path, "archs:fragile", "fragile"))
    with running_app([spec]) as app, grpcclient.InferenceServerClient(f"127.0.0.1:{app.grpc_port}") as client:
        with pytest.raises(InferenceServerException) as caught:
            call(client, "fragile", np.ones((3, 3), dtype=np.float32))
        assert caught.value.status() == "StatusCode.INTERNAL"
        assert "tripped over a batch of three" in caught.value.message()
        assert failures(app.metrics_port, model="fragile", version="1", reason="internal") == 1
        stats = client.get_inference_statistics("fragile").model_stats[0].inference_stats
        assert stats.fail.count == 1
        assert call(client, "fragile", np.ones((2, 3), dtype=np.float32)).shape == (2, 3)


def test_unknown_models_are_counted_without_their_name(tmp_path: Path) -> None:
    spec = load_spec(tiny_spec(tmp_path, "archs:fragile", "fragile"))
    with running_app([spec]) as app, grpcclient.InferenceServerClient(f"127.0.0.1:{app.grpc_port}") as client:
        for name in ("made-up-1", "made-up-2"):
            with pytest.raises(InferenceServerException):
                call(client, name, np.ones((1, 3), dtype=np.float32))
        assert failures(app.metrics_port, model="", reason="not_found") == 2
        assert failures(app.metrics_port, model="made-up-1") == 0


def test_metadata_and_statistics_of_models_that_are_missing_or_not_ready(tmp_path: Path) -> None:
    write_ingredients(tmp_path, 2)
    spec = load_spec(write_spec(tmp_path, digits_spec(["ft-0", "ft-1"])))
    with running_app([spec], build=False) as app, grpcclient.InferenceServerClient(f"127.0.0.1:{app.grpc_port}") as c:
        for rpc in (c.get_model_metadata, c.get_model_config, c.get_inference_statistics):
            with pytest.raises(InferenceServerException) as caught:
                rpc("digits")
            assert caught.value.status() == "StatusCode.UNAVAILABLE"
            with pytest.raises(InferenceServerException) as caught:
                rpc("nope")
            assert caught.value.status() == "StatusCode.NOT_FOUND"
        app.build_all()
        (stats,) = c.get_inference_statistics("digits").model_stats
        assert (stats.name, stats.version, stats.execution_count) == ("digits", "1", 0)
        assert len(c.get_inference_statistics("").model_stats) == 1
        with pytest.raises(InferenceServerException) as caught:
            c.get_inference_statistics("digits", "2")
        assert caught.value.status() == "StatusCode.NOT_FOUND"


def test_outputs_that_do_not_fit_the_interface_fail_the_build(tmp_path: Path) -> None:
    write_ingredients(tmp_path, 2)
    interface = {
        "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [-1, 64]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 3]}],
    }
    spec = load_spec(write_spec(tmp_path, digits_spec(["ft-0", "ft-1"], interface=interface)))
    with running_app([spec], build=False) as app:
        with pytest.raises(
            ArchitectureError, match=r"spec for model 'digits': interface.outputs: 'logits' is declared \[-1, 3\]"
        ):
            app.build_all()
        assert not app.repository.is_ready("digits")


def test_startup_errors_name_the_spec_file(tmp_path: Path) -> None:
    write_ingredients(tmp_path, 2)
    document = digits_spec(["ft-0", "ft-1"])
    document["architecture"] = {"factory": "no_such_module:mlp"}
    path = write_spec(tmp_path, document, "broken.yaml")
    expected = r"^spec .*broken.yaml: architecture.factory: cannot import module 'no_such_module'"
    with running_app([load_spec(path)], build=False, sources=[str(path)]) as app, pytest.raises(SoupError, match=expected):
        app.build_all()


@pytest.mark.parametrize(
    ("datatype", "field", "values", "message"),
    [
        ("INT8", "int_contents", [300], "int_contents does not fit INT8"),
        ("UINT8", "uint_contents", [256], "uint_contents does not fit UINT8"),
        ("FP16", "fp32_contents", [1.0], "FP16 has no typed contents field"),
        ("STRING", "bytes_contents", [b"x"], "unsupported datatype 'STRING'"),
    ],
)
def test_typed_contents_that_do_not_fit_are_invalid(datatype: str, field: str, values: list, message: str) -> None:
    request = pb.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name="x", datatype=datatype, shape=[1])
    getattr(tensor.contents, field).extend(values)
    with pytest.raises(InvalidRequest, match=message):
        decode_infer_request(request)
