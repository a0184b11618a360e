"""The one explicit registry: each declared method paired with the function that merges a tensor.

A function receives a ``TensorJob``: one tensor's versions from the ingredients, the base's
version, and the parameter values already resolved for this tensor. It returns the merged
tensor: the job's ``out`` when it wrote there directly, else a float32 tensor that the caller
rounds into ``out``.
Adding a method means a declaration in ``methods.py`` and one line in ``REGISTRY`` below;
nothing registers itself on import.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tureen.merge import others, spherical
from tureen.merge.linear import linear
from tureen.merge.methods import DECLARATIONS, MethodDecl
from tureen.merge.sparsify import SAMPLE, Magnitude, Outliers, Random, Ranked, sample_index, stable_seed32
from tureen.merge.task_vectors import Sparsifier, task_vector_merge


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


@dataclass(frozen=True)
class Method:
    decl: MethodDecl
    combine: Combine
    elementwise: bool = False
    """Each output entry depends only on the same entry of the inputs and on the parameters (no
    per-tensor statistics, no per-tensor seeds): tensors with equal parameters may be merged
    as one long tensor."""


def _base(job: TensorJob) -> torch.Tensor:
    if job.base is None:  # the spec validation makes this unreachable for methods that need one
        raise ValueError("this method needs a base")
    return job.base


def _samples(job: TensorJob) -> list[torch.Tensor]:
    """|theta_i - base| per ingredient, for ranking: exact for small tensors, else sampled at the
    same positions (``sample_index``) in every ingredient, so the base is gathered once."""
    base = _base(job).reshape(-1)
    index = sample_index(base.numel(), base.device) if base.numel() > SAMPLE else None
    b = (base if index is None else base.index_select(0, index)).float()
    flats = [t.reshape(-1) for t in job.tensors]
    return [((f if index is None else f.index_select(0, index)).float() - b).abs_() for f in flats]


def _seed(job: TensorJob, i: int) -> int:
    return stable_seed32(job.glob["seed"], job.name, job.ingredients[i])


def _sparsifiers(kind: str, job: TensorJob) -> list[Sparsifier | None]:
    """One sparsifier per ingredient, fitted to this tensor with that ingredient's parameters."""
    made: list[Sparsifier | None] = []
    samples = _samples(job) if kind != "random" else []
    for i, density in enumerate(job.per["density"]):
        if kind == "magnitude":
            made.append(Magnitude.fit(samples[i], density) if density < 1.0 else None)
        elif kind == "random":
            made.append(Random(density, job.glob["rescale"], _seed(job, i)))
        elif kind == "outliers":
            made.append(Outliers.fit(samples[i], density, job.per["gamma"][i]))
        elif density >= 1.0:
            made.append(None)
        else:
            epsilon = job.per["epsilon"][i]
            if not (density - epsilon > 0.0 and density + epsilon <= 1.0):
                raise ValueError(
                    f"ingredient {job.ingredients[i]!r}: density {density:g} and epsilon {epsilon:g} need "
                    "0 < density - epsilon and density + epsilon <= 1"
                )
            made.append(Ranked.fit(samples[i], density, epsilon, job.glob["rescale"], _seed(job, i)))
    return made


def _task_vectors(sparsify: str | None, signs: bool) -> Combine:
    def combine(job: TensorJob) -> torch.Tensor:
        return task_vector_merge(
            _base(job),
            job.tensors,
            job.per["weight"],
            lam=job.glob["lambda"],
            normalize=job.glob["normalize"],
            consensus=job.glob["majority_sign"] if signs else None,
            sparsifiers=_sparsifiers(sparsify, job) if sparsify else None,
            out=job.out,
            compiled=job.compiled,
        )

    return combine


def _endpoints(job: TensorJob) -> tuple[torch.Tensor, torch.Tensor]:
    """SLERP's two models: the base then the other, or the two ingredients in spec order."""
    return (job.base, job.tensors[0]) if job.base is not None else (job.tensors[0], job.tensors[1])


_FUNCTIONS: Mapping[str, Combine] = {
    "linear": lambda job: linear(
        job.tensors, job.per["weight"], normalize=job.glob["normalize"], out=job.out, compiled=job.compiled
    ),
    "task_arithmetic": _task_vectors(None, signs=False),
    "ties": _task_vectors("magnitude", signs=True),
    "dare_linear": _task_vectors("random", signs=False),
    "dare_ties": _task_vectors("random", signs=True),
    "breadcrumbs": _task_vectors("outliers", signs=False),
    "breadcrumbs_ties": _task_vectors("outliers", signs=True),
    "della": _task_vectors("ranked", signs=True),
    "della_linear": _task_vectors("ranked", signs=False),
    "slerp": lambda job: spherical.slerp(job.glob["t"], *_endpoints(job)),
    "multislerp": lambda job: spherical.multislerp(job.tensors, job.per["weight"], job.base, job.glob["normalize_weights"]),
    "karcher": lambda job: spherical.karcher(job.tensors, job.per["weight"], int(job.glob["max_iter"]), job.glob["tol"]),
    "model_stock": lambda job: others.model_stock(_base(job), job.tensors, filter_wise=job.glob["filter_wise"]),
    "nearswap": lambda job: others.nearswap(_base(job), job.tensors[0], job.glob["t"]),
    "passthrough": lambda job: others.passthrough(job.tensors[0], job.glob["scale"]),
}

_ELEMENTWISE = frozenset({"linear", "task_arithmetic"})

REGISTRY: Mapping[str, Method] = {
    name: Method(decl, _FUNCTIONS[name], elementwise=name in _ELEMENTWISE) for name, decl in DECLARATIONS.items()
}


def lookup(name: str) -> Method:
    """The method called ``name``; the error lists the methods that exist."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown merge method {name!r} (known: {', '.join(sorted(REGISTRY))})") from None
