"""mergekit's slices: a frankenmerge (passthrough of layer runs) served over gRPC, and the errors
a wrong slice gets, before any weight is read and after."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient

from helpers import llama_config, running_app, write_spec
from tureen.core.ingredients import IngredientPool
from tureen.core.kitchen import Kitchen
from tureen.core.observer import NullObserver
from tureen.errors import IngredientMismatch, SpecInvalid
from tureen.spec import load_spec, parse_spec

transformers = pytest.importorskip("transformers", reason="the tureen[hf] extra is not installed")


def _fine_tunes(folder: Path, count: int, layers: int = 3) -> list[dict[str, torch.Tensor]]:
    states = []
    for seed in range(count):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(llama_config(num_hidden_layers=layers))
        model.save_pretrained(folder / f"ft-{seed}")
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return states


def _stacked(states: list[dict[str, torch.Tensor]], runs: list[tuple[int, int, int]]) -> dict[str, torch.Tensor]:
    """The frankenmerge by hand: (ingredient, first, end) runs of layers one after the other;
    embeddings from the first run's model, norm and head from the last's."""
    out = {k: v for k, v in states[runs[0][0]].items() if not k.startswith("model.layers.") and "embed" in k}
    out |= {k: v for k, v in states[runs[-1][0]].items() if not k.startswith("model.layers.") and "embed" not in k}
    layer = 0
    for which, first, end in runs:
        for k in range(first, end):
            prefix = f"model.layers.{k}."
            out |= {f"model.layers.{layer}.{key[len(prefix) :]}": v for key, v in states[which].items() if key.startswith(prefix)}
            layer += 1
    return out


def _document(layers: int | None) -> dict:
    architecture: dict = {"huggingface": "ft-0"}
    if layers is not None:
        architecture["config"] = {"num_hidden_layers": layers}
    runs = [("ft-0", [0, 2]), ("ft-1", [1, 3]), ("ft-0", [2, 3])]
    return {
        "apiVersion": "tureen/v1",
        "model": "franken",
        "architecture": architecture,
        "placement": "disk",
        "ingredients": [{"name": "ft-0", "path": "ft-0"}, {"name": "ft-1", "path": "ft-1"}],
        "merge": {"method": "passthrough", "slices": [{"sources": [{"ingredient": n, "layers": r}]} for n, r in runs]},
    }


def test_a_frankenmerge_serves_the_forward_of_its_stacked_layers(tmp_path: Path) -> None:
    states = _fine_tunes(tmp_path, 2)
    spec = load_spec(write_spec(tmp_path, _document(5)))
    reference = transformers.AutoModelForCausalLM.from_config(llama_config(num_hidden_layers=5)).eval()
    reference.load_state_dict(_stacked(states, [(0, 0, 2), (1, 1, 3), (0, 2, 3)]))
    ids = np.array([[1, 5, 9, 3, 7]], dtype=np.int64)
    with torch.inference_mode():
        expected = reference(input_ids=torch.from_numpy(ids)).logits.numpy()
    with running_app([spec]) as app, grpcclient.InferenceServerClient(f"127.0.0.1:{app.grpc_port}") as client:
        inputs = []
        for name, array in (("input_ids", ids), ("attention_mask", np.ones_like(ids))):
            tensor = grpcclient.InferInput(name, list(array.shape), "INT64")
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        logits = client.infer("franken", inputs).as_numpy("logits")
    assert np.abs(logits - expected).max() < 1e-5


def test_an_architecture_with_another_layer_count_is_told_how_many_the_slices_make(tmp_path: Path) -> None:
    _fine_tunes(tmp_path, 2)
    spec = load_spec(write_spec(tmp_path, _document(None)))
    with running_app([spec], build=False) as app, pytest.raises(Exception, match="the slices make 5 layers") as caught:
        app.build_all()
    assert "architecture.config.num_hidden_layers" in str(caught.value)


def test_a_slice_beyond_an_ingredients_layers_names_the_source(tmp_path: Path) -> None:
    _fine_tunes(tmp_path, 2)
    document = _document(None) | {"architecture": None}
    document["merge"]["slices"][1]["sources"][0]["layers"] = [1, 4]
    spec = load_spec(write_spec(tmp_path, {k: v for k, v in document.items() if v is not None}))
    kitchen = Kitchen(IngredientPool(torch.device("cpu"), NullObserver()), NullObserver())
    with pytest.raises(IngredientMismatch, match=r"merge.slices\[1\].sources\[0\]: ingredient 'ft-1' has layers 0-2; .*\[1, 4\)"):
        kitchen.merge(spec)


def test_slices_with_layers_averaged_take_each_slices_parameters(tmp_path: Path) -> None:
    # Two slices over the same two fine-tunes, weighted differently per slice and per source.
    states = _fine_tunes(tmp_path, 2, layers=2)
    slices = [
        {
            "sources": [
                {"ingredient": "ft-0", "layers": [0, 1], "parameters": {"weight": 3.0}},
                {"ingredient": "ft-1", "layers": [0, 1]},
            ]
        },
        {
            "sources": [{"ingredient": "ft-0", "layers": [1, 2]}, {"ingredient": "ft-1", "layers": [1, 2]}],
            "parameters": {"weight": [1.0, 2.0]},
        },
    ]
    document = {
        "apiVersion": "tureen/v1",
        "model": "m",
        "ingredients": [{"name": "ft-0", "path": "ft-0"}, {"name": "ft-1", "path": "ft-1", "parameters": {"weight": 1.0}}],
        "merge": {"method": "linear", "slices": slices},
    }
    merged = Kitchen(IngredientPool(torch.device("cpu"), NullObserver()), NullObserver()).merge(
        load_spec(write_spec(tmp_path, document))
    )
    key0, key1 = "model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"
    torch.testing.assert_close(merged[key0], (3 * states[0][key0] + states[1][key0]) / 4)
    # slice 1 has one layer: a gradient reads its last value there (mergekit's t = 1); ft-1's own weight wins over it
    torch.testing.assert_close(merged[key1], (2 * states[0][key1] + states[1][key1]) / 3)
    embed = "model.embed_tokens.weight"  # before the layers: slice 0's parameters, at t = 0
    torch.testing.assert_close(merged[embed], (3 * states[0][embed] + states[1][embed]) / 4)


BASE = {"apiVersion": "tureen/v1", "model": "m", "ingredients": [{"name": "a", "path": "a"}, {"name": "b", "path": "b"}]}


@pytest.mark.parametrize(
    ("merge", "expected"),
    [
        (
            {
                "method": "passthrough",
                "slices": [{"sources": [{"ingredient": "a", "layers": [0, 2]}, {"ingredient": "b", "layers": [0, 2]}]}],
            },
            "merge.slices[0].sources: method 'passthrough' takes at most 1",
        ),
        (
            {
                "method": "linear",
                "slices": [{"sources": [{"ingredient": "a", "layers": [0, 2]}, {"ingredient": "b", "layers": [0, 3]}]}],
            },
            "every source must give as many layers; got runs of [2, 3]",
        ),
        (
            {"method": "linear", "slices": [{"sources": [{"ingredient": "a", "layers": [2, 2]}]}]},
            "merge.slices[0].sources[0].layers: expected [first, end) with 0 <= first < end, got [2, 2]",
        ),
        (
            {"method": "passthrough", "slices": [{"sources": [{"ingredient": "c", "layers": [0, 2]}]}]},
            "merge.slices[0].sources[0].ingredient: no ingredient named 'c'",
        ),
        (
            {"method": "passthrough", "slices": [{"sources": [{"ingredient": "a", "layers": [0, 2]}]}]},
            "ingredients[1]: 'b' is in no slice",
        ),
        (
            {
                "method": "ties",
                "base": "a",
                "slices": [
                    {"sources": [{"ingredient": "b", "layers": [0, 2]}]},
                    {"sources": [{"ingredient": "a", "layers": [0, 2]}]},
                ],
            },
            "merge.slices[0].sources: the base 'a' must be one of the slice's sources",
        ),
        (
            {
                "method": "greedy",
                "slices": [{"sources": [{"ingredient": "a", "layers": [0, 2]}, {"ingredient": "b", "layers": [0, 2]}]}],
            },
            "merge.slices: method 'greedy' searches over whole models",
        ),
        (
            {
                "method": "linear",
                "slices": [
                    {
                        "sources": [
                            {"ingredient": "a", "layers": [0, 1], "parameters": {"lambda": 2}},
                            {"ingredient": "b", "layers": [0, 1]},
                        ]
                    }
                ],
            },
            "method 'linear' has no parameter 'lambda'",
        ),
    ],
)
def test_a_wrong_slice_is_refused_naming_the_field(merge: dict, expected: str) -> None:
    with pytest.raises(SpecInvalid) as caught:
        parse_spec({**BASE, "merge": merge})
    assert expected in str(caught.value)
