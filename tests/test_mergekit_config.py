"""`tureen spec from-mergekit`: a mergekit config converts, keeps its precedence, and merges."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file
from test_methods import ref_ties

from helpers import write_ingredients
from tureen.cli import main
from tureen.errors import SpecInvalid
from tureen.mergekit_config import from_mergekit

CONFIG = """
merge_method: ties
base_model: base-0.safetensors
models:
  - model: ft-0.safetensors
    parameters:
      weight: 0.7
      density: [{filter: net.0, value: 0.9}, {value: 0.5}]
  - model: ft-1.safetensors
    parameters: {weight: 0.3, density: 0.4}
parameters:
  normalize: true
  int8_mask: true
  density: [{filter: net.4, value: 0.2}, {value: 0.6}]
dtype: float32
chat_template: chatml
"""


def test_a_mergekit_config_converts_and_merges_with_mergekit_precedence(tmp_path: Path) -> None:
    write_ingredients(tmp_path, 2)
    write_ingredients(tmp_path, 1, prefix="base")
    (tmp_path / "ties.yml").write_text(CONFIG)
    converted = subprocess.run(
        [sys.executable, "-m", "tureen", "spec", "from-mergekit", str(tmp_path / "ties.yml"), "-o", str(tmp_path / "soup.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert converted.returncode == 0, converted.stderr
    assert "parameters.int8_mask: dropped" in converted.stderr and "chat_template: dropped" in converted.stderr
    assert "not a local file" not in converted.stderr
    assert yaml.safe_load((tmp_path / "soup.yaml").read_text())["merge"]["base"] == "base-0"

    assert main(["--log-level", "warning", "merge", str(tmp_path / "soup.yaml"), "-o", str(tmp_path / "out.safetensors")]) == 0
    merged = load_file(str(tmp_path / "out.safetensors"))
    base = load_file(str(tmp_path / "base-0.safetensors"))
    fts = [load_file(str(tmp_path / f"ft-{i}.safetensors")) for i in range(2)]
    # A model's own setting beats the global filter on net.4; its own filter beats its own catch-all.
    for key, densities in (("net.0.weight", [0.9, 0.4]), ("net.2.weight", [0.5, 0.4]), ("net.4.weight", [0.5, 0.4])):
        expected = ref_ties(base[key], [f[key] for f in fts], [0.7, 0.3], densities)
        assert (merged[key].double() - expected).abs().max() / expected.abs().max() < 1e-5, key


def test_global_filters_apply_where_models_set_nothing() -> None:
    config = yaml.safe_load(CONFIG)
    del config["models"][1]["parameters"]["density"]
    spec, _ = from_mergekit(config, "m")
    overrides = [(o.match, o.ingredient, dict(o.parameters)) for o in spec.merge.overrides]
    assert ("*net.4*", None, {"density": 0.2}) in overrides
    assert spec.merge.parameters["density"] == 0.6


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"merge_method": "arcee_fusion"}, "merge_method: 'arcee_fusion' has no Tureen equivalent"),
        ({"modules": {}}, "modules: only the 'models' and 'slices' forms convert"),
        ({"slices": [{"sources": []}]}, "models: give exactly one of models or slices"),
        ({"base_model": "org/model@v2"}, "revision ('@') references do not convert"),
        ({"parameters": {"bogus": 1}}, "parameters.bogus: method 'ties' has no such parameter"),
        ({"dtype": "float64"}, "dtype: 'float64' cannot be served"),
        ({"tokenizer": {"source": "union", "tokens": {}}}, "tokenizer: only 'source' converts (not tokens)"),
    ],
)
def test_what_cannot_convert_is_said(change: dict, expected: str) -> None:
    with pytest.raises(SpecInvalid, match=expected.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        from_mergekit({**yaml.safe_load(CONFIG), **change}, "m")


def test_lora_references_become_adapter_ingredients() -> None:
    # mergekit's model+lora: the adapter on the model. A model named only that way is no input
    # of the merge (weight 0) unless it is the base_model.
    models = [{"model": "llama+loras/chat"}, {"model": "llama+loras/code", "parameters": {"weight": 2}}]
    spec, _ = from_mergekit({"merge_method": "task_arithmetic", "base_model": "llama", "models": models}, "m")
    assert [(i.name, i.path, i.adapter, i.base) for i in spec.ingredients] == [
        ("llama", "llama", None, None),
        ("chat", None, "loras/chat", "llama"),
        ("code", None, "loras/code", "llama"),
    ]
    assert spec.merge.base == "llama" and dict(spec.ingredients[2].parameters) == {"weight": 2}
    spec, notes = from_mergekit({"merge_method": "linear", "models": models}, "m")
    assert dict(spec.ingredients[0].parameters) == {"weight": 0.0} and any("weight 0" in n for n in notes)
    with pytest.raises(
        SpecInvalid, match="'llama' is only the base of LoRA references or the tokenizer source; 'slerp' has no weights"
    ):
        from_mergekit({"merge_method": "slerp", "models": models, "parameters": {"t": 0.5}}, "m")


def test_a_tokenizer_source_becomes_the_specs_tokenizer_section() -> None:
    config = {**yaml.safe_load(CONFIG), "tokenizer_source": "union"}
    assert from_mergekit(config, "m")[0].tokenizer.source == "union"  # type: ignore[union-attr]
    config = {**yaml.safe_load(CONFIG), "tokenizer": {"source": "ft-1.safetensors"}}
    assert from_mergekit(config, "m")[0].tokenizer.source == "ft-1"  # type: ignore[union-attr]
    # A model named only as the tokenizer source is no input of the merge: weight 0.
    spec, notes = from_mergekit({**yaml.safe_load(CONFIG), "tokenizer_source": "chat-model"}, "m")
    assert any("weight 0" in note for note in notes)
    assert spec.tokenizer.source == "chat-model"  # type: ignore[union-attr]
    assert dict(next(i for i in spec.ingredients if i.name == "chat-model").parameters) == {"weight": 0.0}


def test_linear_takes_its_base_model_as_an_ingredient() -> None:
    config = {"merge_method": "linear", "base_model": "b", "models": [{"model": "a", "parameters": {"weight": 2}}]}
    spec, notes = from_mergekit(config, "m")
    assert [i.name for i in spec.ingredients] == ["a", "b"] and spec.merge.base is None
    assert any("base_model" in note for note in notes)
