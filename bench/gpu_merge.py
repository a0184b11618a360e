"""A merge from host memory on a GPU against a copy of the same bytes, side by side in one run.

    python bench/gpu_merge.py [--params 8.0] [--ingredients 4] [--methods linear ties] [--reps 2]

Builds --ingredients fine-tunes of a Llama of about --params billion parameters (Llama-3-8B's
widths, layers to fit; bf16) straight in pinned host memory, as ``host`` placement keeps
ingredients on a GPU server (no files: four 8B fine-tunes and their base would not fit the GPU
machines' 64 GiB disks), plus the base when a method reads it (four 8B fine-tunes and a base
pin about 80 GiB of host memory: the machine needs more than that). Then, alternating:

- "copy": every ingredient tensor copied to the device in the merge's pieces on one stream, as
  many times as the merge reads it (three for TIES and breadcrumbs, whose exact thresholds take
  two sweeps first): what moving the bytes costs, the floor of any merge that reads them;
- "merge": ``mix`` of the soup into a bf16 blend on the device, the next piece's copies on a
  stream of their own (``tureen.core.staging``) while this piece merges.

Prints the seconds and GB/s of each and the merge's throughput as a fraction of the copy's (the
LLM issue's target: 0.7 or more). Push-to-serving from files on a GPU: ``bench/llm_merge.py
--placements host`` on the same machine (its server picks CUDA when there is one). On a CPU
the script runs too (host and device are then one memory: a check of the script, not a figure).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tureen.core.ingredients import Ingredient
from tureen.core.passes import WINDOW
from tureen.core.recipe import mix
from tureen.spec import parse_spec

GiB = 1 << 30
SWEEPS = {"ties": 2, "breadcrumbs": 2, "breadcrumbs_ties": 2}
"""Methods whose exact thresholds take two sweeps over the pieces before the merge's own: they
read every byte three times, and their copy baseline copies it three times too."""


def shapes(params_b: float) -> dict[str, tuple[int, ...]]:
    """Llama-3-8B's tensor shapes with as many layers as fit ``params_b`` billion parameters."""
    hidden, inter, vocab, kv = 4096, 14336, 128256, 1024
    layer = {
        "self_attn.q_proj.weight": (hidden, hidden),
        "self_attn.k_proj.weight": (kv, hidden),
        "self_attn.v_proj.weight": (kv, hidden),
        "self_attn.o_proj.weight": (hidden, hidden),
        "mlp.gate_proj.weight": (inter, hidden),
        "mlp.up_proj.weight": (inter, hidden),
        "mlp.down_proj.weight": (hidden, inter),
        "input_layernorm.weight": (hidden,),
        "post_attention_layernorm.weight": (hidden,),
    }
    per_layer = sum(torch.Size(s).numel() for s in layer.values())
    layers = max(1, round((params_b * 1e9 - 2 * vocab * hidden) / per_layer))
    found = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        found |= {f"model.layers.{i}.{name}": shape for name, shape in layer.items()}
    return found | {"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}


def ingredients(layout: dict[str, tuple[int, ...]], names: list[str], device: torch.device) -> dict[str, Ingredient]:
    """``names``: fine-tunes (the base plus noise), and the base itself when it is among them;
    each in pinned host memory when the device is a GPU. The numbers are made on the device,
    where they come fastest."""
    pinned = device.type == "cuda"
    made: dict[str, dict[str, torch.Tensor]] = {name: {} for name in names}
    generator = torch.Generator(device).manual_seed(0)
    for key, shape in layout.items():
        base = 0.02 * torch.randn(shape, generator=generator, device=device)
        for name in names:
            tensor = base if name == "base" else base + 0.002 * torch.randn(shape, generator=generator, device=device)
            host = torch.empty(shape, dtype=torch.bfloat16, pin_memory=pinned)
            host.copy_(tensor.to(torch.bfloat16))
            made[name][key] = host
    meta = {key: torch.empty(shape, dtype=torch.bfloat16, device="meta") for key, shape in layout.items()}
    nbytes = sum(t.numel() * 2 for t in meta.values())
    return {name: Ingredient(f"<{name} in memory>", "host", device, meta, made[name], nbytes) for name in names}


def copy_seconds(held: list[Ingredient], device: torch.device, passes: int) -> float:
    """Every tensor of ``held`` to the device ``passes`` times in the merge's pieces, one stream,
    then synchronized."""
    piece = WINDOW << 4 if device.type == "cuda" else WINDOW
    landing = torch.empty(piece, dtype=torch.bfloat16, device=device)
    _synchronize(device)
    started = time.perf_counter()
    for ingredient in held * passes:
        for tensor in ingredient.tensors.values():
            flat = tensor.reshape(-1)
            for begin in range(0, flat.numel(), piece):
                part = flat[begin : begin + piece]
                landing[: part.numel()].copy_(part, non_blocking=True)
    _synchronize(device)
    return time.perf_counter() - started


def merge_seconds(document: dict, held: dict[str, Ingredient], device: torch.device) -> float:
    spec = parse_spec(document)
    _synchronize(device)
    started = time.perf_counter()
    blend = mix(spec, held, quiet=True)
    _synchronize(device)
    seconds = time.perf_counter() - started
    del blend
    return seconds


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def soup(names: list[str], method: str) -> dict:
    merge: dict = {"method": method}
    if method != "linear":
        merge |= {"base": "base", "parameters": {"density": 0.5}}
    mixed = [n for n in names if method != "linear" or n != "base"]
    return {
        "apiVersion": "tureen/v1",
        "model": "llama",
        "ingredients": [{"name": n, "path": f"/nonexistent/{n}"} for n in mixed],
        "merge": merge,
        "dtype": "bfloat16",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=8.0, help="billions of parameters per model (default: 8.0)")
    parser.add_argument("--ingredients", type=int, default=4)
    parser.add_argument("--methods", nargs="+", default=["linear", "ties"])
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    names = [f"ft-{i}" for i in range(args.ingredients)]
    names += ["base"] if any(m != "linear" for m in args.methods) else []  # pinned only when a method reads it
    layout = shapes(args.params)
    started = time.perf_counter()
    held = ingredients(layout, names, device)
    model_bytes = next(iter(held.values())).nbytes
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (no GPU: a check of the script)"
    parameters = sum(torch.Size(s).numel() for s in layout.values()) / 1e9
    memory = "pinned host memory" if device.type == "cuda" else "host memory"
    took = time.perf_counter() - started
    print(f"{len(names)} models of {model_bytes / GiB:.1f} GiB ({parameters:.2f}B bf16 parameters), {memory}, {took:.0f} s")
    print(f"device: {where}", flush=True)
    print("| method | bytes read GiB | copy s | copy GB/s | merge s | merge GB/s | merge / copy throughput |")
    print("|---|---|---|---|---|---|---|")
    for method in args.methods:
        document = soup(names, method)
        used = [held[i["name"]] for i in document["ingredients"]]  # the base is one of them where it is read
        passes = 1 + SWEEPS.get(method, 0)
        nbytes = sum(i.nbytes for i in used) * passes
        copies, merges = [], []
        for _ in range(args.reps):
            copies.append(copy_seconds(used, device, passes))
            merges.append(merge_seconds(document, held, device))
        copy, merge = statistics.median(copies), statistics.median(merges)
        print(
            f"| {method} | {nbytes / GiB:.1f} | {copy:.2f} | {nbytes / copy / 1e9:.1f} | {merge:.2f} | "
            f"{nbytes / merge / 1e9:.1f} | {copy / merge:.2f} (target >= 0.7) |",
            flush=True,
        )


if __name__ == "__main__":
    main()
