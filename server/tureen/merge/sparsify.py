"""Ways to thin out a task vector before merging it: TIES trimming, DARE, breadcrumbs, DELLA.

Each sparsifier works chunk by chunk on a flat task vector, so a merge never holds more than
a chunk of temporaries per ingredient. Thresholds that depend on the whole tensor (a
magnitude quantile, a rank) are computed once from the tensor, or from a fixed random sample
of it when it is large: ``kthvalue`` on a sample instead of a full sort.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from tureen.merge.kernels import uniform

SAMPLE = 1 << 15
"""Entries a threshold is estimated from; tensors this small or smaller are ranked exactly."""


def stable_seed(*parts: object) -> int:
    """A seed from the parts (seed, tensor name, ingredient name) that is the same in every process."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def stable_seed32(*parts: object) -> int:
    """``stable_seed`` cut to the 32 bits that ``uniform`` mixes."""
    return stable_seed(*parts) & 0xFFFFFFFF


BLOCK = 128
"""Sampled entries come in runs of this many neighbours: a run costs a few cache lines, while
scattered single entries would each pull in a whole line (64 bytes for 4 bytes used)."""


@functools.lru_cache(maxsize=32)
def sample_index(count: int, device: torch.device) -> torch.Tensor:
    """SAMPLE sorted positions out of ``count``: SAMPLE / BLOCK runs of BLOCK, one run at a random
    place in each of SAMPLE / BLOCK equal strata of the tensor.

    Stratified runs rather than independent draws: every region of the tensor is represented,
    gathering them reads a sixteenth of the memory that scattered entries would, and the
    positions, which depend on ``count`` only, are computed once per tensor size.
    """
    runs = SAMPLE // BLOCK
    generator = torch.Generator(device=device).manual_seed(stable_seed("sample", count))
    edges = torch.arange(runs + 1, device=device) * (count - BLOCK) // runs
    starts = edges[:-1] + (torch.rand(runs, generator=generator, device=device) * (edges[1:] - edges[:-1])).long()
    return (starts[:, None] + torch.arange(BLOCK, device=device)).reshape(-1)


def kth_smallest(sample: torch.Tensor, k: int) -> float:
    """The k-th smallest value (1-based); -inf for k <= 0, so "> threshold" keeps everything."""
    if k <= 0:
        return float("-inf")
    k = min(k, sample.numel())
    if sample.device.type == "cpu":  # numpy's introselect is about 1.5x torch.kthvalue's speed on a CPU
        return float(np.partition(sample.numpy(), k - 1)[k - 1])
    return float(torch.kthvalue(sample, k).values)


@dataclass(frozen=True)
class Magnitude:
    """TIES trimming: keep the ``density`` fraction of entries with the largest magnitude."""

    threshold: float
    kind: ClassVar[str] = "magnitude"

    @classmethod
    def fit(cls, sample: torch.Tensor, density: float) -> Magnitude:
        count = sample.numel()
        keep = max(1, int(density * count))  # as TIES does: at least the largest entry survives
        return cls(kth_smallest(sample, count - keep))

    def fused(self) -> tuple[float, float, int]:
        return self.threshold, float("inf"), 0

    def apply(self, chunk: torch.Tensor, start: int) -> torch.Tensor:
        return chunk.masked_fill_(chunk.abs() <= self.threshold, 0.0) if self.threshold > float("-inf") else chunk


@dataclass(frozen=True)
class Outliers:
    """Breadcrumbs: drop the ``gamma`` largest-magnitude entries and the smallest, keep ``density``.

    Of N entries ranked by magnitude, ``floor(density N)`` are kept: those just below the top
    ``floor(gamma N)``. When gamma + density exceed 1 fewer outliers go, so that the density
    holds (mergekit 0.1.5's reading).
    """

    low: float
    high: float
    kind: ClassVar[str] = "outliers"

    @classmethod
    def fit(cls, sample: torch.Tensor, density: float, gamma: float) -> Outliers:
        count = sample.numel()
        keep, top = int(density * count), int(gamma * count)
        bottom = max(0, count - keep - top)
        return cls(low=kth_smallest(sample, bottom), high=kth_smallest(sample, bottom + keep))

    def fused(self) -> tuple[float, float, int]:
        return self.low, self.high, 0

    def apply(self, chunk: torch.Tensor, start: int) -> torch.Tensor:
        magnitude = chunk.abs()
        return chunk.masked_fill_((magnitude <= self.low) | (magnitude > self.high), 0.0)


@dataclass(frozen=True)
class Random:
    """DARE: keep each entry with probability ``density``; rescaled by 1/density when asked.

    Dividing by the density keeps the expectation of every entry (the paper's rescaling);
    mergekit 0.1.x instead matches the tensor's L1 norm, which is about the same factor.
    """

    density: float
    rescale: bool
    seed: int
    """32 bits from ``stable_seed32(seed, tensor, ingredient)``: the mask depends on nothing else."""
    kind: ClassVar[str] = "random"

    def fused(self) -> tuple[float, float, int]:
        return self.density, 1.0, self.seed

    def apply(self, chunk: torch.Tensor, start: int) -> torch.Tensor:
        if self.density >= 1.0:
            return chunk
        keep = uniform(torch.arange(start, start + chunk.numel(), device=chunk.device), self.seed) < self.density
        chunk.mul_(keep)
        return chunk.div_(self.density) if self.rescale else chunk


@dataclass(frozen=True)
class Ranked:
    """DELLA's MagPrune: keep probability rises linearly with magnitude rank.

    Ranks are read off a sorted sample of the whole tensor's magnitudes (mergekit ranks within
    each row); the smallest entry is kept with probability ``density - epsilon``, the largest
    with ``density + epsilon``, and kept entries are divided by their own probability when
    ``rescale`` is set, which keeps the expectation (the paper's rescaling; mergekit 0.1.x
    instead matches the tensor's L1 norm).
    """

    sorted_sample: torch.Tensor
    density: float
    epsilon: float
    rescale: bool
    seed: int
    kind: ClassVar[str] = "ranked"

    @classmethod
    def fit(cls, sample: torch.Tensor, density: float, epsilon: float, rescale: bool, seed: int) -> Ranked:
        return cls(torch.sort(sample).values, density, epsilon, rescale, seed)

    def fused(self) -> None:
        return None  # ranks come from a sorted sample: eager only

    def apply(self, chunk: torch.Tensor, start: int) -> torch.Tensor:
        count = self.sorted_sample.numel()
        rank = torch.searchsorted(self.sorted_sample, chunk.abs().contiguous()).float() / max(count - 1, 1)
        probability = (self.density - self.epsilon + 2.0 * self.epsilon * rank.clamp_(0.0, 1.0)).clamp_(0.0, 1.0)
        keep = uniform(torch.arange(start, start + chunk.numel(), device=chunk.device), self.seed) < probability
        chunk.mul_(keep)
        return chunk.div_(probability) if self.rescale else chunk
