"""Model Stock, SCE, NearSwap and passthrough: small methods with a shape of their own."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def model_stock(base: torch.Tensor, tensors: Sequence[torch.Tensor], filter_wise: bool = False) -> torch.Tensor:
    """Model Stock (Jang et al. 2024, https://arxiv.org/abs/2403.19522).

    With task vectors ``d_i = theta_i - base`` and ``cos`` their mean pairwise cosine,
    ``t = N cos / (1 + (N - 1) cos)`` and the result is ``t * mean(theta_i) + (1 - t) * base``.
    One ``t`` per tensor, or per row (vectors along the last axis) with ``filter_wise``.
    """
    if len(tensors) < 2:
        raise ValueError("model_stock needs at least two fine-tunes besides the base")
    b = base.float()
    rows = (lambda x: x.reshape(-1, x.shape[-1])) if filter_wise and b.dim() > 1 else (lambda x: x.reshape(1, -1))
    deltas = [rows(t.float() - b) for t in tensors]
    norms = [d.norm(dim=1) for d in deltas]
    cosines = [
        ((deltas[i] * deltas[j]).sum(dim=1) / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1.0, 1.0)
        for i in range(len(deltas))
        for j in range(i + 1, len(deltas))
    ]
    cos = torch.stack(cosines).mean(dim=0)
    n = len(tensors)
    denominator = 1.0 + (n - 1) * cos
    t = torch.where(denominator.abs() < 1e-6, 0.0, n * cos / denominator).unsqueeze(1)
    mean = rows(torch.stack([x.float() for x in tensors]).mean(dim=0))
    return (t * mean + (1.0 - t) * rows(b)).reshape(b.shape)


def sce(base: torch.Tensor, tensors: Sequence[torch.Tensor], select_topk: float = 1.0) -> torch.Tensor:
    """SCE: select, calculate, erase (FuseChat 2.0, Wan et al. 2024, https://arxiv.org/abs/2408.07990).

    Of the task vectors ``d_i = theta_i - base``: keep the ``select_topk`` fraction of entries
    whose variance across ingredients is largest (of those where it is not zero); weigh each
    ingredient by its mean squared kept delta (weights summing to 1, uniform when all are zero);
    per entry, drop the deltas whose sign disagrees with that of their plain sum (a sum of 0
    counts as positive); return ``base`` plus the weighted mean of what is left.
    """
    b = base.float()
    deltas = torch.stack([t.float() - b for t in tensors])
    if select_topk < 1.0:
        variance = deltas.var(dim=0, unbiased=False).reshape(-1)
        k = int(abs(select_topk) * int(torch.count_nonzero(variance)))
        keep = torch.zeros_like(variance, dtype=torch.bool)
        if k > 0:
            keep[torch.topk(variance.abs(), k).indices] = True
        deltas = deltas * keep.reshape(b.shape)
    energy = [float((d * d).sum()) / max(d.numel(), 1) for d in deltas]
    total = sum(energy)
    weights = [e / total for e in energy] if total > 0 else [1.0 / len(energy)] * len(energy)
    w = torch.tensor(weights, dtype=torch.float32, device=b.device).reshape(-1, *([1] * b.dim()))
    majority = torch.where(deltas.sum(dim=0) >= 0, 1.0, -1.0)
    kept = w * (deltas.sign() == majority)
    divisor = kept.sum(dim=0)
    return b + (deltas * kept).sum(dim=0) / divisor.masked_fill_(divisor == 0, 1.0)


def nearswap(base: torch.Tensor, other: torch.Tensor, t: float) -> torch.Tensor:
    """NearSwap: per entry, weight ``clamp(t / |base - other|, 0, 1)`` on ``other``, the rest on ``base``.

    Where the two are within ``t`` of each other the secondary model is taken whole; far
    apart, the base dominates. From mergekit's ``nearswap`` (Alchemonaut).
    """
    b, o = base.float(), other.float()
    weight = (t / (b - o).abs().clamp_(min=1e-6)).clamp_(0.0, 1.0)
    return torch.lerp(b, o, weight)


def passthrough(tensor: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """The one ingredient, times ``scale``, in float32."""
    return tensor.float() * scale
