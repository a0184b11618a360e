"""Resolving a method's parameters for one tensor, as mergekit users write them.

A value is a scalar, or a gradient list interpolated across the layer index. For a tensor
``T`` and ingredient ``i``, the first of these that gives the parameter wins:

1. the first ``merge.overrides`` entry that names ingredient ``i`` and whose glob matches ``T``;
2. the first ``merge.overrides`` entry without an ingredient whose glob matches ``T``;
3. ingredient ``i``'s own ``parameters`` (per-ingredient parameters only);
4. ``merge.weights[i]`` (the ``weight`` parameter only);
5. ``merge.parameters``;
6. the method's default.

Global parameters (``lambda``, ``t``...) skip steps 1, 3 and 4.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from fnmatch import fnmatchcase
from typing import Any

from tureen.merge.methods import Param, declaration
from tureen.spec import IngredientRef, SoupSpec

_LAYER = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def layer_positions(names: Sequence[str]) -> dict[str, float]:
    """Each tensor's place in [0, 1] along the layers, for gradient lists (as mergekit reads them).

    The layer index is the first all-digit component of the name (``model.layers.12.mlp...``
    is layer 12). Layer ``k`` of ``L`` sits at ``k / (L - 1)`` (at 1 when there is one layer).
    Tensors outside numbered layers (embeddings, final norm, head) sit at 0, so they take the
    first value of a gradient.
    """
    indices = {name: _layer_index(name) for name in names}
    layered = [i for i in indices.values() if i is not None]
    last = max(layered) if layered else 0
    return {name: 0.0 if index is None else (1.0 if last == 0 else index / last) for name, index in indices.items()}


def _layer_index(name: str) -> int | None:
    found = _LAYER.search(name)
    return int(found.group(1)) if found else None


def interpolate(values: Sequence[float], position: float) -> float:
    """The gradient ``values`` (evenly spaced over [0, 1]) read at ``position``."""
    if len(values) == 1:
        return float(values[0])
    x = min(max(position, 0.0), 1.0) * (len(values) - 1)
    low = min(int(x), len(values) - 2)
    frac = x - low
    return float(values[low]) * (1.0 - frac) + float(values[low + 1]) * frac


class ParameterPlan:
    """Answers "which parameter values apply to this tensor" for one spec."""

    def __init__(self, spec: SoupSpec, tensor_names: Sequence[str], positions: Mapping[str, float] | None = None) -> None:
        """``positions``: where each tensor sits along gradients, when not by its layer number
        among ``tensor_names`` (a slice's layers run from 0 to 1 within the slice)."""
        self.spec = spec
        self.method = declaration(spec.merge.method)
        self.mixed = spec.mixed
        self.positions = dict(positions) if positions is not None else layer_positions(tensor_names)
        self._global = [p for p in self.method.params if not p.per_ingredient]
        self._per = [p for p in self.method.params if p.per_ingredient]

    def for_tensor(self, tensor: str) -> tuple[dict[str, Any], dict[str, list[Any]]]:
        """(global values, per-ingredient values in ``mixed`` order) for ``tensor``."""
        position = self.positions.get(tensor, 0.0)
        glob = {p.name: self._read(self._raw(p, None, tensor), position) for p in self._global}
        per = {p.name: [self._read(self._raw(p, i, tensor), position) for i in self.mixed] for p in self._per}
        return glob, per

    def _raw(self, param: Param, ingredient: IngredientRef | None, tensor: str) -> Any:
        merge = self.spec.merge
        if ingredient is not None:
            for override in merge.overrides:
                if (
                    override.ingredient == ingredient.name
                    and param.name in override.parameters
                    and fnmatchcase(tensor, override.match)
                ):
                    return override.parameters[param.name]
        for override in merge.overrides:
            if override.ingredient is None and param.name in override.parameters and fnmatchcase(tensor, override.match):
                return override.parameters[param.name]
        if ingredient is not None:
            if param.name in ingredient.parameters:
                return ingredient.parameters[param.name]
            if param.name == "weight" and merge.weights is not None:
                return merge.weights[ingredient.name]
        return merge.parameters.get(param.name, param.default)

    @staticmethod
    def _read(value: Any, position: float) -> Any:
        if isinstance(value, list | tuple):
            return interpolate(value, position)
        return value
