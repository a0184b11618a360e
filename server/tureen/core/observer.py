"""What the core reports as it works; observability backends implement ``Observer``.

The core calls an observer only through ``SafeObserver``, so a bug in metrics code is logged
and never fails a request or a build.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

_log = logging.getLogger("tureen.observer")


@dataclass(frozen=True)
class GenerationRecord:
    """One generation's tokens and, when it ended well, its times from receipt."""

    prompt_tokens: int
    generated_tokens: int
    first_token_s: float | None = None
    gaps_s: Sequence[float] = ()
    """Between consecutive generated tokens."""
    total_s: float | None = None
    """None: it failed or its caller went away."""


class Observer(Protocol):
    def request_finished(
        self, model: str, version: str, reason: str | None, total_s: float, queue_s: float, compute_s: float
    ) -> None:
        """One inference request ended; ``reason`` is None on success, else the error's reason."""

    def generation_finished(self, model: str, version: str, record: GenerationRecord) -> None:
        """A generation ended (well or not): its tokens and times."""

    def generations_now(self, model: str, version: str, running: int, waiting: int) -> None:
        """The generation loop of this version runs ``running`` generations, ``waiting`` wait."""

    def batch_executed(self, model: str, version: str, size: int) -> None:
        """One forward ran for ``size`` rows (one request's, or a dynamic batch's)."""

    def queue_depth(self, model: str, version: str, depth: int) -> None:
        """The batching queue of this version now holds ``depth`` requests."""

    def blend_built(self, model: str, version: int, seconds: float) -> None:
        """A blend finished building (loading, checking and merging)."""

    def blend_activated(self, model: str, version: int, nbytes: int) -> None:
        """A blend became the one that serves ``model``."""

    def ingredient_memory(self, placement: str, device: str, nbytes: int) -> None:
        """The pool's ingredients at ``placement`` now hold ``nbytes`` on ``device`` (``disk``: the
        bytes of the files merges read from)."""

    def build_failed(self, model: str, reason: str) -> None:
        """A build ended in an error of the given reason; what was serving keeps serving."""

    def blend_swapped(self, model: str, version: int, seconds: float) -> None:
        """``version`` took over ``model``; ``seconds`` from the activation request to the swap."""

    def resident_memory(self, model: str, nbytes: int) -> None:
        """Blends of ``model`` kept for instant rollback (besides the active one) hold ``nbytes``."""

    def blend_evaluated(
        self,
        model: str,
        version: int,
        scores: Mapping[str, Mapping[str, float]],
        ingredients: Mapping[str, Mapping[str, Mapping[str, float]]],
    ) -> None:
        """Held-out scores of a version (split -> metric -> value), and of its ingredients alone."""

    def online_accuracy(self, model: str, version: int, accuracy: float, samples: int) -> None:
        """Rolling accuracy of a version on labelled live requests, over ``samples`` of them."""

    def feedback_ignored(self, model: str) -> None:
        """Feedback named a request id that is unknown (or forgotten); it was counted and dropped."""

    def canary_changed(self, model: str, version: int, percent: float) -> None:
        """``version`` now takes ``percent`` of ``model``'s traffic as a canary (0: no canary)."""

    def canary_decided(self, model: str, version: int, decision: str) -> None:
        """A canary ended: ``promoted`` or ``rolled_back``, automatically or by hand."""


class NullObserver:
    """Observes nothing; for the offline ``tureen merge`` and for library use."""

    def request_finished(self, *args: Any) -> None:
        pass

    def batch_executed(self, *args: Any) -> None:
        pass

    def generation_finished(self, *args: Any) -> None:
        pass

    def generations_now(self, *args: Any) -> None:
        pass

    def queue_depth(self, *args: Any) -> None:
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

    def blend_evaluated(self, *args: Any) -> None:
        pass

    def online_accuracy(self, *args: Any) -> None:
        pass

    def feedback_ignored(self, *args: Any) -> None:
        pass

    def canary_changed(self, *args: Any) -> None:
        pass

    def canary_decided(self, *args: Any) -> None:
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
