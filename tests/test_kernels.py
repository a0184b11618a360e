"""The compiled merge kernels against float64 and against the eager path; blends in one buffer.

Compiling takes a few seconds per kind of merge, so these tests compile a handful of kernels
on tensors just above the size where compiled kernels start, and check each ran compiled
(``compiled_runs``) rather than falling back to the eager path they are compared with.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch

from helpers import combine
from tureen.core.ingredients import Ingredient
from tureen.core.memory import ALIGN, carve
from tureen.core.recipe import mix
from tureen.merge.kernels import MIN_ELEMENTS, compiled_runs, uniform
from tureen.merge.linear import linear
from tureen.merge.task_vectors import task_vector_merge
from tureen.spec import parse_spec

needs_compiler = pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on CPU needs a C++ compiler")
SIZE = MIN_ELEMENTS + 4_321  # an odd size: the kernels' vector loops must handle the tail


def rand(count: int, seed: int, size: int = SIZE) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(size, generator=generator) for _ in range(count)]


@contextmanager
def runs_compiled(kernel: str) -> Iterator[None]:
    """The block must run ``kernel`` compiled at least once (not fall back to the eager path)."""
    before = compiled_runs(kernel)
    yield
    assert compiled_runs(kernel) > before, f"{kernel} did not run compiled"


@needs_compiler
def test_compiled_linear_matches_float64_and_rounds_like_the_eager_path() -> None:
    a, b, c = rand(3, seed=1)
    inputs = [a, b.to(torch.bfloat16), c.to(torch.float16)]
    weights = [0.2, 0.5, 0.3]
    expected = sum(w * t.double() for w, t in zip(weights, inputs, strict=True))
    with runs_compiled("linear_kernel"):
        actual = linear(inputs, weights, normalize=False, compiled=True)
    assert float((actual.double() - expected).abs().max() / expected.abs().max()) < 1e-6
    fused = linear(inputs, weights, out=torch.empty(SIZE, dtype=torch.bfloat16), compiled=True)
    eager = linear(inputs, weights, out=torch.empty(SIZE, dtype=torch.bfloat16))
    # Both round one float32 sum to bfloat16; the sums may differ in the last float32 bit only.
    assert torch.allclose(fused.float(), eager.float(), rtol=2**-7, atol=0)
    assert float((fused.float() != eager.float()).float().mean()) < 1e-3


@needs_compiler
@pytest.mark.parametrize(
    ("method", "values"),
    [
        ("task_arithmetic", {"weight": [0.5, -0.25, 1.5], "lambda": 0.7}),
        ("ties", {"density": [0.2, 1.0, 0.5], "majority_sign": "frequency", "weight": [1.0, 0.6, 0.3]}),
        ("dare_ties", {"density": 0.4, "seed": 3}),
        ("breadcrumbs", {"density": 0.5, "gamma": 0.1}),
    ],
)
def test_compiled_task_vector_kernels_agree_with_the_eager_path(method: str, values: dict[str, Any]) -> None:
    base, *tensors = rand(4, seed=2)
    tensors = [base + 0.1 * t for t in tensors]
    eager = combine(method, tensors, base, compiled=False, **values)
    with runs_compiled("task_vector_kernel"):
        fused = combine(method, tensors, base, compiled=True, **values)
    assert float((fused - eager).abs().max()) <= 1e-6 * float(eager.abs().max())
    # Same entries kept: the trims use the same thresholds and DARE draws the same mask.
    assert torch.equal(fused != base, eager != base)


def test_random_masks_do_not_depend_on_how_the_tensor_is_chunked() -> None:
    base, tensor = rand(2, seed=4, size=10_000)
    whole = task_vector_merge(base, [tensor], [1.0], sparsifiers=[_dare(0.3)], chunk=10_000)
    pieces = task_vector_merge(base, [tensor], [1.0], sparsifiers=[_dare(0.3)], chunk=777)
    assert torch.equal(whole, pieces)


def _dare(density: float) -> Any:
    from tureen.merge.sparsify import Random

    return Random(density, rescale=True, seed=12345)


def test_uniform_draws_are_uniform_and_independent_between_seeds() -> None:
    index = torch.arange(1_000_000)
    first, second = uniform(index, 1), uniform(index, 2)
    assert float(first.min()) >= 0.0 and float(first.max()) < 1.0
    counts = torch.histc(first, bins=10, min=0.0, max=1.0)
    assert float((counts - 100_000).abs().max()) < 1_500  # about 5 standard errors of a bin count
    assert abs(float(torch.corrcoef(torch.stack([first, second]))[0, 1])) < 0.005
    # Neighbouring entries are not correlated either.
    assert abs(float(torch.corrcoef(torch.stack([first[:-1], first[1:]]))[0, 1])) < 0.005


def test_carved_tensors_are_aligned_and_do_not_overlap() -> None:
    layout = [
        ("a", torch.Size([3, 5]), torch.float32),
        ("b", torch.Size([]), torch.int64),
        ("c", torch.Size([7]), torch.bfloat16),
        ("d", torch.Size([0]), torch.float32),
        ("e", torch.Size([2_000_000]), torch.float16),
    ]
    carved = carve(layout, torch.device("cpu"))
    for (name, shape, dtype), value in zip(layout, range(1, 6), strict=True):
        tensor = carved[name]
        assert tensor.shape == shape and tensor.dtype == dtype and tensor.data_ptr() % ALIGN == 0
        tensor.fill_(value)
    for (name, _, _), value in zip(layout, range(1, 6), strict=True):
        assert bool((carved[name] == value).all())


@needs_compiler
def test_mix_writes_one_buffer_and_can_merge_into_a_retired_blend() -> None:
    tensors = rand(6, seed=5)
    pool = {
        name: Ingredient.held(name, {"big": tensors[i], "small": tensors[i + 3][:10].clone(), "steps": torch.tensor([7])})
        for i, name in enumerate(["a", "b", "c"])
    }
    document = {
        "apiVersion": "tureen/v1",
        "model": "m",
        "ingredients": [{"name": n, "path": n} for n in pool],
        "merge": {"method": "linear", "weights": {"a": 1.0, "b": 2.0, "c": 1.0}},
    }
    spec = parse_spec(document)
    eager = mix(spec, pool, kernels="eager")
    with runs_compiled("linear_kernel"):
        blend = mix(spec, pool, kernels="compiled")
    shared = {t.untyped_storage().data_ptr() for t in blend.values()}
    assert len(shared) == 1  # one allocation for the whole blend
    for key in eager:
        torch.testing.assert_close(blend[key], eager[key], rtol=1e-6, atol=1e-7)
    again = mix(spec, pool, kernels="compiled", into=blend)
    assert all(again[key] is blend[key] for key in blend)
    torch.testing.assert_close(again["big"], eager["big"], rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="another layout"):
        mix(spec, pool, into={"big": blend["big"]})


def test_tensors_with_equal_parameters_merge_as_one_run_and_gradients_split_runs(tmp_path: Any) -> None:
    from safetensors.torch import save_file

    from tureen.core.ingredients import IngredientPool
    from tureen.core.memory import span
    from tureen.core.observer import NullObserver

    generator = torch.Generator().manual_seed(6)
    states = []
    for i in range(2):
        state = {f"layers.{k}.w": torch.randn(3, 33, generator=generator) for k in range(4)}
        state["head.w"] = torch.randn(5, generator=generator)
        save_file(state, str(tmp_path / f"ft-{i}.safetensors"))
        states.append(state)
    document = {
        "apiVersion": "tureen/v1",
        "model": "m",
        "ingredients": [{"name": f"ft-{i}", "path": str(tmp_path / f"ft-{i}.safetensors")} for i in range(2)],
        "merge": {"method": "linear", "weights": {"ft-0": [1.0, 1.0, 0.0, 0.0], "ft-1": 1.0}},
    }
    spec = parse_spec(document)
    pool = IngredientPool(torch.device("cpu"), NullObserver())
    loaded = {ref.name: pool.load(ref) for ref in spec.ingredients}
    # The pool lays every ingredient out in one buffer, alike, so a run spans several tensors.
    names = sorted(states[0])
    first, second = (span([loaded[f"ft-{i}"].tensors[k] for k in names]) for i in range(2))
    assert first is not None and second is not None and first[1] == second[1]
    blend = mix(spec, loaded, kernels="eager")
    # The gradient [1, 1, 0, 0] gives ft-0 the weights 1, 1, 0, 0 over layers 0..3 (they sit on
    # its anchors); the head sits at position 0 and takes the first value.
    for key, w in {"head.w": 1.0, "layers.0.w": 1.0, "layers.1.w": 1.0, "layers.2.w": 0.0, "layers.3.w": 0.0}.items():
        expected = (w * states[0][key].double() + states[1][key].double()) / (w + 1.0)
        torch.testing.assert_close(blend[key].double(), expected, rtol=1e-6, atol=1e-7)


def test_without_a_compiler_compiled_merges_fall_back_to_eager_with_a_warning(tmp_path: Any) -> None:
    import os
    import subprocess
    import sys

    import yaml
    from safetensors.torch import load_file, save_file

    tensors = rand(2, seed=7)
    for i, tensor in enumerate(tensors):
        save_file({"w": tensor}, str(tmp_path / f"ft-{i}.safetensors"))
    document = {
        "apiVersion": "tureen/v1",
        "model": "m",
        "ingredients": [{"name": f"ft-{i}", "path": f"ft-{i}.safetensors"} for i in range(2)],
        "merge": {"method": "linear"},
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(document))
    # A compiler that does not exist, and an empty kernel cache so nothing compiled earlier is reused.
    env = {**os.environ, "CXX": str(tmp_path / "no-such-g++"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}
    command = [sys.executable, "-m", "tureen", "merge", str(tmp_path / "spec.yaml"), "-o", str(tmp_path / "out.safetensors")]
    result = subprocess.run([*command, "--merge-kernels", "compiled"], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    assert "merging eagerly" in result.stderr
    merged = load_file(str(tmp_path / "out.safetensors"))["w"]
    torch.testing.assert_close(merged, (tensors[0] + tensors[1]) / 2, rtol=1e-6, atol=1e-7)
