"""What a merge method's tensor function receives: one tensor's versions and its parameters."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
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
    offset: int = 0
    """Where ``tensors`` start in the flat tensor, when they are a piece of it (a streamed merge)."""
    fitted: Sequence[Any] | None = None
    """What the method's ``fit`` found over the whole tensor, for a job on a piece of it."""
    sweep: Callable[[], Iterator[tuple[list[torch.Tensor], torch.Tensor]]] | None = None
    """For ``fit``: yields the whole tensor piece by piece, as (the ingredients' pieces, the base's)."""


Combine = Callable[[TensorJob], torch.Tensor]
"""A method's tensor function: the merged tensor, either ``job.out`` (written in place) or a
float32 tensor that the caller rounds into ``out``."""


Fit = Callable[[TensorJob], Sequence[Any] | None]
"""A method's per-tensor fit over ``job.sweep`` (what ``job.fitted`` then carries to the jobs on
the tensor's pieces), or None when the method needs the whole tensor at once."""
