"""Weighted averages of ingredients: the uniform and weighted soups.

Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models improves
accuracy without increasing inference time", ICML 2022, https://arxiv.org/abs/2203.05482
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tureen.merge.kernels import MIN_ELEMENTS, linear_kernel, on_device, run_compiled, signature

CHUNK = 1 << 18
"""Elements per eager step on a CPU: the float32 accumulator of one chunk (1 MiB) stays in cache
while every ingredient's slice is added to it, so each input is read from memory once and the
output written once, instead of the accumulator going to memory and back N times. On a GPU
the fixed cost of a kernel launch dominates small steps, so chunks there are 64x larger."""


def linear(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    normalize: bool = True,
    out: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
    compiled: bool = False,
    chunk: int | None = None,
) -> torch.Tensor:
    """Return ``sum_i w_i * t_i`` (divided by ``sum_i w_i`` when ``normalize``), written into ``out``.

    Inputs of any floating dtype are accumulated in float32, so bf16 and fp16 ingredients lose
    no precision to the sum; the result is rounded to ``out``'s dtype (a new tensor of
    ``out_dtype`` when ``out`` is None) once. ``compiled`` asks for the fused kernel.
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
    if out is None:
        out = torch.empty(first.shape, dtype=out_dtype, device=first.device)
    flat_out, flats = out.view(-1), [t.reshape(-1) for t in tensors]
    if compiled and flat_out.numel() >= MIN_ELEMENTS:
        factors = on_device(torch.tensor(scaled, dtype=torch.float32), first.device)
        if run_compiled(linear_kernel, signature(flats, out.dtype), flat_out, factors, *flats):
            return out
    _linear_eager(flat_out, flats, scaled, chunk or (CHUNK if first.device.type == "cpu" else CHUNK << 6))
    return out


def _linear_eager(flat_out: torch.Tensor, flats: Sequence[torch.Tensor], scaled: Sequence[float], chunk: int) -> None:
    device = flat_out.device
    direct = flat_out.dtype == torch.float32
    scratch = None if direct else torch.empty(min(chunk, flat_out.numel()), dtype=torch.float32, device=device)
    widened = None  # 16-bit slices are widened into a reused buffer, not a fresh temporary per add
    for start in range(0, flat_out.numel(), chunk):
        stop = min(start + chunk, flat_out.numel())
        acc = flat_out[start:stop] if direct else scratch[: stop - start]  # type: ignore[index]
        for i, (flat, weight) in enumerate(zip(flats, scaled, strict=True)):
            piece = flat[start:stop]
            if piece.dtype != torch.float32:
                if widened is None:
                    widened = torch.empty(min(chunk, flat_out.numel()), dtype=torch.float32, device=device)
                piece = widened[: stop - start].copy_(piece)
            if i == 0:
                torch.mul(piece, weight, out=acc)
            else:
                acc.add_(piece, alpha=weight)
        if not direct:
            flat_out[start:stop].copy_(acc)
