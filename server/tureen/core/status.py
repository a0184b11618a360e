"""What the operator API reports about each model, and the counter its watchers wait on."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field

from tureen.core.blends import Blend, BlendRepository
from tureen.core.builder import Build, Builds
from tureen.core.residency import Residency
from tureen.core.rollout_control import RolloutControl


@dataclass(frozen=True)
class ModelStatus:
    model: str
    active: int | None
    building: Build | None
    resident: tuple[int, ...]
    """Versions held in memory besides the active one, newest first."""
    active_bytes: int
    resident_bytes: int
    canary: int = 0
    canary_percent: float = 0.0
    online: Mapping[int, tuple[float, int]] = field(default_factory=dict)
    """Rolling online accuracy and labelled samples of the active version and the canary."""
    canary_note: str = ""
    placement: str = ""
    """Where the active version's ingredients live between merges."""


def model_status(
    model: str, blend: Blend | None, repository: BlendRepository, residency: Residency, builds: Builds, rollout: RolloutControl
) -> ModelStatus:
    """``model``'s status: what serves it, what is kept, built, in canary, and how each scores online."""
    resident = residency.of(model)
    route = repository.canary(model)
    serving = [v for v in (blend.version if blend else 0, route.blend.version if route else 0) if v]
    return ModelStatus(
        model=model,
        active=blend.version if blend else None,
        building=builds.progress_of(model),
        resident=tuple(b.version for b in resident),
        active_bytes=blend.nbytes if blend else 0,
        resident_bytes=sum(b.nbytes for b in resident),
        canary=route.blend.version if route else 0,
        canary_percent=route.percent if route else 0.0,
        online={v: rollout.online.rolling(model, v) for v in serving},
        canary_note=rollout.note(model),
        placement=blend.placement if blend else "",
    )


class Changes:
    """A generation counter: bumped on every change of status, waited on by status watchers."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._generation = 0
        self._closed = False

    @property
    def generation(self) -> int:
        return self._generation

    def bump(self) -> None:
        with self._condition:
            self._generation += 1
            self._condition.notify_all()

    def wait(self, seen: int, timeout: float) -> int:
        """Wait up to ``timeout`` s for the generation to move past ``seen`` (or for ``close``)."""
        with self._condition:
            self._condition.wait_for(lambda: self._generation != seen or self._closed, timeout=timeout)
            return self._generation

    def close(self) -> None:
        with self._condition:
            self._closed = True
            self._condition.notify_all()
