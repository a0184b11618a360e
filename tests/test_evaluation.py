"""Held-out evaluation of blends and ingredients, and the searches it drives (greedy, learned).

The ingredients are built by hand so that the right answers are known: a DigitsMLP that picks
the nearest of ten class prototypes, a few noisy copies of it (each mediocre alone, good on
average: a soup), and one checkpoint of pure noise. A real server runs in this process on
free ports; the operator API is called with ``tureen_client``, inference with
``tritonclient.grpc``, and /metrics is scraped over HTTP. Every expected number is computed
here with plain torch, independently of the server's code.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from prometheus_client.parser import text_string_to_metric_families
from references import expected_calibration_error
from safetensors.torch import save_file
from tureen_client import SoupClient, SoupClientError

from helpers import (
    accuracy,
    digits_spec,
    hand_average,
    infer,
    mlp_logits,
    nested,
    prototype_rows,
    prototype_state,
    prototypes,
    running_app,
    sample,
    scrape,
    write_spec,
)
from tureen.core.evaluation import ECE_BINS
from tureen.spec import load_spec

HIDDEN = 16
SOUP = ["ft-0", "ft-1", "ft-2", "noise"]


def write_kitchen(folder: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Three noisy copies of the prototype classifier, one noise checkpoint, and two splits."""
    centers = prototypes(seed=0)
    good = prototype_state(centers, HIDDEN)
    generator = torch.Generator().manual_seed(5)
    states = {f"ft-{i}": {k: v + 0.02 * torch.randn(v.shape, generator=generator) for k, v in good.items()} for i in range(3)}
    states["noise"] = {k: torch.randn(v.shape, generator=generator) for k, v in good.items()}
    for name, state in states.items():
        save_file(state, str(folder / f"{name}.safetensors"))
    splits = {"val": prototype_rows(centers, 400, seed=1), "test": prototype_rows(centers, 300, seed=2)}
    for name, (pixels, labels) in splits.items():
        save_file({"pixels": pixels, "labels": labels}, str(folder / f"{name}.safetensors"))
    return states, splits


def evaluation(*splits: str, **extra: Any) -> dict[str, Any]:
    return {"splits": {name: {"path": f"{name}.safetensors"} for name in splits}, **extra}


def uniform(names: list[str]) -> dict[str, float]:
    return dict.fromkeys(names, 1.0)


# ---- greedy soups --------------------------------------------------------------------------------


def test_greedy_soup_leaves_the_noise_out_its_log_replays_and_a_restart_reuses_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tureen.search")
    states, splits = write_kitchen(tmp_path)
    x, y = splits["val"]
    spec = load_spec(
        write_spec(tmp_path, digits_spec(SOUP, hidden=HIDDEN, merge={"method": "greedy"}, evaluation=evaluation("val")))
    )
    store = tmp_path / "store"
    probe = splits["test"][0][:16]

    with running_app([spec], store=str(store)) as app:
        with SoupClient(f"127.0.0.1:{app.grpc_port}") as soups:
            (info,) = soups.versions("digits")
        with grpcclient.InferenceServerClient(f"127.0.0.1:{app.grpc_port}") as client:
            version, before = infer(client, probe)
    assert version == 1 and info["state"] == "active"
    assert any("greedy soup of" in r.getMessage() for r in caplog.records)  # it did search
    resolution = json.loads(info["resolution_json"])
    log = resolution["log"]
    assert log["search"] == "greedy" and log["metric"] == "accuracy" and log["split"] == "val"

    # Each ingredient alone, by hand: the log's scores and a best-first order.
    alone = {name: accuracy(states[name], x, y, HIDDEN) for name in SOUP}
    assert log["alone"] == pytest.approx(alone, abs=1e-9)
    order = log["order"]
    assert sorted(order) == sorted(SOUP)
    assert [alone[n] for n in order] == sorted(alone.values(), reverse=True)
    assert alone["noise"] < 0.2 < min(alone[n] for n in SOUP[:3])  # the construction is what we think

    # Replay the greedy soup: uniform averages of the soup so far plus the next ingredient.
    kept, best = [order[0]], alone[order[0]]
    expected_steps = [{"ingredient": order[0], "accuracy": best, "kept": True, "soup": [order[0]]}]
    for name in order[1:]:
        value = accuracy(hand_average(states, uniform([*kept, name])), x, y, HIDDEN)
        keep = value >= best
        if keep:
            kept, best = [*kept, name], value
        expected_steps.append({"ingredient": name, "accuracy": value, "kept": keep, "soup": list(kept)})
    assert len(log["steps"]) == len(expected_steps)
    for stored, expected in zip(log["steps"], expected_steps, strict=True):
        assert stored == {**expected, "accuracy": pytest.approx(expected["accuracy"], abs=1e-9)}
    assert log["best"] == pytest.approx(best, abs=1e-9)
    assert "noise" not in kept and kept[0] == order[0]
    assert best > max(alone.values())  # the soup beats every ingredient (why one makes soups)

    # Resolved to a linear merge: weight 1 for those kept, 0 for the rest; served as such.
    assert resolution["merge"]["method"] == "linear"
    assert resolution["merge"]["weights"] == {n: (1.0 if n in kept else 0.0) for n in SOUP}
    np.testing.assert_allclose(before, mlp_logits(hand_average(states, uniform(kept)), probe, HIDDEN), rtol=1e-4, atol=1e-4)
    assert info["evaluation"]["val"]["metrics"]["accuracy"] == pytest.approx(best, abs=1e-9)

    # New held-out labels on which the noise is perfect: a new search would pick it first.
    noise_says = mlp_logits(states["noise"], x, HIDDEN).argmax(dim=-1)
    save_file({"pixels": x, "labels": noise_says}, str(tmp_path / "val.safetensors"))
    caplog.clear()
    with running_app([], store=str(store)) as app:
        with SoupClient(f"127.0.0.1:{app.grpc_port}") as soups:
            (again,) = soups.versions("digits")
        with grpcclient.InferenceServerClient(f"127.0.0.1:{app.grpc_port}") as client:
            version, after = infer(client, probe)
    assert version == 1 and again["state"] == "active"
    assert json.loads(again["resolution_json"]) == resolution  # the stored resolution, not a new search
    assert not any("greedy" in r.getMessage() for r in caplog.records)
    assert np.array_equal(before, after)  # bit for bit
    # ...while the evaluation itself ran again, on the new labels.
    soup_says = mlp_logits(hand_average(states, uniform(kept)), x, HIDDEN).argmax(dim=-1)
    expected = float((soup_says == noise_says).double().mean())
    assert again["evaluation"]["val"]["metrics"]["accuracy"] == pytest.approx(expected, abs=1e-9)


# ---- learned soups -------------------------------------------------------------------------------


@pytest.mark.parametrize("granularity", ["model", "layer"])
def test_learned_soup_weights_lie_on_the_simplex_and_beat_uniform(tmp_path: Path, granularity: str) -> None:
    states, splits = write_kitchen(tmp_path)
    x, y = splits["val"]
    merge = {"method": "learned", "parameters": {"granularity": granularity, "steps": 30, "lr": 0.2}}
    document = digits_spec(SOUP, hidden=HIDDEN, merge=merge, evaluation=evaluation("val", ingredients=False))
    with running_app([load_spec(write_spec(tmp_path, document))]) as app:
        with SoupClient(f"127.0.0.1:{app.grpc_port}") as soups:
            (info,) = soups.versions("digits")
        with grpcclient.InferenceServerClient(f"127.0.0.1:{app.grpc_port}") as client:
            _, served = infer(client, splits["test"][0][:16])

    resolution = json.loads(info["resolution_json"])
    merged = resolution["merge"]
    assert merged["method"] == "linear" and merged["parameters"] == {"normalize": False}
    layers = ["net.0", "net.2", "net.4"]
    if granularity == "model":
        rows = {layer: merged["weights"] for layer in layers}
        assert "overrides" not in merged
    else:
        rows = {layer: {} for layer in layers}
        for override in merged["overrides"]:
            layer = override["match"].removesuffix(".*")
            rows[layer][override["ingredient"]] = override["parameters"]["weight"]
        assert sorted(o["match"] for o in merged["overrides"]) == sorted(f"{layer}.*" for layer in layers for _ in SOUP)
    for layer, weights in rows.items():
        assert sorted(weights) == sorted(SOUP), layer
        assert all(w >= 0.0 for w in weights.values()), weights
        assert math.fsum(weights.values()) == pytest.approx(1.0, abs=1e-6), weights

    # The blend serves exactly those weights, layer by layer.
    mixed = {key: sum(states[n][key].double() * rows[key.rpartition(".")[0]][n] for n in SOUP) for key in states["ft-0"]}
    np.testing.assert_allclose(served, mlp_logits(mixed, splits["test"][0][:16], HIDDEN), rtol=1e-4, atol=1e-4)

    # Training starts at the uniform soup; what it keeps is no worse than that on the split.
    uniform_accuracy = accuracy(hand_average(states, uniform(SOUP)), x, y, HIDDEN)
    log = resolution["log"]
    assert log["search"] == "learned" and log["history"][0] == {"step": 0, "accuracy": pytest.approx(uniform_accuracy)}
    assert info["evaluation"]["val"]["metrics"]["accuracy"] >= uniform_accuracy
    assert info["evaluation"]["val"]["metrics"]["accuracy"] == pytest.approx(accuracy(mixed, x, y, HIDDEN), abs=1e-9)


# ---- calibration ---------------------------------------------------------------------------------


def test_expected_calibration_error_matches_a_hand_computation_with_samples_on_bin_edges() -> None:
    # 15 equal-width bins (low, high]; 0.6 = 9/15 and 0.2 = 3/15 sit exactly on upper edges,
    # 1.0 on the last one.
    confidence = [1.0, 0.95, 0.6, 0.55, 0.62, 0.3, 0.2, 0.65]
    correct = [True, False, True, False, False, True, False, True]
    assert ECE_BINS == 15
    bins = [  # (members by index), worked out by hand from the edges k/15
        (0, 1),  # (14/15, 1]: 1.0, 0.95
        (2, 3),  # (8/15, 9/15]: 0.6 (on the edge, so here), 0.55
        (4, 7),  # (9/15, 10/15]: 0.62, 0.65
        (5,),  # (4/15, 5/15]: 0.3
        (6,),  # (2/15, 3/15]: 0.2 (on the edge)
    ]
    assert sorted(i for members in bins for i in members) == list(range(len(confidence)))

    def ece(groups: list[tuple[int, ...]]) -> float:
        return sum(
            len(g) / len(confidence) * abs(sum(confidence[i] for i in g) / len(g) - sum(correct[i] for i in g) / len(g))
            for g in groups
        )

    by_hand = ece(bins)
    assert expected_calibration_error(confidence, correct) == pytest.approx(by_hand, abs=1e-12)
    # The edge matters: 0.6 counted with the bin above would give another number.
    assert ece([(0, 1), (3,), (2, 4, 7), (5,), (6,)]) != pytest.approx(by_hand, abs=1e-6)


def test_served_calibration_scores_match_the_logits_the_blend_answers_with(tmp_path: Path) -> None:
    # A blend whose logits are the first ten pixels, so the test picks the logits it scores.
    state = {k: torch.zeros_like(v) for k, v in prototype_state(prototypes(0), HIDDEN).items()}
    state["net.0.weight"][:10, :10] = 16 * torch.eye(10)
    state["net.2.weight"][:10, :10] = torch.eye(10)
    state["net.4.weight"][:, :10] = torch.eye(10)
    save_file(state, str(tmp_path / "calib.safetensors"))
    chosen = [  # (logits by class, true label)
        ({3: 100.0}, 3),  # confidence exactly 1.0: the last bin's upper edge; right
        ({5: 100.0}, 2),  # confidence 1.0, wrong
        ({0: 30.0, 1: 30.0, 2: 30.0}, 7),  # a three-way tie, confidence about 1/3 = 5/15; wrong whatever the tie-break
        ({0: 2.0}, 0),
        ({1: 1.0}, 1),
        ({4: 3.0}, 4),
        ({9: 4.0}, 8),
        ({6: math.log(9.0)}, 5),  # confidence about one half
    ]
    pixels = torch.zeros(len(chosen), 64)
    for row, (logits, _) in enumerate(chosen):
        for cls, value in logits.items():
            pixels[row, cls] = value
    labels = torch.tensor([label for _, label in chosen])
    save_file({"pixels": pixels, "labels": labels}, str(tmp_path / "calib-set.safetensors"))
    document = digits_spec(
        ["calib"], hidden=HIDDEN, evaluation={"splits": {"edges": {"path": "calib-set.safetensors"}}, "batch_size": 4}
    )
    with running_app([load_spec(write_spec(tmp_path, document))]) as app:
        with grpcclient.InferenceServerClient(f"127.0.0.1:{app.grpc_port}") as client:
            _, logits = infer(client, pixels)
        with SoupClient(f"127.0.0.1:{app.grpc_port}") as soups:
            (info,) = soups.versions("digits")
        page = scrape(app)
    logits_t = torch.from_numpy(logits.copy())
    assert torch.equal(logits_t, pixels[:, :10])  # the construction is what we think
    confidence, predicted = torch.log_softmax(logits_t, dim=-1).exp().max(dim=-1)
    assert float(confidence[0]) == 1.0 and float(confidence[1]) == 1.0
    correct = (predicted == labels).tolist()

    conf = confidence.double().tolist()
    nll = float(-torch.log_softmax(logits_t.double(), dim=-1).gather(1, labels[:, None]).mean())

    scores = info["evaluation"]["edges"]["metrics"]
    assert scores["ece"] == pytest.approx(expected_calibration_error(conf, correct), abs=1e-9)
    assert scores["accuracy"] == pytest.approx(sum(correct) / len(correct), abs=1e-12)
    assert scores["nll"] == pytest.approx(nll, rel=1e-5)
    assert sample(page, "tureen_eval_ece", model="digits", version="1", split="edges") == scores["ece"]


# ---- metrics ---------------------------------------------------------------------------------------


def test_evaluation_gauges_carry_model_version_split_and_ingredient_labels_and_the_listed_values(tmp_path: Path) -> None:
    states, splits = write_kitchen(tmp_path)
    names = ["ft-0", "ft-1", "ft-2"]
    document = digits_spec(names, hidden=HIDDEN, evaluation=evaluation("val", "test"))
    with running_app([load_spec(write_spec(tmp_path, document))]) as app:
        with SoupClient(f"127.0.0.1:{app.grpc_port}") as soups:
            pushed = soups.push(
                write_spec(tmp_path, digits_spec(names[:2], hidden=HIDDEN, evaluation=evaluation("test")), "v2.yaml"), wait=True
            )
            listed = {int(v["version"]): v for v in soups.versions("digits")}
        page = scrape(app)
    assert pushed["state"] == "active"

    # The numbers, by hand: the soup's and each ingredient's accuracy on each split.
    soup1, soup2 = hand_average(states, uniform(names)), hand_average(states, uniform(names[:2]))
    for split, (x, y) in splits.items():
        assert listed[1]["evaluation"][split]["metrics"]["accuracy"] == pytest.approx(accuracy(soup1, x, y, HIDDEN), abs=1e-9)
    assert set(listed[2]["evaluation"]) == {"test"}
    x, y = splits["test"]
    assert listed[2]["evaluation"]["test"]["metrics"]["accuracy"] == pytest.approx(accuracy(soup2, x, y, HIDDEN), abs=1e-9)
    for entry in listed[1]["ingredient_evaluation"]:
        for split, (x, y) in splits.items():
            expected = accuracy(states[entry["ingredient"]], x, y, HIDDEN)
            assert entry["splits"][split]["metrics"]["accuracy"] == pytest.approx(expected, abs=1e-9)

    # The gauges: exactly the listed label sets, with exactly the listed values.
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(page)
        for s in family.samples
        if s.name.startswith(("tureen_eval_", "tureen_ingredient_eval_"))
    }
    expected_samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for version, info in listed.items():
        for split, scores in info["evaluation"].items():
            assert set(scores["metrics"]) == {"accuracy", "nll", "ece"}
            for metric, value in scores["metrics"].items():
                key = tuple(sorted({"model": "digits", "version": str(version), "split": split}.items()))
                expected_samples[(f"tureen_eval_{metric}", key)] = value
    # Ingredient gauges carry no version: the latest evaluation of each ingredient on each split.
    for version in sorted(listed):
        for entry in listed[version]["ingredient_evaluation"]:
            for split, scores in entry["splits"].items():
                for metric, value in scores["metrics"].items():
                    key = tuple(sorted({"model": "digits", "ingredient": entry["ingredient"], "split": split}.items()))
                    expected_samples[(f"tureen_ingredient_eval_{metric}", key)] = value
    assert {k: samples[k] for k in expected_samples if k in samples} == expected_samples
    assert set(samples) == set(expected_samples)


# ---- bad evaluation sets ---------------------------------------------------------------------------


def test_evaluation_sets_that_do_not_fit_are_refused_by_split_name_and_the_blend_keeps_serving(tmp_path: Path) -> None:
    states, splits = write_kitchen(tmp_path)
    x, y = splits["val"]
    bad_sets = {
        "renamed": ({"image": x, "labels": y}, "'pixels'"),
        "narrow": ({"pixels": x[:, :63].contiguous(), "labels": y}, "[-1, 64]"),
        "unlabelled": ({"pixels": x}, "'labels'"),
        "too-high": ({"pixels": x, "labels": torch.where(y == 3, 10, y)}, "found 10"),
        "negative": ({"pixels": x, "labels": torch.where(y == 3, -1, y)}, "found -1"),
        "empty": ({"pixels": x[:0].contiguous(), "labels": y[:0].contiguous()}, "the evaluation set is empty"),
        "uneven": ({"pixels": x, "labels": y[:-1].contiguous()}, "rows"),
        "float-labels": ({"pixels": x, "labels": y.float()}, "integer"),
    }
    for name, (tensors, _) in bad_sets.items():
        save_file(tensors, str(tmp_path / f"{name}.safetensors"))
    probe = splits["test"][0][:4]
    with running_app(
        [load_spec(write_spec(tmp_path, digits_spec(["ft-0"], hidden=HIDDEN)))], ingredient_roots=(str(tmp_path),)
    ) as app:
        address = f"127.0.0.1:{app.grpc_port}"
        with SoupClient(address) as soups, grpcclient.InferenceServerClient(address) as client:
            version = 1
            for name, (_, fragment) in bad_sets.items():
                version += 1
                document = digits_spec(["ft-1"], hidden=HIDDEN, evaluation=evaluation(name))
                with pytest.raises(SoupClientError) as caught:
                    soups.push(write_spec(tmp_path, document, f"{name}.yaml"), wait=True)
                message = str(caught.value)
                assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT, message
                assert f"evaluation.splits.{name}" in message and fragment in message, message
                shown = {int(v["version"]): v for v in soups.versions("digits")}
                assert shown[version]["state"] == "failed" and f"evaluation.splits.{name}" in shown[version]["reason"]
                served, logits = infer(client, probe)
                assert served == 1
                np.testing.assert_allclose(logits, mlp_logits(states["ft-0"], probe, HIDDEN), rtol=1e-4, atol=1e-4)

            # Problems the spec shows by itself are refused before anything is stored.
            refusals = [
                (digits_spec(SOUP, hidden=HIDDEN, merge={"method": "greedy"}), "evaluation"),
                (digits_spec(["ft-0"], hidden=HIDDEN, evaluation=evaluation("val", select="nope")), "evaluation.select"),
                (digits_spec(["ft-0"], hidden=HIDDEN, evaluation=evaluation("val", metric="perplexity")), "evaluation.metric"),
                (digits_spec(["ft-0"], hidden=HIDDEN, evaluation={"splits": {}}), "evaluation.splits"),
                (digits_spec(["ft-0"], hidden=HIDDEN, merge={"grid": {"weight": [0.5, 1.0]}}), "merge.grid"),
            ]
            for document, field in refusals:
                with pytest.raises(SoupClientError) as caught:
                    soups.push(write_spec(tmp_path, document, "refused.yaml"))
                assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT and field in str(caught.value), str(caught.value)
            assert len(soups.versions("digits")) == version
            assert infer(client, probe)[0] == 1


def test_a_split_of_zero_rows_is_reported_as_empty(tmp_path: Path) -> None:
    write_kitchen(tmp_path)
    save_file({"pixels": torch.zeros(0, 64), "labels": torch.zeros(0, dtype=torch.int64)}, str(tmp_path / "none.safetensors"))
    refused = write_spec(tmp_path, digits_spec(["ft-1"], hidden=HIDDEN, evaluation=evaluation("none")), "n.yaml")
    serving = load_spec(write_spec(tmp_path, digits_spec(["ft-0"], hidden=HIDDEN)))
    with (
        running_app([serving], ingredient_roots=(str(tmp_path),)) as app,
        SoupClient(f"127.0.0.1:{app.grpc_port}") as soups,
        pytest.raises(SoupClientError) as caught,
    ):
        soups.push(refused, wait=True)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "evaluation.splits.none: the evaluation set is empty" in str(caught.value)


def test_a_factory_split_scores_like_the_same_rows_read_from_a_file(tmp_path: Path) -> None:
    write_kitchen(tmp_path)
    path = str(tmp_path / "val.safetensors")
    splits = {
        "file": {"path": "val.safetensors"},
        "made": {"factory": "helpers:split_batches", "kwargs": {"path": path, "parts": 3}},
    }
    document = digits_spec(["ft-0", "ft-1"], hidden=HIDDEN, evaluation={"splits": splits, "batch_size": 64})
    served = load_spec(write_spec(tmp_path, document))
    with running_app([served], allow_factories=("helpers:*",)) as app, SoupClient(f"127.0.0.1:{app.grpc_port}") as soups:
        (info,) = soups.versions("digits")
        file, made = info["evaluation"]["file"]["metrics"], info["evaluation"]["made"]["metrics"]
        assert made["accuracy"] == file["accuracy"]
        assert made["nll"] == pytest.approx(file["nll"], rel=1e-6)
        assert made["ece"] == pytest.approx(file["ece"], abs=1e-6)  # other batch shapes: float32 sums differ
        failing = {
            "nothing": ({"factory": "helpers:split_batches", "kwargs": {"path": path, "parts": 0}}, "empty"),
            "unknown": ({"factory": "helpers:no_such_factory"}, "evaluation.splits.unknown.factory"),
            "raising": ({"factory": "helpers:split_batches", "kwargs": {"path": "/nonexistent"}}, "failed"),
        }
        for name, (source, fragment) in failing.items():
            bad = digits_spec(["ft-1"], hidden=HIDDEN, evaluation={"splits": {name: source}})
            with pytest.raises(SoupClientError) as caught:
                soups.push(write_spec(tmp_path, bad, f"{name}.yaml"), wait=True)
            message = str(caught.value)
            assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT, message
            assert f"evaluation.splits.{name}" in message and fragment in message, message
        assert soups.status()["models"][0]["active_version"] == "1"


def test_a_grid_search_keeps_the_best_point_and_logs_every_point_it_tried(tmp_path: Path) -> None:
    states, splits = write_kitchen(tmp_path)
    x, y = splits["val"]
    lambdas = [0.0, 1 / 3, 1.0, 0.5]
    merge = {"method": "task_arithmetic", "base": "ft-0", "grid": {"lambda": lambdas}}
    document = digits_spec(["ft-0", "ft-1", "ft-2"], hidden=HIDDEN, merge=merge, evaluation=evaluation("val"))
    with running_app([load_spec(write_spec(tmp_path, document))]) as app:
        with SoupClient(f"127.0.0.1:{app.grpc_port}") as soups:
            (info,) = soups.versions("digits")
        with grpcclient.InferenceServerClient(f"127.0.0.1:{app.grpc_port}") as client:
            _, served = infer(client, x[:16])

    def point(lam: float) -> dict[str, torch.Tensor]:  # base + lambda * (sum of task vectors), by hand
        base = {k: v.double() for k, v in states["ft-0"].items()}
        return {k: base[k] + lam * sum(states[n][k].double() - base[k] for n in ("ft-1", "ft-2")) for k in base}

    scores = [accuracy(point(lam), x, y, HIDDEN) for lam in lambdas]
    resolution = json.loads(info["resolution_json"])
    log = resolution["log"]
    assert log["search"] == "grid" and [t["parameters"] for t in log["tried"]] == [{"lambda": lam} for lam in lambdas]
    assert [t["accuracy"] for t in log["tried"]] == pytest.approx(scores, abs=1e-9)
    best = lambdas[scores.index(max(scores))]  # the first of the best
    assert best == pytest.approx(1 / 3)  # the uniform soup of the three (a soup beats its ingredients)
    assert resolution["merge"]["method"] == "task_arithmetic" and resolution["merge"]["base"] == "ft-0"
    assert resolution["merge"]["parameters"]["lambda"] == best and "grid" not in resolution["merge"]
    np.testing.assert_allclose(served, mlp_logits(point(best), x[:16], HIDDEN), rtol=1e-4, atol=1e-4)
    assert info["evaluation"]["val"]["metrics"]["accuracy"] == pytest.approx(max(scores), abs=1e-9)


def test_learned_per_layer_weights_reach_a_child_module_beside_its_parents_own_tensors(tmp_path: Path) -> None:
    centers = prototypes(seed=0)
    x, y = prototype_rows(centers, 400, seed=1)
    save_file({"pixels": x, "labels": y}, str(tmp_path / "val.safetensors"))
    states = {
        "a": {"head.scale": torch.ones(10), "head.proj.weight": 4 * centers, "head.proj.bias": -2 * (centers * centers).sum(1)},
    }
    generator = torch.Generator().manual_seed(1)
    states["b"] = {k: torch.randn(v.shape, generator=generator) for k, v in states["a"].items()}
    for name, state in states.items():
        save_file(state, str(tmp_path / f"{name}.safetensors"))
    document = {
        "apiVersion": "tureen/v1",
        "model": "nested",
        "architecture": {"factory": "helpers:nested"},
        "ingredients": [{"name": n, "path": f"{n}.safetensors"} for n in states],
        "merge": {"method": "learned", "parameters": {"granularity": "layer", "steps": 30}},
        "evaluation": evaluation("val", ingredients=False),
    }
    with running_app([load_spec(write_spec(tmp_path, document))]) as app:
        with SoupClient(f"127.0.0.1:{app.grpc_port}") as soups:
            (info,) = soups.versions("nested")
        with grpcclient.InferenceServerClient(f"127.0.0.1:{app.grpc_port}") as client:
            tensor = grpcclient.InferInput("pixels", [8, 64], "FP32")
            tensor.set_data_from_numpy(x[:8].numpy())
            served = client.infer("nested", [tensor]).as_numpy("logits")
    weights: dict[str, dict[str, float]] = {}
    for override in json.loads(info["resolution_json"])["merge"]["overrides"]:
        weights.setdefault(override["match"].removesuffix(".*"), {})[override["ingredient"]] = override["parameters"]["weight"]
    assert set(weights) == {"head", "head.proj"}
    assert abs(weights["head"]["a"] - weights["head.proj"]["a"]) > 1e-3  # two layers, two different mixes
    mixed = {k: sum(states[n][k].double() * weights[k.rpartition(".")[0]][n] for n in states) for k in states["a"]}
    module = nested()
    module.load_state_dict({k: v.float() for k, v in mixed.items()})
    with torch.inference_mode():
        expected = module(x[:8])["logits"].numpy()
    np.testing.assert_allclose(served, expected, rtol=1e-4, atol=1e-4)
