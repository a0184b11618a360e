"""Ingredients with added tokens: embedding rows mapped by token into the blend's vocabulary
(``tokenizer: {source: union | base | INGREDIENT}``), and the tokenizer ``tureen merge`` writes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import llama_with_tokens, write_spec
from tureen.errors import SpecInvalid
from tureen.spec import parse_spec

transformers = pytest.importorskip("transformers", reason="the tureen[hf] extra is not installed")


def _merge(tmp_path: Path, document: dict) -> tuple[dict[str, torch.Tensor], dict]:
    spec = write_spec(tmp_path, document)
    (tmp_path / "out").mkdir()
    subprocess.run(
        [sys.executable, "-m", "tureen", "merge", str(spec), "-o", str(tmp_path / "out" / "blend.safetensors")],
        check=True,
        capture_output=True,
    )
    return load_file(str(tmp_path / "out" / "blend.safetensors")), json.loads((tmp_path / "out" / "tokenizer.json").read_text())


def test_a_union_vocabulary_maps_rows_by_token_and_fills_what_an_ingredient_lacks(tmp_path: Path) -> None:
    a = llama_with_tokens(tmp_path / "a", 0, [])
    b = llama_with_tokens(tmp_path / "b", 1, ["<tool>", "<both>"])
    c = llama_with_tokens(tmp_path / "c", 2, ["<both>"], special=["<|end|>"])
    document = {
        "apiVersion": "tureen/v1",
        "model": "m",
        "ingredients": [{"name": n, "path": n} for n in "abc"],
        "tokenizer": {"source": "union"},
    }
    merged, tokenizer = _merge(tmp_path, document)
    vocab = tokenizer["model"]["vocab"] | {t["content"]: t["id"] for t in tokenizer["added_tokens"]}
    assert [vocab[t] for t in ("<tool>", "<both>", "<|end|>")] == [64, 65, 66]
    assert next(t for t in tokenizer["added_tokens"] if t["content"] == "<|end|>")["special"] is True
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        rows = merged[key]
        assert rows.shape == (67, 16)
        torch.testing.assert_close(rows[:64], (a[key] + b[key][:64] + c[key][:64]) / 3)
        torch.testing.assert_close(rows[64], b[key][64])  # only b has <tool>: everyone takes b's row
        both = (b[key][65] + c[key][64]) / 2  # b and c have <both>, no base: a takes their mean
        torch.testing.assert_close(rows[65], (b[key][65] + c[key][64] + both) / 3)
        torch.testing.assert_close(rows[66], c[key][65])
    layer = "model.layers.0.mlp.up_proj.weight"  # untouched by the vocabulary
    torch.testing.assert_close(merged[layer], (a[layer] + b[layer] + c[layer]) / 3)


def test_a_base_vocabulary_drops_added_tokens_and_the_base_fills_gaps(tmp_path: Path) -> None:
    base = llama_with_tokens(tmp_path / "base", 0, ["<sys>"])
    ft = llama_with_tokens(tmp_path / "ft", 1, [])
    document = {
        "apiVersion": "tureen/v1",
        "model": "m",
        "ingredients": [{"name": "base", "path": "base"}, {"name": "ft", "path": "ft"}],
        "merge": {"method": "task_arithmetic", "base": "base"},
        "tokenizer": {"source": "base"},
    }
    merged, _ = _merge(tmp_path, document)
    key = "model.embed_tokens.weight"
    assert merged[key].shape == (65, 16)
    torch.testing.assert_close(merged[key][:64], ft[key])  # base + (ft - base)
    torch.testing.assert_close(merged[key][64], base[key][64])  # ft lacks <sys>: it takes the base's row, delta 0


def test_a_tokenizer_source_must_be_base_union_or_an_ingredient() -> None:
    document = {
        "apiVersion": "tureen/v1",
        "model": "m",
        "ingredients": [{"name": "a", "path": "a"}],
        "tokenizer": {"source": "b"},
    }
    with pytest.raises(SpecInvalid, match=r"tokenizer.source: expected base, union or an ingredient's name, got 'b'"):
        parse_spec(document)
