"""Which device ingredients and blends live on."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from tureen.errors import SoupError


def resolve_device(name: str = "auto") -> torch.device:
    """Map ``auto | cpu | cuda | cuda:N`` to a torch device; ``auto`` picks CUDA when present."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SoupError(f"--device: {name!r} is not a device (use auto, cpu, cuda or cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise SoupError(f"--device: {name!r} is not supported (use auto, cpu, cuda or cuda:N)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SoupError(f"--device: {name!r} asked for, but this machine has no usable CUDA device")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SoupError(f"--device: {name!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    return device


@dataclass(frozen=True)
class CpuThreads:
    """How many threads torch's CPU operators get, by where the work runs."""

    loop: int
    """A forward on the serving loop, and a build: the loop waits for such a forward, so its core is the forward's too."""
    beside: int
    """Work beside the loop (forward workers, generation loops): one core is left to the loop."""


def cpu_threads(requested: int | None, device: torch.device, environ: Mapping[str, str], chosen: int) -> CpuThreads:
    """The thread counts of a server on ``device``; ``chosen`` is torch's own count.

    Asked for (``--cpu-threads``), it is that everywhere. Otherwise, when forwards run on the CPU,
    a forward on the serving loop gets every core and work beside the loop gets the cores less
    one: on a small machine a forward that wants every core waits for the one receiving requests,
    while a forward on the loop has nothing to wait for (``bench/peers.py``'s big-model rows show
    the throughput of both). The cores are ``OMP_NUM_THREADS`` (or ``MKL_NUM_THREADS``) when set,
    as Kubernetes sets it from a pod's CPU limit, else those this process may run on. On another
    device, or with a value torch reads its own way, every thread gets ``chosen``.
    """
    if requested is not None:
        return CpuThreads(requested, requested)
    cores = _cores_from(environ) if device.type == "cpu" else None
    if cores is None:
        return CpuThreads(chosen, chosen)
    return CpuThreads(cores, max(1, cores - 1))


def available_cores() -> int:
    """The cores this process may run on."""
    return max(1, len(os.sched_getaffinity(0)))


def _cores_from(environ: Mapping[str, str]) -> int | None:
    """The cores the operator gave torch (None: a value torch reads its own way), else this
    process's CPU affinity."""
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        if name in environ:
            first = environ[name].split(",")[0].strip()  # OpenMP allows a list, one count per nesting level
            return int(first) if first.isdigit() and int(first) > 0 else None
    return available_cores()


def limit_cpu_threads(requested: int | None, device: torch.device) -> CpuThreads:
    """Apply ``cpu_threads`` to this thread (the count beside the loop) and return it. Torch's own
    count is read first, before anything sets one: every thread is then given its count, since a
    thread that starts its pools later would take whatever count another thread set last (a
    build's, say)."""
    threads = cpu_threads(requested, device, os.environ, torch.get_num_threads())
    use_cpu_threads(threads.beside)
    return threads


def use_cpu_threads(count: int | None) -> None:
    """Give the calling thread's torch operators ``count`` threads (None: leave them).

    Torch's count is per thread once the thread has started its pools, and a thread starts them
    with the count last set by any thread; reading the count first starts them, so the count set
    here is not overwritten later by one set elsewhere.
    """
    if count is not None and torch.get_num_threads() != count:
        torch.set_num_threads(count)
