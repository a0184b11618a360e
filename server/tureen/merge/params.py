"""The vocabulary of method declarations: a parameter, and what a method or a search takes. No torch.

A parameter is either *global* (one value for the whole merge, like ``lambda``) or
*per-ingredient* (each ingredient may have its own, like ``weight`` or ``density``). Numeric
values may also be gradient lists, interpolated across the layer index.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["number", "integer", "bool", "choice"]
BaseUse = Literal["forbidden", "optional", "required"]


@dataclass(frozen=True)
class Param:
    """One parameter of a merge method, with its default and the values it accepts."""

    name: str
    doc: str
    default: float | int | bool | str | None
    kind: Kind = "number"
    per_ingredient: bool = False
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # True: the low bound itself is excluded, as for density in (0, 1]
    choices: tuple[str, ...] = ()

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is not acceptable, or None. Lists (gradients) are checked item by item."""
        if isinstance(value, list | tuple):
            return self._list_problem(value)
        if self.kind == "bool":
            return None if isinstance(value, bool) else f"expected true or false, got {value!r}"
        if self.kind == "choice":
            return None if value in self.choices else f"expected one of {', '.join(self.choices)}, got {value!r}"
        return self._number_problem(value)

    def _list_problem(self, values: list[Any] | tuple[Any, ...]) -> str | None:
        if self.kind not in ("number", "integer"):
            return f"{self.name} takes a single {self.kind}, not a list"
        if not values:
            return "a gradient list needs at least one value"
        return next((problem for problem in map(self.problem, values) if problem), None)

    def _number_problem(self, value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"expected a number, got {value!r}"
        if self.kind == "integer" and not float(value).is_integer():
            return f"expected a whole number, got {value!r}"
        if not math.isfinite(value):
            return f"must be finite, got {value}"
        below = self.low is not None and (value < self.low or (self.low_open and value == self.low))
        above = self.high is not None and value > self.high
        return f"must be in {self._range()}, got {value}" if below or above else None

    def _range(self) -> str:
        low = "-inf" if self.low is None else f"{self.low:g}"
        high = "inf" if self.high is None else f"{self.high:g}"
        return f"{'(' if self.low_open or self.low is None else '['}{low}, {high}]"


@dataclass(frozen=True)
class MethodDecl:
    """What a merge method takes: its parameters, its use of a base, how many ingredients."""

    name: str
    summary: str
    params: tuple[Param, ...]
    base: BaseUse = "forbidden"
    min_ingredients: int = 1
    max_ingredients: int | None = None
    """Counts the ingredients other than the base."""
    exact_models: int | None = None
    """How many models exactly, the base counted (slerp: 2, whether one of them is the base or not)."""
    search: bool = False
    """A recipe searched on held-out data at build time (greedy, learned), resolved to a linear merge."""

    @property
    def by_name(self) -> Mapping[str, Param]:
        return {param.name: param for param in self.params}
