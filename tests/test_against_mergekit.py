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

from helpers import llama_config
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


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_merges_equal_mergekit_on_the_same_files(tmp_path: Path, method: str) -> None:
    config = llama_config(hidden_size=32, intermediate_size=64, num_attention_heads=4)
    torch.manual_seed(0)
    for name in ("base", "ft-0", "ft-1", "ft-2"):
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / name)
    document = _absolute({"merge_method": method, "dtype": "float32", **CONFIGS[method]}, tmp_path)
    (tmp_path / "mk.yml").write_text(yaml.safe_dump(document))
    run = [str(MERGEKIT / "mergekit-yaml"), "mk.yml", "out", "--no-copy-tokenizer", "--lazy-unpickle"]
    subprocess.run(run, cwd=tmp_path, check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    theirs = {}
    for shard in sorted((tmp_path / "out").glob("*.safetensors")):
        theirs.update(load_file(str(shard)))
    spec, _ = from_mergekit(document, "m")
    ours = Kitchen(IngredientPool(torch.device("cpu"), NullObserver()), NullObserver()).merge(spec)
    assert theirs.keys() <= ours.keys()
    for key, tensor in theirs.items():
        torch.testing.assert_close(ours[key], tensor, rtol=1e-5, atol=1e-6, msg=f"{method}: {key}")


def _absolute(document: dict, folder: Path) -> dict:
    """Model names made absolute paths: mergekit reads any other name as a hub id."""
    out = {**document, "models": [{**m, "model": str(folder / m["model"])} for m in document["models"]]}
    if "base_model" in out:
        out["base_model"] = str(folder / out["base_model"])
    return out
