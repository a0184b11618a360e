"""Ways to thin out a task vector before merging it: TIES trimming, DARE, breadcrumbs, DELLA.

Each sparsifier works chunk by chunk on a flat task vector, so a merge never holds more than
a chunk of temporaries per ingredient. Thresholds that depend on the whole tensor (a
magnitude quantile) are exact by default: a radix select over the float32 bits of the
magnitudes, two passes of chunks (``kth_magnitude``), so the exact threshold costs two reads
of the tensor and no sort or copy of it. A method's ``rank_sample`` parameter opts into
estimating them from a fixed stratified sample instead (``sample_index``).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from tureen.merge.kernels import uniform

RANK_CHUNK = 1 << 20
"""Entries per step of the exact selection: its temporaries stay a few MiB whatever the tensor."""


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
def sample_index(count: int, size: int, device: torch.device) -> torch.Tensor:
    """``size`` sorted positions out of ``count``: ``size / BLOCK`` runs of BLOCK, one run at a
    random place in each of ``size / BLOCK`` equal strata of the tensor.

    Stratified runs rather than independent draws: every region of the tensor is represented,
    gathering them reads a sixteenth of the memory that scattered entries would, and the
    positions, which depend on ``count`` and ``size`` only, are computed once per tensor size.
    """
    runs = max(1, size // BLOCK)
    generator = torch.Generator(device=device).manual_seed(stable_seed("sample", count))
    edges = torch.arange(runs + 1, device=device) * (count - BLOCK) // runs
    starts = edges[:-1] + (torch.rand(runs, generator=generator, device=device) * (edges[1:] - edges[:-1])).long()
    return (starts[:, None] + torch.arange(BLOCK, device=device)).reshape(-1)


@dataclass(frozen=True)
class Magnitudes:
    """``|flat - base|`` of one ingredient's tensor, ranked exactly, or from a sample when
    ``sample`` positions are given."""

    flat: torch.Tensor
    base: torch.Tensor
    sample: torch.Tensor | None = None

    @classmethod
    def of(cls, flat: torch.Tensor, base: torch.Tensor, rank_sample: int) -> Magnitudes:
        if rank_sample <= 0 or flat.numel() <= max(rank_sample, BLOCK):
            return cls(flat, base)
        return cls(flat, base, sample_index(flat.numel(), rank_sample, flat.device))

    @property
    def count(self) -> int:
        return self.flat.numel() if self.sample is None else self.sample.numel()

    def values(self) -> torch.Tensor:
        """Every magnitude ranked (the sample's, when sampled), as float32."""
        if self.sample is None:
            return (self.flat.float() - self.base.float()).abs_()
        return (self.flat.index_select(0, self.sample).float() - self.base.index_select(0, self.sample).float()).abs_()

    def kth(self, k: int) -> float:
        """The k-th smallest magnitude (1-based) of the ranked ones; -inf for k <= 0."""
        if self.sample is not None:
            return kth_smallest(self.values(), k)
        return kth_magnitude(self.flat, self.base, k)


def kth_magnitude(flat: torch.Tensor, base: torch.Tensor, k: int) -> float:
    """The k-th smallest of ``|flat - base|`` (1-based), exactly; -inf for k <= 0.

    Magnitudes are non-negative float32, whose bit patterns sort as integers do. The first pass
    counts them by their top 16 bits and finds the bucket holding the k-th; the second counts
    that bucket's members by their low 16 bits. Both passes go chunk by chunk.
    """
    if k <= 0:
        return float("-inf")
    k = min(k, flat.numel())
    high = torch.zeros(1 << 15, dtype=torch.int64, device=flat.device)
    for bits in _magnitude_bits(flat, base):
        high += torch.bincount(bits >> 16, minlength=1 << 15)
    cumulative = high.cumsum(0)
    bucket = int(torch.searchsorted(cumulative, k))
    below = int(cumulative[bucket - 1]) if bucket else 0
    low = torch.zeros(1 << 16, dtype=torch.int64, device=flat.device)
    for bits in _magnitude_bits(flat, base):
        low += torch.bincount(bits[(bits >> 16) == bucket] & 0xFFFF, minlength=1 << 16)
    offset = int(torch.searchsorted(low.cumsum(0), k - below))
    return float(torch.tensor([(bucket << 16) | offset], dtype=torch.int32).view(torch.float32))


def _magnitude_bits(flat: torch.Tensor, base: torch.Tensor) -> Iterator[torch.Tensor]:
    for start in range(0, flat.numel(), RANK_CHUNK):
        stop = start + RANK_CHUNK
        magnitude = (flat[start:stop].float() - base[start:stop].float()).abs_()
        yield magnitude.view(torch.int32)


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
    def fit(cls, magnitudes: Magnitudes, density: float) -> Magnitude:
        count = magnitudes.count
        keep = max(1, int(density * count))  # as TIES does: at least the largest entry survives
        return cls(magnitudes.kth(count - keep))

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
    def fit(cls, magnitudes: Magnitudes, density: float, gamma: float) -> Outliers:
        count = magnitudes.count
        keep, top = int(density * count), int(gamma * count)
        bottom = max(0, count - keep - top)
        return cls(low=magnitudes.kth(bottom), high=magnitudes.kth(bottom + keep))

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

    Ranks are read off the sorted magnitudes of the whole tensor, or of a sample with
    ``rank_sample`` (mergekit ranks within
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
    def fit(cls, magnitudes: Magnitudes, density: float, epsilon: float, rescale: bool, seed: int) -> Ranked:
        return cls(torch.sort(magnitudes.values()).values, density, epsilon, rescale, seed)

    def fused(self) -> None:
        return None  # ranks come from a sorted sample: eager only

    def apply(self, chunk: torch.Tensor, start: int) -> torch.Tensor:
        count = self.sorted_sample.numel()
        rank = torch.searchsorted(self.sorted_sample, chunk.abs().contiguous()).float() / max(count - 1, 1)
        probability = (self.density - self.epsilon + 2.0 * self.epsilon * rank.clamp_(0.0, 1.0)).clamp_(0.0, 1.0)
        keep = uniform(torch.arange(start, start + chunk.numel(), device=chunk.device), self.seed) < probability
        chunk.mul_(keep)
        return chunk.div_(probability) if self.rescale else chunk
