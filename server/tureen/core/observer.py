"""What the core reports as it works; observability backends implement ``Observer``.

The core calls an observer only through ``SafeObserver``, so a bug in metrics code is logged
and never fails a request or a build.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

_log = logging.getLogger("tureen.observer")


class Observer(Protocol):
    def request_finished(
        self, model: str, version: str, reason: str | None, total_s: float, queue_s: float, compute_s: float
    ) -> None:
        """One inference request ended; ``reason`` is None on success, else the error's reason."""

    def blend_built(self, model: str, version: int, seconds: float) -> None:
        """A blend finished building (loading, checking and merging)."""

    def blend_activated(self, model: str, version: int, nbytes: int) -> None:
        """A blend became the one that serves ``model``."""

    def ingredient_memory(self, device: str, nbytes: int) -> None:
        """The ingredient pool now holds ``nbytes`` on ``device``."""

    def build_failed(self, model: str, reason: str) -> None:
        """A build ended in an error of the given reason; what was serving keeps serving."""

    def blend_swapped(self, model: str, version: int, seconds: float) -> None:
        """``version`` took over ``model``; ``seconds`` from the activation request to the swap."""

    def resident_memory(self, model: str, nbytes: int) -> None:
        """Blends of ``model`` kept for instant rollback (besides the active one) hold ``nbytes``."""


class NullObserver:
    """Observes nothing; for the offline ``tureen merge`` and for library use."""

    def request_finished(self, *args: Any) -> None:
        pass

    def blend_built(self, *args: Any) -> None:
        pass

    def blend_activated(self, *args: Any) -> None:
        pass

    def ingredient_memory(self, *args: Any) -> None:
        pass

    def build_failed(self, *args: Any) -> None:
        pass

    def blend_swapped(self, *args: Any) -> None:
        pass

    def resident_memory(self, *args: Any) -> None:
        pass


class SafeObserver:
    """Forwards to an observer, logging (never raising) whatever it throws."""

    def __init__(self, inner: Observer) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._inner, name)

        def guarded(*args: Any) -> None:
            try:
                method(*args)
            except Exception:
                _log.exception("observer %s failed; the work it observed goes on", name)

        setattr(self, name, guarded)  # later calls skip __getattr__
        return guarded
