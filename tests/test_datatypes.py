"""Datatypes over the wire: INT64, BOOL, INT32 and FP32 together, and FP16/BF16 blends."""

from __future__ import annotations

from pathlib import Path

import grpc
import ml_dtypes
import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from safetensors.torch import save_file
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from archs import Mixed
from helpers import digits_spec, hand_average, random_state, running_app, write_ingredients, write_spec
from tureen.demo.models import DigitsMLP
from tureen.spec import load_spec


def test_mixed_datatypes_raw_and_typed(tmp_path: Path) -> None:
    states = {}
    for i in range(2):
        states[f"m{i}"] = random_state(Mixed(), seed=i)
        save_file(states[f"m{i}"], str(tmp_path / f"m{i}.safetensors"))
    document = {
        "apiVersion": "tureen/v1",
        "model": "mixed",
        "architecture": {"factory": "archs:mixed"},
        "ingredients": [{"name": n, "path": f"{n}.safetensors"} for n in states],
    }
    spec = load_spec(write_spec(tmp_path, document))
    features = np.arange(12, dtype=np.float32).reshape(3, 4) / 10
    index = np.array([0, 4, 2], dtype=np.int64)
    mask = np.array([[True, False, True, True], [False] * 4, [True] * 4])
    reference = Mixed()
    reference.load_state_dict({k: v.to(states["m0"][k].dtype) for k, v in hand_average(states, {"m0": 1, "m1": 1}).items()})
    with torch.inference_mode():
        expected = reference(torch.from_numpy(features), torch.from_numpy(index), torch.from_numpy(mask))

    with running_app([spec]) as app, grpcclient.InferenceServerClient(f"127.0.0.1:{app.grpc_port}") as client:
        inputs = []
        for name, array, datatype in (("features", features, "FP32"), ("index", index, "INT64"), ("mask", mask, "BOOL")):
            tensor = grpcclient.InferInput(name, list(array.shape), datatype)
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        result = client.infer("mixed", inputs)
        assert np.abs(result.as_numpy("score") - expected["score"].numpy()).max() < 1e-5
        active = result.as_numpy("active")
        assert active.dtype == np.int32 and active.tolist() == [3, 0, 4]

        request = pb.ModelInferRequest(model_name="mixed")
        request.inputs.add(name="features", datatype="FP32", shape=[3, 4]).contents.fp32_contents.extend(
            features.ravel().tolist()
        )
        request.inputs.add(name="index", datatype="INT64", shape=[3]).contents.int64_contents.extend(index.tolist())
        request.inputs.add(name="mask", datatype="BOOL", shape=[3, 4]).contents.bool_contents.extend(mask.ravel().tolist())
        with grpc.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
            response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
            score = np.frombuffer(response.raw_output_contents[0], dtype=np.float32).reshape(3, 2)
            assert np.abs(score - expected["score"].numpy()).max() < 1e-5

            missing = pb.ModelInferRequest(model_name="mixed")
            missing.inputs.add(name="features", datatype="FP32", shape=[3, 4]).contents.fp32_contents.extend([0.0] * 12)
            with pytest.raises(grpc.RpcError) as caught:
                service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(missing)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "input 'index': required by the model but not sent" in caught.value.details()


@pytest.mark.parametrize(("dtype", "datatype", "tolerance"), [("float16", "FP16", 2e-3), ("bfloat16", "BF16", 2e-2)])
def test_16_bit_blends_take_16_bit_tensors(tmp_path: Path, dtype: str, datatype: str, tolerance: float) -> None:
    states = write_ingredients(tmp_path, 2)
    interface = {
        "inputs": [{"name": "pixels", "datatype": datatype, "shape": [-1, 64]}],
        "outputs": [{"name": "logits", "datatype": datatype, "shape": [-1, 10]}],
    }
    spec = load_spec(write_spec(tmp_path, digits_spec(list(states), dtype=dtype, interface=interface)))
    x = np.random.default_rng(0).uniform(0, 16, size=(4, 64)).astype(np.float32)
    reference = DigitsMLP(hidden=8)
    reference.load_state_dict({k: v.float() for k, v in hand_average(states, {"ft-0": 1, "ft-1": 1}).items()})
    with torch.inference_mode():
        expected = reference(torch.from_numpy(x))["logits"].numpy()

    with running_app([spec]) as app, grpcclient.InferenceServerClient(f"127.0.0.1:{app.grpc_port}") as client:
        tensor = grpcclient.InferInput("pixels", [4, 64], datatype)
        tensor.set_data_from_numpy(x.astype(np.float16 if datatype == "FP16" else ml_dtypes.bfloat16))
        logits = client.infer("digits", [tensor]).as_numpy("logits").astype(np.float32)
        assert logits.shape == (4, 10)
        scale = np.abs(expected).max()
        assert np.abs(logits - expected).max() < tolerance * scale
        assert app.repository.active("digits").module.net[0].weight.dtype == getattr(torch, dtype)
