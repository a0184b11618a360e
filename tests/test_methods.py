"""Every merge method against an independent float64 reference written from its definition.

The references below are deliberately naive (full sorts, Python loops, float64) so that they
share nothing with the chunked, sampled float32 code they check.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from references import (
    ref_band,
    ref_model_stock,
    ref_multislerp,
    ref_nearswap,
    ref_nuslerp,
    ref_sce,
    ref_slerp,
    ref_ties,
    ref_ties_vectorized,
    ref_topk,
)

from helpers import combine
from tureen.merge.methods import DECLARATIONS

SHAPE = (24, 17)


def rand(count: int, seed: int = 0, dtype: torch.dtype = torch.float32, shape: tuple[int, ...] = SHAPE) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator).to(dtype) for _ in range(count)]


def run(
    method: str, tensors: list[torch.Tensor], base: torch.Tensor | None = None, name: str = "layers.0.w", **values: Any
) -> torch.Tensor:
    """The registered method on one tensor, checked to return float32 of the input's shape."""
    out = combine(method, tensors, base, name, **values)
    assert out.dtype == torch.float32 and out.shape == tensors[0].shape
    return out


def close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    error = (actual.double() - expected).abs().max() / expected.abs().max().clamp(min=1e-12)
    assert error < rel, f"relative error {float(error):.3g}"


# ---- the linear family ------------------------------------------------------------------------


def test_linear_with_equal_weights_is_the_mean() -> None:
    tensors = rand(4)
    close(run("linear", tensors), torch.stack([t.double() for t in tensors]).mean(0))


def test_task_arithmetic_is_base_plus_lambda_times_weighted_task_vectors() -> None:
    base, *tensors = rand(4, seed=1)
    weights = [0.5, -0.25, 1.5]
    expected = base.double() + 0.7 * sum(w * (t.double() - base.double()) for w, t in zip(weights, tensors, strict=True))
    close(run("task_arithmetic", tensors, base, weight=weights, **{"lambda": 0.7}), expected)


# ---- sparsified task vectors ------------------------------------------------------------------


@pytest.mark.parametrize("majority", ["total", "frequency"])
def test_ties_matches_trim_elect_disjoint_mean(majority: str) -> None:
    base, *tensors = rand(4, seed=2)
    weights, densities = [1.0, 0.6, 0.3], [0.2, 0.5, 0.9]
    actual = run("ties", tensors, base, weight=weights, density=densities, majority_sign=majority, **{"lambda": 1.3})
    close(actual, ref_ties(base, tensors, weights, densities, lam=1.3, majority=majority))


def test_ties_at_density_one_is_task_arithmetic_over_elected_signs() -> None:
    base, *tensors = rand(4, seed=3)
    weights = [1.0, 2.0, 0.5]
    deltas = [w * (t.double() - base.double()) for w, t in zip(weights, tensors, strict=True)]
    elected = torch.where(sum(deltas) >= 0, 1.0, -1.0)
    expected = base.double() + sum(d * (d.sign() == elected) for d in deltas)
    close(run("ties", tensors, base, weight=weights, density=1.0, normalize=False), expected)


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
def test_breadcrumbs_keep_the_band_below_the_outliers(method: str) -> None:
    base, *tensors = rand(3, seed=4)
    weights, densities, gammas = [1.0, 0.5], [0.4, 0.7], [0.1, 0.2]
    bands = [
        ref_band(t.double() - base.double(), d, g) * w for t, w, d, g in zip(tensors, weights, densities, gammas, strict=True)
    ]
    if method == "breadcrumbs":
        expected = base.double() + sum(bands)
    else:
        elected = torch.where(sum(bands) >= 0, 1.0, -1.0)
        expected = base.double() + sum(b * (b.sign() == elected) for b in bands)
    close(run(method, tensors, base, weight=weights, density=densities, gamma=gammas), expected)


def kept_fraction_and_mean(method: str, density: float, **values: Any) -> tuple[float, float]:
    base = torch.zeros(400_000)
    delta = torch.full((400_000,), 2.0)
    out = run(method, [delta], base, density=density, **values)
    return float((out != 0).float().mean()), float(out.mean())


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_keeps_about_density_and_preserves_the_expectation(method: str) -> None:
    kept, mean = kept_fraction_and_mean(method, 0.3)
    assert abs(kept - 0.3) < 0.005  # 400k Bernoulli(0.3) draws: the standard error is 0.0007
    assert abs(mean - 2.0) < 0.02
    kept, mean = kept_fraction_and_mean(method, 0.3, rescale=False)
    assert abs(mean - 0.6) < 0.01


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_della_keeps_about_density_and_preserves_the_expectation(method: str) -> None:
    generator = torch.Generator().manual_seed(5)
    delta = torch.rand(400_000, generator=generator) + 0.5
    out = run(method, [delta], torch.zeros_like(delta), density=0.4, epsilon=0.2)
    assert abs(float((out != 0).float().mean()) - 0.4) < 0.005
    assert abs(float(out.mean()) / float(delta.mean()) - 1.0) < 0.02
    # Larger entries are kept more often: keep rate rises from density - eps to density + eps.
    order = torch.argsort(delta)
    low, high = (out[order[:40_000]] != 0).float().mean(), (out[order[-40_000:]] != 0).float().mean()
    assert abs(float(low) - 0.22) < 0.02 and abs(float(high) - 0.58) < 0.02


def test_random_masks_are_reproducible_per_seed_tensor_and_ingredient() -> None:
    base, *tensors = rand(3, seed=6)
    first = run("dare_linear", tensors, base, density=0.5, seed=7)
    assert torch.equal(first, run("dare_linear", tensors, base, density=0.5, seed=7))
    assert not torch.equal(first, run("dare_linear", tensors, base, density=0.5, seed=8))
    assert not torch.equal(first, run("dare_linear", tensors, base, density=0.5, seed=7, name="layers.1.w"))
    # The two ingredients draw different masks even for the same tensor.
    same = [tensors[0], tensors[0].clone()]
    first_mask = (run("dare_linear", same, base, density=0.5, weight=[1.0, 0.0]) - base) != 0
    second_mask = (run("dare_linear", same, base, density=0.5, weight=[0.0, 1.0]) - base) != 0
    assert not torch.equal(first_mask, second_mask)


@pytest.mark.parametrize("method", ["ties", "breadcrumbs"])
def test_million_entry_tensors_are_ranked_exactly_by_default(method: str) -> None:
    # mergekit keeps exactly the top k = int(density * n) magnitudes (torch.topk); so does the
    # reference (a full argsort), and so must the default exact selection.
    base, tensor = rand(2, seed=9, shape=(1000, 1000))
    if method == "ties":
        kept = run("ties", [tensor], base, density=0.1) - base
        expected = ref_topk(tensor.double() - base.double(), 0.1)
    else:
        kept = run("breadcrumbs", [tensor], base, density=0.2, gamma=0.05, **{"lambda": 1.0}) - base
        expected = ref_band(tensor.double() - base.double(), 0.2, 0.05)
    assert torch.equal(kept != 0, expected != 0)


def test_a_million_entry_ties_soup_equals_the_reference() -> None:
    base, *tensors = rand(4, seed=21, shape=(1000, 1000))
    weights, densities = [1.0, 0.5, 2.0], [0.3, 0.5, 0.2]
    out = run("ties", tensors, base, weight=weights, density=densities)
    close(out, ref_ties_vectorized(base, tensors, weights, densities))


def test_rank_sample_estimates_thresholds_from_a_sample_and_stays_close_to_the_density() -> None:
    base, tensor = rand(2, seed=9, shape=(3_000_000,))
    out = run("ties", [tensor], base, density=0.1, rank_sample=32768)
    # The threshold is a quantile of 32768 sampled entries: its rank is off by about
    # sqrt(0.1 * 0.9 / 32768) = 0.0017 of the tensor; allow four of those (and not exactly 0.1).
    kept = float((out != base).float().mean())
    assert abs(kept - 0.1) < 0.007 and kept != 0.1


@pytest.mark.parametrize("topk", [1.0, 0.4])
def test_sce_matches_its_definition(topk: float) -> None:
    base, *tensors = rand(4, seed=31)
    close(run("sce", tensors, base, select_topk=topk), ref_sce(base, tensors, topk))


# ---- spherical -------------------------------------------------------------------------------


@pytest.mark.parametrize(("row_wise", "flatten"), [(False, True), (False, False), (True, False)])
def test_nuslerp_interpolates_whole_tensors_rows_or_columns(row_wise: bool, flatten: bool) -> None:
    a, b, base = rand(3, seed=32)
    options = {"nuslerp_row_wise": row_wise, "nuslerp_flatten": flatten}
    # t is the second ingredient's share of the weights: 3 / (1 + 3).
    close(run("nuslerp", [a, b], weight=[1.0, 3.0], **options), ref_nuslerp(0.75, a, b, row_wise, flatten))
    with_base = run("nuslerp", [a, b], base, weight=[1.0, 1.0], **options)
    close(with_base, base.double() + ref_nuslerp(0.5, a - base, b - base, row_wise, flatten))
    if not flatten:  # rows (or columns) are interpolated on their own: not the whole-tensor slerp
        assert not torch.allclose(with_base, run("nuslerp", [a, b], base, weight=[1.0, 1.0]))


def test_slerp_matches_its_formula_and_returns_its_endpoints() -> None:
    a, b = rand(2, seed=10)
    close(run("slerp", [b], a, t=0.3), ref_slerp(0.3, a, b))
    close(run("slerp", [a, b], t=0.7), ref_slerp(0.7, a, b))
    close(run("slerp", [b], a, t=0.0), a.double(), rel=1e-6)
    close(run("slerp", [b], a, t=1.0), b.double(), rel=1e-6)


def test_slerp_falls_back_to_linear_for_nearly_colinear_tensors() -> None:
    (a,) = rand(1, seed=11)
    b = 2.0 * a + 1e-4 * rand(1, seed=12)[0]
    close(run("slerp", [b], a, t=0.25), 0.75 * a.double() + 0.25 * b.double())


def test_multislerp_of_two_equal_norm_models_is_the_slerp_midpoint() -> None:
    a, b = (t / t.norm() * 3.0 for t in rand(2, seed=13))
    close(run("multislerp", [a, b]), ref_slerp(0.5, a, b), rel=1e-5)


def test_multislerp_matches_the_tangent_space_barycenter() -> None:
    base, *tensors = rand(4, seed=14)
    weights = [0.2, 0.3, 0.5]
    expected = ref_multislerp(base, tensors, weights)
    close(run("multislerp", tensors, base, weight=weights), expected)


def test_karcher_mean_of_two_unit_vectors_is_their_geodesic_midpoint() -> None:
    a, b = (t / t.norm() for t in rand(2, seed=15))
    close(run("karcher", [a, b], max_iter=50, tol=1e-9), ref_slerp(0.5, a, b), rel=1e-5)
    close(run("karcher", [a, a.clone()]), a.double(), rel=1e-6)


def test_karcher_mean_is_a_fixed_point_of_the_tangent_average() -> None:
    tensors = rand(3, seed=16)
    out = run("karcher", tensors, max_iter=100, tol=1e-10).double().reshape(-1)
    point = out / out.norm()
    step = torch.zeros_like(point)
    for t in tensors:
        u = t.double().reshape(-1) / t.double().norm()
        cos = float((point @ u).clamp(-1, 1))
        theta = math.acos(cos)
        step += (u - cos * point) * (theta / math.sin(theta)) / 3
    assert float(step.norm()) < 1e-5
    assert abs(float(out.norm()) - sum(float(t.norm()) for t in tensors) / 3) < 1e-3


# ---- others ----------------------------------------------------------------------------------


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_matches_its_closed_form(filter_wise: bool) -> None:
    base, *tensors = rand(4, seed=17)
    expected = ref_model_stock(base, tensors, filter_wise)
    close(run("model_stock", tensors, base, filter_wise=filter_wise), expected)


def test_nearswap_takes_the_other_model_where_it_is_near() -> None:
    base, other = rand(2, seed=18)
    close(run("nearswap", [other], base, t=0.4), ref_nearswap(base, other, 0.4))


def test_passthrough_scales_its_one_ingredient() -> None:
    (tensor,) = rand(1, seed=19)
    close(run("passthrough", [tensor], scale=0.5), 0.5 * tensor.double())


# ---- every method, in 16-bit -----------------------------------------------------------------

DETERMINISTIC = ["linear", "task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties", "slerp", "multislerp", "karcher"]
DETERMINISTIC += ["model_stock", "nearswap", "passthrough"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", DETERMINISTIC)
def test_16_bit_inputs_accumulate_in_float32(method: str, dtype: torch.dtype) -> None:
    """Feeding 16-bit tensors gives the float32 result of their exact (upcast) values."""
    decl = DECLARATIONS[method]
    count = decl.max_ingredients or 3
    if method == "slerp":
        count = 1
    tensors = rand(count + 1, seed=20, dtype=dtype)
    base = tensors.pop() if decl.base != "forbidden" else None
    values = {"density": 0.5} if method in ("ties", "breadcrumbs", "breadcrumbs_ties") else {}
    low = run(method, tensors, base, **values)
    high = run(method, [t.float() for t in tensors], base.float() if base is not None else None, **values)
    close(low, high.double(), rel=1e-6)


@pytest.mark.parametrize("method", sorted(DECLARATIONS))
def test_no_method_writes_into_its_inputs(method: str) -> None:
    decl = DECLARATIONS[method]
    count = 1 if method == "slerp" else (decl.max_ingredients or 3)
    tensors = rand(count + 1, seed=21)
    base = tensors.pop() if decl.base != "forbidden" else None
    before = [t.clone() for t in tensors] + ([base.clone()] if base is not None else [])
    values = {"density": 0.5} if "density" in decl.by_name else {}
    run(method, tensors, base, **values)
    after = tensors + ([base] if base is not None else [])
    assert all(torch.equal(x, y) for x, y in zip(before, after, strict=True))
