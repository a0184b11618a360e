"""The one explicit registry: each declared method paired with the function that merges a tensor.

A function receives a ``TensorJob``: one tensor's versions from the ingredients, the base's
version, and the parameter values already resolved for this tensor. It returns float32, or
the job's ``out_dtype`` when it can round there itself without another pass.
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
from tureen.merge.sparsify import SAMPLE, Magnitude, Outliers, Random, Ranked, stable_seed
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
    out_dtype: torch.dtype = torch.float32
    """The blend's dtype; a method may return it directly instead of float32 to save a pass."""


Combine = Callable[[TensorJob], torch.Tensor]


@dataclass(frozen=True)
class Method:
    decl: MethodDecl
    combine: Combine


def _base(job: TensorJob) -> torch.Tensor:
    if job.base is None:  # the spec validation makes this unreachable for methods that need one
        raise ValueError("this method needs a base")
    return job.base


def _sample(job: TensorJob, i: int) -> torch.Tensor:
    """|theta_i - base| for ranking: exact for small tensors, a fixed random sample for large."""
    tensor, base = job.tensors[i].reshape(-1), _base(job).reshape(-1)
    if tensor.numel() > SAMPLE:
        generator = torch.Generator(device=tensor.device).manual_seed(stable_seed("sample", job.name))
        index = torch.randint(tensor.numel(), (SAMPLE,), generator=generator, device=tensor.device)
        tensor, base = tensor[index], base[index]
    return (tensor.float() - base.float()).abs_()


def _generator(job: TensorJob, i: int) -> torch.Generator:
    device = job.tensors[i].device
    return torch.Generator(device=device).manual_seed(stable_seed(job.glob["seed"], job.name, job.ingredients[i]))


def _sparsifiers(kind: str, job: TensorJob) -> list[Sparsifier | None]:
    """One sparsifier per ingredient, fitted to this tensor with that ingredient's parameters."""
    made: list[Sparsifier | None] = []
    for i, density in enumerate(job.per["density"]):
        if kind == "magnitude":
            made.append(Magnitude.fit(_sample(job, i), density).apply if density < 1.0 else None)
        elif kind == "random":
            made.append(Random(density, job.glob["rescale"], _generator(job, i)).apply)
        elif kind == "outliers":
            made.append(Outliers.fit(_sample(job, i), density, job.per["gamma"][i]).apply)
        elif density >= 1.0:
            made.append(None)
        else:
            epsilon = job.per["epsilon"][i]
            if not (density - epsilon > 0.0 and density + epsilon <= 1.0):
                raise ValueError(
                    f"ingredient {job.ingredients[i]!r}: density {density:g} and epsilon {epsilon:g} need "
                    "0 < density - epsilon and density + epsilon <= 1"
                )
            made.append(Ranked.fit(_sample(job, i), density, epsilon, job.glob["rescale"], _generator(job, i)).apply)
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
        )

    return combine


def _endpoints(job: TensorJob) -> tuple[torch.Tensor, torch.Tensor]:
    """SLERP's two models: the base then the other, or the two ingredients in spec order."""
    return (job.base, job.tensors[0]) if job.base is not None else (job.tensors[0], job.tensors[1])


_FUNCTIONS: Mapping[str, Combine] = {
    "linear": lambda job: linear(job.tensors, job.per["weight"], normalize=job.glob["normalize"], out_dtype=job.out_dtype),
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

REGISTRY: Mapping[str, Method] = {name: Method(decl, _FUNCTIONS[name]) for name, decl in DECLARATIONS.items()}


def lookup(name: str) -> Method:
    """The method called ``name``; the error lists the methods that exist."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown merge method {name!r} (known: {', '.join(sorted(REGISTRY))})") from None
