"""Versions of each model's soup: push, build beside what serves, swap, roll back, converge.

The controller owns the life of spec versions in one process, composed of parts: the
``SpecStore`` (the truth every replica shares), ``Builds`` (off the request path, one at a
time), ``Swaps`` (obtain a blend, swap it in under the model's lock), ``Residency`` (kept
blends, memory), ``Lifecycle`` (stored states) and ``RolloutControl`` (gate, canaries).
Replicas sharing a store converge by polling it (``poll``). docs/architecture.md draws the map.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future

from tureen.core.blends import Blend, BlendRepository, CanaryRoute
from tureen.core.builder import Builds
from tureen.core.kitchen import Kitchen
from tureen.core.lifecycle import Lifecycle, shown_state
from tureen.core.observer import Observer
from tureen.core.policy import SpecPolicy
from tureen.core.residency import Residency
from tureen.core.rollout import Feedback, OnlineAccuracy
from tureen.core.rollout_control import RolloutControl
from tureen.core.status import Changes, ModelStatus, model_status
from tureen.core.store import Pointer, SpecStore, StoredVersion
from tureen.core.swaps import Swaps
from tureen.errors import ModelNotFound, SoupError, SpecInvalid, VersionConflict
from tureen.spec import SoupSpec

_log = logging.getLogger("tureen.controller")


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
        build_threads: int | None = None,
    ) -> None:
        """``memory_limit``: bytes all blends (active and kept) may hold on the device together.
        ``policy``: what a pushed spec may name (default: Tureen's own factories, no files).
        ``build_threads``: torch's CPU threads for a build (default: every core)."""
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
        self.changes = Changes()
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self.builds = Builds(kitchen, self.lifecycle, self.residency, self.policy, observer, self.changes.bump, build_threads)
        self.swaps = Swaps(store, repository, self.residency, self.builds, observer, self.changes.bump)
        self._given_up: dict[str, tuple[int, float]] = {}
        """model -> (version, when it was activated) this replica failed to follow: not retried
        until the store's pointer changes (an operator activating it again is a new try)."""
        self._seeded: dict[str, int] = {}

    # ---- start-up ----------------------------------------------------------------------------

    def seed(self, spec: SoupSpec, source: str) -> StoredVersion | None:
        """Store ``spec`` as the model's next version, to activate at ``restore``, when the store
        has no active version of the model; a model operators activated keeps that version,
        whatever the start-up flags say."""
        if self.store.pointer(spec.model) is not None:
            _log.info("model %s: the store has an active version; %s is not seeded", spec.model, source)
            return None
        stored = self.store.push(spec, pushed_by=f"seed {source}", origin="operator")
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
                blends.append(self.swaps.activate(model, version, by="seed" if seeded else "", point=seeded is not None))
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
        self.changes.close()
        if self._watcher is not None:
            self._watcher.join(timeout=5)
        self.builds.shutdown()

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
        self.changes.bump()
        if in_place:
            future: Future[Blend] = self.builds.submit(self._replace_in_place, stored, by)
        else:
            future = self.builds.submit(self._build_and_maybe_activate, stored, activate, by)
        if wait:
            future.result()
            return self.store.get(spec.model, stored.version)
        return stored

    def activate(self, model: str, version: int, by: str) -> StoredVersion:
        """Make ``version`` serve ``model`` now: a swap when resident, else a build first."""
        self.swaps.activate(model, version, by=by)
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
        self.swaps.activate(model, target, by=by, history=tuple(history[:-1]))
        return self.store.get(model, target)

    def unload(self, model: str, by: str) -> None:
        """Stop serving ``model`` everywhere (its versions stay stored); ``activate`` brings it back."""
        with self.swaps.lock(model):
            pointer = self.store.pointer(model)
            if pointer is None or pointer.version == 0:
                if not self.store.version_numbers(model):
                    raise ModelNotFound(f"model {model!r} has no stored version")
                return
            self.store.point(model, Pointer(0, (*pointer.history, pointer.version), by, time.time()))
            self.repository.end_canary(model)
            self.residency.retire(model, 0, self.repository.unload(model))
        self.changes.bump()

    def load(self, model: str, by: str) -> StoredVersion:
        """Serve ``model`` again: its active version, or the last one active before an unload."""
        pointer = self.store.pointer(model)
        if pointer is None:
            raise ModelNotFound(f"model {model!r} has no stored version to load")
        if pointer.version:
            return self.activate(model, pointer.version, by)
        return self.rollback(model, by)

    def load_model(self, model: str, spec: SoupSpec | None, by: str) -> StoredVersion:
        """Triton's repository load: with a spec (its ``config``), push it as a new version and
        wait until it serves; without one, serve the model again (``load``)."""
        if spec is None:
            return self.load(model, by)
        if spec.model != model:
            raise SpecInvalid([f"model: {spec.model!r} in parameters.config, but the model to load is {model!r}"])
        return self.push(spec, by, activate=True, wait=True)

    def delete(self, model: str, version: int) -> None:
        with self.swaps.lock(model):  # not while an activation of this model swaps and points
            active = self.repository.models().get(model)
            if active is not None and active.version == version:
                raise VersionConflict(f"model {model!r} version {version} is serving; activate another version first")
            route, pointer = self.repository.canary(model), self.store.pointer(model)
            if (route is not None and route.blend.version == version) or (pointer is not None and pointer.canary == version):
                raise VersionConflict(f"model {model!r} version {version} is the canary; promote or abort it first")
            self.residency.drop(model, version)
            self.store.delete(model, version)
        self.changes.bump()

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
        building = self.builds.progress_of(item.model)
        return shown_state(item, pointer, building.version if building is not None else None)

    def status(self) -> list[ModelStatus]:
        """Every model's status, as this replica sees it."""
        return [
            model_status(model, blend, self.repository, self.residency, self.builds, self.rollout)
            for model, blend in sorted(self.repository.models().items())
        ]

    # ---- canaries: the rollout part decides, the controller swaps -----------------------------

    def promote_canary(self, model: str, by: str, why: str = "by hand", route: CanaryRoute | None = None) -> StoredVersion:
        """The canary becomes the active version (one swap); the old active one is kept for rollback.
        With ``route``, only that canary: one judged by feedback, not one started since."""
        self.rollout.known(model)
        route = route or self.repository.canary(model)
        if route is None:
            raise VersionConflict(f"model {model!r} has no canary to promote")
        self.swaps.promote(model, route, by)
        self.rollout.promoted(model, route.blend.version, why)
        return self.store.get(model, route.blend.version)

    def abort_canary(
        self, model: str, by: str, why: str = "by hand", reject: bool = False, route: CanaryRoute | None = None
    ) -> StoredVersion:
        """All traffic back to the active version; an automatic rollback marks the canary rejected."""
        self.rollout.known(model)
        with self.swaps.lock(model):
            version = self.rollout.abort(model, by, why, reject, route)
        self.changes.bump()
        return self.store.get(model, version)

    def feedback(self, model: str, request_id: str, feedback: Feedback) -> int | None:
        """Score the version that answered ``request_id``; act on the canary's verdict once it has one.
        Returns that version, or None for an unknown request id (counted, never an error)."""
        judged = self.rollout.judge(model, request_id, feedback)
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
            elif self._given_up.get(model) != (pointer.version, pointer.at) and self.builds.progress_of(model) is None:
                self._follow(model, pointer)

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.poll()
            except Exception:  # a bad moment on a shared volume must not end the watch
                _log.exception("store watch failed; retrying")

    def _follow(self, model: str, pointed: Pointer) -> None:
        """Serve the version another replica activated, if the store still points there once built."""
        version = pointed.version
        _log.info("model %s: version %d was activated elsewhere; following", model, version)
        try:
            self.swaps.follow(model, version)
        except SoupError as exc:
            self._given_up[model] = (version, pointed.at)
            _log.error("model %s: cannot follow version %d: %s", model, version, exc)

    def _follow_unload(self, model: str, pointer: Pointer) -> None:
        with self.swaps.lock(model):
            if (self.store.pointer(model) or pointer).version == 0:
                self.repository.end_canary(model)
                self.residency.retire(model, 0, self.repository.unload(model))  # unloaded elsewhere
        self.changes.bump()

    def _follow_canary(self, model: str, pointer: Pointer) -> None:
        """Start or end the canary the store names, as another replica (or a restart) left it."""
        if self.rollout.ended_elsewhere(model, pointer):
            with self.swaps.lock(model):
                if (self.store.pointer(model) or pointer).canary == 0:
                    self.repository.end_canary(model)
            self.changes.bump()
            return
        stored = self.rollout.to_start(model, pointer)
        if stored is None:
            return
        try:
            blend = self.builds.build(stored)
        except SoupError as exc:
            self.rollout.cannot_follow(model, stored.version, exc)
            return
        with self.swaps.lock(model):
            self.rollout.start(model, blend, by="", follow=True)
        self.changes.bump()

    # ---- the work: build, then swap under the model's lock -------------------------------------

    def _build_and_maybe_activate(self, stored: StoredVersion, activate: bool, by: str) -> Blend:
        rollout = stored.spec.rollout
        if activate and rollout is None:
            return self.swaps.activate(stored.model, stored.version, by=by)
        model = stored.model
        blend = self.builds.build(stored)
        if activate and rollout is not None:
            active = self.repository.models().get(model)
            self.rollout.gate(stored, blend, active)
            if rollout.canary is not None and active is not None:
                with self.swaps.lock(model):
                    self.rollout.start(model, blend, by)
                self.changes.bump()
                return blend
        self.residency.add(model, blend)
        if activate:
            return self.swaps.activate(model, stored.version, by=by)
        self.changes.bump()
        return blend

    def _replace_in_place(self, stored: StoredVersion, by: str) -> Blend:
        """Give up the serving blend (and the kept ones) first, then build: the model pauses
        (UNAVAILABLE) instead of needing room for two blends. A failed build brings the previous
        version back, built again, and raises the failure."""
        model = stored.model
        with self.swaps.lock(model):
            self.repository.end_canary(model)
            previous = self.repository.unload(model, pause=True)
            self.residency.drop(model)
            back = previous.version if previous is not None else None
            del previous  # its memory goes as soon as the requests on it finish
        _log.warning("model %s: in-place swap to version %d: paused until it serves", model, stored.version)
        try:
            return self.swaps.activate(model, stored.version, by=by)
        except BaseException:
            if back is not None:
                self.swaps.activate(model, back, by=by, point=False)
            raise
