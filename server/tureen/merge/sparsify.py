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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from tureen.merge.kernels import uniform

RANK_CHUNK = 1 << 18
"""Entries per step of the exact selection: its temporaries stay about a MiB whatever the tensor
(and whatever the piece a streamed merge reads)."""


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
    """The k-th smallest of ``|flat - base|`` (1-based), exactly; -inf for k <= 0."""

    def sweep() -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
        for start in range(0, flat.numel(), RANK_CHUNK):
            yield [flat[start : start + RANK_CHUNK]], base[start : start + RANK_CHUNK]

    return kth_magnitudes(sweep, [(k,)], flat.numel())[0][0]


Sweep = Callable[[], Iterator[tuple[list[torch.Tensor], torch.Tensor]]]
"""Yields a tensor's pieces in order, each as (the ingredients' pieces, the base's piece)."""


def kth_magnitudes(sweep: Sweep, wanted: Sequence[Sequence[int]], count: int) -> list[list[float]]:
    """For each ingredient, the k-th smallest of ``|theta_i - base|`` for each k it wants
    (1-based; -inf for k <= 0), exactly, from two sweeps over the pieces.

    Magnitudes are non-negative float32, whose bit patterns sort as integers do. The first sweep
    counts them by their top 16 bits and finds the bucket holding each k-th; the second counts
    those buckets' members by their low 16 bits. A sweep holds one piece per ingredient, so the
    tensor may be read from disk piece by piece, never whole.
    """
    wanted = [[min(k, count) for k in ks] for ks in wanted]
    ranked = [i for i, ks in enumerate(wanted) if any(k > 0 for k in ks)]
    if not ranked:  # nothing to rank (every density keeps all): no sweep reads the pieces
        return [[float("-inf")] * len(ks) for ks in wanted]
    high: dict[int, torch.Tensor] = {}
    for pieces, base in sweep():
        for i in ranked:
            for bits in _bits(pieces[i], base):
                counts = _count(bits >> 16, 1 << 15)
                high[i] = counts if i not in high else high[i].add_(counts)
    buckets: dict[tuple[int, int], tuple[int, int]] = {}  # (ingredient, k) -> (bucket, entries below it)
    for i in ranked:
        cumulative = high[i].cumsum(0)
        for k in wanted[i]:
            bucket = int(torch.searchsorted(cumulative, k)) if k > 0 else 0
            buckets[i, k] = (bucket, int(cumulative[bucket - 1]) if bucket else 0)
    low: dict[tuple[int, int], torch.Tensor] = {}
    for pieces, base in sweep():
        for i in ranked:
            for bits in _bits(pieces[i], base):
                for k in {k for k in wanted[i] if k > 0}:
                    counts = _count_low(bits, buckets[i, k][0])
                    low[i, k] = counts if (i, k) not in low else low[i, k].add_(counts)
    return [[_value(low, buckets, i, k) for k in ks] for i, ks in enumerate(wanted)]


def _count(values: torch.Tensor, bins: int) -> torch.Tensor:
    """How many of ``values`` (each in ``[0, bins)``) fall in each bin, as int64. On a GPU
    without ``bincount``, which reads the largest value back and so waits for the device on
    every call: a streamed merge would stop copying its next piece while this one is counted."""
    if values.device.type == "cpu":
        return torch.bincount(values, minlength=bins)
    ones = torch.ones(values.shape, dtype=torch.int64, device=values.device)
    return torch.zeros(bins, dtype=torch.int64, device=values.device).index_add_(0, values.long(), ones)


def _count_low(bits: torch.Tensor, bucket: int) -> torch.Tensor:
    """Counts of the low 16 bits of the entries whose top bits are ``bucket``. On a GPU the
    others go to one extra bin instead of being selected out, which would read back their count."""
    if bits.device.type == "cpu":
        return torch.bincount(bits[(bits >> 16) == bucket] & 0xFFFF, minlength=1 << 16)
    return _count(torch.where((bits >> 16) == bucket, bits & 0xFFFF, 1 << 16), (1 << 16) + 1)[: 1 << 16]


def _bits(piece: torch.Tensor, base: torch.Tensor) -> Iterator[torch.Tensor]:
    """The float32 bits of ``|piece - base|``, RANK_CHUNK entries at a time."""
    for start in range(0, piece.numel(), RANK_CHUNK):
        stop = start + RANK_CHUNK
        yield (piece[start:stop].float() - base[start:stop].float()).abs_().view(torch.int32)


def _value(low: dict[tuple[int, int], torch.Tensor], buckets: dict[tuple[int, int], tuple[int, int]], i: int, k: int) -> float:
    if k <= 0:
        return float("-inf")
    bucket, below = buckets[i, k]
    offset = int(torch.searchsorted(low[i, k].cumsum(0), k - below))
    return float(torch.tensor([(bucket << 16) | offset], dtype=torch.int32).view(torch.float32))


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
        return cls.of([magnitudes.kth(k) for k in cls.ranks(magnitudes.count, density)])

    @staticmethod
    def ranks(count: int, density: float) -> tuple[int, ...]:
        """The ranks whose magnitudes ``of`` needs, of ``count`` entries."""
        return (count - max(1, int(density * count)),)  # as TIES does: at least the largest entry survives

    @classmethod
    def of(cls, values: Sequence[float]) -> Magnitude:
        return cls(values[0])

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
        return cls.of([magnitudes.kth(k) for k in cls.ranks(magnitudes.count, density, gamma)])

    @staticmethod
    def ranks(count: int, density: float, gamma: float) -> tuple[int, ...]:
        keep, top = int(density * count), int(gamma * count)
        bottom = max(0, count - keep - top)
        return bottom, bottom + keep

    @classmethod
    def of(cls, values: Sequence[float]) -> Outliers:
        return cls(low=values[0], high=values[1])

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
