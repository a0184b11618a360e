"""The life of a spec version, in one place.

A version's *stored* state says what became of its spec, for every replica::

    stored --build--> building --> ready        (built, warmed up, evaluated)
                               --> failed       (the spec or its checkpoints are at fault: final)
                               --> stored       (this replica's own trouble: no memory, a missing file)
    ready  --gate or canary rollback--> rejected

Which version serves is the store's pointer, not a stored state, so the states shown to
operators add three that are read from it: ``active`` (the pointer's version), ``canary``
(the pointer's canary) and ``retired`` (active once, in the pointer's history). A rebuild of a
settled version (``ready`` or ``rejected``, say after a restart) never reopens its verdict.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tureen.core.blends import Blend
from tureen.core.store import Pointer, SpecStore, State, StoredVersion
from tureen.errors import (
    EvaluationMissing,
    IngredientChanged,
    IngredientMissing,
    OutOfMemory,
    PermissionDenied,
    SoupError,
    StoreError,
)

TRANSITIONS: Mapping[State, frozenset[State]] = {
    "stored": frozenset({"building"}),
    # "building" again: a build cut short (a restart, a kill) leaves the state behind.
    "building": frozenset({"building", "ready", "failed", "stored"}),
    "ready": frozenset({"rejected", "failed"}),
    "rejected": frozenset({"rejected", "failed"}),
    "failed": frozenset(),
}
"""Every stored state a version may move to from each; a rebuild of a settled one keeps it."""

SETTLED: frozenset[State] = frozenset({"ready", "rejected"})

LOCAL_FAILURES = (OutOfMemory, IngredientMissing, IngredientChanged, EvaluationMissing, StoreError, PermissionDenied)
"""Build failures that say something about this replica (its memory, its files, its flags), not about the spec."""


class IllegalTransition(SoupError):
    """A version was asked to move to a state its state does not lead to (a bug, not input)."""


def shown_state(item: StoredVersion, pointer: Pointer | None, building: int | None) -> str:
    """What operators see: the stored state, or active, canary, building or retired as the
    pointer and this replica's build in progress (``building``, a version) say."""
    if pointer is not None and item.version == pointer.version:
        return "active"
    if pointer is not None and item.version == pointer.canary:
        return "canary"
    if building == item.version:
        return "building"
    if item.state == "building":
        return "stored"  # a build cut short (a restart) or running on another replica
    if pointer is not None and item.version in pointer.history and item.state != "failed":
        return "retired"
    return item.state


class Lifecycle:
    """Moves versions between stored states, refusing moves ``TRANSITIONS`` does not allow."""

    def __init__(self, store: SpecStore) -> None:
        self.store = store

    def building(self, stored: StoredVersion) -> StoredVersion:
        """A build starts; a settled version keeps its verdict."""
        return stored if stored.state in SETTLED else self.move(stored, "building")

    def built(self, stored: StoredVersion, blend: Blend) -> StoredVersion:
        """The build's facts go with the version; a new one becomes ready, a settled one stays."""
        state = stored.state if stored.state in SETTLED else "ready"
        facts = {
            "build_seconds": round(blend.build_seconds, 3),
            "checksums": dict(blend.checksums),
            "evaluation": _plain(blend.evaluation),
            "ingredient_evaluation": _plain(blend.ingredient_evaluation),
            "resolution": blend.resolution,
        }
        if state != stored.state:
            self._check(stored, state)
        return self.store.record(stored, state, stored.reason if stored.state in SETTLED else "", **facts)

    def failed(self, stored: StoredVersion, error: SoupError) -> StoredVersion:
        """A failure of the spec marks it failed for every replica; one of this replica's own
        (``LOCAL_FAILURES``) puts the version back as it was, so others may still serve it."""
        if isinstance(error, LOCAL_FAILURES):
            back: State = "stored" if stored.state == "building" else stored.state
            return stored if back == stored.state else self.move(stored, back)
        return self.move(stored, "failed", str(error))

    def rejected(self, stored: StoredVersion, reason: str) -> StoredVersion:
        """The gate or a canary rollback kept the version from serving."""
        return self.move(self.store.get(stored.model, stored.version), "rejected", reason)

    def move(self, stored: StoredVersion, state: State, reason: str = "") -> StoredVersion:
        """Record ``state`` (and ``reason``) for the version; ``IllegalTransition`` if its state does not lead there."""
        self._check(stored, state)
        return self.store.record(stored, state, reason)

    @staticmethod
    def _check(stored: StoredVersion, state: State) -> None:
        if state not in TRANSITIONS[stored.state]:
            raise IllegalTransition(f"model {stored.model!r} version {stored.version}: {stored.state} cannot become {state}")


def _plain(value: Any) -> Any:
    """Nested mappings as plain dicts, for JSON."""
    return {k: _plain(v) for k, v in value.items()} if isinstance(value, Mapping) else value
