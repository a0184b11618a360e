"""A soup of tiny random Hugging Face models, built locally and served over gRPC."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient

from helpers import running_app, write_spec
from tureen.spec import load_spec

transformers = pytest.importorskip("transformers", reason="the tureen[hf] extra is not installed")


def tiny_llama(tied: bool) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=tied,
    )


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
