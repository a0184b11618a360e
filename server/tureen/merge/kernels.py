"""Fused merge kernels: a whole merge of one tensor as a single pass over memory.

Eager torch runs a merge as a chain of ops over chunks; each op has a fixed cost, and 16-bit
inputs are widened by separate copies, which caps a linear merge at a fraction of the memory
bandwidth. The kernels here are written as plain torch code and compiled by ``torch.compile``
into one loop that reads every input once, keeps the float32 accumulator in registers and
writes the output once.

Compiling costs seconds per signature (number of ingredients, dtypes, method flags), once
per process, so callers use these kernels only when asked to or when the merge is big enough
to pay for it (``tureen.core.recipe`` decides). When a signature fails to compile (no C++
compiler, a backend that cannot handle it) a warning is logged once and the caller's eager
path runs instead; results agree with the eager path to float32 rounding, and the random
masks of DARE and DELLA are the same bits on both paths (see ``uniform``).
"""

from __future__ import annotations

import logging
import threading
import types
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch

_log = logging.getLogger("tureen.merge")

Kernels = Literal["auto", "compiled", "eager"]
"""How to run merges: compiled kernels when big enough to pay off, always, or never."""

MIN_ELEMENTS = 1 << 16
"""Smaller tensors always take the eager path: a compiled call has its own fixed cost."""

_MASK32 = 0xFFFFFFFF


def uniform(index: torch.Tensor, seed: int | torch.Tensor) -> torch.Tensor:
    """A float32 in [0, 1) per entry, a pure function of (entry index, seed).

    A counter-based hash instead of a stateful generator: the draw for an entry does not depend
    on how the tensor is chunked or which path (eager or compiled) runs, so a DARE mask is
    reproducible from the seed, the tensor name and the ingredient alone. The mixing steps are
    the xorshift-multiply rounds of common 32-bit integer hashes, on int64 with multipliers
    below 2**31 so that no product overflows. ``seed`` is the 32-bit ``stable_seed``.
    """
    x = ((index & _MASK32) ^ seed) ^ ((index >> 32) * 0x2C1B3C6D & _MASK32)
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x5BD1E995) & _MASK32
    x = x ^ (x >> 16)
    return (x >> 8).to(torch.float32) * (1.0 / (1 << 24))


def linear_kernel(out: torch.Tensor, weights: torch.Tensor, *tensors: torch.Tensor) -> None:
    """``out = sum_i weights[i] * tensors[i]``, accumulated in float32."""
    acc = tensors[0].float() * weights[0]
    for i in range(1, len(tensors)):
        acc = acc + tensors[i].float() * weights[i]
    out.copy_(acc)


def task_vector_kernel(
    out: torch.Tensor,
    base: torch.Tensor,
    weights: torch.Tensor,
    lam: torch.Tensor,
    low: torch.Tensor,
    high: torch.Tensor,
    seeds: torch.Tensor,
    *tensors: torch.Tensor,
    sparsify: str | None,
    consensus: str | None,
    normalize: bool,
    rescale: bool,
) -> None:
    """The task-vector merge of ``tureen.merge.task_vectors`` for one whole tensor, fused.

    Per ingredient ``i``: ``magnitude`` keeps ``|delta| > low[i]``; ``outliers`` keeps
    ``low[i] < |delta| <= high[i]``; ``random`` keeps ``uniform(index, seeds[i]) < low[i]`` (the
    density) and divides by it when ``rescale``.
    """
    b = base.float()
    index = torch.arange(b.numel(), device=b.device) if sparsify == "random" else None
    weighted = [
        _thinned(tensor.float() - b, low[i], high[i], seeds[i], index, sparsify, rescale) * weights[i]
        for i, tensor in enumerate(tensors)
    ]
    if consensus is None:
        merged = weighted[0]
        for item in weighted[1:]:
            merged = merged + item
        if normalize:
            merged = merged / weights.sum()
    else:
        merged = _elected(weighted, weights, b, consensus, normalize)
    out.copy_(b + lam * merged)


def _thinned(
    delta: torch.Tensor,
    low: torch.Tensor,
    high: torch.Tensor,
    seed: torch.Tensor,
    index: torch.Tensor | None,
    sparsify: str | None,
    rescale: bool,
) -> torch.Tensor:
    """One ingredient's task vector with the entries its sparsifier drops set to 0 (traced inline)."""
    if sparsify == "magnitude":
        return torch.where(delta.abs() > low, delta, 0.0)
    if sparsify == "outliers":
        magnitude = delta.abs()
        return torch.where((magnitude > low) & (magnitude <= high), delta, 0.0)
    if sparsify == "random" and index is not None:
        delta = torch.where(uniform(index, seed) < low, delta, 0.0)
        return delta / low if rescale else delta
    return delta


def _elected(
    weighted: list[torch.Tensor], weights: torch.Tensor, b: torch.Tensor, consensus: str, normalize: bool
) -> torch.Tensor:
    """The sum of the weighted task vectors' entries that agree with the elected sign (traced inline)."""
    vote = weighted[0] if consensus == "total" else torch.sign(weighted[0])
    for item in weighted[1:]:
        vote = vote + (item if consensus == "total" else torch.sign(item))
    elected = torch.where(vote >= 0, 1.0, -1.0)
    merged = torch.zeros_like(b)
    divisor = torch.zeros_like(b)
    for i, item in enumerate(weighted):
        agree = torch.sign(item) == elected
        merged = merged + torch.where(agree, item, 0.0)
        divisor = divisor + torch.where(agree, weights[i], 0.0)
    if normalize:
        merged = merged / torch.where(divisor == 0, 1.0, divisor)
    return merged


_lock = threading.Lock()  # compiling is not thread-safe and may happen on any call; builds run one at a time anyway
_compiled: dict[tuple[Any, ...], Callable[..., None] | None] = {}
_runs: dict[str, int] = {}  # successful compiled calls by kernel name


def on_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor (weights, seeds) on ``device``. On a GPU it is copied from pinned
    memory without waiting: a plain copy, or ``torch.tensor(..., device=)``, synchronizes the
    stream, and a merge that did so per piece would keep its next piece's copies from
    overlapping this one's math."""
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def run_compiled(kernel: Callable[..., None], signature: tuple[Any, ...], *args: Any, **static: Any) -> bool:
    """Run ``kernel`` compiled for ``signature``; False (nothing written) when it cannot compile.

    Each signature gets its own copy of the kernel's code object, so compiled variants never
    evict one another from a shared cache. Tensor sizes are dynamic: one compilation serves
    every tensor of the model.
    """
    key = (kernel.__name__, signature, tuple(sorted(static.items())))
    with _lock:
        if key in _compiled and _compiled[key] is None:
            return False
        compiled = _compiled.get(key)
        if compiled is None:
            _log.info("compiling the fused %s for %s (once per process)", kernel.__name__.replace("_", " "), signature)
            compiled = _compiled[key] = torch.compile(_fresh(kernel, len(_compiled)), dynamic=True, fullgraph=True)
        try:
            compiled(*args, **static)
        except Exception as exc:  # no compiler, an unsupported device: the eager path is always there
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            _log.warning("fused %s unavailable (%s); merging eagerly", kernel.__name__.replace("_", " "), reason)
            _compiled[key] = None
            return False
        _runs[kernel.__name__] = _runs.get(kernel.__name__, 0) + 1
        return True


def compiled_runs(kernel: str) -> int:
    """How many times ``kernel`` has run compiled in this process (a fallback to eager does not count)."""
    with _lock:
        return _runs.get(kernel, 0)


def signature(tensors: Sequence[torch.Tensor], *more: object) -> tuple[object, ...]:
    """What a compiled kernel specializes on: device type, ingredient count and dtypes."""
    return (tensors[0].device.type, len(tensors), tuple(str(t.dtype) for t in tensors), *more)


def _fresh(kernel: Callable[..., None], tag: int) -> Callable[..., None]:
    code = kernel.__code__.replace(co_name=f"{kernel.__name__}_{tag}")
    return types.FunctionType(code, kernel.__globals__, code.co_name, kernel.__defaults__, kernel.__closure__)
