"""What a merge method's tensor function receives: one tensor's versions and its parameters."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class TensorJob:
    """Everything a method needs to merge one tensor."""

    name: str
    tensors: Sequence[torch.Tensor]
    """The versions of the tensor in the ingredients other than the base, in spec order."""
    ingredients: Sequence[str]
    base: torch.Tensor | None
    glob: Mapping[str, Any]
    """Global parameter values for this tensor."""
    per: Mapping[str, Sequence[Any]]
    """Per-ingredient parameter values for this tensor, aligned with ``tensors``."""
    out: torch.Tensor | None = None
    """Where the blend's tensor goes; a method that writes it there saves the caller a copy."""
    compiled: bool = False
    """Whether the fused kernels of ``tureen.merge.kernels`` may be used."""


Combine = Callable[[TensorJob], torch.Tensor]
"""A method's tensor function: the merged tensor, either ``job.out`` (written in place) or a
float32 tensor that the caller rounds into ``out``."""
