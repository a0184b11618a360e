"""Writing a blend as a safetensors file while the merge still runs (``tureen merge``).

The merge allocates the blend's tensors first, so the header (names, shapes, offsets) is known
before any value is: ``begin`` writes it, then each tensor the merge finishes is written by a
thread at its offset while the next ones merge. Reads, merge and writes overlap instead of
taking turns; the file appears under its name whole, or not at all.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from tureen.core.checkpoints import WRITE_BLOCK, safetensors_header


class SafetensorsWriter:
    """``begin(tensors)``, ``ready(keys)`` as the merge finishes them, then ``close()`` (or ``abort()``)."""

    def __init__(self, path: Path, metadata: Mapping[str, str] | None = None) -> None:
        self.path, self.metadata = path, metadata
        self._partial = path.with_name(f".{path.name}.partial")
        self._queue: queue.Queue[list[str] | None] = queue.Queue()
        self._tensors: Mapping[str, torch.Tensor] = {}
        self._offsets: dict[str, int] = {}
        self._fd: int | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def begin(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Write the header of ``tensors`` (the blend, its values still to come)."""
        raw = safetensors_header(tensors, self.metadata)
        self._tensors = tensors
        offset = len(raw)
        for name, tensor in tensors.items():
            self._offsets[name] = offset
            offset += tensor.numel() * tensor.element_size()
        self._fd = os.open(self._partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.pwrite(self._fd, raw, 0)
        self._thread = threading.Thread(target=self._write, name="tureen-writer", daemon=True)
        self._thread.start()

    def ready(self, keys: Sequence[str]) -> None:
        """Tensors whose values are final: written while the merge goes on."""
        self._queue.put(list(keys))

    def close(self) -> None:
        """Wait for the writes, then give the file its name."""
        self._finish()
        if self._error is not None:
            self.abort()
            raise self._error
        os.replace(self._partial, self.path)

    def abort(self) -> None:
        """Drop what was written (the merge failed)."""
        self._finish()
        self._partial.unlink(missing_ok=True)

    def _finish(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _write(self) -> None:
        while (keys := self._queue.get()) is not None:
            if self._error is not None:
                continue
            try:
                for key in keys:
                    self._write_tensor(key)
            except OSError as exc:
                self._error = exc

    def _write_tensor(self, key: str) -> None:
        assert self._fd is not None
        flat = self._tensors[key].detach().contiguous().view(-1).view(torch.uint8)
        for begin in range(0, flat.numel(), WRITE_BLOCK):
            block = flat[begin : begin + WRITE_BLOCK].cpu().numpy()
            os.pwrite(self._fd, memoryview(block), self._offsets[key] + begin)  # type: ignore[arg-type]
