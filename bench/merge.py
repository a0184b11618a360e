"""Merge speed against the memory: our merge beside a plain torch copy of the same bytes, one run.

    python bench/merge.py [--params 50] [--tensors 50] [--repeat 3] [--device cpu|cuda]

Each row merges N ingredients of about --params million parameters (split into --tensors
tensors, as a model's state dict is) through the same code path the server uses
(``tureen.core.recipe.mix``). "bytes" counts each ingredient read once and the blend written
once (the base too, for task-vector methods); "copy GB/s" is ``dst.copy_(src)`` over the same
number of bytes (read + write), measured right before the row; "ratio" = merge GB/s / copy GB/s.
Times are the best of --repeat runs.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch

from tureen.core.devices import resolve_device
from tureen.core.ingredients import Ingredient
from tureen.core.recipe import mix
from tureen.spec import parse_spec


def best_of(repeat: int, work: Callable[[], Any], device: torch.device) -> float:
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        work()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times)


def copy_rate(nbytes: int, repeat: int, device: torch.device) -> float:
    """GB/s of ``dst.copy_(src)`` moving ``nbytes`` in all (half read, half written)."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    seconds = best_of(repeat, lambda: dst.copy_(src), device)
    return nbytes / seconds / 1e9


def ingredients(count: int, params: int, tensors: int, dtype: torch.dtype, device: torch.device) -> dict[str, Ingredient]:
    per = params // tensors
    made = {}
    for i in range(count + 1):  # the last one serves as the base of task-vector methods
        generator = torch.Generator(device=device).manual_seed(i)
        state = {f"layers.{k}.weight": torch.randn(per, generator=generator, device=device).to(dtype) for k in range(tensors)}
        made[f"m{i}"] = Ingredient(digest=str(i), path=f"m{i}", tensors=state, nbytes=per * tensors * dtype.itemsize)
    return made


def row(method: str, count: int, dtype: torch.dtype, args: argparse.Namespace, device: torch.device) -> None:
    pool = ingredients(count, args.params * 1_000_000, args.tensors, dtype, device)
    names = [f"m{i}" for i in range(count)]
    merge: dict[str, Any] = {"method": method}
    document: dict[str, Any] = {
        "apiVersion": "tureen/v1",
        "model": "bench",
        "ingredients": [{"name": n, "path": n} for n in [*names, f"m{count}"]],
        "dtype": {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype],
    }
    if method == "linear":
        document["ingredients"] = document["ingredients"][:-1]
    else:
        merge.update(base=f"m{count}", parameters={"density": 0.5} if method != "task_arithmetic" else {})
    document["merge"] = merge
    spec = parse_spec(document)
    elements = sum(t.numel() for t in pool["m0"].tensors.values())
    inputs = len(spec.ingredients)
    nbytes = elements * dtype.itemsize * (inputs + 1)
    copy = copy_rate(nbytes, args.repeat, device)
    seconds = best_of(args.repeat, lambda: mix(spec, pool), device)
    rate = nbytes / seconds / 1e9
    label = f"{method} {str(dtype).removeprefix('torch.')}"
    print(
        f"{label:<22}{count:>3}{elements / 1e6:>9.1f}M{seconds * 1e3:>10.1f}"
        f"{nbytes / 1e9:>9.2f}{rate:>10.1f}{copy:>10.1f}{rate / copy:>8.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description="Merge throughput against a same-run torch copy of the same bytes.")
    parser.add_argument("--params", type=int, default=50, help="millions of parameters per ingredient (default 50)")
    parser.add_argument("--tensors", type=int, default=50, help="tensors per ingredient (default 50)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="only linear fp32 at N=2 (a smoke run)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'method':<22}{'N':>3}{'params':>10}{'ms':>10}{'GB':>9}{'GB/s':>10}{'copy GB/s':>10}{'ratio':>8}")
    if args.quick:
        row("linear", 2, torch.float32, args, device)
        return
    for count in (2, 4, 8):
        row("linear", count, torch.float32, args, device)
    for dtype in (torch.bfloat16, torch.float16):
        row("linear", 4, dtype, args, device)
    for method in ("task_arithmetic", "ties", "dare_ties"):
        row(method, 4, torch.float32, args, device)


if __name__ == "__main__":
    main()
