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


def ref_ties_vectorized(base, tensors, weights, densities, lam=1.0, normalize=True):  # type: ignore[no-untyped-def]
    """``ref_ties`` (``total`` sign election) over whole tensors at once, for tensors too big to loop over."""
    b = base.double().reshape(-1)
    w = torch.tensor(weights, dtype=torch.float64).view(-1, 1)
    trimmed = torch.stack([ref_topk(t.double().reshape(-1) - b, d) for t, d in zip(tensors, densities, strict=True)]) * w
    sign = torch.where(trimmed.sum(0) >= 0, 1.0, -1.0)
    agree = (trimmed != 0) & (trimmed.sign() == sign)
    total = (trimmed * agree).sum(0)
    divisor = (w * agree).sum(0) if normalize else torch.ones_like(total)
    return (b + lam * total / divisor.masked_fill(divisor == 0, 1.0)).reshape(base.shape)


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


def ref_nuslerp(t: float, a: torch.Tensor, b: torch.Tensor, row_wise: bool, flatten: bool) -> torch.Tensor:
    """SLERP of every vector pair: the whole tensors, their rows, or (row_wise) their columns."""
    a, b = a.double(), b.double()
    if flatten or a.dim() == 1:
        return ref_slerp_exact(t, a.reshape(-1), b.reshape(-1)).reshape(a.shape)
    if row_wise:
        return torch.stack([ref_slerp_exact(t, a[:, j], b[:, j]) for j in range(a.shape[1])], dim=1)
    return torch.stack([ref_slerp_exact(t, a[i], b[i]) for i in range(a.shape[0])])


def ref_slerp_exact(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    cos = float((a @ b) / (a.norm() * b.norm()))
    theta = math.acos(max(-1.0, min(1.0, cos)))
    if abs(math.sin(theta)) < 1e-8:
        return (1 - t) * a + t * b
    return (math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta)


def ref_sce(base: torch.Tensor, tensors: list[torch.Tensor], select_topk: float) -> torch.Tensor:
    b = base.double().reshape(-1)
    deltas = [t.double().reshape(-1) - b for t in tensors]
    n = b.numel()
    if select_topk < 1:
        mean = [sum(d[i] for d in deltas) / len(deltas) for i in range(n)]
        variance = torch.tensor([float(sum((d[i] - mean[i]) ** 2 for d in deltas)) / len(deltas) for i in range(n)])
        k = int(select_topk * int((variance != 0).sum()))
        keep = torch.zeros(n, dtype=torch.bool)
        keep[torch.argsort(variance, descending=True)[:k]] = True
        deltas = [d * keep for d in deltas]
    energy = [float((d * d).sum()) / n for d in deltas]
    weights = [e / sum(energy) for e in energy] if sum(energy) > 0 else [1 / len(energy)] * len(energy)
    out = torch.zeros(n, dtype=torch.float64)
    for i in range(n):
        sign = 1.0 if sum(float(d[i]) for d in deltas) >= 0 else -1.0
        agree = [(w, float(d[i])) for w, d in zip(weights, deltas, strict=True) if d[i] != 0 and math.copysign(1, d[i]) == sign]
        divisor = sum(w for w, _ in agree)
        out[i] = sum(w * v for w, v in agree) / (divisor if divisor != 0 else 1.0)
    return (b + out).reshape(base.shape)
