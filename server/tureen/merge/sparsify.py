"""Ways to thin out a task vector before merging it: TIES trimming, DARE, breadcrumbs, DELLA.

Each sparsifier works chunk by chunk on a flat task vector, so a merge never holds more than
a chunk of temporaries per ingredient. Thresholds that depend on the whole tensor (a
magnitude quantile, a rank) are computed once from the tensor, or from a fixed random sample
of it when it is large: ``kthvalue`` on a sample instead of a full sort.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

SAMPLE = 1 << 16
"""Entries a threshold is estimated from; tensors this small or smaller are ranked exactly."""


def stable_seed(*parts: object) -> int:
    """A seed from the parts (seed, tensor name, ingredient name) that is the same in every process."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def kth_smallest(sample: torch.Tensor, k: int) -> float:
    """The k-th smallest value (1-based); -inf for k <= 0, so "> threshold" keeps everything."""
    if k <= 0:
        return float("-inf")
    return float(torch.kthvalue(sample, min(k, sample.numel())).values)


@dataclass(frozen=True)
class Magnitude:
    """TIES trimming: keep the ``density`` fraction of entries with the largest magnitude."""

    threshold: float

    @classmethod
    def fit(cls, sample: torch.Tensor, density: float) -> Magnitude:
        count = sample.numel()
        keep = max(1, int(density * count))  # as TIES does: at least the largest entry survives
        return cls(kth_smallest(sample, count - keep))

    def apply(self, chunk: torch.Tensor) -> torch.Tensor:
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

    @classmethod
    def fit(cls, sample: torch.Tensor, density: float, gamma: float) -> Outliers:
        count = sample.numel()
        keep, top = int(density * count), int(gamma * count)
        bottom = max(0, count - keep - top)
        return cls(low=kth_smallest(sample, bottom), high=kth_smallest(sample, bottom + keep))

    def apply(self, chunk: torch.Tensor) -> torch.Tensor:
        magnitude = chunk.abs()
        return chunk.masked_fill_((magnitude <= self.low) | (magnitude > self.high), 0.0)


@dataclass
class Random:
    """DARE: keep each entry with probability ``density``; rescaled by 1/density when asked.

    Dividing by the density keeps the expectation of every entry (the paper's rescaling);
    mergekit 0.1.x instead matches the tensor's L1 norm, which is about the same factor.
    """

    density: float
    rescale: bool
    generator: torch.Generator

    def apply(self, chunk: torch.Tensor) -> torch.Tensor:
        if self.density >= 1.0:
            return chunk
        keep = torch.rand(chunk.shape, generator=self.generator, device=chunk.device) < self.density
        chunk.mul_(keep)
        return chunk.div_(self.density) if self.rescale else chunk


@dataclass
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
    generator: torch.Generator

    @classmethod
    def fit(cls, sample: torch.Tensor, density: float, epsilon: float, rescale: bool, generator: torch.Generator) -> Ranked:
        return cls(torch.sort(sample).values, density, epsilon, rescale, generator)

    def apply(self, chunk: torch.Tensor) -> torch.Tensor:
        count = self.sorted_sample.numel()
        rank = torch.searchsorted(self.sorted_sample, chunk.abs().contiguous()).float() / max(count - 1, 1)
        probability = (self.density - self.epsilon + 2.0 * self.epsilon * rank.clamp_(0.0, 1.0)).clamp_(0.0, 1.0)
        keep = torch.rand(chunk.shape, generator=self.generator, device=chunk.device) < probability
        chunk.mul_(keep)
        return chunk.div_(probability) if self.rescale else chunk
