"""The rollout half of the controller: the accuracy gate, canaries, and the feedback that decides them.

Kept apart from ``controller.py`` so that each reads in one sitting; ``RolloutControl`` is a base of
``Controller`` and works on the controller's store, repository, locks and activation.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace
from typing import TYPE_CHECKING

from tureen.core.blends import Blend, BlendRepository, CanaryRoute
from tureen.core.observer import Observer
from tureen.core.rollout import OnlineAccuracy, check_gate, decide
from tureen.core.store import Pointer, SpecStore, StoredVersion
from tureen.errors import GateRejected, InvalidRequest, ModelNotFound, SoupError, VersionConflict

_log = logging.getLogger("tureen.controller")


class RolloutControl:
    """Gate, canary and feedback operations of ``Controller``."""

    if TYPE_CHECKING:  # provided by Controller
        store: SpecStore
        repository: BlendRepository
        online: OnlineAccuracy
        _observer: Observer
        _canary_notes: dict[str, str]
        _given_up: dict[str, int]

        def _model_lock(self, model: str) -> threading.Lock: ...
        def _build(self, stored: StoredVersion) -> Blend: ...
        def _bump(self) -> None: ...
        def _activate(
            self, model: str, version: int, *, by: str, write_pointer: bool, canary: CanaryRoute | None = None
        ) -> Blend: ...

    def _gate(self, stored: StoredVersion, blend: Blend, active: Blend | None) -> None:
        """Refuse a candidate the rollout gate finds worse; it is stored as rejected, with both numbers."""
        try:
            line = check_gate(
                stored.spec, blend.version, blend.evaluation, (active.version, active.evaluation) if active else None
            )
        except GateRejected as exc:
            _log.warning("model %s: version %d: %s", stored.model, stored.version, exc)
            self._observer.build_failed(stored.model, exc.reason)
            self.store.record(self.store.get(stored.model, stored.version), "rejected", reason=str(exc))
            self._bump()
            raise
        _log.info("model %s: version %d: %s", stored.model, stored.version, line)

    def _start_canary(self, model: str, blend: Blend, by: str, follow: bool = False) -> Blend:
        """Route the canary's share to ``blend``. ``follow``: started because the store names it
        (a restart, another replica), so only if it still does once built."""
        canary = blend.spec.rollout.canary  # type: ignore[union-attr]
        assert canary is not None
        with self._model_lock(model):
            pointer = self.store.pointer(model)
            if follow and (pointer is None or pointer.canary != blend.version):
                return blend  # ended elsewhere while this replica built it
            active = self.repository.models().get(model)
            self.repository.start_canary(CanaryRoute(blend, canary.percent, canary.sticky))
            self.online.restart(model, blend.version)
            if active is not None:
                self.online.restart(model, active.version)
            self._canary_notes[model] = f"started: {canary.percent:g}% of traffic"
            if not follow and pointer is not None:
                self.store.point(model, replace(pointer, canary=blend.version, by=by, at=time.time()))
        _log.info("model %s: version %d is a canary taking %g%% of traffic", model, blend.version, canary.percent)
        self._bump()
        return blend

    def promote_canary(self, model: str, by: str, why: str = "by hand", route: CanaryRoute | None = None) -> StoredVersion:
        """The canary becomes the active version (one swap); the old active one is kept for rollback.
        With ``route``, only that canary: one judged by feedback, not one started since."""
        self._known(model)
        route = route or self.repository.canary(model)
        if route is None:
            raise VersionConflict(f"model {model!r} has no canary to promote")
        version = route.blend.version
        self._activate(model, version, by=by, write_pointer=True, canary=route)
        self._canary_notes[model] = f"promoted ({why})"
        self._observer.canary_decided(model, version, "promoted")
        _log.info("model %s: canary version %d promoted (%s)", model, version, why)
        return self.store.get(model, version)

    def abort_canary(
        self, model: str, by: str, why: str = "by hand", reject: bool = False, route: CanaryRoute | None = None
    ) -> StoredVersion:
        """All traffic back to the active version; an automatic rollback marks the canary rejected."""
        self._known(model)
        with self._model_lock(model):
            current = self.repository.canary(model)
            if current is None or (route is not None and current is not route):
                raise VersionConflict(f"model {model!r} has no canary to abort")
            self.repository.end_canary(model)
            version = current.blend.version
            pointer = self.store.pointer(model)
            still = pointer is not None and pointer.canary == version  # not ended or promoted elsewhere
            if pointer is not None and still:
                self.store.point(model, replace(pointer, canary=0, by=by, at=time.time()))
            if reject and still:
                self.store.record(self.store.get(model, version), "rejected", reason=f"canary rolled back: {why}")
            self._canary_notes[model] = f"rolled back ({why})"
        self._observer.canary_decided(model, version, "rolled_back")
        _log.warning("model %s: canary version %d rolled back (%s)", model, version, why)
        self._bump()
        return self.store.get(model, version)

    def feedback(self, model: str, request_id: str, labels: list[int]) -> int | None:
        """Score the version that answered ``request_id``; decide the canary when it has enough.
        Returns that version, or None for an unknown request id (counted, never an error)."""
        for field, value in (("model", model), ("request_id", request_id)):
            if not value:
                raise InvalidRequest(f"{field}: required")
        if not labels:
            raise InvalidRequest("labels: give the true class of each row of the request")
        self._known(model)
        try:
            prediction = self.online.labelled(model, request_id, labels)
        except ValueError as exc:
            raise InvalidRequest(f"labels: {exc}") from None
        if prediction is None:
            self._observer.feedback_ignored(model)
            return None
        accuracy, samples = self.online.rolling(model, prediction.version)
        self._observer.online_accuracy(model, prediction.version, accuracy, samples)
        route, active = self.repository.canary(model), self.repository.models().get(model)
        if route is not None and active is not None and route.blend.spec.rollout is not None:
            canary = route.blend.spec.rollout.canary
            assert canary is not None
            verdict = decide(canary, self.online.totals(model, route.blend.version), self.online.totals(model, active.version))
            self._canary_notes[model] = verdict.line
            try:
                if verdict.decision == "promote":
                    self.promote_canary(model, by="canary", why=verdict.line, route=route)
                elif verdict.decision == "rollback":
                    self.abort_canary(model, by="canary", why=verdict.line, reject=True, route=route)
            except VersionConflict:
                pass  # decided a moment ago by another feedback call, an operator or another replica
            except SoupError as exc:  # the label was taken; acting on it failed here, not the caller
                _log.error("model %s: canary decision %r failed: %s", model, verdict.decision, exc)
        return prediction.version

    def _known(self, model: str) -> None:
        if model not in self.repository.models():
            raise ModelNotFound(f"model {model!r} is not served here")

    def _follow_canary(self, model: str, pointer: Pointer) -> None:
        """Start or end the canary the store names, as another replica (or a restart) left it."""
        route = self.repository.canary(model)
        local = route.blend.version if route is not None else 0
        if pointer.canary == local or self._given_up.get(model) == -pointer.canary:
            return
        if pointer.canary == 0:
            with self._model_lock(model):
                if (self.store.pointer(model) or pointer).canary == 0:
                    self.repository.end_canary(model)
            self._bump()
            return
        try:
            stored = self.store.get(model, pointer.canary)
            if stored.spec.rollout is None or stored.spec.rollout.canary is None:
                raise VersionConflict(f"version {pointer.canary} has no rollout.canary section")
            self._start_canary(model, self._build(stored), by="", follow=True)
        except SoupError as exc:
            self._given_up[model] = -pointer.canary
            _log.error("model %s: cannot follow canary version %d: %s", model, pointer.canary, exc)
