"""KServe v2 over HTTP/REST with Triton's client (tritonclient.http), curl and perf_analyzer."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from helpers import ROOT, digits_spec, hand_average, mlp_logits, running_app, write_ingredients
from tureen.spec import parse_spec

NAMES = ["ft-0", "ft-1"]


@pytest.fixture
def soup(tmp_path: Path) -> tuple[Path, dict]:
    return tmp_path, write_ingredients(tmp_path, 2)


def spec_of(folder: Path, **extra: Any) -> Any:
    return parse_spec(digits_spec(NAMES, **extra), base_dir=folder)


def post(port: int, path: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """A raw POST (no client library), for the bodies tritonclient would never send."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, headers=headers or {}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_tritonclient_http_infers_with_binary_and_json_tensors_and_reads_metadata(soup: tuple[Path, dict]) -> None:
    folder, states = soup
    expected_state = hand_average(states, {"ft-0": 1.0, "ft-1": 1.0})
    x = np.random.default_rng(0).uniform(0, 16, size=(3, 64)).astype(np.float32)
    reference = mlp_logits(expected_state, torch.from_numpy(x), hidden=8).numpy()
    with running_app([spec_of(folder, serving={"batching": {"preferred_batch_sizes": [4]}})]) as app:
        client = httpclient.InferenceServerClient(f"127.0.0.1:{app.http_port}")
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("digits")
        assert not client.is_model_ready("nope")
        assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
        metadata = client.get_model_metadata("digits")
        assert metadata["versions"] == ["1"] and metadata["inputs"] == [{"name": "pixels", "datatype": "FP32", "shape": [-1, 64]}]
        config = client.get_model_config("digits")
        assert config["max_batch_size"] == 1024 and config["input"][0]["dims"] == [64]
        assert config["dynamic_batching"]["preferred_batch_size"] == [4]
        for binary_in in (True, False):
            for binary_out in (True, False):
                tensor = httpclient.InferInput("pixels", list(x.shape), "FP32")
                tensor.set_data_from_numpy(x, binary_data=binary_in)
                outputs = [httpclient.InferRequestedOutput("logits", binary_data=binary_out)]
                result = client.infer("digits", [tensor], outputs=outputs, request_id="r1")
                np.testing.assert_allclose(result.as_numpy("logits"), reference, rtol=1e-5, atol=1e-5)
                response = result.get_response()
                assert (response["model_version"], response["id"]) == ("1", "r1")
                assert [o["name"] for o in response["outputs"]] == ["logits"]  # only what was asked for
        every = client.infer("digits", [tensor])  # no outputs named: all of them, binary
        assert every.as_numpy("probabilities").shape == (3, 10)
        pinned = client.infer("digits", [tensor], model_version="1")
        np.testing.assert_allclose(pinned.as_numpy("logits"), reference, rtol=1e-5, atol=1e-5)
        stats = client.get_inference_statistics("digits")["model_stats"][0]
        assert stats["inference_stats"]["success"]["count"] == 6 and stats["inference_count"] == 18
        assert stats["inference_stats"]["fail"] == {"count": 0, "ns": 0}
        assert sum(b["compute_infer"]["count"] for b in stats["batch_stats"]) == stats["execution_count"]
        assert client.get_inference_statistics()["model_stats"][0]["name"] == "digits"
        client.close()


def test_bad_requests_get_the_v2_error_body_and_the_right_status(soup: tuple[Path, dict]) -> None:
    folder, _ = soup
    with running_app([spec_of(folder)]) as app:
        port = app.http_port
        infer = "/v2/models/digits/infer"
        ok = {"inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64}]}
        header = json.dumps({"inputs": [{**ok["inputs"][0], "data": None, "parameters": {"binary_data_size": 256}}]})
        header = header.replace('"data": null, ', "")
        assert post(port, infer, json.dumps(ok).encode())[0] == 200
        cases: list[tuple[str, bytes, dict[str, str], int, str]] = [
            (infer, b"{not json", {}, 400, "request body: not valid JSON"),
            (infer, b"[]", {}, 400, "request body: expected a JSON object"),
            (infer, json.dumps({"inputs": []}).encode(), {}, 400, "inputs: expected a non-empty list"),
            (
                infer,
                json.dumps({"inputs": [{**ok["inputs"][0], "shape": [1, 32]}]}).encode(),
                {},
                400,
                "input 'pixels': data holds 64 values, shape [1, 32] needs 32",
            ),
            (
                infer,
                json.dumps({"inputs": [{**ok["inputs"][0], "shape": [2, 32]}]}).encode(),
                {},
                400,
                "input 'pixels': shape [2, 32] does not match the model's [-1, 64]",
            ),
            (
                infer,
                json.dumps({"inputs": [{**ok["inputs"][0], "datatype": "FP8"}]}).encode(),
                {},
                400,
                "input 'pixels': unsupported datatype 'FP8'",
            ),
            (
                infer,
                header.encode() + bytes(100),
                {"Inference-Header-Content-Length": str(len(header))},
                400,
                "input 'pixels': binary_data_size 256 does not fit the 100 bytes left",
            ),
            (infer, header.encode() + bytes(300), {"Inference-Header-Content-Length": "x"}, 400, "is not a number"),
            (
                infer,
                header.encode() + bytes(300),
                {"Inference-Header-Content-Length": str(len(header))},
                400,
                "44 bytes of binary data that no input claims",
            ),
            ("/v2/models/nope/infer", json.dumps(ok).encode(), {}, 404, "model 'nope' is not served here"),
            ("/v2/models/digits/versions/7/infer", json.dumps(ok).encode(), {}, 404, "version 7 is not loaded"),
            ("/v2/nowhere", b"", {}, 404, "POST /v2/nowhere: Not Found"),
            (
                "/v2/repository/models/digits/load",
                b'{"parameters": {"config": "{"}}',
                {},
                400,
                "parameters.config: not valid JSON",
            ),
        ]
        for path, body, headers, status, message in cases:
            got, document = post(port, path, body, headers)
            assert (got, message in document["error"]) == (status, True), (path, got, document)
        with pytest.raises(urllib.error.HTTPError) as wrong_method:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/models/digits/infer", timeout=10)
        assert wrong_method.value.code == 405 and "Method Not Allowed" in json.loads(wrong_method.value.read())["error"]


def test_the_repository_extension_loads_a_pushed_spec_and_unloads_it(soup: tuple[Path, dict]) -> None:
    folder, states = soup
    x = np.random.default_rng(2).uniform(0, 16, size=(2, 64)).astype(np.float32)
    weights = {"ft-0": 1.0, "ft-1": 4.0}
    document = digits_spec(NAMES, merge={"weights": weights})
    document["ingredients"] = [{"name": n, "path": str(folder / f"{n}.safetensors")} for n in NAMES]
    with running_app([spec_of(folder)]) as app:
        client = httpclient.InferenceServerClient(f"127.0.0.1:{app.http_port}")
        client.load_model("digits", config=json.dumps(document))
        tensor = httpclient.InferInput("pixels", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        result = client.infer("digits", [tensor])
        assert result.get_response()["model_version"] == "2"
        reference = mlp_logits(hand_average(states, weights), torch.from_numpy(x), hidden=8).numpy()
        np.testing.assert_allclose(result.as_numpy("logits"), reference, rtol=1e-5, atol=1e-5)
        assert client.get_model_repository_index() == [{"name": "digits", "version": "2", "state": "READY"}]
        client.unload_model("digits")
        assert not client.is_model_ready("digits")
        with pytest.raises(InferenceServerException) as caught:
            client.infer("digits", [tensor])
        assert caught.value.status() == "503" and "has no ready blend" in caught.value.message()
        client.load_model("digits")  # no config: the active version serves again
        assert client.is_model_ready("digits")
        with pytest.raises(InferenceServerException) as wrong:
            client.load_model("other", config=json.dumps(document))
        assert wrong.value.status() == "400" and "but the model to load is 'other'" in wrong.value.message()
        client.close()


def test_tokens_guard_http_like_grpc_and_health_stays_open(soup: tuple[Path, dict]) -> None:
    folder, _ = soup
    with running_app([spec_of(folder)], admin_token="s3cret", inference_token="let-me-in") as app:
        client = httpclient.InferenceServerClient(f"127.0.0.1:{app.http_port}")
        assert client.is_server_live() and client.is_server_ready()  # probes need no secret
        with pytest.raises(InferenceServerException) as caught:
            client.get_model_metadata("digits")
        assert caught.value.status() == "401" and "inference calls need" in caught.value.message()
        assert client.get_model_metadata("digits", headers={"authorization": "Bearer let-me-in"})["name"] == "digits"
        with pytest.raises(InferenceServerException) as admin:
            client.unload_model("digits", headers={"authorization": "Bearer let-me-in"})
        assert admin.value.status() == "401" and "not valid for admin" in admin.value.message()
        client.unload_model("digits", headers={"authorization": "Bearer s3cret"})
        client.close()


def test_a_body_over_the_message_limit_is_refused_before_it_is_read(soup: tuple[Path, dict]) -> None:
    folder, _ = soup
    with running_app([spec_of(folder)], max_message_bytes=1024) as app:
        status, document = post(app.http_port, "/v2/models/digits/infer", b"{" + b" " * 4096 + b"}")
        # No Content-Length to go by: a chunked body is counted as it arrives.
        connection = http.client.HTTPConnection("127.0.0.1", app.http_port, timeout=30)
        connection.request("POST", "/v2/models/digits/infer", body=iter([b"{", b" " * 4096, b"}"]), encode_chunked=True)
        chunked = connection.getresponse()
        chunked_status, chunked_document = chunked.status, json.loads(chunked.read())
        connection.close()
    assert status == 413 and "over 1024 bytes" in document["error"]
    assert chunked_status == 413 and "over 1024 bytes" in chunked_document["error"]


def test_curl_calls_the_model_as_the_readme_shows(soup: tuple[Path, dict]) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    folder, states = soup
    shown = next(
        line
        for line in (ROOT / "README.md").read_text().splitlines()
        if line.startswith("curl -s localhost:8000/v2/models/digits/infer")
    )
    sent = json.loads((ROOT / "clients" / "digits_request.json").read_text())
    with running_app([spec_of(folder)]) as app:
        command = [
            curl if word == "curl" else word for word in shown.replace("localhost:8000", f"127.0.0.1:{app.http_port}").split()
        ]
        done = subprocess.run(command, capture_output=True, text=True, timeout=30, cwd=ROOT)
    answer = json.loads(done.stdout)
    (logits,) = answer["outputs"]
    pixels = torch.tensor(sent["inputs"][0]["data"], dtype=torch.float32)
    reference = mlp_logits(hand_average(states, {"ft-0": 1.0, "ft-1": 1.0}), pixels, hidden=8)
    np.testing.assert_allclose(np.array(logits["data"]).reshape(2, 10), reference.numpy(), rtol=1e-5, atol=1e-5)
    assert (answer["model_version"], answer["id"], logits["name"], logits["shape"]) == ("1", "digit-0", "logits", [2, 10])


def perf_analyzer() -> list[str] | None:
    """The perf_analyzer command (``$TUREEN_PERF_ANALYZER``, else on PATH), or None."""
    found = os.environ.get("TUREEN_PERF_ANALYZER") or shutil.which("perf_analyzer")
    return [found] if found and Path(found).exists() else None


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_perf_analyzer_drives_the_server_over_both_protocols(soup: tuple[Path, dict], protocol: str) -> None:
    command = perf_analyzer()
    if command is None:
        pytest.skip("perf_analyzer is not installed (set TUREEN_PERF_ANALYZER; .ci/run installs it from tritonclient 2.51)")
    folder, _ = soup
    with running_app([spec_of(folder, serving={"batching": {}})]) as app:
        port = app.grpc_port if protocol == "grpc" else app.http_port
        args = ["-m", "digits", "-i", protocol, "-u", f"127.0.0.1:{port}", "--shape", "pixels:64"]
        args += ["--concurrency-range", "4", "--request-count", "200", "-s", "1000"]
        done = subprocess.run([*command, *args], capture_output=True, text=True, timeout=300)
        client = httpclient.InferenceServerClient(f"127.0.0.1:{app.http_port}")
        stats = client.get_inference_statistics("digits")["model_stats"][0]
        client.close()
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Throughput:" in done.stdout and "Server:" in done.stdout  # it read our statistics too
    assert stats["inference_stats"]["success"]["count"] >= 200 and stats["inference_stats"]["fail"]["count"] == 0
