"""Parameters as mergekit users write them: scalars, gradients, overrides, per ingredient."""

from __future__ import annotations

from typing import Any

import pytest

from helpers import digits_spec
from tureen.core.parameters import ParameterPlan, interpolate, layer_positions
from tureen.errors import SpecInvalid
from tureen.spec import parse_spec

NAMES = [
    "embed.weight",
    "layers.0.attn.weight",
    "layers.1.attn.weight",
    "layers.2.mlp.weight",
    "layers.3.mlp.weight",
    "head.weight",
]


def ties_spec(**merge: Any) -> dict[str, Any]:
    document = digits_spec(["base", "a", "b"])
    document["merge"] = {"method": "ties", "base": "base", **merge}
    return document


def plan(document: dict[str, Any]) -> ParameterPlan:
    return ParameterPlan(parse_spec(document), NAMES)


def test_layer_positions_run_from_the_first_layer_to_the_last() -> None:
    positions = layer_positions(NAMES)
    assert [positions[n] for n in NAMES] == [0.0, 0.0, 1 / 3, 2 / 3, 1.0, 0.0]
    assert layer_positions(["layers.0.w", "norm"]) == {"layers.0.w": 1.0, "norm": 0.0}


def test_gradients_interpolate_between_evenly_spaced_anchors() -> None:
    assert interpolate([0.0, 1.0], 0.25) == 0.25
    assert interpolate([0.2, 0.8, 0.4], 0.75) == pytest.approx(0.6)
    assert interpolate([0.5], 0.9) == 0.5
    gradient = plan(ties_spec(parameters={"density": [0.1, 0.4]}))
    assert gradient.for_tensor("layers.1.attn.weight")[1]["density"] == pytest.approx([0.2, 0.2])
    assert gradient.for_tensor("head.weight")[1]["density"] == [0.1, 0.1]  # outside the layers: the first value


def test_precedence_overrides_then_ingredient_then_weights_then_merge_then_default() -> None:
    document = ties_spec(
        weights={"a": 0.7, "b": 0.3},
        parameters={"density": 0.5, "lambda": 2.0},
        overrides=[
            {"match": "layers.0.*", "ingredient": "b", "parameters": {"density": 0.95}},
            {"match": "layers.*.attn.*", "parameters": {"density": 0.8, "lambda": 1.5}},
            {"match": "layers.0.*", "parameters": {"density": 0.1}},
        ],
    )
    document["ingredients"][1]["parameters"] = {"density": 0.3, "weight": 2.0}
    p = plan(document)
    glob, per = p.for_tensor("layers.0.attn.weight")
    assert per["density"] == [0.8, 0.95]  # a: global override (first match); b: its own override first
    assert glob["lambda"] == 1.5
    glob, per = p.for_tensor("layers.2.mlp.weight")
    assert per["density"] == [0.3, 0.5]  # a: its own parameters; b: merge.parameters
    assert per["weight"] == [2.0, 0.3]  # a: its own weight beats merge.weights
    assert glob == {"lambda": 2.0, "normalize": True, "majority_sign": "total", "rank_sample": 0}  # defaults fill the rest


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"parameters": {"density": 0}}, "merge.parameters.density: must be in (0, 1], got 0"),
        ({"parameters": {"density": 1.5}}, "merge.parameters.density: must be in (0, 1], got 1.5"),
        ({"parameters": {"density": []}}, "merge.parameters.density: a gradient list needs at least one value"),
        ({"parameters": {"density": [0.5, 2]}}, "merge.parameters.density: must be in (0, 1], got 2"),
        ({"parameters": {"majority_sign": "most"}}, "merge.parameters.majority_sign: expected one of total, frequency"),
        ({"overrides": [{"match": "x*", "parameters": {"density": -1}}]}, "merge.overrides[0].parameters.density: must be in"),
        ({"overrides": [{"match": "x*", "ingredient": "zz", "parameters": {"density": 0.5}}]}, "merge.overrides[0].ingredient"),
        ({"base": None}, "merge.base: method 'ties' needs a base ingredient"),
        ({"base": "nope"}, "merge.base: no ingredient named 'nope'"),
    ],
)
def test_bad_parameters_name_the_field(change: dict[str, Any], expected: str) -> None:
    with pytest.raises(SpecInvalid) as caught:
        parse_spec(ties_spec(**change))
    assert expected in str(caught.value)


def test_ingredients_take_only_per_ingredient_parameters() -> None:
    document = ties_spec()
    document["ingredients"][1]["parameters"] = {"lambda": 2.0}
    document["ingredients"][0]["parameters"] = {"density": 0.5}
    with pytest.raises(SpecInvalid) as caught:
        parse_spec(document)
    assert "ingredients[1].parameters.lambda: 'lambda' is a global parameter of 'ties'" in str(caught.value)
    assert "ingredients[0].parameters: the base ingredient takes no parameters" in str(caught.value)


@pytest.mark.parametrize(
    ("method", "names", "base", "expected"),
    [
        ("slerp", ["a", "b", "c"], None, "slerp interpolates exactly two models (the base counts), got 3"),
        ("model_stock", ["a", "b", "c"], None, "merge.base: method 'model_stock' needs a base ingredient"),
        ("model_stock", ["base", "a"], "base", "method 'model_stock' needs at least 2 ingredients besides the base"),
        ("passthrough", ["a", "b"], None, "method 'passthrough' takes at most 1 besides the base, got 2"),
        ("nearswap", ["a", "b"], None, "merge.base: method 'nearswap' needs a base ingredient"),
    ],
)
def test_methods_get_the_ingredients_they_need(method: str, names: list[str], base: str | None, expected: str) -> None:
    document = digits_spec(names)
    document["merge"] = {"method": method, **({"base": base} if base else {})}
    with pytest.raises(SpecInvalid) as caught:
        parse_spec(document)
    assert expected in str(caught.value)
