"""One flat allocation per blend and per ingredient, its tensors carved out of it as views.

A blend is written once by the merge, so the first touch of its memory is the merge itself.
On Linux each first touch of a 4 KiB page costs a fault and a zeroing; for a blend of a few
hundred megabytes that is as slow as writing it twice. One anonymous mapping with
``MADV_HUGEPAGE`` takes 2 MiB pages instead (512 times fewer faults), whatever the process's
``THP_MEM_ALLOC_ENABLE``, and gives the whole blend back to the system at once when its last
tensor goes. GPUs, and systems without ``madvise``, get a plain ``torch.empty``.

Laid out alike, ingredients and blend also let a merge treat a run of tensors with the same
parameters as one long tensor (``span``): one kernel call instead of one per tensor.
"""

from __future__ import annotations

import contextlib
import mmap
from collections.abc import Iterable

import torch

ALIGN = 64
"""Every tensor starts on a cache line, which vectorized kernels assume."""


def flat_buffer(nbytes: int, device: torch.device) -> torch.Tensor:
    """An uninitialized uint8 tensor of ``nbytes`` on ``device``."""
    if device.type != "cpu" or nbytes < (2 << 20) or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(nbytes, dtype=torch.uint8, device=device)
    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(OSError):  # transparent huge pages disabled: 4 KiB pages it is
        region.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(region, dtype=torch.uint8)  # keeps the mapping alive, unmapped with the last view


def carve(layout: Iterable[tuple[str, torch.Size, torch.dtype]], device: torch.device) -> dict[str, torch.Tensor]:
    """Uninitialized tensors of the given shapes and dtypes, all views of one flat buffer."""
    layout = list(layout)
    offsets, total = [], 0
    for _, shape, dtype in layout:
        offsets.append(total)
        total += -(-shape.numel() * dtype.itemsize // ALIGN) * ALIGN
    buffer = flat_buffer(max(total, ALIGN), device)
    return {
        name: buffer[start : start + shape.numel() * dtype.itemsize].view(dtype).view(shape)
        for (name, shape, dtype), start in zip(layout, offsets, strict=True)
    }


def span(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]] | None:
    """One flat view over ``tensors`` when they lie in order in one buffer, and their offsets in it.

    The tensors must share a storage and a dtype and follow one another with at most the
    alignment padding between them, as ``carve`` lays them out; otherwise None.
    """
    first = tensors[0]
    storage = first.untyped_storage()
    offsets: list[int] = []
    end = first.storage_offset()
    slack = ALIGN // first.itemsize
    for tensor in tensors:
        start = tensor.storage_offset()
        if (
            tensor.dtype != first.dtype
            or not tensor.is_contiguous()
            or tensor.untyped_storage().data_ptr() != storage.data_ptr()
            or not end <= start < end + slack
        ):
            return None
        offsets.append(int(start - first.storage_offset()))
        end = start + tensor.numel()
    length = int(end - first.storage_offset())
    view = torch.empty(0, dtype=first.dtype, device=first.device)
    return view.set_(storage, first.storage_offset(), (length,), (1,)), offsets


def available_bytes(device: torch.device) -> int | None:
    """Memory free for new tensors on ``device`` (Linux MemAvailable for the CPU), or None if unknown."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as meminfo:
                for line in meminfo:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None
