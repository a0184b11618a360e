"""A soup of tiny random Hugging Face models, built locally and served over gRPC."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from safetensors.torch import save_file
from tureen_client import SoupClient

from helpers import llama_config, running_app, sample, scrape, write_spec
from tureen.spec import load_spec

transformers = pytest.importorskip("transformers", reason="the tureen[hf] extra is not installed")


def tiny_llama(tied: bool) -> transformers.LlamaConfig:
    return llama_config(tie_word_embeddings=tied)


@pytest.mark.parametrize("tied", [False, True])
def test_a_causal_lm_soup_serves_the_forward_of_its_averaged_weights(tmp_path: Path, tied: bool) -> None:
    config = tiny_llama(tied)
    states = []
    for seed in range(3):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config)
        model.save_pretrained(tmp_path / f"ft-{seed}")  # config.json + model.safetensors (tied head dropped)
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    document = {
        "apiVersion": "tureen/v1",
        "model": "tiny-llama",
        "architecture": {"huggingface": "ft-0", "task": "causal-lm"},
        "ingredients": [{"name": f"ft-{i}", "path": f"ft-{i}"} for i in range(3)],
    }
    spec = load_spec(write_spec(tmp_path, document))

    reference = transformers.AutoModelForCausalLM.from_config(config).eval()
    reference.load_state_dict({k: sum(s[k].double() for s in states).float() / 3 for k in states[0]})
    ids = np.array([[1, 5, 9, 3, 7], [2, 4, 6, 8, 0]], dtype=np.int64)
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=np.int64)
    with torch.inference_mode():
        expected = reference(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()

    with running_app([spec]) as app, grpcclient.InferenceServerClient(f"127.0.0.1:{app.grpc_port}") as client:
        meta = client.get_model_metadata("tiny-llama")
        assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
            ("input_ids", "INT64", [-1, -1]),
            ("attention_mask", "INT64", [-1, -1]),
        ]
        assert [(t.name, list(t.shape)) for t in meta.outputs] == [("logits", [-1, -1, 64])]
        inputs = []
        for name, array in (("input_ids", ids), ("attention_mask", mask)):
            tensor = grpcclient.InferInput(name, list(array.shape), "INT64")
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        logits = client.infer("tiny-llama", inputs).as_numpy("logits")
    assert logits.shape == (2, 5, 64)
    assert np.abs(logits - expected).max() < 1e-4


def test_a_huggingface_architecture_needs_a_config(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(tiny_llama(False)).save_pretrained(tmp_path / "ft")
    document = {
        "apiVersion": "tureen/v1",
        "model": "m",
        "architecture": {"huggingface": "empty"},
        "ingredients": [{"name": "ft", "path": "ft"}],
    }
    spec = load_spec(write_spec(tmp_path, document))
    with (
        running_app([spec], build=False) as app,
        pytest.raises(Exception, match=r"architecture.huggingface: .*empty has no config.json"),
    ):
        app.build_all()


def test_a_language_model_soup_is_scored_by_perplexity_and_a_greedy_search_minimizes_it(tmp_path: Path) -> None:
    config = tiny_llama(False)
    states = []
    for seed in range(3):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config)
        model.save_pretrained(tmp_path / f"ft-{seed}")
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    generator = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 64, (6, 9), generator=generator)
    mask = torch.ones_like(ids)
    mask[4:, 6:] = 0  # two padded rows: their last tokens are not scored
    labels = ids.masked_fill(mask == 0, -100)
    save_file({"input_ids": ids, "attention_mask": mask, "labels": labels}, str(tmp_path / "held-out.safetensors"))
    document = {
        "apiVersion": "tureen/v1",
        "model": "tiny-llama",
        "architecture": {"huggingface": "ft-0", "task": "causal-lm"},
        "ingredients": [{"name": f"ft-{i}", "path": f"ft-{i}"} for i in range(3)],
        "merge": {"method": "greedy"},
        "evaluation": {"task": "language-modeling", "splits": {"held-out": {"path": "held-out.safetensors"}}},
    }
    spec = load_spec(write_spec(tmp_path, document))

    def perplexity(state: dict[str, torch.Tensor]) -> float:
        """Hugging Face's own shifted token loss, averaged over the scored tokens."""
        reference = transformers.AutoModelForCausalLM.from_config(config).eval()
        reference.load_state_dict(state)
        with torch.inference_mode():
            return math.exp(float(reference(input_ids=ids, attention_mask=mask, labels=labels).loss))

    alone = {f"ft-{i}": perplexity(s) for i, s in enumerate(states)}
    with running_app([spec]) as app, SoupClient(f"127.0.0.1:{app.grpc_port}") as soups:
        info = soups.versions("tiny-llama")[0]
        page = scrape(app)
    resolution = json.loads(info["resolution_json"])
    kept = [name for name, weight in resolution["merge"]["weights"].items() if weight]
    assert resolution["log"]["order"][0] == min(alone, key=alone.__getitem__)  # lowest perplexity first
    soup = {k: sum(states[int(n[3:])][k].double() for n in kept).float() / len(kept) for k in states[0]}
    served = info["evaluation"]["held-out"]["metrics"]["perplexity"]
    assert served == pytest.approx(perplexity(soup), rel=1e-4)
    assert served <= min(alone.values()) * (1 + 1e-6)  # greedy never keeps a step that raises it
    for name, value in alone.items():
        scored = next(i for i in info["ingredient_evaluation"] if i["ingredient"] == name)
        assert scored["splits"]["held-out"]["metrics"]["perplexity"] == pytest.approx(value, rel=1e-4)
    gauge = sample(page, "tureen_eval_perplexity", model="tiny-llama", version="1", split="held-out")
    assert gauge == pytest.approx(served)
