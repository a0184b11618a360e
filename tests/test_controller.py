"""The controller alone, fast: a real SpecStore in a temporary folder, a real kitchen merging tiny
real blends on the CPU, and no transport. Every version transition and the races the controller
guards against, in milliseconds each; the gRPC tests (test_swap, test_rollout, test_replicas)
check the same behaviour end to end.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from helpers import digits_spec, mlp_logits, prototype_rows, prototype_state, prototypes
from tureen.core.blends import BlendRepository
from tureen.core.controller import Controller
from tureen.core.ingredients import IngredientPool
from tureen.core.kitchen import Kitchen
from tureen.core.lifecycle import TRANSITIONS, IllegalTransition, Lifecycle
from tureen.core.observer import NullObserver
from tureen.core.policy import SpecPolicy
from tureen.core.rollout import Feedback
from tureen.core.store import SpecStore
from tureen.errors import GateRejected, IngredientCorrupt, IngredientMissing, ModelNotFound, PermissionDenied, VersionConflict
from tureen.spec import SoupSpec, parse_spec

HIDDEN = 16
EVALUATION = {"splits": {"val": {"path": "val.safetensors"}}}


class Pantry:
    """Ingredients whose held-out accuracy is known (good > mid > noise) and held-out data, in a folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        centers = prototypes(seed=0)
        good = prototype_state(centers, HIDDEN)
        mid = {**good, "net.4.weight": good["net.4.weight"][[1, 2, 3, 0, 4, 5, 6, 7, 8, 9]].clone()}
        noise = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(9)) for k, v in good.items()}
        nan = {**good, "net.0.bias": torch.full_like(good["net.0.bias"], float("nan"))}
        for name, state in {"good": good, "mid": mid, "noise": noise, "nan": nan}.items():
            save_file(state, str(folder / f"{name}.safetensors"))
        self.states = {"good": good, "mid": mid}
        self.x, self.y = prototype_rows(centers, 300, seed=1)
        save_file({"pixels": self.x, "labels": self.y}, str(folder / "val.safetensors"))

    def spec(self, ingredient: str, **extra: Any) -> SoupSpec:
        return parse_spec(digits_spec([ingredient], hidden=HIDDEN, **extra), base_dir=self.folder)


class OnBuilt(NullObserver):
    """An observer (the interface Prometheus implements) that runs ``then`` once a blend of
    ``version`` is built, before it is swapped in: the moment another replica may act."""

    def __init__(self, version: int, then: Callable[[], None]) -> None:
        self.version, self.then = version, then

    def blend_built(self, model: str, version: int, seconds: float) -> None:
        if version == self.version:
            self.then()


@contextmanager
def controller(
    folder: Path, store: Path | None = None, observer: NullObserver | None = None, **options: Any
) -> Iterator[Controller]:
    observer = observer or NullObserver()
    kitchen = Kitchen(IngredientPool(torch.device("cpu"), observer), observer)
    policy = SpecPolicy.of([], [folder])
    made = Controller(
        SpecStore(store or folder / "store"), kitchen, BlendRepository(observer), observer, policy=policy, **options
    )
    try:
        yield made
    finally:
        made.stop()


@pytest.fixture
def pantry(tmp_path: Path) -> Pantry:
    return Pantry(tmp_path)


def shown(c: Controller, model: str = "digits") -> dict[int, str]:
    return {stored.version: state for stored, state in c.versions(model)}


def serving(c: Controller, model: str = "digits") -> int:
    blend = c.repository.models()[model]
    assert blend is not None
    return blend.version


def test_push_builds_and_activates_and_the_one_before_retires(pantry: Pantry) -> None:
    with controller(pantry.folder) as c:
        c.push(pantry.spec("mid"), "me", wait=True)
        c.push(pantry.spec("good"), "me", wait=True)
        assert shown(c) == {1: "retired", 2: "active"} and serving(c) == 2
        pointer = c.store.pointer("digits")
        assert pointer is not None and (pointer.version, pointer.history, pointer.by) == (2, (1,), "me")
        logits = c.repository.active("digits").forward({"pixels": pantry.x[:4]})["logits"]
        torch.testing.assert_close(logits, mlp_logits(pantry.states["good"], pantry.x[:4], HIDDEN))


def test_a_version_built_but_not_activated_is_ready_and_activating_it_is_a_swap(pantry: Pantry) -> None:
    with controller(pantry.folder) as c:
        c.push(pantry.spec("mid"), "me", wait=True)
        c.push(pantry.spec("good"), "me", activate=False, wait=True)
        assert shown(c) == {1: "active", 2: "ready"}
        built = c.residency.get("digits", 2)
        c.activate("digits", 2, "me")
        assert c.repository.active("digits") is built  # the resident blend, not a rebuild
        assert shown(c) == {1: "retired", 2: "active"}


def test_a_spec_failure_is_final_and_a_replica_failure_is_not(pantry: Pantry) -> None:
    with controller(pantry.folder) as c:
        c.push(pantry.spec("mid"), "me", wait=True)
        with pytest.raises(IngredientCorrupt, match="NaN"):
            c.push(pantry.spec("nan"), "me", wait=True)
        assert shown(c)[2] == "failed" and serving(c) == 1
        with pytest.raises(VersionConflict, match="failed to build"):
            c.activate("digits", 2, "me")
        missing = parse_spec(digits_spec(["later"], hidden=HIDDEN), base_dir=pantry.folder)
        with pytest.raises(IngredientMissing):
            c.push(missing, "me", wait=True)
        assert shown(c)[3] == "stored"  # a file missing here may be on another replica
        (pantry.folder / "later.safetensors").write_bytes((pantry.folder / "good.safetensors").read_bytes())
        c.activate("digits", 3, "me")
        assert shown(c)[3] == "active" and serving(c) == 3


def test_the_gate_rejects_a_worse_candidate_and_a_rollback_goes_to_the_version_active_before(pantry: Pantry) -> None:
    gated = {"evaluation": EVALUATION, "rollout": {"gate": {"tolerance": 0.0}}}
    with controller(pantry.folder) as c:
        c.push(pantry.spec("good", **gated), "me", wait=True)
        with pytest.raises(GateRejected, match="rejected: accuracy on 'val'"):
            c.push(pantry.spec("noise", **gated), "me", wait=True)
        assert shown(c) == {1: "active", 2: "rejected"} and serving(c) == 1
        with pytest.raises(VersionConflict, match="no earlier active version"):
            c.rollback("digits", "me")
        c.push(pantry.spec("mid"), "me", wait=True)
        with pytest.raises(IngredientCorrupt):
            c.push(pantry.spec("nan"), "me", wait=True)
        c.rollback("digits", "me")  # past the rejected and the failed version, which never served
        assert serving(c) == 1 and shown(c) == {1: "active", 2: "rejected", 3: "ready", 4: "failed"}


def test_canaries_promote_and_roll_back_and_are_protected_while_they_run(pantry: Pantry) -> None:
    canary = {"evaluation": EVALUATION, "rollout": {"canary": {"percent": 20, "min_samples": 40}}}
    with controller(pantry.folder) as c:
        c.push(pantry.spec("mid"), "me", wait=True)
        c.push(pantry.spec("good", **canary), "me", wait=True)
        assert shown(c) == {1: "active", 2: "canary"} and c.status()[0].canary == 2
        with pytest.raises(VersionConflict, match="is the canary"):
            c.delete("digits", 2)
        with pytest.raises(VersionConflict, match="is serving"):
            c.delete("digits", 1)
        c.promote_canary("digits", "me")
        assert shown(c) == {1: "retired", 2: "active"} and c.repository.canary("digits") is None
        c.push(pantry.spec("noise", **canary), "me", wait=True)
        decided = judge_by_feedback(c, pantry, canary_version=3)
        assert decided == "rolled back" and shown(c)[3] == "rejected" and serving(c) == 2
        assert c.status()[0].canary_note.startswith("rolled back (")


def judge_by_feedback(c: Controller, pantry: Pantry, canary_version: int) -> str:
    """Label predictions of both versions (the candidate always wrong) until the canary is decided."""
    for i in range(200):
        version = canary_version if i % 2 else serving(c)
        blend = c.repository.canary("digits").blend if version == canary_version else c.repository.active("digits")  # type: ignore[union-attr]
        row = pantry.x[i : i + 1]
        predicted = int(blend.forward({"pixels": row})["logits"].argmax())
        c.online.predicted("digits", f"r{i}", version, [predicted])
        truth = int(pantry.y[i]) if version != canary_version else (predicted + 1) % 10
        c.feedback("digits", f"r{i}", Feedback(labels=(truth,)))
        if c.repository.canary("digits") is None:
            return c.status()[0].canary_note.split(" (")[0]
    return "undecided"


def test_unload_and_load_and_an_in_place_failure_brings_the_old_version_back(pantry: Pantry) -> None:
    with controller(pantry.folder) as c:
        c.push(pantry.spec("mid"), "me", wait=True)
        c.unload("digits", "me")
        assert c.repository.models()["digits"] is None and c.store.pointer("digits").version == 0  # type: ignore[union-attr]
        c.load("digits", "me")
        assert serving(c) == 1
        with pytest.raises(IngredientCorrupt):
            c.push(pantry.spec("nan"), "me", wait=True, in_place=True)
        assert serving(c) == 1 and shown(c) == {1: "active", 2: "failed"}


def test_a_pushed_spec_outside_the_policy_is_never_stored(pantry: Pantry) -> None:
    with controller(pantry.folder) as c:
        evil = parse_spec({**digits_spec(["mid"]), "architecture": {"factory": "os:system"}}, base_dir=pantry.folder)
        with pytest.raises(PermissionDenied, match=r"architecture\.factory"):
            c.push(evil, "me", wait=True)
        assert c.store.models() == []


def test_a_follower_serves_unloads_and_routes_as_the_store_says(pantry: Pantry) -> None:
    canary = {"evaluation": EVALUATION, "rollout": {"canary": {"percent": 20}}}
    store = pantry.folder / "shared"
    with controller(pantry.folder, store) as leader, controller(pantry.folder, store) as follower:
        leader.push(pantry.spec("mid"), "me", wait=True)
        follower.poll()
        assert serving(follower) == 1
        leader.push(pantry.spec("good", **canary), "me", wait=True)
        follower.poll()
        assert follower.repository.canary("digits").blend.version == 2  # type: ignore[union-attr]
        leader.abort_canary("digits", "me")
        follower.poll()
        assert follower.repository.canary("digits") is None
        leader.unload("digits", "me")
        follower.poll()
        assert follower.repository.models()["digits"] is None
        leader.activate("digits", 2, "me")
        follower.poll()
        assert serving(follower) == 2


def test_a_follower_gives_up_on_a_version_it_cannot_build_until_the_store_moves_on(pantry: Pantry) -> None:
    store = pantry.folder / "shared"
    with controller(pantry.folder, store) as leader, controller(pantry.folder, store) as follower:
        leader.push(pantry.spec("mid"), "me", wait=True)
        follower.poll()
        leader.push(pantry.spec("good"), "me", wait=True)
        (pantry.folder / "good.safetensors").rename(pantry.folder / "gone.safetensors")
        leader.residency.drop("digits")
        follower.poll()  # version 2's file is gone here: it keeps serving 1 and remembers
        assert serving(follower) == 1 and follower.store.get("digits", 2).state == "ready"
        (pantry.folder / "gone.safetensors").rename(pantry.folder / "good.safetensors")
        follower.poll()
        assert serving(follower) == 1  # given up on that activation of version 2 ...
        leader.activate("digits", 2, "me")
        follower.poll()
        assert serving(follower) == 2  # ... but an operator activating it again is a new try


def test_a_follower_swaps_only_if_the_store_still_points_at_the_version_it_built(pantry: Pantry) -> None:
    store = pantry.folder / "shared"
    with controller(pantry.folder, store) as leader:
        leader.push(pantry.spec("mid"), "me", wait=True)
        leader.push(pantry.spec("good"), "me", wait=True)
        leader.push(pantry.spec("noise"), "me", activate=False, wait=True)
        moved = OnBuilt(2, lambda: leader.activate("digits", 3, "me"))  # while the follower builds 2
        with controller(pantry.folder, store, observer=moved) as follower:
            follower.poll()  # builds version 2, then finds the store pointing at 3: no swap to 2
            assert follower.repository.models()["digits"] is None and serving(leader) == 3
            follower.poll()
            assert serving(follower) == 3


def test_a_promotion_is_bound_to_its_canary_in_this_process_and_in_the_store(pantry: Pantry) -> None:
    canary = {"evaluation": EVALUATION, "rollout": {"canary": {"percent": 20}}}
    store = pantry.folder / "shared"
    with controller(pantry.folder, store) as leader, controller(pantry.folder, store) as follower:
        leader.push(pantry.spec("mid"), "me", wait=True)
        leader.push(pantry.spec("good", **canary), "me", wait=True)
        follower.poll()  # serves version 1 ...
        follower.poll()  # ... then starts the canary of 2
        judged = follower.repository.canary("digits")
        assert judged is not None and judged.blend.version == 2
        leader.abort_canary("digits", "me")  # ended in the store; the follower has not polled yet
        with pytest.raises(VersionConflict, match="the canary of version 2 ended meanwhile"):
            follower.promote_canary("digits", "me", route=judged)
        assert serving(follower) == 1 and follower.store.pointer("digits").version == 1  # type: ignore[union-attr]
        leader.push(pantry.spec("noise", **canary), "me", wait=True)
        stale = leader.repository.canary("digits")
        leader.abort_canary("digits", "me")
        leader.push(pantry.spec("good", **canary), "me", wait=True)  # a new canary, version 4
        with pytest.raises(VersionConflict, match="the canary of version 3 ended meanwhile"):
            leader.promote_canary("digits", "me", route=stale)
        assert serving(leader) == 1 and leader.repository.canary("digits").blend.version == 4  # type: ignore[union-attr]


def test_deleted_versions_keep_their_numbers_and_unknown_models_are_not_found(pantry: Pantry) -> None:
    with controller(pantry.folder) as c:
        c.push(pantry.spec("mid"), "me", wait=True)
        c.push(pantry.spec("good"), "me", activate=False, wait=True)
        c.delete("digits", 2)
        assert c.push(pantry.spec("good"), "me", wait=True).version == 3
        with pytest.raises(ModelNotFound):
            c.versions("nothing")
        with pytest.raises(ModelNotFound):
            c.activate("digits", 2, "me")


@pytest.mark.parametrize("start", list(TRANSITIONS))
def test_every_stored_state_moves_only_where_the_table_says(pantry: Pantry, start: str) -> None:
    store = SpecStore(pantry.folder / "store")
    lifecycle = Lifecycle(store)
    for target in TRANSITIONS:
        stored = store.record(store.push(pantry.spec("mid"), "me"), start)  # type: ignore[arg-type]
        if target in TRANSITIONS[start]:
            assert lifecycle.move(stored, target).state == target
        else:
            with pytest.raises(IllegalTransition):
                lifecycle.move(stored, target)
