"""LLM soups at real size: push-to-serving and merge times per placement, beside mergekit, one run.

    python bench/llm_merge.py [--params 1.0] [--ingredients 4] [--methods linear ties]
                              [--placements device host disk] [--mergekit DIR/bin] [--work DIR]

Writes (once, cached in --work) a Llama-architecture base of about --params billion parameters,
bf16, as a sharded Hugging Face directory (``model.safetensors.index.json``, 1 GB shards), and
--ingredients fine-tunes of it (the base plus noise). Then, for each method and placement:

- "push s": a running ``tureen serve`` (``--ingredient-placement P``) takes ``PushSpec`` of the
  soup (``architecture: {huggingface: base}``) until the new blend serves: load, check, merge
  into the blend, build the module on the meta device, warm up;
- "extra RSS": the server's peak resident memory during the push, beyond what it held before
  and beyond the blend itself (sampled every 20 ms from /proc);
- "merge s": ``Kitchen.merge`` writing the output as it goes (``SafetensorsWriter``: what
  ``tureen merge`` runs), in this process after its imports;

and for mergekit (from the venv at --mergekit, when it has ``mergekit-yaml``), on the same files
and config: "mergekit-yaml s" end to end (``--lazy-unpickle``), and "mergekit merge s", its
``run_merge`` after its imports. The ratios the issue targets are printed last. The page cache
is warm for every run after the first read of the files (this machine has no way to drop it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import yaml

HERE = Path(__file__).resolve().parent
SHARD_BYTES = 1 << 30


def llama_config(params_b: float) -> dict:
    """A Llama of about ``params_b`` billion parameters: TinyLlama's widths, layers to fit."""
    hidden, inter, vocab, heads, kv = 2048, 5632, 32000, 32, 4
    per_layer = 2 * hidden * hidden + 2 * hidden * (hidden * kv // heads) + 3 * hidden * inter + 2 * hidden
    layers = max(1, round((params_b * 1e9 - 2 * vocab * hidden) / per_layer))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "vocab_size": vocab,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }


def write_model(folder: Path, shapes: dict[str, tuple[int, ...]], seed: int, base: Path | None) -> None:
    """A sharded bf16 checkpoint: ``base``'s tensors plus noise, or fresh ones (norms at 1)."""
    from tureen.core.checkpoints import SafetensorsFile, write_safetensors

    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    base_files = {}
    if base is not None:
        index = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
        base_files = {n: SafetensorsFile.open(base / shard, "base") for n, shard in index.items()}
    weight_map, shard, size, number = {}, {}, 0, 1

    def flush() -> None:
        nonlocal shard, size, number
        name = f"model-{number:05d}.safetensors"
        write_safetensors(folder / name, shard)
        weight_map.update(dict.fromkeys(shard, name))
        shard, size, number = {}, 0, number + 1

    for name, shape in shapes.items():
        if base is not None:
            tensor = base_files[name].read(name)
            tensor += (0.002 * torch.randn(shape, generator=generator)).to(torch.bfloat16)
        elif name.endswith("norm.weight"):
            tensor = torch.ones(shape, dtype=torch.bfloat16)
        else:
            tensor = (0.02 * torch.randn(shape, generator=generator)).to(torch.bfloat16)
        shard[name] = tensor
        size += tensor.numel() * 2
        if size >= SHARD_BYTES:
            flush()
    if shard:
        flush()
    total = sum(int(torch.Size(s).numel()) * 2 for s in shapes.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def prepare(work: Path, params_b: float, count: int) -> tuple[Path, list[str], int]:
    """The base and fine-tune folders (written unless already there), names, bytes per model."""
    config = llama_config(params_b)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in _llama(config).state_dict().items()}
    names = ["base"] + [f"ft-{i}" for i in range(count)]
    stamp = work / "models.json"
    if not stamp.exists() or json.loads(stamp.read_text()) != {"config": config, "names": names}:
        for name in names:
            shutil.rmtree(work / name, ignore_errors=True)
        for seed, name in enumerate(names):
            started = time.perf_counter()
            write_model(work / name, shapes, seed, None if name == "base" else work / "base")
            (work / name / "config.json").write_text(json.dumps(config))
            print(f"wrote {name} in {time.perf_counter() - started:.1f} s", flush=True)
        stamp.write_text(json.dumps({"config": config, "names": names}))
    nbytes = sum(int(torch.Size(s).numel()) * 2 for s in shapes.values())
    return work, names, nbytes


def tureen_spec(work: Path, names: list[str], method: str) -> dict:
    merge: dict = {"method": method}
    if method != "linear":
        merge |= {"base": "base", "parameters": {"density": 0.5}}
    ingredients = [{"name": n, "path": str(work / n)} for n in names if method != "linear" or n != "base"]
    return {
        "apiVersion": "tureen/v1",
        "model": "llama",
        "architecture": {"huggingface": str(work / "base"), "task": "causal-lm"},
        "ingredients": ingredients,
        "merge": merge,
        "dtype": "bfloat16",
    }


def mergekit_config(work: Path, names: list[str], method: str) -> dict:
    models = [{"model": str(work / n)} for n in names if n != "base"]
    if method == "linear":
        return {"merge_method": "linear", "models": [{**m, "parameters": {"weight": 1.0}} for m in models], "dtype": "bfloat16"}
    return {
        "merge_method": method,
        "base_model": str(work / "base"),
        "models": [{**m, "parameters": {"weight": 1.0, "density": 0.5}} for m in models],
        "parameters": {"normalize": True},
        "dtype": "bfloat16",
    }


class RssPeak:
    """The peak VmRSS of a process, sampled on a thread while a block runs."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0, threading.Event()

    def rss(self) -> int:
        with open(f"/proc/{self.pid}/status") as status:
            return int(status.read().split("VmRSS:")[1].split()[0]) * 1024

    def __enter__(self) -> RssPeak:
        self.before = self.rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.rss())

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def push_to_serving(
    work: Path, names: list[str], methods: list[str], placement: str, blend_bytes: int
) -> dict[str, tuple[float, float]]:
    """method -> (push-to-serving seconds, extra peak RSS bytes) on a fresh server at ``placement``."""
    from tureen_client import SoupClient

    sys.path.insert(0, str(HERE.parent / "tests"))
    from helpers import serve_process  # the test suite's way of starting a server

    tiny = work / "tiny"
    tiny_spec = tiny / "tiny.yaml"
    if not tiny_spec.exists():  # a tiny Llama soup served from the start: transformers is imported
        tiny.mkdir(exist_ok=True)  # and the code paths warm before the push, as on a running server
        config = {**llama_config(0.0), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "vocab_size": 128}
        config |= {"num_attention_heads": 4, "num_key_value_heads": 2}
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in _llama(config).state_dict().items()}
        write_model(tiny / "m", shapes, 0, None)
        (tiny / "m" / "config.json").write_text(json.dumps(config))
        document = {
            "apiVersion": "tureen/v1",
            "model": "tiny",
            "architecture": {"huggingface": str(tiny / "m")},
            "ingredients": [{"name": "m", "path": str(tiny / "m")}],
        }
        tiny_spec.write_text(yaml.safe_dump(document))
    args = ["--spec", str(tiny_spec), "--ingredient-placement", placement, "--ingredient-root", str(work)]
    results = {}
    for method in methods:  # a server each: nothing of the previous blend stays in the measure
        with serve_process(args, timeout=120) as (process, port, _, _), SoupClient(f"127.0.0.1:{port}") as soups:
            with RssPeak(process.pid) as memory:
                started = time.perf_counter()
                info = soups.push(tureen_spec(work, names, method), wait=True)
                seconds = time.perf_counter() - started
            assert info["state"] == "active", info
            results[method] = (seconds, memory.peak - memory.before - blend_bytes)
            print(f"  push {method} {placement}: {seconds:.1f} s", flush=True)
    return results


def _llama(config: dict) -> torch.nn.Module:
    import transformers

    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))


def tureen_merge(work: Path, names: list[str], method: str, placement: str, out: Path) -> float:
    """``Kitchen.merge`` writing the output as tensors are final (``SafetensorsWriter``), after
    imports: what ``tureen merge`` runs."""
    from tureen.core.ingredients import IngredientPool
    from tureen.core.kitchen import Kitchen
    from tureen.core.observer import NullObserver
    from tureen.core.writer import SafetensorsWriter
    from tureen.spec import parse_spec

    spec = parse_spec({k: v for k, v in tureen_spec(work, names, method).items() if k != "architecture"})
    started = time.perf_counter()
    writer = SafetensorsWriter(out)
    Kitchen(IngredientPool(torch.device("cpu"), NullObserver(), placement), NullObserver()).merge(spec, sink=writer)
    writer.close()
    return time.perf_counter() - started


MERGEKIT_TIMED = """
import sys, time, yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import MergeOptions, run_merge
config = MergeConfiguration.model_validate(yaml.safe_load(open(sys.argv[1])))
started = time.perf_counter()
run_merge(config, sys.argv[2], options=MergeOptions(lazy_unpickle=True, copy_tokenizer=False, out_shard_size=1 << 30))
print(time.perf_counter() - started)
"""


def mergekit_runs(bindir: Path, work: Path, names: list[str], method: str) -> tuple[float, float]:
    """(mergekit-yaml wall seconds end to end, run_merge seconds after imports)."""
    config = work / f"mergekit-{method}.yml"
    config.write_text(yaml.safe_dump(mergekit_config(work, names, method)))
    out = Path(tempfile.mkdtemp(dir=work, prefix="mk-out-"))
    try:
        command = [str(bindir / "mergekit-yaml"), str(config), str(out), "--lazy-unpickle", "--out-shard-size", "1B"]
        started = time.perf_counter()
        subprocess.run([*command, "--no-copy-tokenizer"], check=True, capture_output=True)
        wall = time.perf_counter() - started
        shutil.rmtree(out)
        done = subprocess.run(
            [str(bindir / "python"), "-c", MERGEKIT_TIMED, str(config), str(out)], check=True, capture_output=True, text=True
        )
        return wall, float(done.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=1.0, help="billions of parameters per model (default: 1.0)")
    parser.add_argument("--ingredients", type=int, default=4)
    parser.add_argument("--methods", nargs="+", default=["linear", "ties"])
    parser.add_argument("--placements", nargs="+", default=["device", "host", "disk"])
    parser.add_argument("--mergekit", type=Path, default=Path(os.environ.get("MERGEKIT_BIN", "/tmp/mk/bin")))
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "tureen-llm-merge")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    work, names, nbytes = prepare(args.work, args.params, args.ingredients)
    print(f"{len(names)} models of {nbytes / 1e9:.2f} GB (bf16) in {work}; torch threads {torch.get_num_threads()}", flush=True)
    rows: dict[tuple[str, str], dict[str, float]] = {}
    for placement in args.placements:
        for method, (push, extra) in push_to_serving(work, names, args.methods, placement, nbytes).items():
            rows[(method, placement)] = {"push": push, "extra": extra}
        for method in args.methods:
            seconds = tureen_merge(work, names, method, placement, work / "tureen-out.safetensors")
            rows[(method, placement)]["merge"] = seconds
            print(f"  merge {method} {placement}: {seconds:.1f} s", flush=True)
    mergekit = {}
    if (args.mergekit / "mergekit-yaml").exists():
        for method in args.methods:
            mergekit[method] = mergekit_runs(args.mergekit, work, names, method)
            print(f"  mergekit {method}: {mergekit[method][0]:.1f} s end to end, {mergekit[method][1]:.1f} s merging", flush=True)
    report(rows, mergekit, nbytes, args)


def report(rows: dict, mergekit: dict, nbytes: int, args: argparse.Namespace) -> None:
    print()
    print("| method | placement | push-to-serving s | extra peak RSS MB | tureen merge s | mergekit-yaml s | mergekit merge s |")
    print("|---|---|---|---|---|---|---|")
    for (method, placement), row in rows.items():
        kit = mergekit.get(method, (float("nan"), float("nan")))
        cells = [f"{row['push']:.1f}", f"{row['extra'] / 1e6:.0f}", f"{row['merge']:.1f}", f"{kit[0]:.1f}", f"{kit[1]:.1f}"]
        print(f"| {method} | {placement} | " + " | ".join(cells) + " |")
    print()
    targets = {"linear": 0.25, "ties": 0.5}
    for (method, placement), row in rows.items():
        kit = mergekit.get(method)
        if kit is None:
            continue
        target = targets.get(method, 1.0)
        print(f"{method} {placement}: push-to-serving / mergekit-yaml = {row['push'] / kit[0]:.2f} (target <= {target})")
        print(f"{method} {placement}: tureen merge / mergekit merge = {row['merge'] / kit[1]:.2f} (target <= 0.5)")
    ingredient = nbytes
    for method in args.methods:
        if (method, "disk") in rows:
            extra = rows[(method, "disk")]["extra"] / ingredient
            print(f"{method} disk: extra peak RSS / one ingredient = {extra:.3f} (target <= 0.10)")
        if (method, "disk") in rows and (method, "host") in rows:
            ratio = rows[(method, "disk")]["merge"] / rows[(method, "host")]["merge"]
            print(f"{method}: merge from disk / from host = {ratio:.2f} (target <= 1.5, warm page cache)")


if __name__ == "__main__":
    main()
