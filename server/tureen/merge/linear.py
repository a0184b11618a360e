"""Weighted averages of ingredients: the uniform and weighted soups.

Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models improves
accuracy without increasing inference time", ICML 2022, https://arxiv.org/abs/2203.05482
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

CHUNK = 1 << 18
"""Elements per step: the float32 accumulator of one chunk (1 MiB) stays in cache while every
ingredient's slice is added to it, so each input is read from memory once and the output
written once, instead of the accumulator going to memory and back N times."""


def linear(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    normalize: bool = True,
    out_dtype: torch.dtype = torch.float32,
    chunk: int = CHUNK,
) -> torch.Tensor:
    """Return ``sum_i w_i * t_i`` (divided by ``sum_i w_i`` when ``normalize``) as ``out_dtype``.

    Inputs of any floating dtype are accumulated in float32, so bf16 and fp16 ingredients lose
    no precision to the sum; the result is rounded to ``out_dtype`` once.
    """
    if len(tensors) != len(weights) or not tensors:
        raise ValueError(f"linear needs one weight per tensor, got {len(weights)} for {len(tensors)}")
    scale = 1.0
    if normalize:
        total = float(sum(weights))
        if total == 0.0:
            raise ValueError("weights sum to 0 and cannot be normalized")
        scale = 1.0 / total
    scaled = [float(w) * scale for w in weights]
    first = tensors[0]
    out = torch.empty(first.shape, dtype=out_dtype, device=first.device)
    flat_out, flats = out.view(-1), [t.reshape(-1) for t in tensors]
    direct = out_dtype == torch.float32
    scratch = None if direct else torch.empty(min(chunk, flat_out.numel()), dtype=torch.float32, device=first.device)
    for start in range(0, flat_out.numel(), chunk):
        stop = min(start + chunk, flat_out.numel())
        acc = flat_out[start:stop] if direct else scratch[: stop - start]  # type: ignore[index]
        # torch.mul(..., out=) computes in the input's dtype: 16-bit inputs are widened first.
        if flats[0].dtype == torch.float32:
            torch.mul(flats[0][start:stop], scaled[0], out=acc)
        else:
            acc.copy_(flats[0][start:stop]).mul_(scaled[0])
        for flat, weight in zip(flats[1:], scaled[1:], strict=True):
            acc.add_(flat[start:stop], alpha=weight)
        if not direct:
            flat_out[start:stop].copy_(acc)
    return out
