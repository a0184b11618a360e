"""Which blend serves each model: a version's blend obtained, then swapped in under the model's lock.

Obtaining may build (on the builder, with no lock held: a build can take minutes, and requests,
status and other models must not wait on it). The swap, the check that nothing changed
meanwhile, and the store's pointer then happen together under the model's lock, so two
activations of one model never interleave and a reader of the store never sees a pointer to a
blend that is not serving. Each caller checks its own condition inside the lock: an operator's
activation none, a follower that the store still points there, a promotion that its canary
still runs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from tureen.core.blends import Blend, BlendRepository, CanaryRoute
from tureen.core.builder import Builds
from tureen.core.observer import Observer
from tureen.core.residency import Residency
from tureen.core.store import SpecStore, pointing
from tureen.errors import VersionConflict

_log = logging.getLogger("tureen.controller")


class Swaps:
    """Activation in two steps, obtain then swap, for the controller's three kinds of caller."""

    def __init__(
        self,
        store: SpecStore,
        repository: BlendRepository,
        residency: Residency,
        builds: Builds,
        observer: Observer,
        changed: Callable[[], None],
    ) -> None:
        self.store = store
        self.repository = repository
        self.residency = residency
        self.builds = builds
        self._observer = observer
        self._changed = changed
        self._guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}

    def lock(self, model: str) -> threading.Lock:
        """The model's lock: held by every change of what serves it, never while building."""
        with self._guard:
            return self._locks.setdefault(model, threading.Lock())

    def activate(self, model: str, version: int, *, by: str, point: bool = True, history: tuple[int, ...] | None = None) -> Blend:
        """Make ``version`` serve ``model``: obtain its blend, then swap and, with ``point``, write the
        store's pointer. ``history``: the pointer's history after the swap (a rollback's); default,
        the store's with the version it replaces added."""
        requested = time.perf_counter()
        blend = self.obtain(model, version)
        with self.lock(model):
            self._swap_in(model, version, blend, requested)
            if point:
                self.store.point(model, pointing(self.store.pointer(model), version, by, time.time(), history))
        self._changed()
        return blend

    def follow(self, model: str, version: int) -> None:
        """Serve the version another replica activated, if the store still points there once built."""
        requested = time.perf_counter()
        blend = self.obtain(model, version)
        with self.lock(model):
            pointer = self.store.pointer(model)
            if pointer is None or pointer.version != version:
                return  # activated again elsewhere meanwhile: the next poll follows that
            self._swap_in(model, version, blend, requested)
        self._changed()

    def promote(self, model: str, route: CanaryRoute, by: str) -> None:
        """Swap the canary's blend in (built, warmed up and serving a share already: never built
        again), only while it is still the model's canary in this process and in the store."""
        requested, version = time.perf_counter(), route.blend.version
        with self.lock(model):
            pointer = self.store.pointer(model)
            if self.repository.canary(model) is not route or pointer is None or pointer.canary != version:
                raise VersionConflict(f"model {model!r}: the canary of version {version} ended meanwhile")
            self._swap_in(model, version, route.blend, requested)
            self.store.point(model, pointing(pointer, version, by, time.time()))
        self._changed()

    def obtain(self, model: str, version: int) -> Blend:
        """The blend of ``version``: the serving one, a resident one, or a new build."""
        current = self.repository.models().get(model)
        if current is not None and current.version == version:
            return current
        return self.residency.get(model, version) or self.builds.build(self.store.get(model, version))

    def _swap_in(self, model: str, version: int, blend: Blend, requested: float) -> None:
        """Serve ``blend`` (the caller holds the model's lock); the blend it replaces is kept
        resident, and a canary ends after the swap, so a promoted canary's share never dips."""
        self.store.get(model, version)  # deleted meanwhile? then ModelNotFound, nothing swapped
        current = self.repository.models().get(model)
        if current is None or current.version != version:
            previous = self.repository.swap(blend)
            self._observer.blend_swapped(model, version, time.perf_counter() - requested)
            self.residency.retire(model, version, previous)
            _log.info("model %s: serving version %d", model, version)
        self.repository.end_canary(model)
