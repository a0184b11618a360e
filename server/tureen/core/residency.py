"""The blends kept in memory besides the active ones, and what a new build may use.

Up to ``keep`` blends per model stay resident after they stop serving, so rolling back to them
is a swap. A build may take over the memory of the one it will push out (``donor``) and must
otherwise fit beside everything held (``room``).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from tureen.core.blends import Blend, BlendRepository
from tureen.core.memory import available_bytes
from tureen.core.observer import Observer
from tureen.errors import OutOfMemory


class Residency:
    """Resident blends per model, newest first; thread-safe."""

    def __init__(
        self, repository: BlendRepository, observer: Observer, device: torch.device, *, keep: int, limit: int | None
    ) -> None:
        self._repository = repository
        self._observer = observer
        self._device = device
        self.keep = keep
        self.limit = limit
        """Bytes all blends (active and kept) may hold together; None: the device's free memory decides."""
        self._lock = threading.Lock()
        self._kept: dict[str, list[Blend]] = {}

    def get(self, model: str, version: int) -> Blend | None:
        with self._lock:
            return next((b for b in self._kept.get(model, []) if b.version == version), None)

    def of(self, model: str) -> list[Blend]:
        with self._lock:
            return list(self._kept.get(model, []))

    def retire(self, model: str, now_active: int, previous: Blend | None) -> None:
        """Keep the blend that just stopped serving; drop the oldest beyond ``keep``."""
        with self._lock:
            kept = [b for b in self._kept.get(model, []) if b.version != now_active]
            if previous is not None and previous.version != now_active:
                kept.insert(0, previous)
            self._set(model, kept)

    def add(self, model: str, blend: Blend) -> None:
        """Keep a blend built but not activated: activating it later is a swap."""
        with self._lock:
            self._set(model, [blend, *self._kept.get(model, [])])

    def drop(self, model: str, version: int | None = None) -> None:
        """Forget one kept version of ``model``, or all of them."""
        with self._lock:
            self._set(model, [b for b in self._kept.get(model, []) if version is not None and b.version != version])

    def donor(self, model: str) -> Mapping[str, torch.Tensor] | None:
        """The weights of the kept blend this build will push out, for the build to reuse.

        With ``keep`` blends kept, the swap after this build drops the oldest; giving it up as
        the merge starts (ingredients loaded and checked, so most bad pushes never get here)
        lets the merge write into memory that is already mapped instead of faulting in a new
        blend's worth, and keeps the peak at active + ``keep`` blends. It is reused only when no
        request holds it any more; a build that fails after this point has cost that rollback.
        """
        with self._lock:
            kept = self._kept.get(model, [])
            if not kept or len(kept) < self.keep:
                return None
            oldest = kept.pop()
            weights, still_used = oldest.weights, weakref.ref(oldest)
            del oldest
            if still_used() is not None:  # a request started long ago is still on it
                kept.append(still_used())  # type: ignore[arg-type]
                return None
            self._set(model, kept)
            return weights

    def budget(self, model: str, version: int) -> Budget:
        """What a build of ``version`` may take: the donor its swap would drop, or room beside the rest."""
        return Budget(self, model, version)

    def room(self, model: str, version: int, needed: int) -> None:
        """Refuse a build whose new blend would not fit beside the blends held, before it allocates."""
        models = self._repository.models()
        held = sum(b.nbytes for b in models.values() if b is not None)
        held += sum(route.blend.nbytes for m in models if (route := self._repository.canary(m)) is not None)
        with self._lock:
            held += sum(b.nbytes for kept in self._kept.values() for b in kept)
        where = f"model {model!r} version {version}: the blend needs {_size(needed)}"
        advice = "lower --keep-versions, or push in place (tureen push --in-place) to swap with a short pause"
        if self.limit is not None and held + needed > self.limit:
            raise OutOfMemory(
                f"{where}, and blends already hold {_size(held)} of the {_size(self.limit)} limit (--blend-memory-mb); {advice}"
            )
        free = available_bytes(self._device)
        if free is not None and needed > 0.9 * free:
            raise OutOfMemory(f"{where} but {self._device} has {_size(free)} free; {advice}")

    def _set(self, model: str, kept: list[Blend]) -> None:
        self._kept[model] = kept[: self.keep]
        self._observer.resident_memory(model, sum(b.nbytes for b in self._kept[model]))


@dataclass(frozen=True)
class Budget:
    """``Residency``'s answer for one build (the kitchen's ``MemoryBudget``)."""

    residency: Residency
    model: str
    version: int

    def donor(self) -> Mapping[str, torch.Tensor] | None:
        return self.residency.donor(self.model)

    def room(self, nbytes: int) -> None:
        self.residency.room(self.model, self.version, nbytes)


def _size(nbytes: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            break
        nbytes /= 1024
    return f"{nbytes:.0f} {unit}" if unit == "bytes" else f"{nbytes:.1f} {unit}"
