"""The `tureen` command as users run it: serve, merge, and one-line errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import numpy as np
import torch
import tritonclient.grpc as grpcclient
from safetensors.torch import load_file, save_file
from tureen_client import SoupClient

from helpers import digits_spec, hand_average, serve_process, write_ingredients, write_spec
from tureen.demo.train import load_split


def tureen(*args: str) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory(prefix="tureen-test-store-") as store:  # never the user's own store
        env = {**os.environ, "TUREEN_STORE": store}
        return subprocess.run([sys.executable, "-m", "tureen", *args], capture_output=True, text=True, timeout=120, env=env)


def assert_one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("tureen: error:")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in errors[0]


def test_merge_exports_the_hand_computed_average(tmp_path: Path) -> None:
    states = write_ingredients(tmp_path, 3)
    weights = {"ft-0": 1.0, "ft-1": 2.0, "ft-2": 5.0}
    document = digits_spec(list(states), merge={"weights": weights})
    del document["architecture"]  # the offline export does not need one
    spec = write_spec(tmp_path, document)
    result = tureen("merge", str(spec), "-o", str(tmp_path / "out.safetensors"), "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["ingredients"] == 3 and summary["method"] == "linear"
    merged = load_file(str(tmp_path / "out.safetensors"))
    expected = hand_average(states, weights)
    assert set(merged) == set(expected)
    for key, tensor in merged.items():
        assert tensor.dtype == torch.float32
        assert (tensor.double() - expected[key]).abs().max() < 1e-6


def test_a_merge_that_fails_midway_leaves_no_output_file(tmp_path: Path) -> None:
    # The output is written while the merge runs; a NaN in the last tensor fails it after the
    # first tensors were written, and neither the file nor its partial copy remains.
    states = write_ingredients(tmp_path, 2)
    last = list(states["ft-1"])[-1]
    save_file({**states["ft-1"], last: torch.full_like(states["ft-1"][last], float("nan"))}, str(tmp_path / "ft-1.safetensors"))
    document = digits_spec(list(states))
    del document["architecture"]
    result = tureen("merge", str(write_spec(tmp_path, document)), "-o", str(tmp_path / "out.safetensors"))
    assert result.returncode != 0 and f"tensor {last!r} holds" in result.stderr
    assert not [p.name for p in tmp_path.iterdir() if "out.safetensors" in p.name]


def test_merge_casts_to_the_spec_dtype(tmp_path: Path) -> None:
    states = write_ingredients(tmp_path, 2)
    spec = write_spec(tmp_path, digits_spec(list(states), dtype="bfloat16"))
    assert tureen("merge", str(spec), "-o", str(tmp_path / "bf16.safetensors")).returncode == 0
    merged = load_file(str(tmp_path / "bf16.safetensors"))
    expected = hand_average(states, {"ft-0": 1, "ft-1": 1})
    for key, tensor in merged.items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, expected[key].float().to(torch.bfloat16))


def test_bad_specs_and_checkpoints_are_one_line_errors(tmp_path: Path) -> None:
    write_ingredients(tmp_path, 2)
    bad_weights = write_spec(tmp_path, digits_spec(["ft-0", "ft-1"], merge={"weights": {"ft-0": 1, "ft-c": 1}}), "w.yaml")
    assert_one_line_error(tureen("serve", "--spec", str(bad_weights)), "w.yaml", "merge.weights.ft-c: no ingredient named 'ft-c'")
    missing = write_spec(tmp_path, digits_spec(["ft-0", "gone"]), "m.yaml")
    assert_one_line_error(
        tureen("serve", "--spec", str(missing), "--grpc-port", "0", "--metrics-port", "0"),
        "ingredient 'gone'",
        "gone.safetensors",
        "file not found",
    )
    poisoned = {**load_file(str(tmp_path / "ft-0.safetensors")), "net.0.weight": torch.full((8, 64), float("nan"))}
    save_file(poisoned, str(tmp_path / "nan.safetensors"))
    nan = write_spec(tmp_path, digits_spec(["ft-0", "nan"]), "n.yaml")
    assert_one_line_error(
        tureen("merge", str(nan), "-o", str(tmp_path / "x.safetensors")), "nan.safetensors", "'net.0.weight'", "NaN"
    )
    write_ingredients(tmp_path / "wide", 1, hidden=9)
    shape = write_spec(
        tmp_path, {**digits_spec(["ft-0"]), "ingredients": [{"name": "w", "path": "wide/ft-0.safetensors"}]}, "s.yaml"
    )
    assert_one_line_error(
        tureen("serve", "--spec", str(shape), "--grpc-port", "0", "--metrics-port", "0"),
        "ingredient 'w'",
        "has shape",
        "the architecture has",
    )
    assert_one_line_error(tureen("serve"), "nothing to serve")


def test_serve_a_spec_then_stop_on_sigterm(tmp_path: Path) -> None:
    write_ingredients(tmp_path, 2)
    spec = write_spec(tmp_path, digits_spec(["ft-0", "ft-1"], model="tiny"))
    with serve_process(["--spec", str(spec)]) as (process, grpc_port, metrics_port, _lines):
        with grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}") as client:
            tensor = grpcclient.InferInput("pixels", [1, 64], "FP32")
            tensor.set_data_from_numpy(np.zeros((1, 64), dtype=np.float32))
            assert client.infer("tiny", [tensor]).as_numpy("logits").shape == (1, 10)
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
            assert 'tureen_request_success_total{model="tiny",version="1"} 1.0' in response.read().decode()
    assert process.returncode == 0


def test_the_demo_trains_once_then_serves_a_real_soup_from_its_cache(tmp_path: Path) -> None:
    demo_dir = tmp_path / "demo"
    for run in ("first", "cached"):
        # The budget: answering tritonclient within 60 s of the command, on 2 cores.
        with serve_process(["--demo", "--demo-dir", str(demo_dir)], timeout=60) as (_process, grpc_port, _metrics, lines):
            log = "".join(lines)
            assert ("first run, training" in log) == (run == "first"), run
            for name in ("ft-lr1e-3-s1", "ft-lr1e-3-s5"):
                assert re.search(rf"ingredient {name} +0\.\d{{4}}  1\n", log), name
            assert re.search(r"uniform soup \(version 1\) +0\.\d{4}  1\n", log)
            assert re.search(r"greedy soup \(version 2\) +0\.\d{4}  1\n", log)
            assert re.search(r"ensemble of 5 ingredients +0\.\d{4}  5\n", log)
            assert re.search(r"the greedy soup (beats|matches|does not beat) the best single fine-tune", log)
            assert f'InferenceServerClient("127.0.0.1:{grpc_port}")' in log  # how to call it

            pixels, labels = load_split(demo_dir, "test")
            with grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}") as client:
                tensor = grpcclient.InferInput("pixels", list(pixels.shape), "FP32")
                tensor.set_data_from_numpy(pixels.numpy())
                predicted = client.infer("digits", [tensor]).as_numpy("logits").argmax(axis=1)
            assert float(np.mean(predicted == labels.numpy())) > 0.9
            with SoupClient(f"127.0.0.1:{grpc_port}") as soups:  # the cached run finds the store's version 2 active
                shown = {int(v["version"]): v["state"] for v in soups.versions("digits")}
            assert shown == {1: "retired", 2: "active"}, shown


def test_each_demo_folder_keeps_its_own_store(tmp_path: Path) -> None:
    """Without --store, a demo's versions live in its folder: a store seeded from another demo
    folder would name that folder's files, which this demo may not read."""
    environ = {k: v for k, v in os.environ.items() if k != "TUREEN_STORE"}
    environ["XDG_STATE_HOME"] = str(tmp_path / "state")  # where the default store would be
    for folder in ("one", "two"):
        demo_dir = tmp_path / folder
        with (
            serve_process(["--demo", "--demo-dir", str(demo_dir)], timeout=60, environ=environ) as (_p, grpc_port, _m, _l),
            SoupClient(f"127.0.0.1:{grpc_port}") as soups,
        ):
            shown = {int(v["version"]): v["state"] for v in soups.versions("digits")}
        assert shown == {1: "retired", 2: "active"}, (folder, shown)
        assert (demo_dir / "store" / "models" / "digits" / "active.json").is_file(), folder
    assert not (tmp_path / "state").exists()


def test_a_broken_demo_cache_is_rebuilt(tmp_path: Path) -> None:
    demo_dir = tmp_path / "demo"
    demo_dir.mkdir()
    (demo_dir / "demo.json").write_text("{ truncated")
    with serve_process(["--demo", "--demo-dir", str(demo_dir)], timeout=60) as (_process, _port, _metrics, lines):
        assert "first run, training" in "".join(lines)
    (demo_dir / "test.safetensors").unlink()
    with serve_process(["--demo", "--demo-dir", str(demo_dir)], timeout=60) as (_process, _port, _metrics, lines):
        assert "first run, training" in "".join(lines)
