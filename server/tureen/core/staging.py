"""A streamed merge's pieces, the next one's copies in flight while this one merges.

On a GPU, a piece of a ``host`` ingredient is a copy from pinned host memory: issued on the
merge's own stream, it would wait for the previous piece's math and the math for it, so the
copy engine and the compute units would take turns. ``Staging`` issues piece k+1's copies on a
stream of their own once piece k's math is queued, and makes the merge's stream wait only for
the copies it reads. At most two pieces per ingredient are allocated on the device at once
(three may stay reserved by the allocator while a slow copy runs): before issuing piece k+1
the host waits until piece k-1 has merged, so memory stays within a few pieces per ingredient
however fast the host issues work. ``disk`` pieces pass through host
memory that is not pinned, so their copies hold the host until staged; issued after piece k's
math is queued, their file reads overlap it. The caller must not wait for the device between
pieces (a NaN check that reads a result back, a ``torch.tensor(..., device=)``, a
``bincount``), or nothing overlaps: ``tureen.merge`` avoids those on a GPU.

On a CPU there is nothing to overlap: pieces are read as the merge asks for them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import torch

P = TypeVar("P")


class Staging:
    """Reads a tensor's pieces for a merge on ``device``, ahead of the merge on a GPU."""

    def __init__(self, device: torch.device) -> None:
        if device.type == "cuda" and device.index is None:  # the streams of one device, the one in use now
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    @property
    def overlaps(self) -> bool:
        """Copies run beside the merge's math (on a GPU)."""
        return self._stream is not None

    def ahead(
        self, spans: Iterable[tuple[int, int]], read: Callable[[int, int], P], tensors: Callable[[P], Iterable[torch.Tensor]]
    ) -> Iterator[tuple[int, int, P]]:
        """``(begin, end, read(begin, end))`` for each span, in order; on a GPU the next span's
        read is issued as soon as the caller has queued this one's math (when it asks for the
        next). ``tensors`` lists the device tensors a read made, which the merge's stream may
        only use once their copies are done."""
        if self._stream is None:
            for begin, end in spans:
                yield begin, end, read(begin, end)
            return
        merging = torch.cuda.current_stream(self.device)
        # Device tensors the merge's stream wrote so far (held ingredients) are there before the copy stream reads them.
        self._stream.wait_stream(merging)
        pending = iter(spans)
        issued = self._issue(next(pending, None), read)
        before: torch.cuda.Event | None = None
        while issued is not None:
            begin, end, piece, copied = issued
            merging.wait_event(copied)
            for tensor in tensors(piece):
                tensor.record_stream(merging)  # its memory is reused only once the merge's stream is done with it
            yield begin, end, piece  # the caller queues this piece's math
            merged = torch.cuda.Event()
            merged.record(merging)
            if before is not None:
                before.synchronize()  # the piece before this one has merged: two pieces at most on the device
            issued = self._issue(next(pending, None), read)  # copied while this piece merges
            before = merged

    def _issue(self, span: tuple[int, int] | None, read: Callable[[int, int], P]) -> tuple[int, int, P, torch.cuda.Event] | None:
        """Start reading ``span`` on the copy stream; the event marks its copies done."""
        if span is None:
            return None
        assert self._stream is not None
        with torch.cuda.stream(self._stream):
            piece = read(*span)
            copied = torch.cuda.Event()
            copied.record(self._stream)
        return span[0], span[1], piece, copied
