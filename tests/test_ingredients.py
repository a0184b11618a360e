"""Loading checkpoints safely, and the checks that run before any merge."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from helpers import digits_spec, hand_average, write_ingredients
from tureen.core.ingredients import IngredientPool
from tureen.core.kitchen import Kitchen
from tureen.core.observer import NullObserver
from tureen.core.recipe import check_compatible
from tureen.errors import IngredientCorrupt, IngredientMismatch, IngredientMissing
from tureen.spec import IngredientRef, parse_spec


class Payload:
    """Not a tensor: a weights-only load must refuse to build it."""


def pool() -> IngredientPool:
    return IngredientPool(torch.device("cpu"), NullObserver())


def ref(path: Path, name: str = "x", sha256: str | None = None) -> IngredientRef:
    return IngredientRef(name=name, path=str(path), sha256=sha256)


def test_safetensors_pt_and_nested_state_dicts_load(tmp_path: Path) -> None:
    state = {"w": torch.arange(6.0).reshape(2, 3), "steps": torch.tensor([3])}
    save_file(state, str(tmp_path / "a.safetensors"))
    torch.save(state, tmp_path / "b.pt")
    torch.save({"state_dict": state}, tmp_path / "c.bin")
    for name in ("a.safetensors", "b.pt", "c.bin"):
        loaded = pool().load(ref(tmp_path / name))
        assert set(loaded.tensors) == {"w", "steps"}
        assert torch.equal(loaded.tensors["w"], state["w"])


def test_pickled_objects_are_refused_not_executed(tmp_path: Path) -> None:
    torch.save({"w": torch.zeros(2), "extra": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(IngredientCorrupt, match=r"ingredient 'x' \(.*evil.pt\): not a weights-only torch checkpoint"):
        pool().load(ref(tmp_path / "evil.pt"))


def test_missing_and_corrupt_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(IngredientMissing, match=r"ingredient 'x' \(.*nope.safetensors\): file not found"):
        pool().load(ref(tmp_path / "nope.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(IngredientCorrupt, match=r"junk.safetensors\): not a readable safetensors file"):
        pool().load(ref(tmp_path / "junk.safetensors"))


@pytest.mark.parametrize("placement", ["device", "disk"])
def test_non_finite_values_name_the_ingredient_and_tensor(tmp_path: Path, placement: str) -> None:
    # NaN and Inf are found by the merge on what it reads, not by a pass of their own at load.
    save_file({"ok": torch.ones(3), "bad": torch.tensor([1.0, float("nan"), float("inf")])}, str(tmp_path / "n.safetensors"))
    save_file({"ok": torch.ones(3), "bad": torch.ones(3)}, str(tmp_path / "fine.safetensors"))
    spec = parse_spec({**digits_spec(["fine", "n"]), "placement": placement}, base_dir=tmp_path)
    with pytest.raises(IngredientCorrupt, match=r"ingredient 'n' \(.*n.safetensors\): tensor 'bad' holds 2 NaN/Inf value\(s\)"):
        Kitchen(pool(), NullObserver()).merge(spec)


def test_checksums_are_checked_when_given_and_only_then_computed(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    save_file({"w": torch.ones(3)}, str(path))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert pool().load(ref(path)).digest is None  # nothing pins it: not hashed
    assert pool().load(ref(path, sha256=digest)).digest == digest
    with pytest.raises(IngredientCorrupt, match=f"sha256 is {digest}, the spec expects {'0' * 64}"):
        pool().load(ref(path, sha256="0" * 64))


def test_unchanged_files_are_loaded_once_and_changed_ones_again(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    save_file({"w": torch.ones(1000)}, str(path))
    shared = pool()
    first = shared.load(ref(path, name="a"))
    assert shared.load(ref(path, name="b")) is first
    assert shared.nbytes == 4000
    save_file({"w": torch.zeros(1000)}, str(path))
    again = shared.load(ref(path, name="a"))
    assert again is not first and torch.equal(again.tensors["w"], torch.zeros(1000))
    assert shared.nbytes == 4000  # the stale copy is dropped


def load_all(tmp_path: Path, names: list[str]) -> tuple[Kitchen, dict]:
    spec = parse_spec(digits_spec(names), base_dir=tmp_path)
    kitchen = Kitchen(pool(), NullObserver())
    return kitchen, {"spec": spec, "ingredients": kitchen.pool.load_all(spec)}


def test_mismatched_keys_and_shapes_name_ingredient_and_tensor(tmp_path: Path) -> None:
    write_ingredients(tmp_path, 2)
    write_ingredients(tmp_path, 1, hidden=9, prefix="wide")
    save_file({"net.0.weight": torch.zeros(8, 64)}, str(tmp_path / "short.safetensors"))
    _, loaded = load_all(tmp_path, ["ft-0", "wide-0"])
    with pytest.raises(
        IngredientMismatch,
        match=r"ingredient 'wide-0' .*: tensor 'net\.\d\.\w+' has shape \[\d+(, \d+)?\], ingredient 'ft-0' has \[\d+(, \d+)?\]",
    ):
        check_compatible(loaded["spec"], loaded["ingredients"])
    _, loaded = load_all(tmp_path, ["ft-0", "short"])
    with pytest.raises(IngredientMismatch, match=r"ingredient 'short' .*: missing tensor 'net.0.bias' and 4 more"):
        check_compatible(loaded["spec"], loaded["ingredients"])


def test_integer_tensors_are_never_averaged_and_must_agree(tmp_path: Path) -> None:
    for i, steps in enumerate([5, 5, 6]):
        save_file({"w": torch.full((3,), float(i)), "steps": torch.tensor([steps])}, str(tmp_path / f"s{i}.safetensors"))
    kitchen = Kitchen(pool(), NullObserver())
    merged = kitchen.merge(parse_spec(digits_spec(["s0", "s1"]), base_dir=tmp_path))
    assert merged["steps"].dtype == torch.int64 and merged["steps"].tolist() == [5]
    assert merged["w"].tolist() == [0.5, 0.5, 0.5]
    with pytest.raises(
        IngredientMismatch, match=r"ingredient 's2' .*: tensor 'steps' \(torch.int64\) differs from ingredient 's0'"
    ):
        kitchen.merge(parse_spec(digits_spec(["s0", "s2"]), base_dir=tmp_path))


def test_the_merge_of_state_dicts_equals_the_hand_average(tmp_path: Path) -> None:
    states = write_ingredients(tmp_path, 3)
    weights = {"ft-0": 0.2, "ft-1": 0.5, "ft-2": 1.3}
    spec = parse_spec(digits_spec(list(states), merge={"weights": weights}), base_dir=tmp_path)
    merged = Kitchen(pool(), NullObserver()).merge(spec)
    expected = hand_average(states, weights)
    for key, tensor in merged.items():
        assert tensor.dtype == torch.float32
        assert (tensor.double() - expected[key]).abs().max() < 1e-6, key


def write_hf_directory(folder: Path, state: dict[str, torch.Tensor], kind: str) -> Path:
    """A Hugging Face-style model directory: config.json plus weights, sharded or not."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "digits-mlp"}')
    names = sorted(state)
    if kind == "single":
        save_file(state, str(folder / "model.safetensors"))
    elif kind == "bin":
        torch.save(state, folder / "pytorch_model.bin")
    else:
        halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
        for shard, keys in halves.items():
            save_file({k: state[k] for k in keys}, str(folder / shard))
        weight_map = {k: shard for shard, keys in halves.items() for k in keys}
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


@pytest.mark.parametrize("kind", ["single", "sharded", "bin"])
def test_hugging_face_model_directories_load_as_ingredients(tmp_path: Path, kind: str) -> None:
    states = write_ingredients(tmp_path, 2)
    write_hf_directory(tmp_path / "hf-model", states["ft-1"], kind)
    document = digits_spec(["ft-0", "hf"])
    document["ingredients"][1]["path"] = "hf-model"
    merged = Kitchen(pool(), NullObserver()).merge(parse_spec(document, base_dir=tmp_path))
    expected = hand_average(states, {"ft-0": 1, "ft-1": 1})
    assert all((merged[k].double() - expected[k]).abs().max() < 1e-6 for k in expected)


def test_broken_model_directories_are_named(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(IngredientMissing, match=r"empty\): directory has no model.safetensors"):
        pool().load(ref(tmp_path / "empty"))
    states = write_ingredients(tmp_path, 1)
    folder = write_hf_directory(tmp_path / "sharded", states["ft-0"], "sharded")
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(IngredientMissing, match=r"shard model-00002-of-00002.safetensors: file not found"):
        pool().load(ref(folder))
    (folder / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(IngredientCorrupt, match=r"model.safetensors.index.json is not a readable shard index"):
        pool().load(ref(folder))
