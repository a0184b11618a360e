"""The benchmark's two models, torch and safetensors only, so every server's environment imports them.

``Digits`` is Tureen's demo architecture (64-128-128-10, the same state-dict keys);
``Big`` is a 3072-2048-2048-10 MLP (about 10.5M parameters). Every server loads the same
merged weights (``tureen merge`` output), so all of them answer with the same logits.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

# name -> (input, features, outputs)
MODELS = {"digits": ("pixels", 64, ("logits", "probabilities")), "big": ("x", 3072, ("logits",))}


class Digits(nn.Module):
    def __init__(self, hidden: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.net(pixels / 16.0)
        return {"logits": logits, "probabilities": logits.softmax(dim=-1)}


class Big(nn.Module):
    tureen_interface = {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 3072]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}],
        "max_batch_size": 1024,
    }

    def __init__(self, hidden: int = 2048) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3072, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.net(x)}


def big_mlp() -> Big:
    """Tureen's ``architecture.factory`` for the big model: ``models:big_mlp`` (bench/peers on PYTHONPATH)."""
    return Big()


def load(name: str, work: Path) -> nn.Module:
    """The model with the merged weights every server serves, in eval mode."""
    module = Digits() if name == "digits" else Big()
    module.load_state_dict(load_file(str(work / f"{name}-blend.safetensors")))
    return module.eval()
