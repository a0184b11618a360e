"""Where ingredients live between merges (device, host, disk), and merges that stream from there."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import load_file, save_file
from tureen_client import SoupClient

from helpers import digits_spec, llama_config, running_app, sample, scrape, write_ingredients, write_spec
from tureen.core.ingredients import PLACEMENTS, IngredientPool
from tureen.core.kitchen import Kitchen
from tureen.core.observer import NullObserver
from tureen.core.recipe import mix
from tureen.errors import IngredientChanged, IngredientCorrupt
from tureen.spec import SoupSpec, load_spec, parse_spec

transformers = pytest.importorskip("transformers", reason="the tureen[hf] extra is not installed")


def llama_soup(folder: Path, count: int = 4) -> dict:
    """``count`` fine-tunes of one tiny Llama, bf16, each a sharded Hugging Face directory."""
    config = llama_config(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, torch_dtype="bfloat16"
    )
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    base.save_pretrained(folder / "base", max_shard_size="20KB")
    for i in range(count):
        tuned = transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
        noise = torch.Generator().manual_seed(10 + i)
        tuned.load_state_dict(
            {k: v + 0.05 * torch.randn(v.shape, generator=noise).to(v.dtype) for k, v in base.state_dict().items()}
        )
        tuned.save_pretrained(folder / f"ft-{i}", max_shard_size="20KB")
    return {
        "apiVersion": "tureen/v1",
        "model": "llama",
        "architecture": {"huggingface": "base", "task": "causal-lm"},
        "ingredients": [{"name": "base", "path": "base"}] + [{"name": f"ft-{i}", "path": f"ft-{i}"} for i in range(count)],
        "dtype": "bfloat16",
    }


@pytest.mark.parametrize("method", ["linear", "ties", "task_arithmetic"])
def test_every_placement_merges_a_sharded_llama_soup_to_the_same_bits(tmp_path: Path, method: str) -> None:
    document = llama_soup(tmp_path)
    assert json.loads((tmp_path / "ft-0" / "model.safetensors.index.json").read_text())["weight_map"]  # sharded
    merge = {"method": method} if method == "linear" else {"method": method, "base": "base"}
    if method == "ties":
        merge["parameters"] = {"density": 0.4}
    blends = {}
    for placement in PLACEMENTS:
        spec = parse_spec({**document, "merge": merge, "placement": placement}, base_dir=tmp_path)
        pool = IngredientPool(torch.device("cpu"), NullObserver())
        blends[placement] = Kitchen(pool, NullObserver()).merge(spec)
        held = pool.bytes_by_placement()
        assert held[placement] > 0 and all(held[p] == 0 for p in PLACEMENTS if p != placement)
    for placement in ("host", "disk"):
        assert blends[placement].keys() == blends["device"].keys()
        for key, tensor in blends["device"].items():
            assert torch.equal(blends[placement][key], tensor), f"{placement}: {key}"


def test_disk_ingredients_are_read_during_the_merge_and_never_held(tmp_path: Path) -> None:
    names = [f"ft-{i}" for i in range(3)]
    write_ingredients(tmp_path, 3)
    spec = parse_spec({**digits_spec(names), "placement": "disk"}, base_dir=tmp_path)
    pool = IngredientPool(torch.device("cpu"), NullObserver())
    blend = Kitchen(pool, NullObserver()).merge(spec)
    assert pool.nbytes == 0 and pool.bytes_by_placement()["disk"] > 0
    states = [load_file(str(tmp_path / f"{n}.safetensors")) for n in names]
    for key, tensor in blend.items():
        torch.testing.assert_close(tensor, sum(s[key] for s in states) / 3, rtol=1e-6, atol=1e-7)


def test_a_file_that_changes_while_in_use_fails_the_merge_naming_it(tmp_path: Path) -> None:
    states = write_ingredients(tmp_path, 2)
    spec = parse_spec({**digits_spec(["ft-0", "ft-1"]), "placement": "disk"}, base_dir=tmp_path)
    pool = IngredientPool(torch.device("cpu"), NullObserver())
    loaded = pool.load_all(spec)
    save_file({k: v + 1 for k, v in states["ft-1"].items()}, str(tmp_path / "ft-1.safetensors"))
    with pytest.raises(IngredientChanged, match=r"ingredient 'ft-1' \(.*ft-1.safetensors\): the file changed on disk"):
        mix(spec, loaded)
    (tmp_path / "ft-1.safetensors").write_bytes(b"")  # shrunk under a read: an error, not a crash (no mapping)
    with pytest.raises(IngredientChanged):
        loaded["ft-1"].tensors["net.0.weight"]
    save_file({k: v + 2 for k, v in states["ft-1"].items()}, str(tmp_path / "ft-1.safetensors"))
    again = pool.load_all(spec)  # the next build reads the file anew
    assert torch.equal(again["ft-1"].tensors["net.0.weight"], states["ft-1"]["net.0.weight"] + 2)
    expected = (states["ft-0"]["net.0.bias"] + states["ft-1"]["net.0.bias"] + 2) / 2
    torch.testing.assert_close(mix(spec, again)["net.0.bias"], expected)


def test_shard_index_problems_name_the_file(tmp_path: Path) -> None:
    document = llama_soup(tmp_path, count=1)
    index_path = tmp_path / "ft-0" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    spec = parse_spec({**document, "placement": "disk"}, base_dir=tmp_path)
    index["weight_map"]["model.ghost.weight"] = next(iter(index["weight_map"].values()))
    index_path.write_text(json.dumps(index))
    pool = IngredientPool(torch.device("cpu"), NullObserver())
    with pytest.raises(IngredientCorrupt, match=r"ingredient 'ft-0' .*: the shard index puts tensor 'model.ghost.weight' in"):
        pool.load_all(spec)
    del index["weight_map"]["model.ghost.weight"]
    index_path.write_text(json.dumps(index))
    shard = tmp_path / "ft-0" / sorted(set(index["weight_map"].values()))[-1]
    shard.unlink()
    with pytest.raises(Exception, match=rf"ingredient 'ft-0' .* shard {shard.name}: file not found"):
        pool.load_all(spec)


RSS_SCRIPT = """
import sys, torch
from tureen.core.ingredients import PLACEMENTS, IngredientPool
from tureen.core.kitchen import Kitchen
from tureen.core.observer import NullObserver
from tureen.spec import load_spec
def merge(path):
    pool = IngredientPool(torch.device("cpu"), NullObserver(), sys.argv[2])
    return Kitchen(pool, NullObserver()).merge(load_spec(path))
def kib(field):  # from /proc: getrusage's ru_maxrss starts at the forking parent's peak
    with open("/proc/self/status") as status:
        return int(status.read().split(field + ":")[1].split()[0])
merge(sys.argv[3])  # everything a merge imports is imported before the measure starts
before = kib("VmRSS")
blend = merge(sys.argv[1])
print((kib("VmHWM") - before) * 1024, sum(t.numel() * t.element_size() for t in blend.values()))
"""


@pytest.mark.parametrize(
    ("method", "parameters"),
    [("ties", {"density": 0.3}), ("dare_ties", {"density": 0.5}), ("breadcrumbs", {"density": 0.6, "gamma": 0.05})],
)
def test_a_sparsified_merge_streams_from_disk_to_the_same_bits(tmp_path: Path, method: str, parameters: dict) -> None:
    # Tensors of 1.5 WINDOW: thresholds come from two sweeps over the pieces, masks by position.
    for i, name in enumerate(["base", "ft-0", "ft-1", "ft-2"]):
        noise = torch.Generator().manual_seed(i)
        save_file(
            {"layers.0.w": torch.randn(1536, 1024, generator=noise), "layers.1.b": torch.randn(7, generator=noise)},
            str(tmp_path / f"{name}.safetensors"),
        )
    document = {
        "apiVersion": "tureen/v1",
        "model": "m",
        "ingredients": [{"name": n, "path": f"{n}.safetensors"} for n in ["base", "ft-0", "ft-1", "ft-2"]],
        "merge": {"method": method, "base": "base", "parameters": parameters},
    }
    blends = {}
    for placement in ("device", "disk"):
        spec = parse_spec({**document, "placement": placement}, base_dir=tmp_path)
        blends[placement] = Kitchen(IngredientPool(torch.device("cpu"), NullObserver()), NullObserver()).merge(spec)
    for key, tensor in blends["device"].items():
        assert torch.equal(blends["disk"][key], tensor), key


@pytest.mark.parametrize("method", ["linear", "ties"])
def test_a_merge_from_disk_holds_a_few_pieces_not_the_ingredients(tmp_path: Path, method: str) -> None:
    # Four 48 MiB ingredients (a 200 MB soup): held on the device they add 4 x 48 MiB to the
    # peak; read from disk, only the blend and one piece (WINDOW elements) per ingredient
    # (TIES: the same, for each of its three sweeps).
    names = [f"ft-{i}" for i in range(4)]
    for i, name in enumerate(names):
        noise = torch.Generator().manual_seed(i)
        state = {f"layers.{k}.w": torch.randn(1536, 2048, generator=noise) for k in range(4)}
        save_file(state, str(tmp_path / f"{name}.safetensors"))
        save_file({"layers.0.w": torch.randn(8, 8, generator=noise)}, str(tmp_path / f"tiny-{i}.safetensors"))
    ingredient = 4 * 1536 * 2048 * 4
    specs = [
        write_spec(
            tmp_path,
            {
                "apiVersion": "tureen/v1",
                "model": "m",
                "ingredients": [{"name": n, "path": f"{prefix}{i}.safetensors"} for i, n in enumerate(names)],
                "merge": {"method": "linear"} if method == "linear" else {"method": method, "base": "ft-0"},
            },
            f"{prefix}.yaml",
        )
        for prefix in ("ft-", "tiny-")
    ]
    growth = {}
    for placement in ("device", "disk"):
        command = [sys.executable, "-c", RSS_SCRIPT, str(specs[0]), placement, str(specs[1])]
        grown, blend = (int(x) for x in subprocess.run(command, capture_output=True, text=True, check=True).stdout.split())
        growth[placement] = grown - blend
    assert growth["device"] > 3 * ingredient  # the measure sees ingredients that are held
    # A piece per ingredient (4 x 4 MiB) and slack; TIES also the temporaries of its eager
    # chunks (about a dozen of 2^18 float32, ~12 MiB): 16 and 39-43 MiB measured.
    limit = (32 if method == "linear" else 56) << 20
    assert growth["disk"] < limit, f"{growth['disk'] / 2**20:.1f} MiB beyond the blend"


def test_the_server_reports_placement_in_status_and_metrics(tmp_path: Path) -> None:
    write_ingredients(tmp_path, 2)
    spec = load_spec(write_spec(tmp_path, {**digits_spec(["ft-0", "ft-1"]), "placement": "disk"}))
    with running_app([spec], ingredient_placement="host") as app:
        with SoupClient(f"127.0.0.1:{app.grpc_port}") as soups:
            status = soups.status()
            assert status["models"][0]["placement"] == "disk"
            on_disk = int(status["ingredient_bytes_by_placement"]["disk"])
            files = [load_file(str(tmp_path / f"ft-{i}.safetensors")) for i in range(2)]
            assert on_disk == sum(t.numel() * t.element_size() for state in files for t in state.values())
            assert int(status["ingredient_bytes"]) == 0
            # A spec without a placement takes the server's (--ingredient-placement host here).
            pushed = soups.push(
                write_spec(tmp_path, digits_spec(["ft-0", "ft-1"], merge={"weights": {"ft-0": 2, "ft-1": 1}}), "b.yaml"),
                wait=True,
            )
            assert pushed["state"] in ("active", "ready")
            assert soups.status()["models"][0]["placement"] == "host"
        metrics = scrape(app)
        assert sample(metrics, "tureen_ingredient_memory_bytes", placement="disk", device="disk") == on_disk
        assert sample(metrics, "tureen_ingredient_memory_bytes", placement="host", device="cpu") == on_disk


def test_grpc_maps_a_changed_file_to_aborted() -> None:
    from tureen.transport.grpc.status import status_of
    from tureen.transport.http.status import STATUS_OF

    assert status_of(IngredientChanged("x")) == grpc.StatusCode.ABORTED
    assert STATUS_OF[IngredientChanged] == 409


def test_a_build_reports_bytes_and_rates_while_loading_and_merging(tmp_path: Path) -> None:
    write_ingredients(tmp_path, 3)
    spec = parse_spec({**digits_spec([f"ft-{i}" for i in range(3)]), "placement": "disk"}, base_dir=tmp_path)
    heard: list[tuple[str, float]] = []
    Kitchen(IngredientPool(torch.device("cpu"), NullObserver()), NullObserver()).build(spec, 1, lambda s, f: heard.append((s, f)))
    loading = [s for s, _ in heard if s.startswith("loading ingredient 3/3")]
    assert loading and re.search(r"\(disk\), [\d,]+ MB so far at [\d,]+ MB/s", loading[0])
    merging = [(s, f) for s, f in heard if s.startswith("merging: ")]
    assert merging and re.fullmatch(r"merging: [\d,]+/[\d,]+ MB read at [\d,]+ MB/s", merging[-1][0])
    assert 0.6 < merging[-1][1] <= 0.9 and [f for _, f in heard] == sorted(f for _, f in heard)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the copy stream overlaps only there)")
@pytest.mark.parametrize("method", ["linear", "ties"])
def test_on_a_gpu_host_and_disk_pieces_merge_to_the_bits_of_device_ones_within_a_few_pieces(tmp_path: Path, method: str) -> None:
    # A tensor of 6 GPU pieces (2^24 float32 elements, 64 MiB) per ingredient: pieces are copied
    # ahead on the copy stream while earlier ones merge, two at most per ingredient read (4, and
    # the base for TIES) where the whole tensors would take 4 x 384 MiB; a NaN in the last piece
    # must still be found.
    names = ["base", "ft-0", "ft-1", "ft-2"]
    for i, name in enumerate(names):
        noise = torch.Generator().manual_seed(i)
        state = {"w": torch.randn(6 << 24, generator=noise), "b": torch.randn(7, generator=noise)}
        save_file(state, str(tmp_path / f"{name}.safetensors"))
    document = {
        "apiVersion": "tureen/v1",
        "model": "m",
        "ingredients": [{"name": n, "path": f"{n}.safetensors"} for n in names],
        "merge": {"method": "linear"}
        if method == "linear"
        else {"method": "ties", "base": "base", "parameters": {"density": 0.3}},
    }
    device = torch.device("cuda")
    blends, peaks = {}, {}
    for placement in PLACEMENTS:
        pool = IngredientPool(device, NullObserver())
        loaded = pool.load_all(parse_spec({**document, "placement": placement}, base_dir=tmp_path))
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        blends[placement] = mix(parse_spec({**document, "placement": placement}, base_dir=tmp_path), loaded)
        torch.cuda.synchronize()
        peaks[placement] = torch.cuda.max_memory_allocated() - before
    blend_bytes = sum(t.numel() * t.element_size() for t in blends["device"].values())
    for placement in ("host", "disk"):
        for key, tensor in blends["device"].items():
            assert torch.equal(blends[placement][key], tensor), f"{placement}: {key}"
        # Two pieces per tensor read (5 x 2 x 64 MiB) and the method's chunks, not 4 x 384 MiB.
        assert peaks[placement] - blend_bytes < (5 * 2 * 64 + 128) << 20, f"{placement}: {peaks[placement] / 2**20:.0f} MiB"
    if method == "linear":
        assert copies_overlap_math(parse_spec({**document, "placement": "host"}, base_dir=tmp_path), device, tmp_path)
    broken = load_file(str(tmp_path / "ft-1.safetensors"))
    broken["w"][-1] = float("nan")
    save_file(broken, str(tmp_path / "ft-1.safetensors"))
    spec = parse_spec({**document, "merge": {"method": "linear"}, "placement": "host"}, base_dir=tmp_path)
    with pytest.raises(IngredientCorrupt, match=r"ingredient 'ft-1' .*tensor 'w' holds 1 NaN"):
        mix(spec, IngredientPool(device, NullObserver()).load_all(spec))


def copies_overlap_math(spec: SoupSpec, device: torch.device, folder: Path) -> bool:
    """Whether a merge of ``spec``'s ingredients (host placement) copies on a stream of its own,
    with a copy running while a kernel of the merge does, in the profiler's trace."""
    loaded = IngredientPool(device, NullObserver()).load_all(spec)
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as profiler:
        mix(spec, loaded)
        torch.cuda.synchronize()
    trace = folder / "trace.json"
    profiler.export_chrome_trace(str(trace))
    events = [e for e in json.loads(trace.read_text())["traceEvents"] if e.get("ph") == "X"]
    copies = [e for e in events if e.get("cat") == "gpu_memcpy" and "HtoD" in e.get("name", "")]
    kernels = [e for e in events if e.get("cat") == "kernel"]
    assert copies and kernels, f"no host-to-device copies ({len(copies)}) or kernels ({len(kernels)}) in the trace"
    merging = {k["args"]["stream"] for k in kernels}
    apart = [c for c in copies if c["args"]["stream"] not in merging]  # a few numbers may go on the merge's own
    assert apart, "every copy ran on a stream of the merge's kernels"
    return any(c["ts"] < k["ts"] + k["dur"] and k["ts"] < c["ts"] + c["dur"] for c in apart for k in kernels)
