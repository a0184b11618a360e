"""Interpolation on the sphere: SLERP for two models, multi-SLERP and the Karcher mean for more.

Each tensor is treated as one vector. Directions are interpolated on the unit sphere and the
result is given back a norm (interpolated, or the weighted mean of the inputs' norms). Nearly
parallel inputs, where the angle carries no information, fall back to linear interpolation.
Edge cases follow mergekit 0.1.5, so that configs written for it give the same tensors.

SLERP: Shoemake, "Animating rotation with quaternion curves", SIGGRAPH 1985. Karcher mean:
Karcher, "Riemannian center of mass and mollifier smoothing", 1977; its use for merging:
https://arxiv.org/abs/2503.07211 (mergekit's ``karcher``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

COLINEAR = 0.9995
"""Above this |cosine| between two directions, interpolate linearly instead."""
EPS = 1e-8


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation from ``v0`` (t=0) to ``v1`` (t=1), in float32."""
    a, b = v0.float(), v1.float()
    norm_a, norm_b = float(a.norm()), float(b.norm())
    if norm_a < EPS or norm_b < EPS:
        return torch.lerp(a, b, t)
    dot = float((a.reshape(-1) @ b.reshape(-1)) / (norm_a * norm_b))
    if abs(dot) > COLINEAR:
        return torch.lerp(a, b, t)
    theta = math.acos(max(-1.0, min(1.0, dot)))
    sin_theta = math.sin(theta)
    s0 = math.sin((1.0 - t) * theta) / sin_theta
    s1 = math.sin(t * theta) / sin_theta
    return a * s0 + b * s1


def nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, *, row_wise: bool = False, flatten: bool = True) -> torch.Tensor:
    """SLERP of ``v0`` and ``v1`` as many vectors at once (mergekit's ``nuslerp``), in float32.

    With ``flatten`` each tensor is one vector (the SLERP above, with nuslerp's own edge cases);
    without, a matrix is interpolated vector by vector: its rows, or its columns with
    ``row_wise``. Vectors whose angle has a sine below 1e-8 are interpolated linearly.
    """
    a, b = v0.float(), v1.float()
    shape = a.shape
    if flatten or a.dim() < 2:
        a, b = a.reshape(1, -1), b.reshape(1, -1)
    elif row_wise:
        a, b = a.transpose(0, -1), b.transpose(0, -1)
    unit_a = a / a.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    unit_b = b / b.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    theta = torch.acos((unit_a * unit_b).sum(dim=-1, keepdim=True).clamp(-1.0, 1.0))
    sin_theta = torch.sin(theta)
    curved = (torch.sin((1.0 - t) * theta) * a + torch.sin(t * theta) * b) / sin_theta
    out = torch.where(sin_theta.abs() < EPS, torch.lerp(a, b, t), curved)
    if row_wise and not flatten and len(shape) >= 2:
        out = out.transpose(0, -1)
    return out.reshape(shape)


def multislerp(
    tensors: Sequence[torch.Tensor], weights: Sequence[float], base: torch.Tensor | None = None, normalize_weights: bool = True
) -> torch.Tensor:
    """Weighted spherical barycenter in one tangent-space step (mergekit's ``multislerp``).

    Directions ``u_i`` are averaged linearly to a point ``m`` on the sphere; their components
    tangent to the sphere at ``m`` are averaged and mapped back with the exponential map; the
    norm is the weighted mean of the inputs' norms. With a base, the task vectors
    ``t_i - base`` are interpolated and the base added back.
    """
    if len(tensors) == 1:
        return tensors[0].float()
    w = _weights(weights, normalize_weights)
    offset = base.float().reshape(-1) if base is not None else None
    vectors = [t.float().reshape(-1) - offset if offset is not None else t.float().reshape(-1) for t in tensors]
    norms = [float(v.norm()) for v in vectors]
    units = [v / (n + EPS) for v, n in zip(vectors, norms, strict=True)]
    mean = _weighted_sum(w, units)
    if float(mean.norm()) < EPS:
        if len(tensors) != 2:
            raise ValueError("the directions cancel out (antipodal inputs); multislerp has no answer")
        return _restore(_weighted_sum(w, vectors), tensors[0], base)
    point = mean / mean.norm()
    tangent = _weighted_sum(w, [u - float(u @ point) * point for u in units])
    length = float(tangent.norm()) + EPS
    direction = point * math.cos(length) + tangent * (math.sin(length) / length)
    return _restore(direction * sum(wi * n for wi, n in zip(w, norms, strict=True)), tensors[0], base)


def karcher(tensors: Sequence[torch.Tensor], weights: Sequence[float], max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    """Weighted Karcher (Riemannian) mean of the directions, scaled by the weighted mean norm.

    Inputs whose norm is below ``tol`` take no part in the direction; iteration stops when the
    tangent step is shorter than ``tol`` or after ``max_iter`` steps.
    """
    w = _weights(weights, True)
    if len(tensors) == 1:
        return tensors[0].float()
    vectors = [t.float().reshape(-1) for t in tensors]
    norms = [float(v.norm()) for v in vectors]
    scale = sum(wi * n for wi, n in zip(w, norms, strict=True))
    valid = [i for i, n in enumerate(norms) if n > tol]
    if not valid:
        return torch.zeros_like(tensors[0], dtype=torch.float32)
    total = sum(w[i] for i in valid)
    alphas = {i: w[i] / total for i in valid}
    units = {i: vectors[i] / norms[i] for i in valid}
    mean = _weighted_sum([alphas[i] for i in valid], [units[i] for i in valid])
    point = units[valid[0]] if float(mean.norm()) < tol else mean / mean.norm()
    for _ in range(max_iter):
        step = torch.zeros_like(point)
        for i in valid:
            cos = float(torch.clamp(point @ units[i], -1.0, 1.0))
            theta = math.acos(cos)
            if theta >= tol:
                step.add_(units[i] - cos * point, alpha=alphas[i] * theta / math.sin(theta))
        length = float(step.norm())
        if length < tol:
            break
        point = point * math.cos(length) + step * (math.sin(length) / length)
        point = point / point.norm()
    return _restore(point * scale, tensors[0], None)


def _weighted_sum(weights: Sequence[float], vectors: Sequence[torch.Tensor]) -> torch.Tensor:
    out = torch.zeros_like(vectors[0])
    for weight, vector in zip(weights, vectors, strict=True):
        out.add_(vector, alpha=weight)
    return out


def _weights(weights: Sequence[float], normalize: bool) -> list[float]:
    total = float(sum(weights))
    if normalize:
        if total == 0.0:
            raise ValueError("weights sum to 0 and cannot be normalized")
        return [float(x) / total for x in weights]
    return [float(x) for x in weights]


def _restore(flat: torch.Tensor, like: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
    shaped = flat.reshape(like.shape)
    return shaped + base.float() if base is not None else shaped
