"""Merge speed against the memory: our merge beside a plain torch copy of the same bytes, one run.

    python bench/merge.py [--params 50] [--tensors 50] [--repeat 5] [--device cpu|cuda] [--kernels eager compiled]

Each row merges N ingredients of about --params million parameters (split into --tensors
tensors, as a model's state dict is, and laid out in memory as the ingredient pool lays out
a loaded checkpoint) through the code path the server uses (``tureen.core.recipe.mix``), with
the eager or the compiled kernels (``tureen.merge.kernels``).

- "bytes" counts each ingredient read once and the blend written once (the base too, for
  task-vector methods);
- "copy" is the GB/s of ``dst.copy_(src)`` into an allocated ``dst`` over the same number of
  bytes (read + write), timed alternately with the warm merge;
- "warm" merges into the blend of the previous merge, as a copy writes into its ``dst`` (a
  server re-merging into a retired version's memory); "ratio" = warm GB/s / copy GB/s;
- "cold" merges into fresh memory, as the first blend of a process does, first-touch page
  faults included;
- "compile s" is the first call's extra time when the kernels are compiled (once per process
  and kind of merge), not included in the other columns;
- "extra MB" is the peak growth of the process's resident memory during a cold merge, next to
  the blend's own size.

Times are the best of --repeat runs.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from tureen.core.devices import resolve_device
from tureen.core.ingredients import Ingredient
from tureen.core.memory import carve
from tureen.core.recipe import mix
from tureen.spec import SoupSpec, parse_spec

DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def timed(work: Callable[[], Any], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    work()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def best_of(repeat: int, work: Callable[[], Any], device: torch.device) -> float:
    return min(timed(work, device) for _ in range(repeat))


def copier(nbytes: int, device: torch.device) -> Callable[[], Any]:
    """``dst.copy_(src)`` moving ``nbytes`` in all (half read, half written), both allocated."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src).fill_(0)
    return lambda: dst.copy_(src)


class PeakResident:
    """The peak resident set size of this process while in the block, sampled every millisecond."""

    def __init__(self) -> None:
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = self.start = self.now()
        self._stop = threading.Event()

    def now(self) -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * self.page

    def _watch(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, self.now())

    def __enter__(self) -> PeakResident:
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


def ingredients(count: int, params: int, tensors: int, dtype: torch.dtype, device: torch.device) -> dict[str, Ingredient]:
    """Random ingredients laid out in memory as ``IngredientPool`` lays out a loaded checkpoint."""
    per = params // tensors
    made = {}
    for i in range(count + 1):  # the last one serves as the base of task-vector methods
        generator = torch.Generator(device=device).manual_seed(i)
        state = carve(((f"layers.{k:03d}.weight", torch.Size([per]), dtype) for k in range(tensors)), device)
        for tensor in state.values():
            tensor.copy_(torch.randn(per, generator=generator, device=device))
        made[f"m{i}"] = Ingredient.held(f"m{i}", state)
    return made


def bench_spec(method: str, count: int, dtype: torch.dtype) -> SoupSpec:
    names = [f"m{i}" for i in range(count + 1)]
    merge: dict[str, Any] = {"method": method}
    if method == "linear":
        names = names[:-1]
    else:
        merge.update(base=names[-1], parameters={"density": 0.5} if method != "task_arithmetic" else {})
    document = {
        "apiVersion": "tureen/v1",
        "model": "bench",
        "ingredients": [{"name": n, "path": n} for n in names],
        "dtype": DTYPES[dtype],
        "merge": merge,
    }
    return parse_spec(document)


def row(method: str, count: int, dtype: torch.dtype, kernels: str, args: argparse.Namespace, device: torch.device) -> None:
    pool = ingredients(count, args.params * 1_000_000, args.tensors, dtype, device)
    spec = bench_spec(method, count, dtype)
    elements = sum(t.numel() for t in pool["m0"].tensors.values())
    nbytes = elements * dtype.itemsize * (len(spec.ingredients) + 1)
    first = timed(lambda: mix(spec, pool, kernels=kernels), device)  # compiles, when compiled
    with PeakResident() as resident:
        blend = mix(spec, pool, kernels=kernels)
    cold = best_of(args.repeat, lambda: mix(spec, pool, kernels=kernels), device)
    # The memory bandwidth on a shared machine drifts: alternate the merge and the copy.
    copy_once = copier(nbytes, device)
    warm, copy_s = float("inf"), float("inf")
    for _ in range(args.repeat):
        warm = min(warm, timed(lambda: mix(spec, pool, kernels=kernels, into=blend), device))
        copy_s = min(copy_s, timed(copy_once, device))
    copy = nbytes / copy_s / 1e9
    rate = nbytes / warm / 1e9
    compile_s = f"{first - cold:.1f}" if kernels == "compiled" else "-"
    extra = (resident.peak - resident.start) / 1e6 if device.type == "cpu" else float("nan")
    print(
        f"{method:<16}{DTYPES[dtype]:<9}{count:>3} {kernels:<9}{elements / 1e6:>6.0f}M{nbytes / 1e9:>7.2f}"
        f"{cold * 1e3:>9.1f}{warm * 1e3:>9.1f}{rate:>8.1f}{copy:>8.1f}{rate / copy:>7.2f}{nbytes / cold / 1e9 / copy:>7.2f}"
        f"{compile_s:>9}{extra:>9.0f}{elements * dtype.itemsize / 1e6:>8.0f}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description="Merge throughput against a same-run torch copy of the same bytes.")
    parser.add_argument("--params", type=int, default=50, help="millions of parameters per ingredient (default 50)")
    parser.add_argument("--tensors", type=int, default=50, help="tensors per ingredient (default 50)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--kernels", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    parser.add_argument("--quick", action="store_true", help="only linear fp32 at N=2 (a smoke run)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(
        f"{'method':<16}{'dtype':<9}{'N':>3} {'kernels':<9}{'params':>7}{'GB':>7}{'cold ms':>9}{'warm ms':>9}"
        f"{'GB/s':>8}{'copy':>8}{'ratio':>7}{'cold':>7}{'compile s':>9}{'extra MB':>9}{'blend MB':>8}"
    )
    rows: list[tuple[str, int, torch.dtype]] = [("linear", 2, torch.float32)]
    if not args.quick:
        rows = [("linear", n, t) for t in DTYPES for n in (2, 4, 8)]
        rows += [(m, 4, torch.float32) for m in ("task_arithmetic", "ties", "dare_ties")]
    for kernels in args.kernels:
        for method, count, dtype in rows:
            row(method, count, dtype, kernels, args, device)


if __name__ == "__main__":
    main()
