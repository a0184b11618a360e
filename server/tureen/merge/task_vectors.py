"""One generalized task-vector merge: task arithmetic, TIES, DARE, breadcrumbs and DELLA.

All of them compute task vectors ``delta_i = theta_i - base``, optionally thin each one out
(``sparsify``), optionally elect a sign per entry and drop the entries that disagree with it
(``consensus``), and return ``base + lambda * merged`` with

    merged = sum_i w_i * delta_i * agree_i  /  (sum_i w_i * agree_i   if normalize else 1)

Papers: task arithmetic, Ilharco et al. 2023 (https://arxiv.org/abs/2212.04089); TIES, Yadav
et al. 2023 (https://arxiv.org/abs/2306.01708); DARE, Yu et al. 2024
(https://arxiv.org/abs/2311.03099); breadcrumbs, Davari & Belilovsky 2024
(https://arxiv.org/abs/2312.06795); DELLA, Deep et al. 2024 (https://arxiv.org/abs/2406.11617).
The eager path runs in chunks, so temporaries stay a few chunks big whatever the tensor size;
the compiled path (``tureen.merge.kernels``) does the same math in one pass with none.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol

import torch

from tureen.merge.kernels import MIN_ELEMENTS, on_device, run_compiled, signature, task_vector_kernel

CHUNK = 1 << 18
"""Elements per eager step: the N task-vector rows of one chunk (1 MiB each in float32) stay in
cache through the dozen passes a step makes over them (``python bench/merge.py`` prints the
eager rates)."""
Consensus = Literal["total", "frequency"] | None


class Sparsifier(Protocol):
    """Thins out one ingredient's task vector; see ``tureen.merge.sparsify``."""

    @property
    def kind(self) -> str: ...

    def apply(self, chunk: torch.Tensor, start: int) -> torch.Tensor:
        """Thin ``chunk`` (entries ``start`` onwards of the flat task vector) in place."""
        ...

    def fused(self) -> tuple[float, float, int] | None:
        """(low, high, seed) for ``task_vector_kernel``, or None when only the eager path can do it."""
        ...


_KEEP_ALL = {"magnitude": (float("-inf"), float("inf"), 0), "random": (1.0, 1.0, 0)}


def task_vector_merge(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    lam: float = 1.0,
    normalize: bool = False,
    consensus: Consensus = None,
    sparsifiers: Sequence[Sparsifier | None] | None = None,
    out: torch.Tensor | None = None,
    compiled: bool = False,
    chunk: int = CHUNK,
    offset: int = 0,
) -> torch.Tensor:
    """``base + lam * merged`` written into ``out`` (new float32 when None); see the module
    docstring. ``offset``: where these tensors start in the flat tensor they are a piece of (the
    positions that random masks are drawn by)."""
    if len(tensors) != len(weights) or not tensors:
        raise ValueError(f"one weight per ingredient needed, got {len(weights)} for {len(tensors)}")
    if normalize and consensus is None and sum(weights) == 0:
        raise ValueError("weights sum to 0 and cannot be normalized")
    if out is None:
        out = torch.empty(base.shape, dtype=torch.float32, device=base.device)
    flats = [t.reshape(-1) for t in tensors]
    positional = offset and any(getattr(s, "kind", None) in ("random", "ranked") for s in sparsifiers or ())
    fused = compiled and out.numel() >= MIN_ELEMENTS and not positional  # the kernel draws masks from position 0
    if fused and _merge_fused(out, base, flats, weights, lam, normalize, consensus, sparsifiers):
        return out
    flat_out, flat_base = out.view(-1), base.reshape(-1)
    host = torch.tensor(list(weights), dtype=torch.float32)
    total = float(host.sum())  # on the host: reading it back from a GPU would wait per chunk
    w = on_device(host, base.device).view(-1, 1)
    for start in range(0, flat_out.numel(), chunk):
        stop = min(start + chunk, flat_out.numel())
        b = flat_base[start:stop].to(torch.float32, copy=True)  # a copy: b becomes the output chunk
        deltas = torch.stack([f[start:stop] for f in flats]).float().sub_(b)
        for i, sparsify in enumerate(sparsifiers or ()):
            if sparsify is not None:
                sparsify.apply(deltas[i], offset + start)
        flat_out[start:stop] = b.add_(_combine(deltas.mul_(w), w, consensus, normalize, total), alpha=lam)
    return out


def _merge_fused(
    out: torch.Tensor,
    base: torch.Tensor,
    flats: list[torch.Tensor],
    weights: Sequence[float],
    lam: float,
    normalize: bool,
    consensus: Consensus,
    sparsifiers: Sequence[Sparsifier | None] | None,
) -> bool:
    """The whole merge in one compiled kernel; False (nothing written) when it cannot run."""
    fused = _fused_parameters(sparsifiers, len(flats))
    if fused is None:
        return False
    kind, low, high, seeds = fused
    device = base.device
    numbers = [on_device(torch.tensor(v, dtype=torch.float32), device) for v in (weights, lam, low, high)]
    signed = on_device(torch.tensor(seeds, dtype=torch.int64), device)
    static = {"sparsify": kind, "consensus": consensus, "normalize": normalize, "rescale": _rescale(sparsifiers)}
    key = signature(flats, base.dtype, out.dtype)
    return run_compiled(task_vector_kernel, key, out.view(-1), base.reshape(-1), *numbers, signed, *flats, **static)


def _combine(weighted: torch.Tensor, w: torch.Tensor, consensus: Consensus, normalize: bool, total: float) -> torch.Tensor:
    """One chunk's merged task vector from its weighted task vectors (one row per ingredient);
    ``total``: the weights' float32 sum."""
    if consensus is None:
        merged = weighted.sum(0)
        return merged.div_(total) if normalize else merged
    # The elected sign is +1 where the vote ties at 0; zero entries never agree with it.
    vote = weighted.sum(0) if consensus == "total" else weighted.sign().sum(0)
    elected = torch.where(vote >= 0, 1.0, -1.0)
    agree = weighted.sign() == elected
    merged = weighted.mul_(agree).sum(0)
    if normalize:
        divisor = (w * agree).sum(0)
        merged.div_(divisor.masked_fill_(divisor == 0, 1.0))
    return merged


def _fused_parameters(
    sparsifiers: Sequence[Sparsifier | None] | None, count: int
) -> tuple[str | None, list[float], list[float], list[int]] | None:
    """The kernel's per-ingredient (low, high, seed), or None when a sparsifier is eager-only."""
    if sparsifiers is None:
        return None, [0.0] * count, [0.0] * count, [0] * count
    kinds = {s.kind for s in sparsifiers if s is not None}
    if not kinds:
        return None, [0.0] * count, [0.0] * count, [0] * count
    if len(kinds) > 1 or next(iter(kinds)) not in ("magnitude", "outliers", "random"):
        return None
    (kind,) = kinds
    rows = []
    for sparsify in sparsifiers:
        row = sparsify.fused() if sparsify is not None else _KEEP_ALL.get(kind)
        if row is None:
            return None
        rows.append(row)
    return kind, [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]


def _rescale(sparsifiers: Sequence[Sparsifier | None] | None) -> bool:
    return any(getattr(s, "rescale", False) for s in sparsifiers or ())
