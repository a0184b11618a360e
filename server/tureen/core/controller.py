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
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field, replace

from tureen.core.blends import Blend, BlendRepository, CanaryRoute
from tureen.core.builder import Builder
from tureen.core.kitchen import Kitchen
from tureen.core.lifecycle import Lifecycle, shown_state
from tureen.core.observer import Observer
from tureen.core.policy import SpecPolicy
from tureen.core.residency import Residency
from tureen.core.rollout import OnlineAccuracy
from tureen.core.rollout_control import RolloutControl
from tureen.core.store import Pointer, SpecStore, StoredVersion, pointing
from tureen.errors import ModelNotFound, OutOfMemory, SoupError, SpecInvalid, VersionConflict
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


class Controller:
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
        self.lifecycle = Lifecycle(store)
        self.online = online if online is not None else OnlineAccuracy()
        self.rollout = RolloutControl(store, repository, self.online, observer, self.lifecycle)
        self._builder = Builder()
        self._lock = threading.RLock()
        self._model_locks: dict[str, threading.Lock] = {}
        self._building: dict[str, Build] = {}
        self._changed = threading.Condition()
        self._generation = 0
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._given_up: dict[str, int] = {}  # model -> version this replica failed to follow
        self._seeded: dict[str, int] = {}

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
                blends.append(self._activate(model, version, by="seed" if seeded else "", point=seeded is not None))
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
        self._builder.shutdown()

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
        self._activate(model, version, by=by)
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
        self._activate(model, target, by=by, history=tuple(history[:-1]))
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
        """The state operators see (``lifecycle.shown_state``): stored, building, ready, active,
        canary, failed, rejected or retired."""
        return self._shown_state(stored, self.store.pointer(stored.model))

    def _shown_state(self, item: StoredVersion, pointer: Pointer | None) -> str:
        building = self._building.get(item.model)
        return shown_state(item, pointer, building.version if building is not None else None)

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
                        canary_note=self.rollout.note(model),
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

    # ---- canaries: the rollout part decides, the controller swaps -----------------------------

    def promote_canary(self, model: str, by: str, why: str = "by hand", route: CanaryRoute | None = None) -> StoredVersion:
        """The canary becomes the active version (one swap); the old active one is kept for rollback.
        With ``route``, only that canary: one judged by feedback, not one started since."""
        self._known(model)
        route = route or self.repository.canary(model)
        if route is None:
            raise VersionConflict(f"model {model!r} has no canary to promote")
        self._promote(model, route, by)
        self.rollout.promoted(model, route.blend.version, why)
        return self.store.get(model, route.blend.version)

    def abort_canary(
        self, model: str, by: str, why: str = "by hand", reject: bool = False, route: CanaryRoute | None = None
    ) -> StoredVersion:
        """All traffic back to the active version; an automatic rollback marks the canary rejected."""
        self._known(model)
        with self._model_lock(model):
            version = self.rollout.abort(model, by, why, reject, route)
        self._bump()
        return self.store.get(model, version)

    def feedback(self, model: str, request_id: str, labels: list[int]) -> int | None:
        """Score the version that answered ``request_id``; act on the canary's verdict once it has one.
        Returns that version, or None for an unknown request id (counted, never an error)."""
        judged = self.rollout.judge(model, request_id, labels)
        if judged.verdict is None or judged.route is None or judged.verdict.decision not in ("promote", "rollback"):
            return judged.version
        try:
            if judged.verdict.decision == "promote":
                self.promote_canary(model, by="canary", why=judged.verdict.line, route=judged.route)
            else:
                self.abort_canary(model, by="canary", why=judged.verdict.line, reject=True, route=judged.route)
        except VersionConflict:
            pass  # decided a moment ago by another feedback call, an operator or another replica
        except SoupError as exc:  # the label was taken; acting on it failed here, not the caller
            _log.error("model %s: canary decision %r failed: %s", model, judged.verdict.decision, exc)
        return judged.version

    def _known(self, model: str) -> None:
        if model not in self.repository.models():
            raise ModelNotFound(f"model {model!r} is not served here")

    # ---- following the store (other replicas, restarts) ---------------------------------------

    def poll(self) -> None:
        """One look at the store: serve what other replicas activated, unloaded or made canary."""
        for model in self.store.models():
            self.repository.declare(model)
            pointer = self.store.pointer(model)
            current = self.repository.models().get(model)
            if pointer is None:
                continue
            if pointer.version == 0:
                if current is not None:
                    self._follow_unload(model, pointer)
            elif current is not None and current.version == pointer.version:
                self._follow_canary(model, pointer)
            elif self._given_up.get(model) != pointer.version and model not in self._building:
                self._follow(model, pointer.version)

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.poll()
            except Exception:  # a bad moment on a shared volume must not end the watch
                _log.exception("store watch failed; retrying")

    def _follow(self, model: str, version: int) -> None:
        """Serve the version another replica activated, if the store still points there once built."""
        _log.info("model %s: version %d was activated elsewhere; following", model, version)
        try:
            blend = self._obtain(model, version)
            with self._model_lock(model):
                pointer = self.store.pointer(model)
                if pointer is None or pointer.version != version:
                    return  # activated again elsewhere meanwhile: the next poll follows that
                self._swap_in(model, version, blend, time.perf_counter())
        except SoupError as exc:
            self._given_up[model] = version
            _log.error("model %s: cannot follow version %d: %s", model, version, exc)
            return
        self._bump()

    def _follow_unload(self, model: str, pointer: Pointer) -> None:
        with self._model_lock(model):
            if (self.store.pointer(model) or pointer).version == 0:
                self.repository.end_canary(model)
                self.residency.retire(model, 0, self.repository.unload(model))  # unloaded elsewhere
        self._bump()

    def _follow_canary(self, model: str, pointer: Pointer) -> None:
        """Start or end the canary the store names, as another replica (or a restart) left it."""
        if self.rollout.ended_elsewhere(model, pointer):
            with self._model_lock(model):
                if (self.store.pointer(model) or pointer).canary == 0:
                    self.repository.end_canary(model)
            self._bump()
            return
        stored = self.rollout.to_start(model, pointer)
        if stored is None:
            return
        try:
            blend = self._build(stored)
        except SoupError as exc:
            self.rollout.cannot_follow(model, stored.version, exc)
            return
        with self._model_lock(model):
            self.rollout.start(model, blend, by="", follow=True)
        self._bump()

    # ---- the work: build, then swap under the model's lock -------------------------------------

    def _build_and_maybe_activate(self, stored: StoredVersion, activate: bool, by: str) -> Blend:
        rollout = stored.spec.rollout
        if activate and rollout is None:
            return self._activate(stored.model, stored.version, by=by)
        model = stored.model
        blend = self._build(stored)
        if activate and rollout is not None:
            active = self.repository.models().get(model)
            self.rollout.gate(stored, blend, active)
            if rollout.canary is not None and active is not None:
                with self._model_lock(model):
                    self.rollout.start(model, blend, by)
                self._bump()
                return blend
        self.residency.add(model, blend)
        if activate:
            return self._activate(model, stored.version, by=by)
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
            return self._activate(model, stored.version, by=by)
        except BaseException:
            if back is not None:
                self._activate(model, back, by=by, point=False)
            raise

    def _activate(
        self, model: str, version: int, *, by: str, point: bool = True, history: tuple[int, ...] | None = None
    ) -> Blend:
        """Make ``version`` serve ``model``: obtain its blend (building it with no lock held), then
        swap and, with ``point``, write the store's pointer, together under the model's lock.
        ``history``: the pointer's history after the swap (a rollback's); default, the store's."""
        requested = time.perf_counter()
        blend = self._obtain(model, version)
        with self._model_lock(model):
            self._swap_in(model, version, blend, requested)
            if point:
                self.store.point(model, pointing(self.store.pointer(model), version, by, time.time(), history))
        self._bump()
        return blend

    def _promote(self, model: str, route: CanaryRoute, by: str) -> None:
        """Swap the canary's blend in (built, warmed up and serving a share already: never built
        again), only while it is still the model's canary in this process and in the store."""
        requested, version = time.perf_counter(), route.blend.version
        with self._model_lock(model):
            pointer = self.store.pointer(model)
            if self.repository.canary(model) is not route or pointer is None or pointer.canary != version:
                raise VersionConflict(f"model {model!r}: the canary of version {version} ended meanwhile")
            self._swap_in(model, version, route.blend, requested)
            self.store.point(model, pointing(pointer, version, by, time.time()))
        self._bump()

    def _obtain(self, model: str, version: int) -> Blend:
        """The blend of ``version``: the serving one, a resident one, or a new build."""
        current = self.repository.models().get(model)
        if current is not None and current.version == version:
            return current
        return self.residency.get(model, version) or self._build(self.store.get(model, version))

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

    def _build(self, stored: StoredVersion) -> Blend:
        """Build on the builder thread: queued behind the builds before it, or inline when the
        caller is a build already (a push that activates). Never called holding a model lock."""
        return self._builder.run(self._build_here, stored)

    def _build_here(self, stored: StoredVersion) -> Blend:
        if stored.state == "failed":
            raise VersionConflict(
                f"model {stored.model!r} version {stored.version} failed to build ({stored.reason}); push a fixed spec"
            )
        model, version = stored.model, stored.version
        self._set_building(Build(model, version, "starting", 0.0, time.time()))

        def progress(stage: str, fraction: float) -> None:
            self._set_building(replace(self._building[model], stage=stage, fraction=fraction))

        try:
            stored = self.lifecycle.building(stored)
            blend = self.kitchen.build(
                stored.spec, version, progress, self.residency.budget(model, version), resolution=stored.resolution
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
        self.lifecycle.built(stored, blend)
        return blend

    def _failed(self, stored: StoredVersion, exc: SoupError) -> None:
        """Record a failed build (``Lifecycle.failed``: the spec's fault, or this replica's)."""
        self._observer.build_failed(stored.model, exc.reason)
        _log.error("model %s: version %d failed to build: %s", stored.model, stored.version, exc)
        try:
            self.lifecycle.failed(stored, exc)
        except SoupError as store_error:  # the version may have been deleted meanwhile
            _log.warning("model %s: version %d: cannot record the failure: %s", stored.model, stored.version, store_error)

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
