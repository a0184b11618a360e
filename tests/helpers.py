"""Helpers for the tests: tiny checkpoints, specs, a server in-process, a server as a subprocess."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import tritonclient.grpc as grpcclient
import yaml
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import save_file

from tureen.app import App, Settings
from tureen.demo.models import DigitsMLP
from tureen.merge.methods import DECLARATIONS
from tureen.merge.registry import REGISTRY, TensorJob
from tureen.spec import SoupSpec

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def random_state(module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """A state dict shaped like ``module``'s, filled with seeded random floats (ints copied)."""
    generator = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(t.shape, generator=generator, dtype=torch.float32).to(t.dtype) if t.is_floating_point() else t.clone()
        for name, t in module.state_dict().items()
    }


def write_ingredients(folder: Path, count: int, hidden: int = 8, prefix: str = "ft") -> dict[str, dict[str, torch.Tensor]]:
    """Write ``count`` random DigitsMLP checkpoints as ``{prefix}-{i}.safetensors``; return their tensors."""
    folder.mkdir(parents=True, exist_ok=True)
    skeleton = DigitsMLP(hidden=hidden)
    states = {}
    for i in range(count):
        state = random_state(skeleton, seed=100 + i + (0 if prefix == "ft" else sum(map(ord, prefix)) * 1000))
        save_file(state, str(folder / f"{prefix}-{i}.safetensors"))
        states[f"{prefix}-{i}"] = state
    return states


def digits_spec(names: list[str], hidden: int = 8, model: str = "digits", **extra: Any) -> dict[str, Any]:
    """A spec document for DigitsMLP ingredients named ``names`` (files ``NAME.safetensors``)."""
    spec: dict[str, Any] = {
        "apiVersion": "tureen/v1",
        "model": model,
        "architecture": {"factory": "tureen.demo.models:mlp", "kwargs": {"hidden": hidden}},
        "ingredients": [{"name": n, "path": f"{n}.safetensors"} for n in names],
        "merge": {"method": "linear"},
    }
    spec.update(extra)
    return spec


def write_spec(folder: Path, document: Mapping[str, Any], name: str = "spec.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(dict(document), sort_keys=False))
    return path


def hand_average(states: Mapping[str, Mapping[str, torch.Tensor]], weights: Mapping[str, float]) -> dict[str, torch.Tensor]:
    """The normalized weighted average, computed in float64 by hand."""
    total = sum(weights.values())
    keys = next(iter(states.values())).keys()
    return {k: sum(states[n][k].double() * (w / total) for n, w in weights.items()) for k in keys}


@contextmanager
def running_app(specs: list[SoupSpec], build: bool = True, sources: list[str] | None = None, **settings: Any) -> Iterator[App]:
    """A real server in this process on free ports of 127.0.0.1; stopped and unbound on exit."""
    ports = {"grpc_port": 0, "http_port": 0, "metrics_port": 0, **settings}
    app = App(specs, Settings(host="127.0.0.1", device="cpu", **ports), sources)
    app.start()
    try:
        if build:
            app.build_all()
        yield app
    finally:
        app.stop(grace=0.5)


@contextmanager
def serve_process(
    args: list[str], timeout: float = 90.0, environ: dict[str, str] | None = None
) -> Iterator[tuple[subprocess.Popen[str], int, int, list[str]]]:
    """Run ``tureen serve ARGS`` on free ports until it logs "ready"; stop it (SIGTERM, then kill) on exit.

    A thread keeps draining the server's stderr into the returned list of lines, so the server
    never blocks on a full pipe and the test can read what it logged. ``environ`` replaces the
    server's environment (then no scratch store is added: the test chose where stores go).
    """
    base = os.environ if environ is None else environ
    env = {**base, "PYTHONPATH": os.pathsep.join([str(TESTS), base.get("PYTHONPATH", "")])}
    scratch = None
    if "--store" not in args and environ is None:  # never the user's own store
        scratch = tempfile.TemporaryDirectory(prefix="tureen-test-store-")
        args = [*args, "--store", scratch.name]
    command = [sys.executable, "-m", "tureen", "serve", *args, "--host", "127.0.0.1", "--grpc-port", "0"]
    command += [] if "--http-port" in args else ["--http-port", "0"]
    command += ["--metrics-port", "0"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    lines: list[str] = []
    arrived: queue.Queue[str | None] = queue.Queue()

    def drain() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            lines.append(line)
            arrived.put(line)
        arrived.put(None)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        grpc_port = metrics_port = 0
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = arrived.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError("server not ready in time:\n" + "".join(lines)) from None
            if line is None:
                raise AssertionError("server exited before it was ready:\n" + "".join(lines))
            if found := re.search(r"gRPC .* on [\d.]+:(\d+)", line):
                grpc_port = int(found.group(1))
            if found := re.search(r"metrics on http://[\d.]+:(\d+)", line):
                metrics_port = int(found.group(1))
            if "ready:" in line:
                break
        yield process, grpc_port, metrics_port, lines
    finally:
        stop(process)
        reader.join(timeout=5)
        if scratch is not None:
            scratch.cleanup()


def combine(
    method: str,
    tensors: list[torch.Tensor],
    base: torch.Tensor | None = None,
    name: str = "layers.0.w",
    compiled: bool = False,
    **values: Any,
) -> torch.Tensor:
    """Call the registered method on one tensor the way the recipe does, with defaults filled in."""
    decl = DECLARATIONS[method]
    glob = {p.name: values.get(p.name, p.default) for p in decl.params if not p.per_ingredient}
    per = {}
    for p in decl.params:
        if p.per_ingredient:
            given = values.get(p.name, p.default)
            per[p.name] = list(given) if isinstance(given, list) else [given] * len(tensors)
    names = [f"ing-{i}" for i in range(len(tensors))]
    job = TensorJob(name=name, tensors=tensors, ingredients=names, base=base, glob=glob, per=per, compiled=compiled)
    return REGISTRY[method].combine(job)


def scrape(app: App) -> str:
    """The app's /metrics page, over HTTP."""
    with urllib.request.urlopen(f"http://127.0.0.1:{app.metrics_port}/metrics", timeout=5) as response:
        return response.read().decode()


def sample(text: str, name: str, **labels: str) -> float:
    """The value of the sample ``name`` with these labels in a scraped page (0 when absent)."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return 0.0


# ---- held-out data, and ingredients whose accuracy on it is known (evaluation and rollout tests) ----


def prototypes(seed: int = 0) -> torch.Tensor:
    """Ten class prototypes in [0, 1]^64 (a pixel row is 16 times a point near one of them)."""
    return torch.rand(10, 64, generator=torch.Generator().manual_seed(seed))


def prototype_rows(centers: torch.Tensor, rows: int, seed: int, spread: float = 0.4) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixels [rows, 64] FP32, labels [rows] INT64): each row is its class's prototype plus noise."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (rows,), generator=generator)
    pixels = 16 * (centers[labels] + spread * torch.randn(rows, 64, generator=generator))
    return pixels.float(), labels


def prototype_state(
    centers: torch.Tensor, hidden: int = 16, sharpness: float = 4.0, shift: float = 50.0
) -> dict[str, torch.Tensor]:
    """DigitsMLP weights, built by hand, that pick the nearest prototype: class c's logit is
    ``sharpness * (q_c . z - |q_c|^2 / 2)`` (``shift`` keeps the hidden units above the ReLUs)."""
    w0, b0 = torch.zeros(hidden, 64), torch.zeros(hidden)
    w0[:10], b0[:10] = sharpness * centers, shift - sharpness * (centers * centers).sum(1) / 2
    w2, w4 = torch.zeros(hidden, hidden), torch.zeros(10, hidden)
    w2[:10, :10], w4[:, :10] = torch.eye(10), torch.eye(10)
    return {
        "net.0.weight": w0,
        "net.0.bias": b0,
        "net.2.weight": w2,
        "net.2.bias": torch.zeros(hidden),
        "net.4.weight": w4,
        "net.4.bias": torch.full((10,), -shift),
    }


def mlp_logits(state: Mapping[str, torch.Tensor], pixels: torch.Tensor, hidden: int = 16) -> torch.Tensor:
    """A plain float32 DigitsMLP forward with ``state`` (float64 states are cast first)."""
    module = DigitsMLP(hidden=hidden)
    module.load_state_dict({k: v.float() for k, v in state.items()})
    with torch.inference_mode():
        return module(pixels.float())["logits"]


def accuracy(state: Mapping[str, torch.Tensor], pixels: torch.Tensor, labels: torch.Tensor, hidden: int = 16) -> float:
    return float((mlp_logits(state, pixels, hidden).argmax(dim=-1) == labels).double().mean())


def split_batches(path: str, parts: int = 1) -> list[dict[str, torch.Tensor]]:
    """An evaluation-split factory (``helpers:split_batches``): a safetensors file's rows in ``parts`` batches."""
    from safetensors.torch import load_file

    tensors = load_file(path)
    rows = next(iter(tensors.values())).shape[0]
    size = -(-rows // parts) if parts else rows
    return [{k: v[start : start + size] for k, v in tensors.items()} for start in range(0, rows, size)][:parts]


class ScaledHead(torch.nn.Module):
    """A module with a tensor of its own beside a child module's: ``head.scale`` and ``head.proj.*``."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(10))
        self.proj = torch.nn.Linear(64, 10)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.proj(z) * self.scale


class NestedClassifier(torch.nn.Module):
    """The digits interface over a nested head (``helpers:nested``)."""

    tureen_interface = {
        "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [-1, 64]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}],
    }

    def __init__(self) -> None:
        super().__init__()
        self.head = ScaledHead()

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.head(pixels / 16.0)}


def nested() -> NestedClassifier:
    return NestedClassifier()


def infer(client: grpcclient.InferenceServerClient, pixels: Any, **kwargs: Any) -> tuple[int, np.ndarray]:
    """Send digits (a numpy array or tensor, [rows, 64]) through tritonclient: (model_version, logits).
    ``model`` defaults to ``digits``; other keyword arguments go to ``client.infer``."""
    array = pixels.numpy() if isinstance(pixels, torch.Tensor) else pixels
    tensor = grpcclient.InferInput("pixels", list(array.shape), "FP32")
    tensor.set_data_from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    result = client.infer(kwargs.pop("model", "digits"), [tensor], **kwargs)
    return int(result.get_response().model_version), result.as_numpy("logits")


def stop(process: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """SIGTERM a server process and wait for it; kill it if it does not stop in ``timeout`` seconds."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def openssl(folder: Path, *args: str) -> None:
    """Run the openssl CLI in ``folder`` (tests make their certificates with it)."""
    subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True, timeout=60)


def llama_config(**overrides: Any) -> Any:
    """A tiny ``transformers.LlamaConfig`` (2 layers of 16), with ``overrides``; callers skip
    without transformers, so it is imported here, not at the top."""
    import transformers

    sizes: dict[str, Any] = {
        "vocab_size": 64,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "max_position_embeddings": 32,
    }
    return transformers.LlamaConfig(**{**sizes, **overrides})


WORDS = [f"w{i}" for i in range(63)] + ["[UNK]"]


def llama_with_tokens(folder: Path, seed: int, added: list[str], special: list[str] = ()) -> dict[str, torch.Tensor]:
    """A tiny Llama (``llama_config``) saved in ``folder`` with a word-level tokenizer of 64 tokens plus ``added`` and ``special`` ones,
    its embeddings grown to match (rows of the new tokens random, as a fine-tune leaves them)."""
    import tokenizers
    import transformers

    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tokenizer.add_tokens(list(added))
    tokenizer.add_special_tokens(list(special))
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(llama_config())
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size != 64:
        model.resize_token_embeddings(size, mean_resizing=False)
        with torch.no_grad():
            model.get_input_embeddings().weight[64:] = torch.randn(size - 64, 16)
            model.get_output_embeddings().weight[64:] = torch.randn(size - 64, 16)
    model.save_pretrained(folder)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "[UNK]"})
    )
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def text_llama(folder: Path, seeds: Sequence[int] = (0, 1), vocab: int = 320) -> list[dict[str, torch.Tensor]]:
    """Tiny Llama fine-tunes in ``folder/ft-SEED`` sharing a byte-level BPE tokenizer trained on
    the standard library's ``json`` package (real text), with the LLM demo's chat template and
    ``<|end|>`` as end of sequence; returns their state dicts."""
    import transformers

    from tureen.demo.llm import byte_level_bpe, save_tokenizer

    tokenizer = byte_level_bpe([p.read_text() for p in sorted(Path(json.__file__).parent.glob("*.py"))], vocab)
    end = tokenizer.token_to_id("<|end|>")
    config = llama_config(vocab_size=tokenizer.get_vocab_size(), max_position_embeddings=512, eos_token_id=end, bos_token_id=end)
    states = []
    for seed in seeds:
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config)
        target = folder / f"ft-{seed}"
        model.save_pretrained(target)
        save_tokenizer(tokenizer, target)
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return states
