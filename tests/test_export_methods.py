"""`tureen merge` runs every registered method end to end, from spec file to safetensors."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from references import ref_band, ref_model_stock, ref_multislerp, ref_nearswap, ref_slerp, ref_ties
from safetensors.torch import load_file

from helpers import write_ingredients, write_spec
from tureen.cli import main
from tureen.merge.methods import DECLARATIONS

PARAMETERS: dict[str, dict[str, Any]] = {
    "ties": {"density": 0.4, "lambda": 1.2},
    "dare_linear": {"density": 0.5},
    "dare_ties": {"density": 0.5},
    "breadcrumbs": {"density": 0.5, "gamma": 0.1},
    "breadcrumbs_ties": {"density": 0.5, "gamma": 0.1},
    "della": {"density": 0.5, "epsilon": 0.1},
    "della_linear": {"density": 0.5, "epsilon": 0.1},
    "slerp": {"t": [0.2, 0.8]},
    "nearswap": {"t": 0.3},
    "passthrough": {"scale": 0.5},
}


def spec_for(method: str) -> dict[str, Any]:
    decl = DECLARATIONS[method]
    count = 1 if method == "slerp" else min(decl.max_ingredients or 3, 3)
    names = [f"ft-{i}" for i in range(count)]
    merge: dict[str, Any] = {"method": method, "parameters": PARAMETERS.get(method, {})}
    ingredients = [{"name": n, "path": f"{n}.safetensors"} for n in names]
    if decl.base != "forbidden":
        merge["base"] = "base"
        ingredients.insert(0, {"name": "base", "path": "base-0.safetensors"})
    return {"apiVersion": "tureen/v1", "model": "m", "ingredients": ingredients, "merge": merge}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("export")
    write_ingredients(path, 3)
    write_ingredients(path, 1, prefix="base")
    return path


def export(folder: Path, method: str, name: str) -> dict[str, torch.Tensor]:
    """Run `tureen merge` on the spec for ``method`` and read back what it wrote."""
    spec = write_spec(folder, spec_for(method), f"{name}.yaml")
    out = folder / f"{name}.safetensors"
    assert main(["--log-level", "warning", "merge", str(spec), "-o", str(out)]) == 0
    return load_file(str(out))


@pytest.mark.parametrize("method", sorted(DECLARATIONS))
def test_tureen_merge_writes_every_method(folder: Path, method: str) -> None:
    merged = export(folder, method, method)
    ingredient = load_file(str(folder / "ft-0.safetensors"))
    assert set(merged) == set(ingredient)
    for key, tensor in merged.items():
        assert tensor.shape == ingredient[key].shape and tensor.dtype == torch.float32
        assert torch.isfinite(tensor).all()


def test_the_exported_ties_merge_matches_the_reference(folder: Path) -> None:
    merged = export(folder, "ties", "ties-ref")
    base = load_file(str(folder / "base-0.safetensors"))
    tensors = [load_file(str(folder / f"ft-{i}.safetensors")) for i in range(3)]
    for key in ("net.0.bias", "net.4.weight"):
        expected = ref_ties(base[key], [t[key] for t in tensors], [1.0] * 3, [0.4] * 3, lam=1.2)
        assert (merged[key].double() - expected).abs().max() / expected.abs().max() < 1e-5


def test_slerp_gradients_follow_the_layers(folder: Path) -> None:
    merged = export(folder, "slerp", "slerp-gradient")
    base, other = load_file(str(folder / "base-0.safetensors")), load_file(str(folder / "ft-0.safetensors"))
    # net.0 is the first layer (t = 0.2) and net.4 the last (t = 0.8): the merge leans accordingly.
    for key, t in (("net.0.weight", 0.2), ("net.4.weight", 0.8)):
        to_base = (merged[key] - base[key]).norm()
        to_other = (merged[key] - other[key]).norm()
        assert (to_base < to_other) == (t < 0.5)


# ---- every method through `tureen merge` against its reference ----------------------------------

State = dict[str, torch.Tensor]


def _weighted_sum(parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(parts).sum(0)


def _elect(parts: list[torch.Tensor]) -> list[torch.Tensor]:
    elected = torch.where(_weighted_sum(parts) >= 0, 1.0, -1.0).double()
    return [p * (p.sign() == elected) for p in parts]


REFERENCES: dict[str, tuple[dict[str, Any], Any]] = {
    # method: (parameters, reference(base, tensors) for one tensor)
    "linear": ({}, lambda b, ts: _weighted_sum([t.double() for t in ts]) / len(ts)),
    "task_arithmetic": (
        {"lambda": 0.7},
        lambda b, ts: b.double() + 0.7 * _weighted_sum([t.double() - b.double() for t in ts]),
    ),
    "ties": ({"density": 0.4, "lambda": 1.2}, lambda b, ts: ref_ties(b, ts, [1.0] * 3, [0.4] * 3, lam=1.2)),
    "breadcrumbs": (
        {"density": 0.5, "gamma": 0.1},
        lambda b, ts: b.double() + _weighted_sum([ref_band(t.double() - b.double(), 0.5, 0.1) for t in ts]),
    ),
    "breadcrumbs_ties": (
        {"density": 0.5, "gamma": 0.1},
        lambda b, ts: b.double() + _weighted_sum(_elect([ref_band(t.double() - b.double(), 0.5, 0.1) for t in ts])),
    ),
    "slerp": ({"t": 0.3}, lambda b, ts: ref_slerp(0.3, b, ts[0])),
    "multislerp": ({}, lambda b, ts: ref_multislerp(b, ts, [1 / 3] * 3)),
    "model_stock": ({}, lambda b, ts: ref_model_stock(b, ts, filter_wise=False)),
    "nearswap": ({"t": 0.3}, lambda b, ts: ref_nearswap(b, ts[0], 0.3)),
    "passthrough": ({"scale": 0.5}, lambda b, ts: 0.5 * ts[0].double()),
}


def export_with(folder: Path, method: str, parameters: dict[str, Any]) -> tuple[State, State | None, list[State]]:
    spec = spec_for(method)
    spec["merge"]["parameters"] = parameters
    path = write_spec(folder, spec, f"ref-{method}.yaml")
    out = folder / f"ref-{method}.safetensors"
    assert main(["--log-level", "warning", "merge", str(path), "-o", str(out)]) == 0
    base = load_file(str(folder / "base-0.safetensors")) if DECLARATIONS[method].base != "forbidden" else None
    names = [i["name"] for i in spec["ingredients"] if i["name"] != "base"]
    return load_file(str(out)), base, [load_file(str(folder / f"{n}.safetensors")) for n in names]


@pytest.mark.parametrize("method", sorted(REFERENCES))
def test_every_deterministic_method_matches_its_reference_through_tureen_merge(folder: Path, method: str) -> None:
    parameters, reference = REFERENCES[method]
    merged, base, tensors = export_with(folder, method, parameters)
    for key, tensor in merged.items():
        expected = reference(base[key] if base is not None else None, [t[key] for t in tensors])
        error = (tensor.double() - expected).abs().max() / expected.abs().max()
        assert error < 1e-5, f"{method} {key}: relative error {float(error):.3g}"


def test_karcher_through_tureen_merge_is_a_fixed_point_of_the_tangent_average(folder: Path) -> None:
    merged, _, tensors = export_with(folder, "karcher", {"max_iter": 200, "tol": 1e-12})
    for key, out in merged.items():
        flat = out.double().reshape(-1)
        point = flat / flat.norm()
        step = torch.zeros_like(point)
        for t in tensors:
            u = t[key].double().reshape(-1) / t[key].double().norm()
            cos = float((point @ u).clamp(-1, 1))
            theta = math.acos(cos)
            step += (u - cos * point) * (theta / math.sin(theta) if theta > 1e-12 else 1.0) / len(tensors)
        assert float(step.norm()) < 1e-4, key


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties", "della_linear"])
def test_random_methods_through_tureen_merge_keep_masked_rescaled_task_vectors(folder: Path, method: str) -> None:
    """Each entry of merged - base must be sum_i m_i * delta_i / p_i for some mask m in {0, 1}^3, where
    p_i is the keep probability of the definition; the masks keep about ``density`` of the entries."""
    density, epsilon = 0.5, 0.1
    parameters = {"density": density, **({"epsilon": epsilon} if method.startswith("della") else {})}
    merged, base, tensors = export_with(folder, method, parameters)
    assert base is not None
    masks = torch.tensor(list(itertools.product([0.0, 1.0], repeat=3)), dtype=torch.float64)  # [8, 3]
    kept, total = 0.0, 0
    for key, out in merged.items():
        deltas = torch.stack([t[key].double().reshape(-1) - base[key].double().reshape(-1) for t in tensors])  # [3, n]
        if method.startswith("della"):
            # MagPrune: keep probability rises linearly with the magnitude rank, density +- epsilon.
            ranks = deltas.abs().argsort(dim=1).argsort(dim=1).double() / max(deltas.shape[1] - 1, 1)
            probability = density - epsilon + 2 * epsilon * ranks
        else:
            probability = torch.full_like(deltas, density)
        candidates = masks @ (deltas / probability)  # [8, n]: every way the entries could have been kept
        observed = out.double().reshape(-1) - base[key].double().reshape(-1)
        distance = (candidates - observed).abs().min(0)
        assert bool((distance.values <= 1e-5 * (1 + observed.abs())).all()), key
        kept += float(masks[distance.indices].sum())
        total += deltas.numel()
    if method != "dare_ties":  # sign election drops more entries
        assert abs(kept / total - density) < 0.05, kept / total  # about 1800 draws: 4 standard errors
