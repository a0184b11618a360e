"""Tureen's merges against mergekit itself, on the same files, when a mergekit venv is there.

``MERGEKIT_BIN`` (default ``/tmp/mk/bin``) names a venv's ``bin`` with ``mergekit-yaml`` (bench/
README: ``python -m venv --system-site-packages /tmp/mk && /tmp/mk/bin/pip install mergekit``);
without one the test skips, saying so. The config goes through ``tureen spec from-mergekit``, so
the conversion is checked with the math.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from helpers import llama_config, llama_with_tokens
from tureen.core.ingredients import IngredientPool
from tureen.core.kitchen import Kitchen
from tureen.core.observer import NullObserver
from tureen.mergekit_config import from_mergekit

transformers = pytest.importorskip("transformers", reason="the tureen[hf] extra is not installed")
MERGEKIT = Path(os.environ.get("MERGEKIT_BIN", "/tmp/mk/bin"))
pytestmark = pytest.mark.skipif(
    not (MERGEKIT / "mergekit-yaml").exists(), reason=f"no mergekit venv at {MERGEKIT} (set MERGEKIT_BIN)"
)

CONFIGS = {
    "linear": {"models": [{"model": "ft-0", "parameters": {"weight": 1.0}}, {"model": "ft-1", "parameters": {"weight": 3.0}}]},
    "ties": {
        "base_model": "base",
        "models": [{"model": f"ft-{i}", "parameters": {"weight": 1.0, "density": d}} for i, d in enumerate([0.3, 0.6, 0.5])],
        "parameters": {"normalize": True},
    },
    "nuslerp": {
        "base_model": "base",
        "models": [{"model": "ft-0", "parameters": {"weight": 1.0}}, {"model": "ft-1", "parameters": {"weight": 2.0}}],
        "parameters": {"nuslerp_flatten": False},
    },
    "sce": {"base_model": "base", "models": [{"model": f"ft-{i}"} for i in range(3)], "parameters": {"select_topk": 0.5}},
}
SLICES = {  # each over 4-layer models
    "passthrough": {  # a frankenmerge: 3 + 3 + 1 layers, with a scaled source
        "slices": [
            {"sources": [{"model": "ft-0", "layer_range": [0, 3]}]},
            {
                "sources": [
                    {
                        "model": "ft-1",
                        "layer_range": [1, 4],
                        "parameters": {"scale": [{"filter": "o_proj", "value": 0.5}, {"value": 1.0}]},
                    }
                ]
            },
            {"sources": [{"model": "ft-2", "layer_range": [3, 4]}]},
        ]
    },
    "slerp": {  # per-slice gradients and filters, the base from the top level
        "base_model": "base",
        "slices": [
            {
                "sources": [{"model": "base", "layer_range": [0, 2]}, {"model": "ft-0", "layer_range": [0, 2]}],
                "parameters": {"t": [0.0, 1.0]},
            },
            {
                "sources": [{"model": "base", "layer_range": [2, 4]}, {"model": "ft-1", "layer_range": [1, 3]}],
                "parameters": {"t": [{"filter": "mlp", "value": [0.9, 0.1]}, {"value": 0.3}]},
            },
        ],
    },
    "ties": {  # a slice's own base, per-source densities, global parameters
        "base_model": "base",
        "parameters": {"normalize": True, "weight": 1.0},
        "slices": [
            {
                "sources": [
                    {"model": "base", "layer_range": [0, 4]},
                    {"model": "ft-0", "layer_range": [0, 4], "parameters": {"density": 0.4}},
                    {"model": "ft-1", "layer_range": [0, 4], "parameters": {"density": 0.7}},
                ]
            },
        ],
    },
}


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_merges_equal_mergekit_on_the_same_files(tmp_path: Path, method: str) -> None:
    _compare(tmp_path, method, CONFIGS[method], layers=2)


@pytest.mark.parametrize("method", sorted(SLICES))
def test_sliced_merges_equal_mergekit_on_the_same_files(tmp_path: Path, method: str) -> None:
    _compare(tmp_path, method, SLICES[method], layers=4)


@pytest.mark.parametrize("method", ["ties", "breadcrumbs"])
def test_million_entry_tensors_rank_as_mergekit_ranks_them(tmp_path: Path, method: str) -> None:
    # Projections of 1024 x 1024 entries, each ranked exactly (mergekit: torch.topk / argsort), from disk.
    models = [{"model": f"ft-{i}", "parameters": {"weight": 1.0, "density": d}} for i, d in enumerate([0.2, 0.5, 0.35])]
    body: dict = {"base_model": "base", "models": models}
    if method == "breadcrumbs":
        body["parameters"] = {"gamma": 0.02}
    # Among a million float32 magnitudes some are equal; where two sit astride a threshold,
    # mergekit's sort keeps one of them arbitrarily and the threshold keeps both or neither.
    _compare(tmp_path, method, body, layers=1, hidden=1024, boundary_ties=3)


def _compare(tmp_path: Path, method: str, body: dict, layers: int, hidden: int = 32, boundary_ties: int = 0) -> None:
    config = llama_config(
        hidden_size=hidden,
        intermediate_size=2 * hidden if hidden < 1024 else hidden,
        num_attention_heads=4,
        num_hidden_layers=layers,
    )
    torch.manual_seed(0)
    for name in ("base", "ft-0", "ft-1", "ft-2"):
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / name)
    document = _absolute({"merge_method": method, "dtype": "float32", **body}, tmp_path)
    (tmp_path / "mk.yml").write_text(yaml.safe_dump(document))
    run = [str(MERGEKIT / "mergekit-yaml"), "mk.yml", "out", "--no-copy-tokenizer", "--lazy-unpickle"]
    subprocess.run(run, cwd=tmp_path, check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    theirs = {}
    for shard in sorted((tmp_path / "out").glob("*.safetensors")):
        theirs.update(load_file(str(shard)))
    spec, _ = from_mergekit(document, "m")
    ours = Kitchen(IngredientPool(torch.device("cpu"), NullObserver()), NullObserver()).merge(spec)
    assert theirs.keys() <= ours.keys()
    if "slices" in body:
        assert theirs.keys() == ours.keys()
    for key, tensor in theirs.items():
        differ = ~torch.isclose(ours[key], tensor, rtol=1e-5, atol=1e-6)
        assert int(differ.sum()) <= boundary_ties, f"{method}: {key}: {int(differ.sum())} of {differ.numel()} entries differ"


def _absolute(document: dict, folder: Path) -> dict:
    """Model names made absolute paths: mergekit reads any other name as a hub id."""
    out = dict(document)
    if "models" in out:
        out["models"] = [{**m, "model": str(folder / m["model"])} for m in document["models"]]
    else:
        out["slices"] = [
            {**piece, "sources": [{**s, "model": str(folder / s["model"])} for s in piece["sources"]]} for piece in out["slices"]
        ]
    if "base_model" in out:
        out["base_model"] = str(folder / out["base_model"])
    return out


@pytest.mark.parametrize(
    ("method", "source"), [("linear", "union"), ("ties", "union"), ("task_arithmetic", "base"), ("linear", "ft-1")]
)
def test_vocabularies_mapped_by_token_equal_mergekit(tmp_path: Path, method: str, source: str) -> None:
    # ft-0 adds two tokens and a special one, ft-1 the first of them: rows taken from the only
    # holder, the base, or the holders' mean. ft-1's tokens are a prefix of ft-0's because
    # mergekit walks the models in set order (by hash: it varies run to run) to build the union.
    llama_with_tokens(tmp_path / "base", 0, [])
    llama_with_tokens(tmp_path / "ft-0", 1, ["<tool>", "<only>"], special=["<|end|>"])
    llama_with_tokens(tmp_path / "ft-1", 2, ["<tool>"])
    models = [{"model": "ft-0", "parameters": {"weight": 1.0}}, {"model": "ft-1", "parameters": {"weight": 2.0}}]
    body = {"base_model": "base", "models": models, "tokenizer_source": source}
    if method == "ties":
        body["parameters"] = {"density": 0.5}
    if method == "linear":
        body = {"models": [{"model": "base", "parameters": {"weight": 1.0}}, *models], "tokenizer_source": source}
    document = _absolute({"merge_method": method, "dtype": "float32", **body}, tmp_path)
    if source not in ("base", "union"):
        document["tokenizer_source"] = str(tmp_path / source)
    (tmp_path / "mk.yml").write_text(yaml.safe_dump(document))
    run = [str(MERGEKIT / "mergekit-yaml"), "mk.yml", "out", "--lazy-unpickle"]
    subprocess.run(run, cwd=tmp_path, check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    theirs = {}
    for shard in sorted((tmp_path / "out").glob("*.safetensors")):
        theirs.update(load_file(str(shard)))
    spec, _ = from_mergekit(document, "m")
    (tmp_path / "ours").mkdir()
    ours = Kitchen(IngredientPool(torch.device("cpu"), NullObserver()), NullObserver()).merge(
        spec, tokenizer_to=tmp_path / "ours"
    )
    assert theirs.keys() == ours.keys()
    for key, tensor in theirs.items():
        bad = torch.nonzero((ours[key] - tensor).abs().reshape(len(tensor), -1).amax(1) > 1e-5).flatten().tolist()
        torch.testing.assert_close(ours[key], tensor, rtol=1e-5, atol=1e-6, msg=f"{method}/{source}: {key} rows {bad}")
    mine = transformers.AutoTokenizer.from_pretrained(tmp_path / "ours").get_vocab()
    assert mine == transformers.AutoTokenizer.from_pretrained(tmp_path / "out").get_vocab()
