"""Independent float64 references for the merge methods, written from their definitions.

They are deliberately naive (full sorts, Python loops, float64) so that they share nothing
with the chunked, sampled, fused float32 code they check.
"""

from __future__ import annotations

import math

import torch


def ref_topk(delta: torch.Tensor, density: float) -> torch.Tensor:
    flat = delta.reshape(-1)
    k = max(1, int(density * flat.numel()))
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[torch.argsort(flat.abs(), descending=True)[:k]] = True
    return (flat * keep).reshape(delta.shape)


def ref_band(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    flat = delta.reshape(-1)
    n = flat.numel()
    keep_n, top = int(density * n), int(gamma * n)
    bottom = max(0, n - keep_n - top)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[torch.argsort(flat.abs())[bottom : bottom + keep_n]] = True
    return (flat * keep).reshape(delta.shape)


def ref_ties(base, tensors, weights, densities, lam=1.0, normalize=True, majority="total"):  # type: ignore[no-untyped-def]
    b = base.double()
    trimmed = [ref_topk(t.double() - b, d) * w for t, w, d in zip(tensors, weights, densities, strict=True)]
    out = torch.zeros_like(b)
    for index in range(b.numel()):
        values = [x.reshape(-1)[index].item() for x in trimmed]
        vote = sum(values) if majority == "total" else sum(math.copysign(1, v) if v else 0 for v in values)
        sign = 1.0 if vote >= 0 else -1.0
        agree = [(v, w) for v, w in zip(values, weights, strict=True) if v != 0 and math.copysign(1, v) == sign]
        total = sum(v for v, _ in agree)
        divisor = sum(w for _, w in agree) if normalize else 1.0
        out.reshape(-1)[index] = total / (divisor if divisor != 0 else 1.0)
    return b + lam * out


def ref_slerp(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.double(), b.double()
    cos = float((a.reshape(-1) @ b.reshape(-1)) / (a.norm() * b.norm()))
    if abs(cos) > 0.9995:
        return (1 - t) * a + t * b
    theta = math.acos(cos)
    return (math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta)


def ref_multislerp(base: torch.Tensor, tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """The weighted barycenter of the task vectors' directions on the sphere, mapped back."""
    vectors = [(t.double() - base.double()).reshape(-1) for t in tensors]
    norms = [v.norm() for v in vectors]
    units = [v / (n + 1e-8) for v, n in zip(vectors, norms, strict=True)]
    mean = sum(w * u for w, u in zip(weights, units, strict=True))
    point = mean / mean.norm()
    tangent = sum(w * (u - (u @ point) * point) for w, u in zip(weights, units, strict=True))
    r = tangent.norm() + 1e-8
    direction = point * torch.cos(r) + tangent * torch.sin(r) / r
    return (direction * sum(w * n for w, n in zip(weights, norms, strict=True))).reshape(base.shape) + base.double()


def ref_model_stock(base: torch.Tensor, tensors: list[torch.Tensor], filter_wise: bool) -> torch.Tensor:
    """Model Stock's closed form: t = N cos / (1 + (N - 1) cos) between the mean and the base."""
    b = base.double()
    rows = [(t.double() - b) for t in tensors]
    shape = (-1, base.shape[-1]) if filter_wise and base.dim() > 1 else (1, -1)
    rows = [r.reshape(shape) for r in rows]
    n = len(tensors)
    cosines = []
    for i in range(n):
        for j in range(i + 1, n):
            cosines.append((rows[i] * rows[j]).sum(-1) / (rows[i].norm(dim=-1) * rows[j].norm(dim=-1)))
    cos = sum(cosines) / len(cosines)
    t = (n * cos / (1 + (n - 1) * cos)).unsqueeze(-1)
    mean = sum(x.double() for x in tensors) / n
    return (t * mean.reshape(shape) + (1 - t) * b.reshape(shape)).reshape(base.shape)


def ref_nearswap(base: torch.Tensor, other: torch.Tensor, t: float) -> torch.Tensor:
    """Take the other model where it is within ``t`` of the base, blend towards the base beyond."""
    diff = (base.double() - other.double()).abs()
    weight = (t / diff.clamp(min=1e-6)).clamp(0, 1)
    return weight * other.double() + (1 - weight) * base.double()


def expected_calibration_error(confidence: list[float], correct: list[bool], bins: int = 15) -> float:
    """ECE by its definition, one sample at a time: the reference the server's batched sums are checked against."""
    total = 0.0
    for b in range(bins):
        low, high = b / bins, (b + 1) / bins
        members = [i for i, c in enumerate(confidence) if (low < c <= high) or (b == 0 and c == 0.0)]
        if members:
            mean_confidence = sum(confidence[i] for i in members) / len(members)
            accuracy = sum(correct[i] for i in members) / len(members)
            total += len(members) / len(confidence) * abs(mean_confidence - accuracy)
    return total
