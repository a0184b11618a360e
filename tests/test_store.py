"""The spec store on its own: atomic files, version numbers claimed once, across processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tureen.core.store import Pointer, SpecStore
from tureen.errors import ModelNotFound, StoreError, VersionConflict
from tureen.spec import parse_spec

DOCUMENT = {"apiVersion": "tureen/v1", "model": "m", "ingredients": [{"name": "a", "path": "/a.safetensors"}]}

PUSHER = """
import sys
from tureen.core.store import SpecStore
from tureen.spec import parse_spec
store = SpecStore(sys.argv[1])
spec = parse_spec({"apiVersion": "tureen/v1", "model": "m", "ingredients": [{"name": "a", "path": "/a.safetensors"}]})
print(" ".join(str(store.push(spec, pushed_by=sys.argv[2]).version) for _ in range(int(sys.argv[3]))))
"""


def test_concurrent_pushes_from_several_processes_never_share_or_lose_a_number(tmp_path: Path) -> None:
    pushers = [
        subprocess.Popen([sys.executable, "-c", PUSHER, str(tmp_path), f"replica-{i}", "25"], stdout=subprocess.PIPE, text=True)
        for i in range(4)
    ]
    claimed = []
    for process in pushers:
        out, _ = process.communicate(timeout=120)
        assert process.returncode == 0
        claimed += [int(v) for v in out.split()]
    assert sorted(claimed) == list(range(1, 101))
    store = SpecStore(tmp_path)
    stored = store.versions("m")
    assert [v.version for v in stored] == list(range(1, 101))
    assert {v.pushed_by for v in stored} == {f"replica-{i}" for i in range(4)}
    assert not list((tmp_path / "models" / "m" / "versions").glob(".*.tmp"))  # no temporary file left behind


def test_states_pointer_and_deletes_round_trip(tmp_path: Path) -> None:
    store = SpecStore(tmp_path)
    spec = parse_spec(DOCUMENT)
    first, second = store.push(spec, "ops"), store.push(spec, "ops")
    store.record(second, "failed", reason="ingredient 'a': file not found")
    assert store.get("m", 2).state == "failed" and "not found" in store.get("m", 2).reason
    assert store.get("m", 1).spec == spec
    store.point("m", Pointer(1, (), "ops", 1.0))
    assert store.pointer("m") == Pointer(1, (), "ops", 1.0)
    with pytest.raises(VersionConflict, match="version 1 is active"):
        store.delete("m", 1)
    store.delete("m", second.version)
    assert store.version_numbers("m") == [first.version]
    assert store.push(spec, "ops").version == 3  # a deleted version's number is never given again
    with pytest.raises(ModelNotFound, match="no version 7"):
        store.get("m", 7)
    (tmp_path / "models" / "m" / "active.json").write_text("{torn")
    with pytest.raises(StoreError, match="unreadable"):
        store.pointer("m")
    assert json.loads((tmp_path / "models" / "m" / "versions" / "00000001.json").read_text())["pushed_by"] == "ops"


def test_a_store_path_that_is_a_file_is_refused_naming_it(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(StoreError, match="not a writable directory"):
        SpecStore(tmp_path / "file")
