"""Declarations of the merge methods: names, parameters, bounds. No torch here.

Specs are validated against these declarations (so ``spec.py`` stays free of torch), and the
registry in ``tureen.merge.registry`` pairs each declaration with its tensor function. A
parameter is either *global* (one value for the whole merge, like ``lambda``) or
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
            if self.kind not in ("number", "integer"):
                return f"{self.name} takes a single {self.kind}, not a list"
            if not value:
                return "a gradient list needs at least one value"
            for item in value:
                problem = self.problem(item)
                if problem:
                    return problem
            return None
        if self.kind == "bool":
            return None if isinstance(value, bool) else f"expected true or false, got {value!r}"
        if self.kind == "choice":
            return None if value in self.choices else f"expected one of {', '.join(self.choices)}, got {value!r}"
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"expected a number, got {value!r}"
        if self.kind == "integer" and not float(value).is_integer():
            return f"expected a whole number, got {value!r}"
        if not math.isfinite(value):
            return f"must be finite, got {value}"
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return f"must be in {self._range()}, got {value}"
        if self.high is not None and value > self.high:
            return f"must be in {self._range()}, got {value}"
        return None

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
    search: bool = False
    """A recipe searched on held-out data at build time (greedy, learned), resolved to a linear merge."""

    @property
    def by_name(self) -> Mapping[str, Param]:
        return {param.name: param for param in self.params}


def _weight() -> Param:
    return Param("weight", "how much this ingredient counts", 1.0, per_ingredient=True)


def _density(default: float = 1.0) -> Param:
    return Param(
        "density", "fraction of each task vector's entries kept", default, per_ingredient=True, low=0.0, high=1.0, low_open=True
    )


LAMBDA = Param("lambda", "scale of the merged task vector added to the base", 1.0)
MAJORITY = Param(
    "majority_sign", "sign election: by summed mass or by count", "total", kind="choice", choices=("total", "frequency")
)
SEED = Param("seed", "seed of the random drop masks (with the tensor and ingredient names)", 0, kind="integer", low=0)
RESCALE = Param("rescale", "divide kept entries by their keep probability", True, kind="bool")
EPSILON = Param("epsilon", "spread of keep probabilities by magnitude rank", 0.15, per_ingredient=True, low=0.0, high=1.0)
GAMMA = Param("gamma", "fraction of largest-magnitude outliers removed", 0.01, per_ingredient=True, low=0.0, high=1.0)
T = Param("t", "interpolation factor from the first endpoint (0) to the second (1)", 0.5)


def _normalize(default: bool) -> Param:
    return Param("normalize", "divide by the sum of the weights that contribute", default, kind="bool")


def _task_vector(name: str, summary: str, sparse: tuple[Param, ...], signs: bool, normalize: bool, random: bool) -> MethodDecl:
    """A task-vector method; defaults of ``normalize`` and ``rescale`` follow mergekit's."""
    params = [_weight(), *sparse, LAMBDA, _normalize(normalize)]
    if signs:
        params.append(MAJORITY)
    if random:
        params += [RESCALE, SEED]
    return MethodDecl(name, summary, tuple(params), base="required")


DECLARATIONS: Mapping[str, MethodDecl] = {
    decl.name: decl
    for decl in (
        MethodDecl("linear", "weighted average of the ingredients", (_weight(), _normalize(True))),
        _task_vector("task_arithmetic", "base + lambda * weighted sum of task vectors", (), False, False, False),
        _task_vector("ties", "trim, elect signs, disjoint mean (TIES-Merging)", (_density(),), True, True, False),
        _task_vector("dare_linear", "random drop and rescale, then task arithmetic (DARE)", (_density(),), False, False, True),
        _task_vector("dare_ties", "random drop and rescale, then TIES sign election (DARE)", (_density(),), True, False, True),
        _task_vector(
            "breadcrumbs", "drop tiny and outlier entries, then task arithmetic", (_density(), GAMMA), False, False, False
        ),
        _task_vector(
            "breadcrumbs_ties", "breadcrumbs sparsification with sign election", (_density(), GAMMA), True, False, False
        ),
        _task_vector("della", "magnitude-ranked random drop with sign election (DELLA)", (_density(), EPSILON), True, True, True),
        _task_vector(
            "della_linear", "magnitude-ranked random drop, then task arithmetic", (_density(), EPSILON), False, False, True
        ),
        MethodDecl("slerp", "spherical interpolation between exactly two models", (T,), base="optional", max_ingredients=2),
        MethodDecl(
            "multislerp",
            "weighted spherical interpolation of several models",
            (_weight(), Param("normalize_weights", "divide weights by their sum", True, kind="bool")),
            base="optional",
        ),
        MethodDecl(
            "karcher",
            "Riemannian (Karcher) mean of the models on the sphere",
            (
                _weight(),
                Param("max_iter", "iterations at most", 10, kind="integer", low=1),
                Param("tol", "stop when the tangent step is below this", 1e-5, low=0.0, low_open=True),
            ),
            min_ingredients=2,
        ),
        MethodDecl(
            "model_stock",
            "Model Stock: average pulled toward the base by angle",
            (Param("filter_wise", "one interpolation factor per row instead of per tensor", False, kind="bool"),),
            base="required",
            min_ingredients=2,
        ),
        MethodDecl(
            "nearswap",
            "take the secondary model where it is within t of the base",
            (Param("t", "distance below which the secondary model's value is taken whole", 0.5, low=0.0, low_open=True),),
            base="required",
            max_ingredients=1,
        ),
        MethodDecl(
            "passthrough", "one ingredient, scaled", (Param("scale", "factor applied to every tensor", 1.0),), max_ingredients=1
        ),
    )
}


SEARCHES: Mapping[str, MethodDecl] = {
    decl.name: decl
    for decl in (
        MethodDecl(
            "greedy",
            "greedy soup: add ingredients best first while the held-out metric does not get worse",
            (),
            min_ingredients=1,
            search=True,
        ),
        MethodDecl(
            "learned",
            "mixing weights learned on the held-out split by gradient descent (softmax over ingredients)",
            (
                Param(
                    "granularity",
                    "one weight vector for the model, or one per layer",
                    "model",
                    kind="choice",
                    choices=("model", "layer"),
                ),
                Param("steps", "gradient steps", 60, kind="integer", low=1, high=10000),
                Param("lr", "learning rate of the mixing logits (Adam)", 0.1, low=0.0, low_open=True),
            ),
            min_ingredients=2,
            search=True,
        ),
    )
}
"""Recipes searched at build time; each resolves to a ``linear`` merge stored with the version."""


def declaration(name: str) -> MethodDecl:
    """The declaration of method ``name`` (a merge method or a search); the error lists them all."""
    found = DECLARATIONS.get(name) or SEARCHES.get(name)
    if found is None:
        known = ", ".join(sorted([*DECLARATIONS, *SEARCHES]))
        raise ValueError(f"unknown merge method {name!r} (known: {known})")
    return found
