"""Weighted averages of ingredients: the uniform and weighted soups.

Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models improves
accuracy without increasing inference time", ICML 2022, https://arxiv.org/abs/2203.05482
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def linear(tensors: Sequence[torch.Tensor], weights: Sequence[float], *, normalize: bool = True) -> torch.Tensor:
    """Return ``sum_i w_i * t_i`` in float32 (divided by ``sum_i w_i`` when ``normalize``).

    Inputs of any floating dtype are read once each and accumulated in float32, so bf16 and
    fp16 ingredients lose no precision to the sum; the caller casts the result.
    """
    if len(tensors) != len(weights) or not tensors:
        raise ValueError(f"linear needs one weight per tensor, got {len(weights)} for {len(tensors)}")
    scale = 1.0
    if normalize:
        total = float(sum(weights))
        if total == 0.0:
            raise ValueError("weights sum to 0 and cannot be normalized")
        scale = 1.0 / total
    first = tensors[0]
    out = torch.empty(first.shape, dtype=torch.float32, device=first.device)
    # torch.mul(..., out=) computes in the input's dtype: 16-bit inputs are widened first.
    if first.dtype == torch.float32:
        torch.mul(first, weights[0] * scale, out=out)
    else:
        out.copy_(first).mul_(weights[0] * scale)
    for tensor, weight in zip(tensors[1:], weights[1:], strict=True):
        out.add_(tensor, alpha=weight * scale)
    return out
