"""Test-only architectures, importable as ``archs:NAME`` because tests/ is on sys.path."""

from __future__ import annotations

import threading

import torch
from torch import nn

from tureen.demo.models import DigitsMLP


class Mixed(nn.Module):
    """Three inputs of three datatypes (FP32, INT64, BOOL) and outputs of two (FP32, INT32)."""

    tureen_interface = {
        "inputs": [
            {"name": "features", "datatype": "FP32", "shape": [-1, 4]},
            {"name": "index", "datatype": "INT64", "shape": [-1]},
            {"name": "mask", "datatype": "BOOL", "shape": [-1, 4]},
        ],
        "outputs": [
            {"name": "score", "datatype": "FP32", "shape": [-1, 2]},
            {"name": "active", "datatype": "INT32", "shape": [-1]},
        ],
        "max_batch_size": 16,
    }

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 2)
        self.table = nn.Embedding(5, 2)
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

    def forward(self, features: torch.Tensor, index: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        score = self.proj(features * mask) + self.table(index)
        return {"score": score, "active": mask.sum(dim=-1)}


def mixed() -> Mixed:
    return Mixed()


def broken() -> nn.Module:
    raise RuntimeError("this factory always fails")


class InPlace(nn.Module):
    """Writes into its input, which the server hands over as a view of the request's bytes."""

    tureen_interface = {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}],
    }

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mul_(2.0) * self.scale


class Fragile(InPlace):
    """Fails on batches of exactly three rows, as a model with a latent bug might."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 3:
            raise RuntimeError("the model tripped over a batch of three")
        return x * self.scale


def inplace() -> InPlace:
    return InPlace()


def fragile() -> Fragile:
    return Fragile()


def slow_mlp(hidden: int = 8, seconds: float = 1.0) -> nn.Module:
    """The demo MLP, built after a pause: a build slow enough to kill a server in the middle of."""
    import time

    time.sleep(seconds)
    return DigitsMLP(hidden=hidden)


class Gated(DigitsMLP):
    """The demo MLP, whose forward waits at a gate the test opens: a batch that runs as long as
    the test needs, so that requests queue behind it deterministically."""

    OPEN = threading.Event()
    ENTERED = threading.Event()

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        Gated.ENTERED.set()
        Gated.OPEN.wait(60)
        return super().forward(pixels)


def gated(hidden: int = 8) -> Gated:
    Gated.OPEN.set()  # open while the blend is built and warmed up; the test closes it
    return Gated(hidden=hidden)


class Recorder(DigitsMLP):
    """The demo MLP, noting the thread each forward runs on and the threads torch gives its
    operators there (and pausing when asked to be slow)."""

    THREADS: list[tuple[str, int]] = []

    def __init__(self, hidden: int = 8, pause: float = 0.0) -> None:
        super().__init__(hidden=hidden)
        self.pause = pause

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        Recorder.THREADS.append((threading.current_thread().name, torch.get_num_threads()))
        if self.pause:
            threading.Event().wait(self.pause)
        return super().forward(pixels)


def recorder(hidden: int = 8, pause: float = 0.0) -> Recorder:
    return Recorder(hidden=hidden, pause=pause)
