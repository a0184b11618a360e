"""One generalized task-vector merge: task arithmetic, TIES, DARE, breadcrumbs and DELLA.

All of them compute task vectors ``delta_i = theta_i - base``, optionally thin each one out
(``sparsify``), optionally elect a sign per entry and drop the entries that disagree with it
(``consensus``), and return ``base + lambda * merged`` with

    merged = sum_i w_i * delta_i * agree_i  /  (sum_i w_i * agree_i   if normalize else 1)

Papers: task arithmetic, Ilharco et al. 2023 (https://arxiv.org/abs/2212.04089); TIES, Yadav
et al. 2023 (https://arxiv.org/abs/2306.01708); DARE, Yu et al. 2024
(https://arxiv.org/abs/2311.03099); breadcrumbs, Davari & Belilovsky 2024
(https://arxiv.org/abs/2312.06795); DELLA, Deep et al. 2024 (https://arxiv.org/abs/2406.11617).
The work runs in chunks, so temporaries stay a few chunks big whatever the tensor size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch

CHUNK = 1 << 21
Consensus = Literal["total", "frequency"] | None
Sparsifier = Callable[[torch.Tensor], torch.Tensor]  # thins one chunk of one task vector in place


def task_vector_merge(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    lam: float = 1.0,
    normalize: bool = False,
    consensus: Consensus = None,
    sparsifiers: Sequence[Sparsifier | None] | None = None,
    chunk: int = CHUNK,
) -> torch.Tensor:
    """``base + lam * merged`` in float32, computed chunk by chunk (see the module docstring)."""
    if len(tensors) != len(weights) or not tensors:
        raise ValueError(f"one weight per ingredient needed, got {len(weights)} for {len(tensors)}")
    if normalize and consensus is None and sum(weights) == 0:
        raise ValueError("weights sum to 0 and cannot be normalized")
    out = torch.empty(base.shape, dtype=torch.float32, device=base.device)
    flat_out, flat_base = out.view(-1), base.reshape(-1)
    flats = [t.reshape(-1) for t in tensors]
    w = torch.tensor(list(weights), dtype=torch.float32, device=base.device).view(-1, 1)
    for start in range(0, flat_out.numel(), chunk):
        stop = min(start + chunk, flat_out.numel())
        b = flat_base[start:stop].to(torch.float32, copy=True)  # a copy: b becomes the output chunk
        deltas = torch.stack([f[start:stop] for f in flats]).float().sub_(b)
        if sparsifiers is not None:
            for i, sparsify in enumerate(sparsifiers):
                if sparsify is not None:
                    sparsify(deltas[i])
        weighted = deltas.mul_(w)
        if consensus is None:
            merged = weighted.sum(0)
            if normalize:
                merged.div_(float(w.sum()))
        else:
            # The elected sign is +1 where the vote ties at 0; zero entries never agree with it.
            vote = weighted.sum(0) if consensus == "total" else weighted.sign().sum(0)
            elected = torch.where(vote >= 0, 1.0, -1.0)
            agree = weighted.sign() == elected
            merged = weighted.mul_(agree).sum(0)
            if normalize:
                divisor = (w * agree).sum(0)
                merged.div_(divisor.masked_fill_(divisor == 0, 1.0))
        flat_out[start:stop] = b.add_(merged, alpha=lam)
    return out
