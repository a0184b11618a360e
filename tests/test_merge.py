"""The merge math, checked against float64 computed by hand."""

from __future__ import annotations

import pytest
import torch

from tureen.merge.linear import linear
from tureen.merge.methods import DECLARATIONS
from tureen.merge.registry import REGISTRY, lookup


def tensors(count: int, dtype: torch.dtype = torch.float32, shape: tuple[int, ...] = (33, 17)) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    return [torch.randn(shape, generator=generator).to(dtype) for _ in range(count)]


@pytest.mark.parametrize("normalize", [True, False])
def test_linear_matches_a_float64_weighted_sum(normalize: bool) -> None:
    inputs = tensors(4)
    weights = [0.1, 0.7, 0.25, 2.0]
    scale = sum(weights) if normalize else 1.0
    expected = sum(t.double() * w for t, w in zip(inputs, weights, strict=True)) / scale
    merged = linear(inputs, weights, normalize=normalize)
    assert merged.dtype == torch.float32
    assert torch.allclose(merged.double(), expected, rtol=1e-6, atol=1e-6)


def test_linear_with_equal_weights_is_the_mean() -> None:
    inputs = tensors(5)
    merged = linear(inputs, [1.0] * 5)
    assert torch.allclose(merged, torch.stack(inputs).mean(dim=0), atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_inputs_accumulate_in_float32(dtype: torch.dtype) -> None:
    inputs = tensors(8, dtype)
    weights = [float(i + 1) for i in range(8)]
    expected = sum(t.double() * w for t, w in zip(inputs, weights, strict=True)) / sum(weights)
    merged = linear(inputs, weights)
    assert merged.dtype == torch.float32
    # Exact float32 accumulation of exactly representable 16-bit inputs: error far below one 16-bit ulp.
    assert (merged.double() - expected).abs().max() < 1e-5


def test_weights_that_sum_to_zero_cannot_be_normalized() -> None:
    with pytest.raises(ValueError, match="sum to 0"):
        linear(tensors(2), [1.0, -1.0])
    assert torch.allclose(linear(tensors(2), [1.0, -1.0], normalize=False), tensors(2)[0] - tensors(2)[1])


def test_the_registry_is_explicit_and_lookups_name_what_exists() -> None:
    assert lookup("linear") is REGISTRY["linear"]
    assert REGISTRY["linear"].decl is DECLARATIONS["linear"] and DECLARATIONS["linear"].base == "forbidden"
    assert set(REGISTRY) == set(DECLARATIONS)
    with pytest.raises(ValueError, match=r"unknown merge method 'tiez' \(known: breadcrumbs, .*ties"):
        lookup("tiez")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunks_and_the_output_dtype_change_nothing_but_the_final_rounding(dtype: torch.dtype) -> None:
    inputs = tensors(3, dtype, shape=(101, 7))
    weights = [0.2, 0.5, 0.3]
    whole = linear(inputs, weights)
    assert torch.equal(linear(inputs, weights, chunk=13), whole)
    assert torch.equal(linear(inputs, weights, out_dtype=torch.bfloat16, chunk=13), whole.to(torch.bfloat16))
