"""The tensor function of each merge method: a ``TensorJob`` in, the merged tensor out.

Each function adapts a job (tensors, base, resolved parameters) to the math in ``linear``,
``task_vectors``, ``spherical`` and ``others``; the records in ``tureen.merge.methods`` name
these functions.
"""

from __future__ import annotations

import torch

from tureen.merge import linear as _linear
from tureen.merge import others, spherical
from tureen.merge.job import Combine, Fit, TensorJob
from tureen.merge.sparsify import Magnitude, Magnitudes, Outliers, Random, Ranked, kth_magnitudes, stable_seed32
from tureen.merge.task_vectors import Sparsifier, task_vector_merge


def _base(job: TensorJob) -> torch.Tensor:
    if job.base is None:  # the spec validation makes this unreachable for methods that need one
        raise ValueError("this method needs a base")
    return job.base


def _magnitudes(job: TensorJob) -> list[Magnitudes]:
    """|theta_i - base| per ingredient, to rank: every entry, or ``rank_sample`` of them at the
    same positions (``sample_index``) in every ingredient."""
    base = _base(job).reshape(-1)
    return [Magnitudes.of(t.reshape(-1), base, int(job.glob.get("rank_sample", 0))) for t in job.tensors]


def _seed(job: TensorJob, i: int) -> int:
    return stable_seed32(job.glob["seed"], job.name, job.ingredients[i])


def _ranked(job: TensorJob, i: int, magnitudes: Magnitudes, density: float) -> Sparsifier | None:
    """DELLA's sparsifier for ingredient ``i``, once its density and epsilon are known to fit."""
    if density >= 1.0:
        return None
    epsilon = job.per["epsilon"][i]
    if not (density - epsilon > 0.0 and density + epsilon <= 1.0):
        raise ValueError(
            f"ingredient {job.ingredients[i]!r}: density {density:g} and epsilon {epsilon:g} need "
            "0 < density - epsilon and density + epsilon <= 1"
        )
    return Ranked.fit(magnitudes, density, epsilon, job.glob["rescale"], _seed(job, i))


def _sparsifiers(kind: str, job: TensorJob) -> list[Sparsifier | None]:
    """One sparsifier per ingredient, fitted to this tensor with that ingredient's parameters."""
    made: list[Sparsifier | None] = []
    samples = _magnitudes(job) if kind != "random" else []
    for i, density in enumerate(job.per["density"]):
        if kind == "magnitude":
            made.append(Magnitude.fit(samples[i], density) if density < 1.0 else None)
        elif kind == "random":
            made.append(Random(density, job.glob["rescale"], _seed(job, i)))
        elif kind == "outliers":
            made.append(Outliers.fit(samples[i], density, job.per["gamma"][i]))
        else:
            made.append(_ranked(job, i, samples[i], density))
    return made


def _task_vectors(sparsify: str | None, signs: bool) -> Combine:
    def combine(job: TensorJob) -> torch.Tensor:
        fitted = job.fitted if job.fitted is not None else (_sparsifiers(sparsify, job) if sparsify else None)
        return task_vector_merge(
            _base(job),
            job.tensors,
            job.per["weight"],
            lam=job.glob["lambda"],
            normalize=job.glob["normalize"],
            consensus=job.glob["majority_sign"] if signs else None,
            sparsifiers=fitted,
            out=job.out,
            compiled=job.compiled,
            offset=job.offset,
        )

    return combine


def _fit(kind: str) -> Fit:
    """A sparsifying method's per-tensor fit from a sweep over the tensor's pieces (two for
    magnitude thresholds, none for random masks), so that a merge from disk streams the tensor.
    None where it needs the whole tensor at once: DELLA's ranks, or a sampled ranking."""

    def fit(job: TensorJob) -> list[Sparsifier | None] | None:
        if kind == "ranked" or int(job.glob.get("rank_sample", 0)) > 0 or job.sweep is None or job.out is None:
            return None
        if kind == "random":
            return _sparsifiers(kind, job)
        count = job.out.numel()
        if kind == "magnitude":
            wanted = [Magnitude.ranks(count, d) if d < 1.0 else () for d in job.per["density"]]
        else:
            wanted = [Outliers.ranks(count, d, g) for d, g in zip(job.per["density"], job.per["gamma"], strict=True)]
        values = kth_magnitudes(job.sweep, wanted, count)
        made = Magnitude.of if kind == "magnitude" else Outliers.of
        return [made(v) if ks else None for ks, v in zip(wanted, values, strict=True)]

    return fit


def linear(job: TensorJob) -> torch.Tensor:
    return _linear.linear(job.tensors, job.per["weight"], normalize=job.glob["normalize"], out=job.out, compiled=job.compiled)


task_arithmetic = _task_vectors(None, signs=False)
ties = _task_vectors("magnitude", signs=True)
dare_linear = _task_vectors("random", signs=False)
dare_ties = _task_vectors("random", signs=True)
breadcrumbs = _task_vectors("outliers", signs=False)
breadcrumbs_ties = _task_vectors("outliers", signs=True)
della = _task_vectors("ranked", signs=True)
della_linear = _task_vectors("ranked", signs=False)
fit_ties = _fit("magnitude")
fit_dare = _fit("random")
fit_breadcrumbs = _fit("outliers")


def slerp(job: TensorJob) -> torch.Tensor:
    # The two models: the base then the other, or the two ingredients in spec order.
    v0, v1 = (job.base, job.tensors[0]) if job.base is not None else (job.tensors[0], job.tensors[1])
    return spherical.slerp(job.glob["t"], v0, v1)


def nuslerp(job: TensorJob) -> torch.Tensor:
    # Two ingredients, weighted; t is the second one's share (0.5 when the weights cancel out).
    w0, w1 = job.per["weight"]
    t = 0.5 if abs(w0 + w1) < 1e-6 else w1 / (w0 + w1)
    options = {"row_wise": job.glob["nuslerp_row_wise"], "flatten": job.glob["nuslerp_flatten"]}
    if job.base is None:
        return spherical.nuslerp(t, job.tensors[0], job.tensors[1], **options)
    base = job.base.float()
    return base + spherical.nuslerp(t, job.tensors[0].float() - base, job.tensors[1].float() - base, **options)


def sce(job: TensorJob) -> torch.Tensor:
    return others.sce(_base(job), job.tensors, job.glob["select_topk"])


def multislerp(job: TensorJob) -> torch.Tensor:
    return spherical.multislerp(job.tensors, job.per["weight"], job.base, job.glob["normalize_weights"])


def karcher(job: TensorJob) -> torch.Tensor:
    return spherical.karcher(job.tensors, job.per["weight"], int(job.glob["max_iter"]), job.glob["tol"])


def model_stock(job: TensorJob) -> torch.Tensor:
    return others.model_stock(_base(job), job.tensors, filter_wise=job.glob["filter_wise"])


def nearswap(job: TensorJob) -> torch.Tensor:
    return others.nearswap(_base(job), job.tensors[0], job.glob["t"])


def passthrough(job: TensorJob) -> torch.Tensor:
    return others.passthrough(job.tensors[0], job.per["scale"][0])
