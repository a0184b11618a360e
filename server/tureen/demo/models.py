"""Architectures the demo (and anyone) can name as ``architecture.factory``."""

from __future__ import annotations

import torch
from torch import nn

DIGITS_INTERFACE = {
    "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [-1, 64]}],
    "outputs": [
        {"name": "logits", "datatype": "FP32", "shape": [-1, 10]},
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
    ],
    "max_batch_size": 1024,
}


class DigitsMLP(nn.Module):
    """A small MLP over 8x8 digit images given as 64 raw pixel intensities in 0..16."""

    tureen_interface = DIGITS_INTERFACE

    def __init__(self, hidden: int = 128, pixels: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(pixels, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, classes),
        )

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.net(pixels / 16.0)
        return {"logits": logits, "probabilities": logits.softmax(dim=-1)}


def mlp(hidden: int = 128) -> DigitsMLP:
    """The demo's architecture factory: ``tureen.demo.models:mlp``."""
    return DigitsMLP(hidden=hidden)
