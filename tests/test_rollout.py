"""Rollouts decided by accuracy: the evaluation gate on push, and canaries judged on feedback.

Three hand-built DigitsMLP checkpoints with known behaviour on generated data: ``good`` picks
the nearest class prototype (right on every row sent below), ``mid`` is ``good`` with the
outputs of classes 0..3 rotated (right exactly on the rows of classes 4..9), and ``noise`` is
random. A real server runs in this process on free ports; ``tritonclient.grpc`` sends the
requests (with ids and parameters), ``tureen_client`` pushes specs and reports true labels,
and /metrics is scraped over HTTP. The canary's decision rule is re-implemented here from
``tureen.core.rollout``'s docstring and predicts, feedback by feedback, when the server acts.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from pathlib import Path
from statistics import NormalDist
from typing import Any

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from safetensors.torch import save_file
from tureen_client import SoupClient, SoupClientError

from helpers import (
    accuracy,
    digits_spec,
    infer,
    mlp_logits,
    prototype_rows,
    prototype_state,
    prototypes,
    running_app,
    sample,
    scrape,
)
from helpers import write_spec as _write_spec
from tureen.app import App
from tureen.spec import load_spec

HIDDEN = 16
ROTATED = [1, 2, 3, 0, 4, 5, 6, 7, 8, 9]


class Kitchen:
    """Checkpoints and held-out data in a folder, and spec files that point at them."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        centers = prototypes(seed=0)
        good = prototype_state(centers, HIDDEN)
        mid = {**good, "net.4.weight": good["net.4.weight"][ROTATED].clone()}
        generator = torch.Generator().manual_seed(9)
        noise = {k: torch.randn(v.shape, generator=generator) for k, v in good.items()}
        self.states = {"good": good, "mid": mid, "noise": noise}
        for name, state in self.states.items():
            save_file(state, str(folder / f"{name}.safetensors"))
        self.x, self.y = prototype_rows(centers, 400, seed=1)
        save_file({"pixels": self.x, "labels": self.y}, str(folder / "val.safetensors"))
        # Rows sent as traffic: those the good model gets right, in a fixed random order.
        right = (mlp_logits(good, self.x, HIDDEN).argmax(dim=-1) == self.y).nonzero().flatten().tolist()
        random.Random(3).shuffle(right)
        self.traffic = right
        self.count = 0

    def spec(self, ingredient: str, model: str = "digits", **extra: Any) -> Path:
        document = digits_spec([ingredient], hidden=HIDDEN, model=model, **extra)
        self.count += 1
        return _write_spec(self.folder, document, f"spec-{self.count}.yaml")

    def accuracy(self, ingredient: str) -> float:
        return accuracy(self.states[ingredient], self.x, self.y, HIDDEN)


EVALUATION = {"splits": {"val": {"path": "val.safetensors"}}}


@pytest.fixture
def kitchen(tmp_path: Path) -> Kitchen:
    return Kitchen(tmp_path)


@pytest.fixture
def serving(kitchen: Kitchen) -> Iterator[tuple[App, SoupClient, grpcclient.InferenceServerClient]]:
    """A server whose version 1 is ``mid``, evaluated on the held-out split."""
    with running_app([load_spec(kitchen.spec("mid", evaluation=EVALUATION))], ingredient_roots=(str(kitchen.folder),)) as app:
        address = f"127.0.0.1:{app.grpc_port}"
        with SoupClient(address) as soups, grpcclient.InferenceServerClient(address) as client:
            yield app, soups, client


def model_status(soups: SoupClient) -> dict[str, Any]:
    (status,) = soups.status("digits")["models"]
    return status


def states_of(soups: SoupClient) -> dict[int, str]:
    return {int(v["version"]): v["state"] for v in soups.versions("digits")}


def refused(call: Any, code: grpc.StatusCode, *fragments: str) -> str:
    with pytest.raises(SoupClientError) as caught:
        call()
    message = str(caught.value)
    assert caught.value.code == code, message
    for fragment in fragments:
        assert fragment in message, message
    return message


# ---- the gate ------------------------------------------------------------------------------------


def test_the_gate_passes_a_first_version_and_rejects_a_worse_one_with_both_numbers(kitchen: Kitchen) -> None:
    good, mid, noise = kitchen.accuracy("good"), kitchen.accuracy("mid"), kitchen.accuracy("noise")
    assert good > mid + 0.2 and mid > noise + 0.2  # the construction is what we think
    probe = kitchen.x[:8]
    with running_app([], ingredient_roots=(str(kitchen.folder),)) as app:
        address = f"127.0.0.1:{app.grpc_port}"
        with SoupClient(address) as soups, grpcclient.InferenceServerClient(address) as client:
            strict = {"gate": {"tolerance": 0.0}}
            first = soups.push(kitchen.spec("good", evaluation=EVALUATION, rollout=strict), wait=True)
            assert first["state"] == "active"  # nothing active to compare with: the gate passes

            message = refused(
                lambda: soups.push(kitchen.spec("noise", evaluation=EVALUATION, rollout=strict), wait=True),
                grpc.StatusCode.FAILED_PRECONDITION,
                "rollout.gate",
                f"{noise:.4f}",
                f"{good:.4f}",
            )
            assert f"version 2 {noise:.4f}" in message and f"version 1 {good:.4f}" in message  # whose is whose
            assert states_of(soups) == {1: "active", 2: "rejected"}
            (rejected,) = [v for v in soups.versions("digits") if v["version"] == "2"]
            assert f"{noise:.4f}" in rejected["reason"] and rejected["evaluation"]["val"]["metrics"]["accuracy"] == noise
            version, logits = infer(client, probe)
            assert version == 1
            np.testing.assert_allclose(logits, mlp_logits(kitchen.states["good"], probe, HIDDEN), rtol=1e-5, atol=1e-5)

            # The tolerance is in the metric's units: mid is worse than good by (good - mid).
            tight = {"gate": {"tolerance": round(good - mid - 0.05, 4)}}
            refused(
                lambda: soups.push(kitchen.spec("mid", evaluation=EVALUATION, rollout=tight), wait=True),
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{mid:.4f}",
                f"{good:.4f}",
            )
            assert infer(client, probe)[0] == 1
            loose = {"gate": {"tolerance": round(good - mid + 0.05, 4)}}
            assert soups.push(kitchen.spec("mid", evaluation=EVALUATION, rollout=loose), wait=True)["state"] == "active"
            assert states_of(soups) == {1: "retired", 2: "rejected", 3: "rejected", 4: "active"}
            version, logits = infer(client, probe)
            assert version == 4
            np.testing.assert_allclose(logits, mlp_logits(kitchen.states["mid"], probe, HIDDEN), rtol=1e-5, atol=1e-5)

            # A gate needs evaluations to compare: refused before anything is stored.
            refused(lambda: soups.push(kitchen.spec("good", rollout=strict)), grpc.StatusCode.INVALID_ARGUMENT, "rollout.gate")
            assert len(states_of(soups)) == 4


# ---- canaries ------------------------------------------------------------------------------------


def verdict(canary: dict[str, Any], candidate: list[int], active: list[int]) -> str | None:
    """The rule of tureen.core.rollout, from its docstring: nothing before each version has
    min(min_samples, 30) labels; roll back when a one-sided two-proportion z-test (pooled
    standard error; z = 0 when it is 0) finds the canary worse at level alpha; promote when both
    have min_samples labels and the canary is within margin; roll back an undecided canary at
    max_samples."""
    (c_ok, c_n), (a_ok, a_n) = candidate, active
    if min(c_n, a_n) < min(canary["min_samples"], 30):
        return None
    p_c, p_a = c_ok / c_n, a_ok / a_n
    pooled = (c_ok + a_ok) / (c_n + a_n)
    se = math.sqrt(pooled * (1 - pooled) * (1 / c_n + 1 / a_n))
    if NormalDist().cdf((p_c - p_a) / se if se else 0.0) < canary.get("alpha", 0.05):
        return "rollback"
    if min(c_n, a_n) >= canary["min_samples"] and p_c >= p_a - canary.get("margin", 0.0):
        return "promote"
    if c_n >= canary.get("max_samples", 5000):
        return "rollback"
    return None


def run_canary(
    kitchen: Kitchen, soups: SoupClient, client: grpcclient.InferenceServerClient, canary: dict[str, Any], page: Any
) -> tuple[str, dict[int, list[int]]]:
    """Send labelled traffic until the rule above decides; check the server acts on that very feedback."""
    tally: dict[int, list[int]] = {1: [0, 0], 2: [0, 0]}
    for i in range(600):
        row = kitchen.traffic[i % len(kitchen.traffic)]
        request_id = f"req-{i}"
        version, logits = infer(client, kitchen.x[row : row + 1], request_id=request_id)
        label = int(kitchen.y[row])
        assert soups.feedback("digits", request_id, label) == version  # the version that answered it
        tally[version][0] += int(int(logits.argmax()) == label)
        tally[version][1] += 1
        decision = verdict(canary, tally[2], tally[1])
        status = model_status(soups)
        if decision is not None:
            assert status["canary_version"] == "0", (decision, tally, status["canary_note"])
            return decision, tally
        assert status["canary_version"] == "2" and status["canary_percent"] == canary["percent"], (tally, status)
        if i == 20:  # online accuracy, as the status and the gauges report it, is our tally
            page(tally, status)
    raise AssertionError(f"no decision after 600 labelled requests: {tally}")


def check_online(app: App) -> Any:
    def check(tally: dict[int, list[int]], status: dict[str, Any]) -> None:
        text = scrape(app)
        for version, (ok, n) in tally.items():
            shown = status["online"][str(version)]
            assert int(shown["samples"]) == n and shown["accuracy"] == pytest.approx(ok / n if n else 0.0, abs=1e-12)
            if n:
                assert sample(text, "tureen_online_accuracy", model="digits", version=str(version)) == pytest.approx(ok / n)
                assert sample(text, "tureen_online_labelled_samples", model="digits", version=str(version)) == n

    return check


def test_a_better_canary_is_promoted_once_both_versions_have_their_samples(
    kitchen: Kitchen, serving: tuple[App, SoupClient, grpcclient.InferenceServerClient]
) -> None:
    app, soups, client = serving
    canary = {"percent": 50, "min_samples": 30}
    pushed = soups.push(kitchen.spec("good", rollout={"canary": canary}), wait=True)
    assert pushed["state"] == "canary" and states_of(soups) == {1: "active", 2: "canary"}
    page = scrape(app)
    assert sample(page, "tureen_canary_version", model="digits") == 2
    assert sample(page, "tureen_canary_percent", model="digits") == 50

    builds = sample(scrape(app), "tureen_builds_total", model="digits")
    decision, tally = run_canary(kitchen, soups, client, canary, check_online(app))
    assert decision == "promote" and min(tally[1][1], tally[2][1]) == 30
    assert sample(scrape(app), "tureen_builds_total", model="digits") == builds
    assert tally[2][0] == tally[2][1]  # good is right on every row sent
    status = model_status(soups)
    assert status["active_version"] == "2" and status["canary_percent"] == 0
    assert states_of(soups) == {1: "retired", 2: "active"}
    assert all(infer(client, kitchen.x[i : i + 1])[0] == 2 for i in range(20))
    page = scrape(app)
    assert sample(page, "tureen_canary_decisions_total", model="digits", decision="promoted") == 1
    assert sample(page, "tureen_canary_decisions_total", model="digits", decision="rolled_back") == 0
    assert sample(page, "tureen_canary_version", model="digits") == 0
    assert sample(page, "tureen_canary_percent", model="digits") == 0


def test_a_worse_canary_is_rolled_back_as_soon_as_the_test_finds_it_worse(kitchen: Kitchen) -> None:
    with running_app([load_spec(kitchen.spec("good"))], ingredient_roots=(str(kitchen.folder),)) as app:
        address = f"127.0.0.1:{app.grpc_port}"
        with SoupClient(address) as soups, grpcclient.InferenceServerClient(address) as client:
            canary = {"percent": 50, "min_samples": 30}
            assert soups.push(kitchen.spec("mid", rollout={"canary": canary}), wait=True)["state"] == "canary"
            decision, tally = run_canary(kitchen, soups, client, canary, check_online(app))
            assert decision == "rollback" and tally[1][0] == tally[1][1]
            status = model_status(soups)
            assert status["active_version"] == "1" and "rolled back" in status["canary_note"]
            (rejected,) = [v for v in soups.versions("digits") if v["version"] == "2"]
            assert rejected["state"] == "rejected" and "canary rolled back" in rejected["reason"]
            assert states_of(soups) == {1: "active", 2: "rejected"}
            assert all(infer(client, kitchen.x[i : i + 1])[0] == 1 for i in range(20))
            page = scrape(app)
            assert sample(page, "tureen_canary_decisions_total", model="digits", decision="rolled_back") == 1
            assert sample(page, "tureen_canary_decisions_total", model="digits", decision="promoted") == 0
            assert sample(page, "tureen_canary_version", model="digits") == 0
            refused(lambda: soups.promote_canary("digits"), grpc.StatusCode.FAILED_PRECONDITION, "no canary")


def test_sticky_routing_the_share_of_random_routing_and_promote_and_abort_by_hand(
    kitchen: Kitchen, serving: tuple[App, SoupClient, grpcclient.InferenceServerClient]
) -> None:
    app, soups, client = serving
    probe = kitchen.x[:1]
    canary = {"percent": 50, "sticky": "user", "min_samples": 1000}
    assert soups.push(kitchen.spec("good", rollout={"canary": canary}), wait=True)["state"] == "canary"

    by_user = {}
    for user in [f"user-{i}" for i in range(24)]:
        seen = {infer(client, probe, parameters={"user": user})[0] for _ in range(4)}
        assert len(seen) == 1, (user, seen)  # the same value, the same version, every time
        by_user[user] = seen.pop()
    assert set(by_user.values()) == {1, 2}

    # Without the parameter, each request goes to the canary with probability one half.
    versions = [infer(client, probe)[0] for _ in range(200)]
    assert set(versions) == {1, 2} and 60 <= versions.count(2) <= 140
    # A request may name a version: the canary's, or the active one's; Triton's per-version calls answer for both.
    assert infer(client, probe, model_version="2")[0] == 2 and infer(client, probe, model_version="1")[0] == 1
    for version in ("1", "2"):
        assert client.is_model_ready("digits", version)
        assert client.get_model_metadata("digits", version).versions == [version]
        assert client.get_model_config("digits", version).config.name == "digits"
    served = {s.version for s in client.get_inference_statistics("digits").model_stats}
    assert served == {"1", "2"}
    _, logits = infer(client, probe, model_version="2")
    np.testing.assert_allclose(logits, mlp_logits(kitchen.states["good"], probe, HIDDEN), rtol=1e-5, atol=1e-5)

    builds = sample(scrape(app), "tureen_builds_total", model="digits")
    promoted = soups.promote_canary("digits")
    assert sample(scrape(app), "tureen_builds_total", model="digits") == builds  # a swap: the canary is not built again
    assert int(promoted["version"]) == 2 and promoted["state"] == "active"
    assert states_of(soups) == {1: "retired", 2: "active"}
    assert {infer(client, probe, parameters={"user": user})[0] for user in by_user} == {2}

    assert soups.push(kitchen.spec("noise", rollout={"canary": canary}), wait=True)
    assert model_status(soups)["canary_version"] == "3"
    # The same share and key: the users the first canary took go to this one.
    canary_users = [user for user, version in by_user.items() if version == 2]
    assert {infer(client, probe, parameters={"user": user})[0] for user in canary_users} == {3}
    aborted = soups.abort_canary("digits")
    assert int(aborted["version"]) == 3 and aborted["state"] not in ("active", "canary", "rejected")
    assert {infer(client, probe, parameters={"user": user})[0] for user in canary_users} == {2}
    assert model_status(soups)["canary_version"] == "0" and states_of(soups)[2] == "active"
    refused(lambda: soups.abort_canary("digits"), grpc.StatusCode.FAILED_PRECONDITION, "no canary")
    refused(lambda: soups.promote_canary("digits"), grpc.StatusCode.FAILED_PRECONDITION, "no canary")
    page = scrape(app)
    assert sample(page, "tureen_canary_decisions_total", model="digits", decision="promoted") == 1
    assert sample(page, "tureen_canary_decisions_total", model="digits", decision="rolled_back") == 1


def test_a_canary_without_an_active_version_simply_becomes_active(kitchen: Kitchen) -> None:
    with running_app([], ingredient_roots=(str(kitchen.folder),)) as app, SoupClient(f"127.0.0.1:{app.grpc_port}") as soups:
        info = soups.push(kitchen.spec("good", rollout={"canary": {"percent": 10}}), wait=True)
        assert info["state"] == "active" and model_status(soups)["canary_version"] == "0"


# ---- bad input -----------------------------------------------------------------------------------


def test_canary_percent_outside_0_to_100_is_invalid_and_unknown_feedback_is_counted_not_failed(
    kitchen: Kitchen, serving: tuple[App, SoupClient, grpcclient.InferenceServerClient]
) -> None:
    app, soups, client = serving
    for percent in (0, -5, 100, 100.5, 150):  # 100 would leave the active version without labels
        refused(
            lambda p=percent: soups.push(kitchen.spec("good", rollout={"canary": {"percent": p}})),
            grpc.StatusCode.INVALID_ARGUMENT,
            "rollout.canary.percent",
        )
    refused(
        lambda: soups.push(kitchen.spec("good", rollout={"canary": {"percent": 5, "min_samples": 10, "max_samples": 5}})),
        grpc.StatusCode.INVALID_ARGUMENT,
        "rollout.canary.max_samples",
    )
    assert states_of(soups) == {1: "active"}

    ignored = lambda model="digits": sample(scrape(app), "tureen_feedback_ignored_total", model=model)  # noqa: E731
    assert ignored() == 0
    assert soups.feedback("digits", "never-sent", 3) is None  # no error: matched false
    assert soups.feedback("digits", "never-sent", [3]) is None
    assert ignored() == 2
    version, logits = infer(client, kitchen.x[:2], request_id="two-rows")
    assert soups.feedback("digits", "two-rows", [int(kitchen.y[0]), int(kitchen.y[1])]) == version == 1
    assert soups.feedback("digits", "two-rows", [int(kitchen.y[0]), int(kitchen.y[1])]) is None  # scored once
    assert ignored() == 3
    infer(client, kitchen.x[:1])  # no request id: nothing to match later
    refused(lambda: soups.feedback("digits", "", 1), grpc.StatusCode.INVALID_ARGUMENT, "request_id")
    refused(lambda: soups.feedback("digits", "two-rows", []), grpc.StatusCode.INVALID_ARGUMENT, "labels")
    refused(lambda: soups.feedback("nope", "never-sent", 1), grpc.StatusCode.NOT_FOUND, "nope")
    version3, _ = infer(client, kitchen.x[:3], request_id="three-rows")
    refused(lambda: soups.feedback("digits", "three-rows", [1]), grpc.StatusCode.INVALID_ARGUMENT, "3 rows")
    assert soups.feedback("digits", "three-rows", [int(v) for v in kitchen.y[:3]]) == version3  # kept for the retry
    page = scrape(app)
    assert sample(page, "tureen_feedback_ignored_total", model="digits") == 3
    assert not any('model="nope"' in line for line in page.splitlines())
    # The matched requests scored their two and three rows for version 1.
    _, logits3 = infer(client, kitchen.x[:3])
    rows = [*zip(logits.argmax(axis=1), kitchen.y[:2], strict=True), *zip(logits3.argmax(axis=1), kitchen.y[:3], strict=True)]
    correct = sum(int(p) == int(t) for p, t in rows)
    assert sample(page, "tureen_online_labelled_samples", model="digits", version="1") == 5
    assert sample(page, "tureen_online_accuracy", model="digits", version="1") == pytest.approx(correct / 5)
    assert model_status(soups)["online"]["1"] == {"accuracy": pytest.approx(correct / 5), "samples": "5"}
