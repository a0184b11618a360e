"""Versions of each model's soup: push, build beside what serves, swap, roll back, converge.

The controller owns the life of spec versions in one process. Specs are stored first (the
``SpecStore`` is the truth shared by every replica), built off the request path on one
builder thread, and swapped in by ``BlendRepository.swap``: a request keeps the blend it
started on, and an old blend's memory goes when its last request does. Up to ``keep``
earlier blends per model stay resident, so a rollback to them is a swap and nothing more.

Replicas sharing a store converge by polling each model's active pointer: when another
process activated a version, this one builds it (or finds it resident) and swaps it in.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from tureen.core.blends import Blend, BlendRepository, CanaryRoute
from tureen.core.kitchen import Kitchen
from tureen.core.observer import Observer
from tureen.core.policy import SpecPolicy
from tureen.core.residency import Residency
from tureen.core.rollout import OnlineAccuracy
from tureen.core.rollout_control import RolloutControl
from tureen.core.store import Pointer, SpecStore, StoredVersion
from tureen.errors import (
    EvaluationMissing,
    IngredientMissing,
    ModelNotFound,
    OutOfMemory,
    SoupError,
    SpecInvalid,
    StoreError,
    VersionConflict,
)
from tureen.spec import SoupSpec

_log = logging.getLogger("tureen.controller")


@dataclass(frozen=True)
class Build:
    """A build in progress."""

    model: str
    version: int
    stage: str
    fraction: float
    started: float


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


class Controller(RolloutControl):
    """Pushes, builds, activates and rolls back spec versions; keeps replicas in step."""

    def __init__(
        self,
        store: SpecStore,
        kitchen: Kitchen,
        repository: BlendRepository,
        observer: Observer,
        *,
        keep: int = 1,
        poll_seconds: float = 1.0,
        memory_limit: int | None = None,
        online: OnlineAccuracy | None = None,
        policy: SpecPolicy | None = None,
    ) -> None:
        """``memory_limit``: bytes all blends (active and kept) may hold on the device together.
        ``policy``: what a pushed spec may name (default: Tureen's own factories, no files)."""
        self.store = store
        self.policy = policy if policy is not None else SpecPolicy()
        self.kitchen = kitchen
        self.repository = repository
        self._observer = observer
        self.poll_seconds = poll_seconds
        self.residency = Residency(repository, observer, kitchen.pool.device, keep=keep, limit=memory_limit)
        # One build at a time, on a thread of lowered priority: merging competes with requests
        # for the same cores, and requests should win. The thread's OpenMP workers, which it
        # starts itself, inherit its priority.
        self._builder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tureen-build", initializer=_lower_priority)
        self._lock = threading.RLock()
        self._model_locks: dict[str, threading.Lock] = {}
        self._building: dict[str, Build] = {}
        self._changed = threading.Condition()
        self._generation = 0
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._given_up: dict[str, int] = {}  # model -> version this replica failed to build
        self._seeded: dict[str, int] = {}
        self.online = online if online is not None else OnlineAccuracy()
        self._canary_notes: dict[str, str] = {}

    # ---- start-up ----------------------------------------------------------------------------

    def seed(self, spec: SoupSpec, source: str) -> StoredVersion | None:
        """Store ``spec`` as the model's next version, to activate at ``restore``, when the store
        has no active version of the model; a model operators activated keeps that version,
        whatever the start-up flags say."""
        if self.store.pointer(spec.model) is not None:
            _log.info("model %s: the store has an active version; %s is not seeded", spec.model, source)
            return None
        stored = self.store.push(spec, pushed_by=f"seed {source}")
        self._seeded[spec.model] = stored.version
        return stored

    def declare_stored(self) -> None:
        """Make every stored model known (UNAVAILABLE until built); those that should serve after
        start-up hold readiness back until they do, a model unloaded on purpose does not."""
        for model in self.store.models():
            pointer = self.store.pointer(model)  # None: just seeded
            self.repository.declare(model, expected=pointer is None or pointer.version != 0)

    def restore(self, where: Mapping[str, str] | None = None) -> list[Blend]:
        """Declare every stored model and build its active (or just seeded) version; the first
        failure raises, prefixed with ``where[model]`` (the spec file it was seeded from) when given."""
        blends = []
        for model in self.store.models():
            self.repository.declare(model)
            pointer = self.store.pointer(model)
            seeded = self._seeded.pop(model, None)
            version = pointer.version if pointer is not None else seeded
            if not version:
                continue
            try:
                blends.append(self._activate(model, version, by="seed" if seeded else "", write_pointer=seeded is not None))
            except SoupError as exc:
                raise exc.within((where or {}).get(model, f"model {model!r} version {version}")) from None
            if pointer is not None and pointer.canary:
                self._follow_canary(model, pointer)
        return blends

    def start_watching(self) -> None:
        """Poll the store so that activations made by other replicas reach this one."""
        self._watcher = threading.Thread(target=self._watch, name="tureen-store-watch", daemon=True)
        self._watcher.start()

    def stop(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5)
        self._builder.shutdown(wait=False, cancel_futures=True)

    # ---- operator actions --------------------------------------------------------------------

    def push(
        self, spec: SoupSpec, by: str, *, activate: bool = True, wait: bool = False, in_place: bool = False
    ) -> StoredVersion:
        """Store ``spec`` as the next version and build it (then activate it, unless told not to).

        Returns once stored, or with ``wait`` once built and (when asked) active; a failed build
        then raises its error. The blend serving the model is untouched until the swap. A spec
        naming code or files outside ``policy`` is refused before it is stored, so nothing it
        names is imported or opened.
        """
        self.policy.check(spec)
        if in_place and spec.rollout is not None:
            raise SpecInvalid(["in_place: a spec with a rollout section needs the serving blend beside it; push it normally"])
        stored = self.store.push(spec, pushed_by=by)
        self.repository.declare(spec.model)
        _log.info("model %s: version %d stored (pushed by %s)", spec.model, stored.version, by or "?")
        self._bump()
        if in_place:
            future: Future[Blend] = self._builder.submit(self._replace_in_place, stored, by)
        else:
            future = self._builder.submit(self._build_and_maybe_activate, stored, activate, by)
        if wait:
            future.result()
            return self.store.get(spec.model, stored.version)
        return stored

    def activate(self, model: str, version: int, by: str) -> StoredVersion:
        """Make ``version`` serve ``model`` now: a swap when resident, else a build first."""
        self._activate(model, version, by=by, write_pointer=True)
        return self.store.get(model, version)

    def rollback(self, model: str, by: str, to: int | None = None) -> StoredVersion:
        """Go back to the version active before this one (skipping deleted ones), or to ``to``."""
        pointer = self.store.pointer(model)
        if pointer is None:
            raise VersionConflict(f"model {model!r} has no active version to roll back from")
        if to is not None:
            return self.activate(model, to, by)
        existing = set(self.store.version_numbers(model))
        history = [v for v in pointer.history if v in existing and v != pointer.version]
        # Newest first, stopping at the first that did not fail: usually one read, not the whole history.
        while history and self.store.get(model, history[-1]).state == "failed":
            history.pop()
        if not history:
            raise VersionConflict(f"model {model!r}: no earlier active version to roll back to (active: {pointer.version})")
        target = history[-1]
        self._activate(model, target, by=by, write_pointer=True, history=tuple(history[:-1]))
        return self.store.get(model, target)

    def unload(self, model: str, by: str) -> None:
        """Stop serving ``model`` everywhere (its versions stay stored); ``activate`` brings it back."""
        with self._model_lock(model):
            pointer = self.store.pointer(model)
            if pointer is None or pointer.version == 0:
                if not self.store.version_numbers(model):
                    raise ModelNotFound(f"model {model!r} has no stored version")
                return
            self.store.point(model, Pointer(0, (*pointer.history, pointer.version), by, time.time()))
            self.repository.end_canary(model)
            self.residency.retire(model, 0, self.repository.unload(model))
        self._bump()

    def load(self, model: str, by: str) -> StoredVersion:
        """Serve ``model`` again: its active version, or the last one active before an unload."""
        pointer = self.store.pointer(model)
        if pointer is None:
            raise ModelNotFound(f"model {model!r} has no stored version to load")
        if pointer.version:
            return self.activate(model, pointer.version, by)
        return self.rollback(model, by)

    def delete(self, model: str, version: int) -> None:
        with self._model_lock(model):  # not while an activation of this model swaps and points
            active = self.repository.models().get(model)
            if active is not None and active.version == version:
                raise VersionConflict(f"model {model!r} version {version} is serving; activate another version first")
            route, pointer = self.repository.canary(model), self.store.pointer(model)
            if (route is not None and route.blend.version == version) or (pointer is not None and pointer.canary == version):
                raise VersionConflict(f"model {model!r} version {version} is the canary; promote or abort it first")
            self.residency.drop(model, version)
            self.store.delete(model, version)
        self._bump()

    def spec(self, model: str, version: int | None = None) -> StoredVersion:
        """A stored version, or the active one when ``version`` is None."""
        if version is None:
            pointer = self.store.pointer(model)
            if pointer is None:
                if not self.store.version_numbers(model):
                    raise ModelNotFound(f"model {model!r} has no stored version")
                raise VersionConflict(f"model {model!r} has no active version")
            if pointer.version == 0:
                raise VersionConflict(f"model {model!r} is unloaded; give a version, or load it first")
            version = pointer.version
        return self.store.get(model, version)

    def versions(self, model: str) -> list[tuple[StoredVersion, str]]:
        """Every stored version with its state as seen from here (see ``state_of``)."""
        stored = self.store.versions(model)
        if not stored:
            raise ModelNotFound(f"model {model!r} has no stored version")
        pointer = self.store.pointer(model)
        return [(item, self._shown_state(item, pointer)) for item in stored]

    def state_of(self, stored: StoredVersion) -> str:
        """stored, building, ready, active, failed, or retired (active once, no longer)."""
        return self._shown_state(stored, self.store.pointer(stored.model))

    def _shown_state(self, item: StoredVersion, pointer: Pointer | None) -> str:
        building = self._building.get(item.model)
        if pointer is not None and item.version == pointer.version:
            return "active"
        if pointer is not None and item.version == pointer.canary:
            return "canary"
        if building is not None and building.version == item.version:
            return "building"
        if item.state == "building":
            return "stored"  # a build cut short (a restart) or running on another replica
        if pointer is not None and item.version in pointer.history and item.state != "failed":
            return "retired"
        return item.state

    def status(self) -> list[ModelStatus]:
        with self._lock:
            out = []
            for model, blend in sorted(self.repository.models().items()):
                resident = self.residency.of(model)
                route = self.repository.canary(model)
                serving = [v for v in (blend.version if blend else 0, route.blend.version if route else 0) if v]
                out.append(
                    ModelStatus(
                        model=model,
                        active=blend.version if blend else None,
                        building=self._building.get(model),
                        resident=tuple(b.version for b in resident),
                        active_bytes=blend.nbytes if blend else 0,
                        resident_bytes=sum(b.nbytes for b in resident),
                        canary=route.blend.version if route else 0,
                        canary_percent=route.percent if route else 0.0,
                        online={v: self.online.rolling(model, v) for v in serving},
                        canary_note=self._canary_notes.get(model, ""),
                    )
                )
            return out

    @property
    def generation(self) -> int:
        """Bumped on every change of status; ``wait_for_change`` waits for it to move."""
        return self._generation

    def wake(self) -> None:
        """Wake every ``wait_for_change`` (a watcher that went away must not hold its thread)."""
        self._bump()

    def wait_for_change(self, seen: int, timeout: float) -> int:
        with self._changed:
            self._changed.wait_for(lambda: self._generation != seen or self._stop.is_set(), timeout=timeout)
            return self._generation

    # ---- the work ----------------------------------------------------------------------------

    def _build_and_maybe_activate(self, stored: StoredVersion, activate: bool, by: str) -> Blend:
        rollout = stored.spec.rollout
        if activate and rollout is None:
            return self._activate(stored.model, stored.version, by=by, write_pointer=True)
        model = stored.model
        blend = self._build(stored)
        if activate and rollout is not None:
            active = self.repository.models().get(model)
            self._gate(stored, blend, active)
            if rollout.canary is not None and active is not None:
                return self._start_canary(model, blend, by)
        self.residency.add(model, blend)
        if activate:
            return self._activate(model, stored.version, by=by, write_pointer=True)
        self._bump()
        return blend

    def _replace_in_place(self, stored: StoredVersion, by: str) -> Blend:
        """Give up the serving blend (and the kept ones) first, then build: the model pauses
        (UNAVAILABLE) instead of needing room for two blends. A failed build brings the previous
        version back, built again, and raises the failure."""
        model = stored.model
        with self._model_lock(model):
            self.repository.end_canary(model)
            previous = self.repository.unload(model, pause=True)
            self.residency.drop(model)
            back = previous.version if previous is not None else None
            del previous  # its memory goes as soon as the requests on it finish
        _log.warning("model %s: in-place swap to version %d: paused until it serves", model, stored.version)
        try:
            return self._activate(model, stored.version, by=by, write_pointer=True)
        except BaseException:
            if back is not None:
                self._activate(model, back, by=by, write_pointer=False)
            raise

    def _activate(
        self,
        model: str,
        version: int,
        *,
        by: str,
        write_pointer: bool,
        history: tuple[int, ...] | None = None,
        follow: bool = False,
        canary: CanaryRoute | None = None,
    ) -> Blend:
        """Make ``version`` serve ``model``. The build (if any) runs with no lock held; the swap and
        the pointer write happen together under the model's lock. ``follow`` (the store watcher)
        swaps only if the store still points at ``version`` by then. ``canary`` (a promotion)
        swaps in that canary's blend, only while it is still the model's canary."""
        requested = time.perf_counter()
        current = self.repository.models().get(model)
        blend = current if current is not None and current.version == version else None
        if canary is not None:
            blend = canary.blend  # already built, warmed up and serving a share: never built again
        if blend is None:
            blend = self.residency.get(model, version) or self._build(self.store.get(model, version))
        with self._model_lock(model):
            if canary is not None:
                pointer = self.store.pointer(model)
                if self.repository.canary(model) is not canary or pointer is None or pointer.canary != version:
                    raise VersionConflict(f"model {model!r}: the canary of version {version} ended meanwhile")
            if follow:
                pointer = self.store.pointer(model)
                if pointer is None or pointer.version != version:
                    return blend  # activated again elsewhere meanwhile: the next poll follows that
            self.store.get(model, version)  # deleted meanwhile? then ModelNotFound, nothing swapped
            current = self.repository.models().get(model)
            if current is None or current.version != version:
                previous = self.repository.swap(blend)
                self._observer.blend_swapped(model, version, time.perf_counter() - requested)
                self.residency.retire(model, version, previous)
                _log.info("model %s: serving version %d", model, version)
            self.repository.end_canary(model)  # after the swap: a promoted canary's share never dips
            if write_pointer:
                pointer = self.store.pointer(model)
                if history is None:
                    if pointer is None:
                        history = ()
                    elif pointer.version == version:
                        history = pointer.history
                    else:
                        history = (*pointer.history, pointer.version)
                self.store.point(model, Pointer(version, history, by, time.time()))
        self._bump()
        return blend

    def _build(self, stored: StoredVersion) -> Blend:
        """Build on the builder thread (waiting for it when called from elsewhere, holding no lock)."""
        if threading.current_thread().name.startswith("tureen-build"):
            return self._build_here(stored)
        return self._builder.submit(self._build_here, stored).result()

    def _build_here(self, stored: StoredVersion) -> Blend:
        if stored.state == "failed":
            raise VersionConflict(
                f"model {stored.model!r} version {stored.version} failed to build ({stored.reason}); push a fixed spec"
            )
        model, version = stored.model, stored.version
        self._set_building(Build(model, version, "starting", 0.0, time.time()))

        def progress(stage: str, fraction: float) -> None:
            self._set_building(replace(self._building[model], stage=stage, fraction=fraction))

        settled = stored.state in ("ready", "rejected")  # a rebuild must not reopen a verdict
        try:
            if not settled:
                stored = self.store.record(stored, "building")
            blend = self.kitchen.build(
                stored.spec,
                version,
                progress,
                donor=lambda: self.residency.donor(model),
                room=lambda n: self.residency.room(model, version, n),
                resolution=stored.resolution,
            )
        except MemoryError as exc:  # a build that cannot get memory must not take the server down
            failure = OutOfMemory(f"model {model!r} version {version}: out of memory while building: {exc}")
            self._failed(stored, failure)
            raise failure from None
        except SoupError as exc:
            self._failed(stored, exc)
            raise
        finally:
            self._set_building(None, model)
        self.store.record(
            stored,
            stored.state if settled else "ready",
            stored.reason if settled else "",
            build_seconds=round(blend.build_seconds, 3),
            checksums=dict(blend.checksums),
            evaluation=_plain(blend.evaluation),
            ingredient_evaluation=_plain(blend.ingredient_evaluation),
            resolution=blend.resolution,
        )
        return blend

    def _failed(self, stored: StoredVersion, exc: SoupError) -> None:
        """Record a failed build. Only failures of the spec itself (its fields, its checkpoints'
        contents, the architecture) mark the version failed in the shared store; a failure of
        this replica (no memory here, a file missing on this node, the store) must not stop the
        others from serving the version, so the state goes back to what it was."""
        model, version = stored.model, stored.version
        self._observer.build_failed(model, exc.reason)
        _log.error("model %s: version %d failed to build: %s", model, version, exc)
        try:
            if isinstance(exc, LOCAL_FAILURES):
                self.store.record(stored, "stored" if stored.state == "building" else stored.state)
            else:
                self.store.record(stored, "failed", reason=str(exc))
        except SoupError as store_error:  # the version may have been deleted meanwhile
            _log.warning("model %s: version %d: cannot record the failure: %s", model, version, store_error)

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self._converge()
            except Exception:  # a bad moment on a shared volume must not end the watch
                _log.exception("store watch failed; retrying")

    def _converge(self) -> None:
        for model in self.store.models():
            self.repository.declare(model)
            pointer = self.store.pointer(model)
            current = self.repository.models().get(model)
            if pointer is not None and pointer.version == 0 and current is not None:
                with self._model_lock(model):
                    if (self.store.pointer(model) or pointer).version == 0:
                        self.repository.end_canary(model)
                        self.residency.retire(model, 0, self.repository.unload(model))  # unloaded elsewhere
                self._bump()
                continue
            if pointer is not None and current is not None and current.version == pointer.version:
                self._follow_canary(model, pointer)
                continue
            if pointer is None or pointer.version == 0:
                continue
            if self._given_up.get(model) == pointer.version or model in self._building:
                continue
            _log.info("model %s: version %d was activated elsewhere; following", model, pointer.version)
            try:
                self._activate(model, pointer.version, by="", write_pointer=False, follow=True)
            except SoupError as exc:
                self._given_up[model] = pointer.version
                _log.error("model %s: cannot follow version %d: %s", model, pointer.version, exc)

    def _model_lock(self, model: str) -> threading.Lock:
        with self._lock:
            return self._model_locks.setdefault(model, threading.Lock())

    def _set_building(self, build: Build | None, model: str = "") -> None:
        with self._lock:
            if build is None:
                self._building.pop(model, None)
            else:
                self._building[build.model] = build
        self._bump()

    def _bump(self) -> None:
        with self._changed:
            self._generation += 1
            self._changed.notify_all()


def _plain(value: Any) -> Any:
    """Nested mappings as plain dicts, for JSON."""
    return {k: _plain(v) for k, v in value.items()} if isinstance(value, Mapping) else value


LOCAL_FAILURES = (OutOfMemory, IngredientMissing, EvaluationMissing, StoreError)
"""Build failures that say something about this replica, not about the spec."""

BUILD_NICENESS = 10


def _lower_priority() -> None:
    """Lower the calling thread's scheduling priority (Linux: per-thread niceness)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BUILD_NICENESS)
    except (AttributeError, OSError):  # not Linux, or not allowed: builds run at normal priority
        _log.debug("cannot lower the build thread's priority")
