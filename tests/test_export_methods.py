"""`tureen merge` runs every registered method end to end, from spec file to safetensors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from test_methods import ref_ties

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
