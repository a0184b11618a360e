"""Rollout, as a part the controller holds: the accuracy gate, canaries, and the feedback that decides them.

``RolloutControl`` keeps its own state (each model's canary note, the canaries this replica
could not start) and works on the store, the repository and the online accuracy it is given.
It never calls back into the controller: it answers what to do (a verdict, a canary to follow)
and the controller, which owns builds, locks and swaps, does it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

from tureen.core.blends import Blend, BlendRepository, CanaryRoute
from tureen.core.lifecycle import Lifecycle
from tureen.core.observer import Observer
from tureen.core.rollout import Feedback, OnlineAccuracy, Verdict, check_gate, decide
from tureen.core.store import Pointer, SpecStore, StoredVersion
from tureen.errors import GateRejected, InvalidRequest, ModelNotFound, SoupError, VersionConflict
from tureen.spec import name_problem

_log = logging.getLogger("tureen.controller")


@dataclass(frozen=True)
class Judged:
    """What a feedback call found: the version that answered, and the canary's verdict if any."""

    version: int | None
    verdict: Verdict | None = None
    route: CanaryRoute | None = None


class RolloutControl:
    """Gate, canary and feedback decisions; the controller holds the model lock where asked."""

    def __init__(
        self, store: SpecStore, repository: BlendRepository, online: OnlineAccuracy, observer: Observer, lifecycle: Lifecycle
    ) -> None:
        self.store = store
        self.repository = repository
        self.online = online
        self._observer = observer
        self._lifecycle = lifecycle
        self._notes: dict[str, str] = {}
        self._unfollowable: dict[str, int] = {}
        """model -> the canary version this replica failed to start (not retried until it changes)."""

    def note(self, model: str) -> str:
        """The last thing that happened to the model's canary, for status."""
        return self._notes.get(model, "")

    def known(self, model: str) -> None:
        """Raise ``ModelNotFound`` unless ``model`` is served here."""
        if model not in self.repository.models():
            raise ModelNotFound(f"model {model!r} is not served here")

    def gate(self, stored: StoredVersion, blend: Blend, active: Blend | None) -> None:
        """Refuse a candidate the rollout gate finds worse; it is stored as rejected, with both numbers."""
        try:
            line = check_gate(
                stored.spec, blend.version, blend.evaluation, (active.version, active.evaluation) if active else None
            )
        except GateRejected as exc:
            _log.warning("model %s: version %d: %s", stored.model, stored.version, exc)
            self._observer.build_failed(stored.model, exc.reason)
            self._lifecycle.rejected(stored, str(exc))
            raise
        _log.info("model %s: version %d: %s", stored.model, stored.version, line)

    def start(self, model: str, blend: Blend, by: str, follow: bool = False) -> None:
        """Route the canary's share to ``blend`` (the caller holds the model's lock). ``follow``:
        started because the store names it (a restart, another replica), so only if it still does."""
        canary = blend.spec.rollout.canary if blend.spec.rollout is not None else None
        assert canary is not None, "only specs with rollout.canary start canaries"
        pointer = self.store.pointer(model)
        if follow and (pointer is None or pointer.canary != blend.version):
            return  # ended elsewhere while this replica built it
        active = self.repository.models().get(model)
        self.repository.start_canary(CanaryRoute(blend, canary.percent, canary.sticky))
        self.online.restart(model, blend.version)
        if active is not None:
            self.online.restart(model, active.version)
        self._notes[model] = f"started: {canary.percent:g}% of traffic"
        if not follow and pointer is not None:
            self.store.point(model, replace(pointer, canary=blend.version, by=by, at=time.time()))
        _log.info("model %s: version %d is a canary taking %g%% of traffic", model, blend.version, canary.percent)

    def promoted(self, model: str, version: int, why: str) -> None:
        """Bookkeeping once the controller swapped the canary in."""
        self._notes[model] = f"promoted ({why})"
        self._observer.canary_decided(model, version, "promoted")
        _log.info("model %s: canary version %d promoted (%s)", model, version, why)

    def abort(self, model: str, by: str, why: str, reject: bool, route: CanaryRoute | None) -> int:
        """All traffic back to the active version (the caller holds the model's lock); an automatic
        rollback marks the canary rejected. With ``route``, only that canary. Returns its version."""
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
            self._lifecycle.rejected(self.store.get(model, version), f"canary rolled back: {why}")
        self._notes[model] = f"rolled back ({why})"
        self._observer.canary_decided(model, version, "rolled_back")
        _log.warning("model %s: canary version %d rolled back (%s)", model, version, why)
        return version

    def judge(self, model: str, request_id: str, feedback: Feedback) -> Judged:
        """Score the version that answered ``request_id`` and say whether the canary is decided.
        An unknown request id is counted, never an error."""
        for field, value in (("model", model), ("request_id", request_id)):
            if not value:
                raise InvalidRequest(f"{field}: required")
        feedback.reward()  # malformed feedback is refused whether or not the id is known
        if (problem := name_problem(model)) is not None:
            raise InvalidRequest(f"model: {problem}")
        self.known(model)
        prediction = self.online.scored(model, request_id, feedback)
        if prediction is None:
            self._observer.feedback_ignored(model)
            return Judged(None)
        accuracy, samples = self.online.rolling(model, prediction.version)
        self._observer.online_accuracy(model, prediction.version, accuracy, samples)
        route, active = self.repository.canary(model), self.repository.models().get(model)
        if route is None or active is None or route.blend.spec.rollout is None or route.blend.spec.rollout.canary is None:
            return Judged(prediction.version)
        canary = route.blend.spec.rollout.canary
        verdict = decide(canary, self.online.totals(model, route.blend.version), self.online.totals(model, active.version))
        self._notes[model] = verdict.line
        return Judged(prediction.version, verdict, route)

    def ended_elsewhere(self, model: str, pointer: Pointer) -> bool:
        """The store names no canary, but this replica still routes to one."""
        return pointer.canary == 0 and self.repository.canary(model) is not None

    def to_start(self, model: str, pointer: Pointer) -> StoredVersion | None:
        """The canary the store names that this replica should build and start, if any (not one
        it already routes to, nor one it failed to start before)."""
        route = self.repository.canary(model)
        local = route.blend.version if route is not None else 0
        if pointer.canary in (0, local) or self._unfollowable.get(model) == pointer.canary:
            return None
        try:
            stored = self.store.get(model, pointer.canary)
            if stored.spec.rollout is None or stored.spec.rollout.canary is None:
                raise VersionConflict(f"version {pointer.canary} has no rollout.canary section")
        except SoupError as exc:
            self.cannot_follow(model, pointer.canary, exc)
            return None
        return stored

    def cannot_follow(self, model: str, version: int, error: SoupError) -> None:
        self._unfollowable[model] = version
        _log.error("model %s: cannot follow canary version %d: %s", model, version, error)
