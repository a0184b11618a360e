"""Which device ingredients and blends live on."""

from __future__ import annotations

import os
from collections.abc import Mapping

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


def cpu_threads(requested: int | None, device: torch.device, environ: Mapping[str, str]) -> int | None:
    """How many threads torch's CPU operators get (None: leave torch's own choice).

    Asked for, it is that. Otherwise, when forwards run on the CPU and neither ``OMP_NUM_THREADS``
    nor ``MKL_NUM_THREADS`` is set, one core is left to the serving loop: on a small machine a
    forward that wants every core waits for the one receiving requests (``bench/peers.py``'s
    big-model rows with dynamic batching show the throughput this gives).
    """
    if requested is not None:
        return requested
    if device.type != "cpu" or "OMP_NUM_THREADS" in environ or "MKL_NUM_THREADS" in environ:
        return None
    return max(1, len(os.sched_getaffinity(0)) - 1)


def limit_cpu_threads(requested: int | None, device: torch.device) -> int:
    """Apply ``cpu_threads`` to this process; returns the thread count torch now uses."""
    threads = cpu_threads(requested, device, os.environ)
    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()
