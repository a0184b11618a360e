"""Spec validation: every error names its field and reason."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from helpers import digits_spec, write_spec
from tureen.core.parameters import ParameterPlan
from tureen.errors import SpecInvalid
from tureen.spec import RESERVED_MODEL_NAMES, load_spec, parse_spec
from tureen.transport.grpc import health


def problems(document: Any) -> str:
    with pytest.raises(SpecInvalid) as caught:
        parse_spec(document)
    return str(caught.value)


def test_a_valid_yaml_spec_loads_with_paths_relative_to_the_file(tmp_path: Path) -> None:
    path = write_spec(tmp_path, digits_spec(["a", "b"]))
    spec = load_spec(path)
    assert spec.model == "digits"
    assert [i.path for i in spec.ingredients] == [str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")]
    assert spec.merge.method == "linear" and spec.dtype == "float32"
    assert spec.merge.parameters == {} and spec.mixed == spec.ingredients


def test_json_specs_load_too(tmp_path: Path) -> None:
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(digits_spec(["a"])))
    assert load_spec(path).ingredients[0].name == "a"


def test_specs_are_frozen_all_the_way_down() -> None:
    spec = parse_spec(digits_spec(["a", "b"], merge={"weights": {"a": 1, "b": 2}, "parameters": {"normalize": True}}))
    with pytest.raises(ValidationError):
        spec.model = "other"  # type: ignore[misc]
    for mapping in (spec.merge.weights, spec.merge.parameters, spec.architecture.kwargs):  # type: ignore[union-attr]
        with pytest.raises(TypeError, match="cannot be changed"):
            mapping["a"] = 0  # type: ignore[index]
    assert parse_spec(spec.model_dump(by_alias=True)) == spec


def test_weights_default_to_equal_and_are_given_per_ingredient() -> None:
    uniform = ParameterPlan(parse_spec(digits_spec(["a", "b", "c"])), ["w"])
    assert uniform.for_tensor("w") == ({"normalize": True}, {"weight": [1.0, 1.0, 1.0]})
    weighted = ParameterPlan(parse_spec(digits_spec(["a", "b"], merge={"weights": {"a": 3, "b": 1}})), ["w"])
    assert weighted.for_tensor("w")[1] == {"weight": [3, 1]}


def test_a_weight_for_an_unknown_ingredient_is_named() -> None:
    document = digits_spec(["ft-a", "ft-b"], merge={"weights": {"ft-a": 0.5, "ft-b": 0.3, "ft-c": 0.2}})
    assert "merge.weights.ft-c: no ingredient named 'ft-c'" in problems(document)


def test_weights_must_cover_every_ingredient() -> None:
    document = digits_spec(["ft-a", "ft-b"], merge={"weights": {"ft-a": 1.0}})
    assert "merge.weights: no weight for ingredient 'ft-b'" in problems(document)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"apiVersion": "tureen/v2"}, "apiVersion: Input should be 'tureen/v1'"),
        ({"modle": "x"}, "modle: unknown field"),
        ({"model": "bad name!"}, "model: String should match pattern"),
        ({"ingredients": []}, "ingredients: Tuple should have at least 1 item"),
        ({"dtype": "float8"}, "dtype: Input should be 'float32', 'float16' or 'bfloat16'"),
        ({"merge": {"method": "soup-of-the-day"}}, "merge.method: unknown merge method 'soup-of-the-day' (known: breadcrumbs, "),
        (
            {"merge": {"parameters": {"normalise": False}}},
            "merge.parameters.normalise: method 'linear' has no parameter 'normalise'",
        ),
        (
            {"merge": {"parameters": {"normalize": "sometimes"}}},
            "merge.parameters.normalize: expected true or false, got 'sometimes'",
        ),
        ({"merge": {"base": "a"}}, "merge.base: method 'linear' does not use a base"),
        ({"merge": {"base": "zz"}}, "merge.base: no ingredient named 'zz'"),
        ({"merge": {"weights": {"a": float("nan")}}}, "merge.weights.a: must be finite, got nan"),
        ({"merge": {"weights": {"a": 0}}}, "merge.weights: weights sum to 0 and cannot be normalized"),
        ({"architecture": {"factory": "no-colon"}}, "architecture.factory: String should match pattern"),
        ({"architecture": {"factory": "m:f", "kwarg": {}}}, "architecture.kwarg: unknown field"),
        (
            {"architecture": {"factory": "m:f", "huggingface": "d"}},
            "architecture.factory: give exactly one of factory or huggingface",
        ),
        ({"architecture": {"huggingface": "d", "kwargs": {"x": 1}}}, "architecture.kwargs: kwargs go with factory"),
        ({"architecture": {"huggingface": "d", "task": "vision"}}, "architecture.task: Input should be 'causal-lm'"),
    ],
)
def test_each_problem_names_its_field(change: dict[str, Any], expected: str) -> None:
    assert expected in problems({**digits_spec(["a"]), **change})


def test_ingredient_problems_name_the_list_index() -> None:
    document = digits_spec(["a", "a"])
    assert "ingredients[1].name: duplicate ingredient name 'a'" in problems(document)
    document = digits_spec(["a"])
    document["ingredients"][0]["sha256"] = "not-hex"
    assert "ingredients[0].sha256: String should match pattern" in problems(document)
    del document["ingredients"][0]["path"]
    document["ingredients"][0]["sha256"] = "0" * 64
    assert "ingredients[0].path: give exactly one of path or adapter" in problems(document)


def test_interface_shapes_must_lead_with_the_batch_dimension() -> None:
    unbatched = {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [64]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 10]}],
    }
    assert "interface.inputs[0].shape: the first dimension must be -1" in problems(digits_spec(["a"], interface=unbatched))
    assert parse_spec(digits_spec(["a"], interface={**unbatched, "max_batch_size": 0})).interface is not None
    malformed = {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 64]}],
        "outputs": [{"name": "y", "datatype": "FP99", "shape": [-1, 0]}],
    }
    text = problems(digits_spec(["a"], interface=malformed))
    assert "interface.outputs[0].datatype: Input should be" in text
    assert "interface.outputs[0].shape: dimensions must be positive or -1" in text


def test_file_problems_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(SpecInvalid, match=r"spec .*missing.yaml: cannot read the file"):
        load_spec(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    with pytest.raises(SpecInvalid, match=r"broken.yaml: not valid YAML"):
        load_spec(broken)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(SpecInvalid, match=r"expected a mapping at the top level, got list"):
        load_spec(listing)


@pytest.mark.parametrize("name", ["liveness", "inference.GRPCInferenceService"])
def test_health_service_names_are_not_model_names(name: str) -> None:
    document = {"apiVersion": "tureen/v1", "model": name, "ingredients": [{"name": "a", "path": "a.safetensors"}]}
    with pytest.raises(SpecInvalid, match=r"^model: .*health service"):
        parse_spec(document)
    assert set(RESERVED_MODEL_NAMES) == {health.LIVENESS_SERVICE, health.INFERENCE_SERVICE}
