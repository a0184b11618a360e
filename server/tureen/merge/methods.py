"""The merge methods and the searches, one record each: declaration, function, paper. No torch here.

Specs are validated against these declarations, and this module imports no torch so that
``tureen.spec`` (and the client, which reads specs) never loads it. A record therefore names
its tensor function as ``module:function`` instead of holding it; ``tureen.merge.registry``
resolves the names. Adding a merge method is one entry in ``METHODS`` (and its function);
adding a search is one entry in ``SEARCH_METHODS``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

from tureen.merge.params import BaseUse, Kind, MethodDecl, Param

__all__ = [
    "DECLARATIONS",
    "METHODS",
    "SEARCHES",
    "SEARCH_METHODS",
    "BaseUse",
    "Kind",
    "MergeMethod",
    "MethodDecl",
    "Param",
    "SearchMethod",
    "declaration",
    "named_function",
]


@dataclass(frozen=True)
class MergeMethod:
    """Everything about one merge method."""

    decl: MethodDecl
    function: str
    """``module:function`` that merges one tensor (a ``tureen.merge.job.TensorJob``)."""
    paper: str
    """Where the method is defined: its paper, or mergekit's documentation of it when it has none."""
    elementwise: bool = False
    """Each output entry depends only on the same entry of the inputs and on the parameters (no
    per-tensor statistics, no per-tensor seeds): tensors with equal parameters may be merged
    as one long tensor."""
    fit: str | None = None
    """``module:function`` fitting what a tensor's merge needs from the whole tensor (thresholds)
    over a sweep of its pieces; then the merge runs piece by piece, so ingredients on disk stream
    like an elementwise method's (see ``tureen.merge.job.Fit``). None: merged whole."""
    compile_from: int | None = None
    """Under ``--merge-kernels auto``, CPU merges reading at least this many bytes use the compiled
    kernel: where its first compile (seconds; later ones come from PyTorch's on-disk cache) is won
    back by its speed over the eager path. None: eager always (no compiled kernel, or no gain)."""

    @property
    def task_vectors(self) -> bool:
        """It merges ``theta_i - base`` scaled by ``lambda`` (task arithmetic, TIES, DARE, ...)."""
        return "lambda" in self.decl.by_name


def _weight() -> Param:
    return Param("weight", "how much this ingredient counts", 1.0, per_ingredient=True)


def _density(default: float = 1.0) -> Param:
    return Param(
        "density", "fraction of each task vector's entries kept", default, per_ingredient=True, low=0.0, high=1.0, low_open=True
    )


def _normalize(default: bool) -> Param:
    return Param("normalize", "divide by the sum of the weights that contribute", default, kind="bool")


LAMBDA = Param("lambda", "scale of the merged task vector added to the base", 1.0)
MAJORITY = Param(
    "majority_sign", "sign election: by summed mass or by count", "total", kind="choice", choices=("total", "frequency")
)
SEED = Param("seed", "seed of the random drop masks (with the tensor and ingredient names)", 0, kind="integer", low=0)
RESCALE = Param("rescale", "divide kept entries by their keep probability", True, kind="bool")
EPSILON = Param("epsilon", "spread of keep probabilities by magnitude rank", 0.15, per_ingredient=True, low=0.0, high=1.0)
GAMMA = Param("gamma", "fraction of largest-magnitude outliers removed", 0.01, per_ingredient=True, low=0.0, high=1.0)
RANK_SAMPLE = Param(
    "rank_sample",
    "entries magnitude thresholds are estimated from; 0 ranks every entry exactly (mergekit's results)",
    0,
    kind="integer",
    low=0,
)
T = Param("t", "interpolation factor from the first endpoint (0) to the second (1)", 0.5)

COMPILE_DENSE = 16 << 30
COMPILE_SPARSE = 2 << 30
"""Where the compiled task-vector kernels win back their first compile on a CPU, from
``TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python bench/merge.py --params 16 --tensors 1 --repeat 2``
on the 2-core CI machine kind (4 ingredients of 16M float32 entries, 0.38 GB read), warm ms
eager / compiled and cold-cache compile s: task arithmetic 41 / 17, 1.2 s (breaks even near
17 GB); TIES 869 / 357, 2.6 s (near 2 GB); DARE-TIES 553 / 30, 3.8 s (near 3 GB). Linear's eager
path already runs at copy speed (0.79 of a copy against 0.87 compiled)."""

_TRIM = (_density(), RANK_SAMPLE)
_CRUMBS = (_density(), GAMMA, RANK_SAMPLE)
_RANKED = (_density(), EPSILON, RANK_SAMPLE)

_MERGEKIT = "https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md"
SOUPS = "https://arxiv.org/abs/2203.05482"
"""Wortsman et al., "Model soups", ICML 2022: the uniform, greedy and learned soups."""
TASK_ARITHMETIC = "https://arxiv.org/abs/2212.04089"
TIES = "https://arxiv.org/abs/2306.01708"
DARE = "https://arxiv.org/abs/2311.03099"
BREADCRUMBS = "https://arxiv.org/abs/2312.06795"
DELLA = "https://arxiv.org/abs/2406.11617"
SLERP = "https://doi.org/10.1145/325334.325242"
"""Shoemake, "Animating rotation with quaternion curves", SIGGRAPH 1985."""
KARCHER = "https://doi.org/10.1002/cpa.3160300502"
"""Karcher, "Riemannian center of mass and mollifier smoothing", 1977."""
MODEL_STOCK = "https://arxiv.org/abs/2403.19522"
NUSLERP = "https://arxiv.org/abs/2412.19819"
SCE = "https://arxiv.org/abs/2408.07990"

_COMBINE = "tureen.merge.combine"


def _task_vector(name: str, summary: str, sparse: tuple[Param, ...], signs: bool, normalize: bool, random: bool) -> MethodDecl:
    """A task-vector method; defaults of ``normalize`` and ``rescale`` follow mergekit's."""
    params = [_weight(), *sparse, LAMBDA, _normalize(normalize)]
    if signs:
        params.append(MAJORITY)
    if random:
        params += [RESCALE, SEED]
    return MethodDecl(name, summary, tuple(params), base="required")


METHODS: tuple[MergeMethod, ...] = (
    MergeMethod(
        MethodDecl("linear", "weighted average of the ingredients", (_weight(), _normalize(True))),
        f"{_COMBINE}:linear",
        SOUPS,
        elementwise=True,
    ),
    MergeMethod(
        _task_vector("task_arithmetic", "base + lambda * weighted sum of task vectors", (), False, False, False),
        f"{_COMBINE}:task_arithmetic",
        TASK_ARITHMETIC,
        elementwise=True,
        compile_from=COMPILE_DENSE,
    ),
    MergeMethod(
        _task_vector("ties", "trim, elect signs, disjoint mean (TIES-Merging)", _TRIM, True, True, False),
        f"{_COMBINE}:ties",
        TIES,
        fit=f"{_COMBINE}:fit_ties",
        compile_from=COMPILE_SPARSE,
    ),
    MergeMethod(
        _task_vector("dare_linear", "random drop and rescale, then task arithmetic (DARE)", (_density(),), False, False, True),
        f"{_COMBINE}:dare_linear",
        DARE,
        fit=f"{_COMBINE}:fit_dare",
        compile_from=COMPILE_SPARSE,
    ),
    MergeMethod(
        _task_vector("dare_ties", "random drop and rescale, then TIES sign election (DARE)", (_density(),), True, False, True),
        f"{_COMBINE}:dare_ties",
        DARE,
        fit=f"{_COMBINE}:fit_dare",
        compile_from=COMPILE_SPARSE,
    ),
    MergeMethod(
        _task_vector("breadcrumbs", "drop tiny and outlier entries, then task arithmetic", _CRUMBS, False, False, False),
        f"{_COMBINE}:breadcrumbs",
        BREADCRUMBS,
        fit=f"{_COMBINE}:fit_breadcrumbs",
        compile_from=COMPILE_SPARSE,
    ),
    MergeMethod(
        _task_vector("breadcrumbs_ties", "breadcrumbs sparsification with sign election", _CRUMBS, True, False, False),
        f"{_COMBINE}:breadcrumbs_ties",
        BREADCRUMBS,
        fit=f"{_COMBINE}:fit_breadcrumbs",
        compile_from=COMPILE_SPARSE,
    ),
    MergeMethod(
        _task_vector("della", "magnitude-ranked random drop with sign election (DELLA)", _RANKED, True, True, True),
        f"{_COMBINE}:della",
        DELLA,
    ),
    MergeMethod(
        _task_vector("della_linear", "magnitude-ranked random drop, then task arithmetic", _RANKED, False, False, True),
        f"{_COMBINE}:della_linear",
        DELLA,
    ),
    MergeMethod(
        MethodDecl(
            "slerp",
            "spherical interpolation between exactly two models",
            (T,),
            base="optional",
            max_ingredients=2,
            exact_models=2,
        ),
        f"{_COMBINE}:slerp",
        SLERP,
    ),
    MergeMethod(
        MethodDecl(
            "nuslerp",
            "SLERP of two weighted models (or of their task vectors), whole or row by row",
            (
                _weight(),
                Param("nuslerp_flatten", "treat each tensor as one vector", True, kind="bool"),
                Param("nuslerp_row_wise", "without flatten: interpolate columns (dim 0) instead of rows", False, kind="bool"),
            ),
            base="optional",
            min_ingredients=2,
            max_ingredients=2,
        ),
        f"{_COMBINE}:nuslerp",
        NUSLERP,
    ),
    MergeMethod(
        MethodDecl(
            "multislerp",
            "weighted spherical interpolation of several models",
            (_weight(), Param("normalize_weights", "divide weights by their sum", True, kind="bool")),
            base="optional",
        ),
        f"{_COMBINE}:multislerp",
        f"{_MERGEKIT}#multi-slerp-multislerp",  # mergekit's own method; no paper
    ),
    MergeMethod(
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
        f"{_COMBINE}:karcher",
        KARCHER,
    ),
    MergeMethod(
        MethodDecl(
            "model_stock",
            "Model Stock: average pulled toward the base by angle",
            (Param("filter_wise", "one interpolation factor per row instead of per tensor", False, kind="bool"),),
            base="required",
            min_ingredients=2,
        ),
        f"{_COMBINE}:model_stock",
        MODEL_STOCK,
    ),
    MergeMethod(
        MethodDecl(
            "sce",
            "select high-variance entries, weigh ingredients by their deltas' energy, erase minority signs (SCE)",
            (Param("select_topk", "fraction of entries kept, by variance across ingredients", 1.0, low=0.0, high=1.0),),
            base="required",
        ),
        f"{_COMBINE}:sce",
        SCE,
    ),
    MergeMethod(
        MethodDecl(
            "nearswap",
            "take the secondary model where it is within t of the base",
            (Param("t", "distance below which the secondary model's value is taken whole", 0.5, low=0.0, low_open=True),),
            base="required",
            max_ingredients=1,
        ),
        f"{_COMBINE}:nearswap",
        f"{_MERGEKIT}#nearswap-nearswap",  # from a model card, not a paper
    ),
    MergeMethod(
        MethodDecl(
            "passthrough",
            "one ingredient, scaled",
            (Param("scale", "factor applied to every tensor", 1.0, per_ingredient=True),),
            max_ingredients=1,
        ),
        f"{_COMBINE}:passthrough",
        f"{_MERGEKIT}#passthrough-passthrough",  # no merge at all, so no paper
    ),
)

DECLARATIONS: Mapping[str, MethodDecl] = {method.decl.name: method.decl for method in METHODS}


@dataclass(frozen=True)
class SearchMethod:
    """Everything about one search: a recipe searched on held-out data at build time that
    resolves to a ``linear`` merge stored with the version."""

    decl: MethodDecl
    function: str
    """``module:function`` that runs the search (it needs the model and the evaluator, so it
    lives in ``tureen.core.search``, which resolves the name)."""
    paper: str


_SOUPS = "https://arxiv.org/abs/2203.05482"

SEARCH_METHODS: tuple[SearchMethod, ...] = (
    SearchMethod(
        MethodDecl(
            "greedy",
            "greedy soup: add ingredients best first while the held-out metric does not get worse",
            (),
            min_ingredients=1,
            search=True,
        ),
        "tureen.core.search:greedy_search",
        _SOUPS,
    ),
    SearchMethod(
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
        "tureen.core.search:learned_search",
        _SOUPS,  # the learned soup of the same paper's appendix
    ),
)
"""Adding a search is one entry here (and its function in ``tureen.core.search``)."""

SEARCHES: Mapping[str, MethodDecl] = {record.decl.name: record.decl for record in SEARCH_METHODS}


def named_function(reference: str) -> Callable[..., Any]:
    """The function a record names as ``module:function``; an error names the wrong reference."""
    module, _, name = reference.partition(":")
    function = getattr(importlib.import_module(module), name, None)
    if not callable(function):
        raise ImportError(f"function {reference!r} does not exist")
    return cast(Callable[..., Any], function)


def declaration(name: str) -> MethodDecl:
    """The declaration of method ``name`` (a merge method or a search); the error lists them all."""
    found = DECLARATIONS.get(name) or SEARCHES.get(name)
    if found is None:
        known = ", ".join(sorted([*DECLARATIONS, *SEARCHES]))
        raise ValueError(f"unknown merge method {name!r} (known: {known})")
    return found
