"""The one explicit registry of merge methods.

A method is a pure per-tensor function plus a declaration of its parameters. Specs are
validated against these declarations, so a typo in a method name or parameter is caught when
the spec is pushed, not halfway through a build. New methods are added to ``METHODS`` below,
by hand: there is no registration by import side effect.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict

from tureen.merge.linear import linear


class MethodParams(BaseModel):
    """Base of every method's parameter model: immutable, unknown keys are errors."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class LinearParams(MethodParams):
    normalize: bool = True
    """Divide by the sum of the weights, so weights need not add up to one."""


Combine = Callable[[Sequence[torch.Tensor], Sequence[float], MethodParams], torch.Tensor]
BaseUse = Literal["forbidden", "optional", "required"]


@dataclass(frozen=True)
class MergeMethod:
    """How one merge method combines the ingredients' versions of one floating tensor."""

    name: str
    summary: str
    params: type[MethodParams]
    combine: Combine
    base: BaseUse = "forbidden"
    min_ingredients: int = 1


def _linear(tensors: Sequence[torch.Tensor], weights: Sequence[float], params: MethodParams) -> torch.Tensor:
    assert isinstance(params, LinearParams)
    return linear(tensors, weights, normalize=params.normalize)


LINEAR = MergeMethod(
    name="linear",
    summary="weighted average of the ingredients (uniform when no weights are given)",
    params=LinearParams,
    combine=_linear,
)

METHODS: Mapping[str, MergeMethod] = {method.name: method for method in (LINEAR,)}


def lookup(name: str) -> MergeMethod:
    """Return the method called ``name``; the error lists the methods that exist."""
    try:
        return METHODS[name]
    except KeyError:
        known = ", ".join(sorted(METHODS))
        raise ValueError(f"unknown merge method {name!r} (known: {known})") from None
