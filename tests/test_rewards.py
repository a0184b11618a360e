"""Canaries of generative soups judged on live rewards: applications send a score or thumbs up
or down for a generation's id, over gRPC (``tureen_client``) or HTTP (``/v2/models/M/feedback``).

A real server serves a tiny Llama soup; completions come from the ``openai`` client (whose
response ids are the request ids feedback names) and the generate extension. The canary's
answers are rewarded well and the active version's badly, or the other way round, so the
sequential test must promote, or roll back; every outcome is also checked on /metrics.
"""

from __future__ import annotations

import json
import math
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
from tureen_client import SoupClient, SoupClientError

from helpers import running_app, sample, scrape, text_llama, write_spec
from tureen.spec import load_spec
from tureen.v1 import admin_pb2 as pb
from tureen.v1 import admin_pb2_grpc

pytest.importorskip("transformers", reason="the tureen[hf] extra is not installed")
openai = pytest.importorskip("openai", reason="the openai client is a dev dependency")

PROMPT = "def dumps(obj, *, skipkeys=False"


def soup(weights: dict[str, float], **extra: Any) -> dict[str, Any]:
    return {
        "apiVersion": "tureen/v1",
        "model": "tiny",
        "architecture": {"huggingface": "ft-0", "task": "causal-lm"},
        "ingredients": [{"name": f"ft-{i}", "path": f"ft-{i}"} for i in range(3)],
        "merge": {"weights": weights},
        **extra,
    }


def canary(percent: float = 50) -> dict[str, Any]:
    return {"canary": {"percent": percent, "min_samples": 30, "max_samples": 400}}


def post(port: int, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", json.dumps(body).encode(), method="POST")
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def reward_until_decided(app: Any, soups: SoupClient, canary_version: int, canary_reward: float) -> dict[int, list[float]]:
    """Completions, each rewarded by the version that answered (the canary ``canary_reward``, the
    active one its opposite), until the canary ends; the rewards each version got."""
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{app.http_port}/v1", api_key="none")
    given: dict[int, list[float]] = {}
    for i in range(400):
        completion = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2, temperature=0)
        version = int(completion.system_fingerprint.rpartition("-v")[2])
        reward = canary_reward if version == canary_version else 1.0 - canary_reward
        given.setdefault(version, []).append(reward)
        if i % 3 == 0:  # three ways to say it: thumbs and a score over gRPC, a score over HTTP
            matched = soups.feedback("tiny", completion.id, thumbs_up=reward == 1.0)
        elif i % 3 == 1:
            matched = soups.feedback("tiny", completion.id, score=reward)
        else:
            status, reply = post(app.http_port, "/v2/models/tiny/feedback", {"request_id": completion.id, "score": reward})
            assert status == 200, reply
            matched = int(reply["version"])
        assert matched == version
        if soups.status("tiny")["models"][0].get("canary_version", "0") == "0":
            return given
    raise AssertionError(f"the canary was not decided after 400 rewards: {soups.status('tiny')}")


def test_a_generative_canary_is_promoted_on_good_rewards_then_the_next_rolled_back_on_bad_ones(tmp_path: Path) -> None:
    text_llama(tmp_path, seeds=(0, 1, 2))
    first = load_spec(write_spec(tmp_path, soup({"ft-0": 1.0, "ft-1": 1.0, "ft-2": 0.0}), "v1.yaml"))
    with running_app([first], ingredient_roots=(str(tmp_path),)) as app, SoupClient(f"127.0.0.1:{app.grpc_port}") as soups:
        soups.push(write_spec(tmp_path, soup({"ft-0": 0.0, "ft-1": 1.0, "ft-2": 1.0}, rollout=canary()), "v2.yaml"), wait=True)
        given = reward_until_decided(app, soups, 2, canary_reward=1.0)
        states = {int(v["version"]): v["state"] for v in soups.versions("tiny")}
        assert states == {1: "retired", 2: "active"}, states
        assert len(given[2]) >= 30 and len(given[1]) >= 30  # decided on the evidence the spec asks for
        page = scrape(app)
        for version, rewards in given.items():
            labels = {"model": "tiny", "version": str(version)}
            assert sample(page, "tureen_online_labelled_samples", **labels) == len(rewards)
            assert sample(page, "tureen_online_accuracy", **labels) == pytest.approx(sum(rewards) / len(rewards))
        assert sample(page, "tureen_canary_decisions_total", model="tiny", decision="promoted") == 1

        soups.push(write_spec(tmp_path, soup({"ft-0": 1.0, "ft-1": 0.0, "ft-2": 1.0}, rollout=canary()), "v3.yaml"), wait=True)
        given = reward_until_decided(app, soups, 3, canary_reward=0.0)
        states = {int(v["version"]): v["state"] for v in soups.versions("tiny")}
        assert states[2] == "active" and states[3] == "rejected", states
        assert len(given[3]) >= 30 and given[3] == [0.0] * len(given[3])
        assert "canary rolled back" in next(v for v in soups.versions("tiny") if v["version"] == "3")["reason"]


def test_feedback_that_does_not_fit_is_refused_by_field_and_unknown_ids_are_ignored(tmp_path: Path) -> None:
    text_llama(tmp_path, seeds=(0, 1, 2))
    spec = load_spec(write_spec(tmp_path, soup({"ft-0": 1.0, "ft-1": 1.0, "ft-2": 0.0}), "v1.yaml"))
    with running_app([spec]) as app, SoupClient(f"127.0.0.1:{app.grpc_port}") as soups:
        body = {"text_input": PROMPT, "id": "gen-1", "parameters": {"max_tokens": 2}}
        status, answer = post(app.http_port, "/v2/models/tiny/generate", body)
        assert status == 200 and answer["id"] == "gen-1", answer
        refusals = [
            ({"request_id": "gen-1", "labels": [3]}, "labels: version 1 answered this request without classes"),
            ({"request_id": "gen-1", "score": 1, "thumbs": "up"}, "thumbs: give one of labels, score and thumbs"),
            ({"request_id": "gen-1", "score": 1.5}, "score: a reward from 0 (bad) to 1 (good), got 1.5"),
            ({"request_id": "gen-1", "thumbs": "sideways"}, 'thumbs: expected "up" or "down"'),
            ({"request_id": "gen-1", "reward": 1}, "reward: not a feedback field"),
            ({"request_id": "gen-1"}, "labels: give the true class of each row, a score from 0 to 1, or thumbs"),
            ({"score": 1}, "request_id: required"),
        ]
        for document, message in refusals:
            status, reply = post(app.http_port, "/v2/models/tiny/feedback", document)
            assert status == 400 and message in reply["error"], (document, reply)
        huge = b'{"request_id": "gen-1", "score": 1' + b"0" * 400 + b"}"  # beyond a float
        request = urllib.request.Request(f"http://127.0.0.1:{app.http_port}/v2/models/tiny/feedback", huge, method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == 400 and b"score" in refused.value.read()
        with grpc.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
            stub = admin_pb2_grpc.SoupFeedbackStub(channel)
            with pytest.raises(grpc.RpcError) as caught_rpc:
                stub.Feedback(pb.FeedbackRequest(model="tiny", request_id="gen-1", thumbs=7))
            assert caught_rpc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "thumbs" in caught_rpc.value.details()
        with pytest.raises(SoupClientError) as caught:
            soups.feedback("tiny", "gen-1", score=math.nan)
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT and "score" in str(caught.value)
        status, reply = post(app.http_port, "/v2/models/nope/feedback", {"request_id": "gen-1", "score": 1})
        assert status == 404 and "nope" in reply["error"], reply
        # Refused feedback kept the generation for a corrected call; it is scored once.
        assert soups.feedback("tiny", "gen-1", thumbs_up=False) == 1
        assert post(app.http_port, "/v2/models/tiny/feedback", {"request_id": "gen-1", "thumbs": "up"})[1] == {
            "matched": False,
            "version": "",
        }
        page = scrape(app)
        assert sample(page, "tureen_online_accuracy", model="tiny", version="1") == 0.0
        assert sample(page, "tureen_online_labelled_samples", model="tiny", version="1") == 1
        assert sample(page, "tureen_feedback_ignored_total", model="tiny") == 1
