"""LoRA adapters (PEFT's format) as ingredients, checked against PEFT's own merge_and_unload."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from safetensors.torch import load_file

from helpers import llama_config, running_app, write_spec
from tureen.core.ingredients import IngredientPool
from tureen.core.kitchen import Kitchen
from tureen.core.observer import NullObserver
from tureen.errors import IngredientCorrupt, IngredientMismatch, IngredientMissing, SpecInvalid
from tureen.spec import load_spec, parse_spec

transformers = pytest.importorskip("transformers", reason="the tureen[hf] extra is not installed")
peft = pytest.importorskip("peft", reason="peft is not installed (pip install 'tureen[dev]')")


def config(hidden: int = 32) -> transformers.LlamaConfig:
    return llama_config(vocab_size=80, hidden_size=hidden, intermediate_size=48, num_attention_heads=4)


ADAPTERS = {
    # Plain LoRA on two projections; rsLoRA with a per-module rank; an embedding LoRA with a
    # replaced head (modules_to_save).
    "a": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    "b": {
        "r": 8,
        "lora_alpha": 4,
        "target_modules": ["q_proj", "down_proj"],
        "use_rslora": True,
        "rank_pattern": {"down_proj": 2},
    },
    "c": {"r": 2, "lora_alpha": 16, "target_modules": ["embed_tokens", "k_proj"], "modules_to_save": ["lm_head"]},
}


def make_soup(folder: Path, hidden: int = 32) -> dict[str, dict[str, torch.Tensor]]:
    """A base model directory and three trained-looking adapters; returns each adapter's
    ``merge_and_unload()`` state, by PEFT itself, and the base's."""
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_config(config(hidden))
    base.save_pretrained(folder / "base")
    merged = {"base": {k: v.clone() for k, v in base.state_dict().items()}}
    for seed, (name, options) in enumerate(ADAPTERS.items(), start=1):
        model = transformers.AutoModelForCausalLM.from_pretrained(folder / "base")
        tuned = peft.get_peft_model(model, peft.LoraConfig(lora_dropout=0.0, **options))
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for parameter in tuned.parameters():
                if parameter.requires_grad:  # as if trained: B is no longer zero, the saved head moved
                    parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
        tuned.save_pretrained(folder / name)
        merged[name] = {k: v.clone() for k, v in tuned.merge_and_unload().state_dict().items()}
    return merged


def soup_document(merge: dict, names: tuple[str, ...] = tuple(ADAPTERS)) -> dict:
    return {
        "apiVersion": "tureen/v1",
        "model": "lora-soup",
        "architecture": {"huggingface": "base", "task": "causal-lm"},
        "ingredients": [{"name": "base", "path": "base"}] + [{"name": n, "adapter": n, "base": "base"} for n in names],
        "merge": merge,
    }


def merged_by(document: dict, folder: Path, placement: str = "device") -> dict[str, torch.Tensor]:
    spec = parse_spec({**document, "placement": placement}, base_dir=folder)
    return Kitchen(IngredientPool(torch.device("cpu"), NullObserver()), NullObserver()).merge(spec)


def test_each_adapter_alone_is_peft_merge_and_unload(tmp_path: Path) -> None:
    expected = make_soup(tmp_path)
    for name in ADAPTERS:
        document = soup_document({"method": "linear", "weights": {"base": 0.0, name: 1.0}}, (name,))
        merged = merged_by(document, tmp_path)
        for key, tensor in merged.items():
            assert torch.equal(tensor, expected[name][key]), f"{name}: {key}"
        changed = {k for k in merged if not torch.equal(expected[name][k], expected["base"][k])}
        assert changed and changed <= {k for k in merged if not torch.equal(merged[k], expected["base"][k])}


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties"])
def test_an_adapter_soup_is_the_method_applied_to_merge_and_unload(tmp_path: Path, method: str) -> None:
    expected = make_soup(tmp_path)
    weights = {"a": 1.0, "b": 0.5, "c": 1.5}
    if method == "linear":
        merge: dict = {"method": "linear", "weights": {"base": 0.0, **weights}}
        total = sum(weights.values())
        reference = {k: sum(w * expected[n][k].double() for n, w in weights.items()) / total for k in expected["base"]}
    elif method == "task_arithmetic":
        merge = {"method": "task_arithmetic", "base": "base", "weights": weights}
        b = expected["base"]
        reference = {k: b[k].double() + sum(w * (expected[n][k].double() - b[k].double()) for n, w in weights.items()) for k in b}
    else:
        merge = {"method": "ties", "base": "base", "weights": weights, "parameters": {"density": 0.5}}
        from references import ref_ties_vectorized

        b = expected["base"]
        reference = {
            k: ref_ties_vectorized(b[k], [expected[n][k] for n in weights], list(weights.values()), [0.5] * 3) for k in b
        }
    merged = merged_by(soup_document(merge), tmp_path)
    for key, tensor in merged.items():
        torch.testing.assert_close(tensor.double(), reference[key].double(), rtol=1e-5, atol=1e-6, msg=key)
    # Read from disk, piece by piece, the same bits.
    on_disk = merged_by(soup_document(merge), tmp_path, "disk")
    assert all(torch.equal(on_disk[k], merged[k]) for k in merged)


def test_a_served_adapter_soup_answers_with_the_forward_of_its_weights(tmp_path: Path) -> None:
    expected = make_soup(tmp_path)
    spec = load_spec(
        write_spec(tmp_path, soup_document({"method": "linear", "weights": {"base": 0.0, "a": 1.0, "b": 1.0, "c": 1.0}}))
    )
    reference = transformers.AutoModelForCausalLM.from_config(config()).eval()
    reference.load_state_dict({k: sum(expected[n][k].double() for n in ADAPTERS).float() / 3 for k in expected["base"]})
    ids = np.array([[1, 5, 9, 3]], dtype=np.int64)
    with torch.inference_mode():
        logits = reference(input_ids=torch.from_numpy(ids)).logits.numpy()
    with running_app([spec]) as app, grpcclient.InferenceServerClient(f"127.0.0.1:{app.grpc_port}") as client:
        inputs = [
            grpcclient.InferInput("input_ids", list(ids.shape), "INT64"),
            grpcclient.InferInput("attention_mask", list(ids.shape), "INT64"),
        ]
        inputs[0].set_data_from_numpy(ids)
        inputs[1].set_data_from_numpy(np.ones_like(ids))
        served = client.infer("lora-soup", inputs).as_numpy("logits")
    np.testing.assert_allclose(served, logits, rtol=1e-4, atol=1e-5)


def test_bad_adapters_are_named_and_refused(tmp_path: Path) -> None:
    make_soup(tmp_path)
    torch.manual_seed(5)
    transformers.AutoModelForCausalLM.from_config(config(hidden=16)).save_pretrained(tmp_path / "small")
    other_base = {
        **soup_document({"method": "linear"}, ("a",)),
        "ingredients": [{"name": "base", "path": "small"}, {"name": "a", "adapter": "a", "base": "base"}],
    }
    with pytest.raises(
        IngredientMismatch,
        match=r"ingredient 'a' \(.*\): the adapter's update of 'model.layers.0.self_attn.q_proj.weight' is \[32, 32\], base 'base' has \[16, 16\]",
    ):
        merged_by(other_base, tmp_path)
    with pytest.raises(IngredientMissing, match=r"ingredient 'a' \(.*nowhere\): adapter folder not found"):
        merged_by(
            {
                **other_base,
                "ingredients": [{"name": "base", "path": "base"}, {"name": "a", "adapter": "nowhere", "base": "base"}],
            },
            tmp_path,
        )
    dora = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**dora, "use_dora": True}))
    with pytest.raises(IngredientCorrupt, match=r"DoRA adapters are not supported"):
        merged_by(soup_document({"method": "linear"}, ("a",)), tmp_path)
    with pytest.raises(SpecInvalid, match=r"ingredients\[1\].base: an adapter needs the ingredient it was trained on"):
        parse_spec(
            {
                **soup_document({"method": "linear"}, ("a",)),
                "ingredients": [{"name": "base", "path": "base"}, {"name": "a", "adapter": "a"}],
            }
        )
    with pytest.raises(SpecInvalid, match=r"ingredients\[2\].base: 'a' is an adapter itself"):
        parse_spec(
            {
                **soup_document({"method": "linear"}, ("a",)),
                "ingredients": [
                    {"name": "base", "path": "base"},
                    {"name": "a", "adapter": "a", "base": "base"},
                    {"name": "b", "adapter": "b", "base": "a"},
                ],
            }
        )


def test_a_task_vector_merge_takes_an_adapters_update_itself_not_rounded_weights(tmp_path: Path) -> None:
    # A bf16 base and a small update: base + update rounded to bf16 (what merge_and_unload gives)
    # keeps little of it; task arithmetic on the adapter's own base merges the update itself.
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_config(config()).to(torch.bfloat16)
    base.save_pretrained(tmp_path / "base")
    tuned = peft.get_peft_model(
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.bfloat16),
        peft.LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj"], lora_dropout=0.0),
    )
    with torch.no_grad():
        for name, parameter in tuned.named_parameters():
            if "lora_B" in name:
                parameter.copy_(1e-3 * torch.randn(parameter.shape))
    tuned.save_pretrained(tmp_path / "a")
    rounded = {k: v.clone() for k, v in tuned.merge_and_unload().state_dict().items()}
    adapter = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    key = "model.layers.0.self_attn.q_proj.weight"
    factor = "base_model.model.model.layers.0.self_attn.q_proj.lora_"
    update = adapter[factor + "B.weight"].double() @ adapter[factor + "A.weight"].double()  # scale 1
    document = soup_document({"method": "task_arithmetic", "base": "base", "weights": {"a": 2.0}}, ("a",))
    merged = merged_by({**document, "dtype": "float32"}, tmp_path)
    exact = base.state_dict()[key].double() + 2.0 * update
    torch.testing.assert_close(merged[key].double(), exact, rtol=0, atol=1e-6)
    from_rounded = base.state_dict()[key].double() + 2.0 * (rounded[key].double() - base.state_dict()[key].double())
    assert (from_rounded - exact).abs().max() > 1e-4  # what the rounded weights would have merged to
