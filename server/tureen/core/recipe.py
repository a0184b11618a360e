"""Applying a spec's merge to whole state dicts: compatibility checks, then one tensor at a time.

The per-tensor math lives in ``tureen.merge``; this module decides which tensors go in, in
which order and with which weights, and what happens to tensors that must not be averaged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol

import torch

from tureen.core.datatypes import BLEND_DTYPES
from tureen.core.ingredients import Ingredient
from tureen.core.memory import carve
from tureen.core.parameters import ParameterPlan
from tureen.core.passes import MergePass
from tureen.core.slices import Part, check_parts, parts
from tureen.core.staging import Staging
from tureen.errors import IngredientMismatch
from tureen.merge.kernels import Kernels
from tureen.merge.registry import Method, lookup
from tureen.spec import SoupSpec

_log = logging.getLogger("tureen.recipe")


def check_compatible(
    spec: SoupSpec, ingredients: Mapping[str, Ingredient], reference: Mapping[str, torch.Tensor] | None = None
) -> None:
    """Every ingredient must have the reference's keys, shapes and kinds of dtype.

    The reference is the architecture's own ``state_dict()`` when serving, else the first
    ingredient. Floating dtypes may differ (a bf16 and an fp32 fine-tune mix fine); integer and
    bool tensors must match exactly. With slices, each part is checked on the tensors it
    writes, and together the parts must write the reference's tensors.
    """
    found = parts(spec, ingredients)
    if spec.merge.slices is None:
        _check_part(found[0], reference)
        return
    check_parts(spec, found, reference)
    for part in found:
        _check_part(part, None if reference is None else {key: reference[key] for key in part.layout})


def _check_part(part: Part, reference: Mapping[str, torch.Tensor] | None) -> None:
    first = part.spec.ingredients[0]
    against = "the architecture" if reference is not None else f"ingredient {first.name!r}"
    expected = reference if reference is not None else part.ingredients[first.name].layout
    for ref in part.spec.ingredients:
        tensors = part.ingredients[ref.name].layout
        where = f"ingredient {ref.name!r} ({ref.location})"
        missing = sorted(key for key in expected if key not in tensors)
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise IngredientMismatch(f"{where}: missing tensor {missing[0]!r}{more} that {against} has")
        extra = sorted(key for key in tensors if key not in expected)
        if extra:
            more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
            raise IngredientMismatch(f"{where}: unexpected tensor {extra[0]!r}{more}, not in {against}")
        for key in sorted(tensors):
            tensor, want = tensors[key], expected[key]
            if tensor.shape != want.shape:
                raise IngredientMismatch(
                    f"{where}: tensor {key!r} has shape {list(tensor.shape)}, {against} has {list(want.shape)}"
                )
            if tensor.is_floating_point() != want.is_floating_point() or (
                not tensor.is_floating_point() and tensor.dtype != want.dtype
            ):
                raise IngredientMismatch(f"{where}: tensor {key!r} is {tensor.dtype}, {against} has {want.dtype}")


def mix(
    spec: SoupSpec,
    ingredients: Mapping[str, Ingredient],
    *,
    kernels: Kernels = "auto",
    into: Mapping[str, torch.Tensor] | None = None,
    quiet: bool = False,
    progress: Callable[[str, float], None] | None = None,
    sink: Sink | None = None,
) -> dict[str, torch.Tensor]:
    """Merge the ingredients' tensors by the spec's method into the spec's dtype.

    Floating tensors are merged in float32 with parameters resolved per tensor (see
    ``tureen.core.parameters``) and rounded once into the blend. Integer and bool tensors
    (step counters, index buffers) are never averaged: they must agree across all ingredients
    and are taken from the base, or the first ingredient when there is no base.

    The blend's tensors are views of one fresh flat buffer (``tureen.core.memory``), or the
    tensors of ``into`` (a retired blend of the same layout) when given.
    """
    started = time.perf_counter()
    method = lookup(spec.merge.method)
    found = parts(spec, ingredients)
    reference = {key: tensor for part in found for key, tensor in part.layout.items()}
    merged = _blend_buffer(reference, BLEND_DTYPES[spec.dtype], into, ingredients[found[0].source].device)
    used = [ingredients[ref.name] for ref in spec.ingredients]
    for ingredient in used:
        ingredient.verify()
    compiled = _use_compiled(kernels, spec, ingredients)
    meter = _Meter(sum(_bytes(part.layout.values()) * len(part.ingredients) for part in found), progress)
    if sink is not None:
        sink.begin(merged)
    for part in found:
        _merge_part(part, method, merged, compiled, meter, sink)
    for ingredient in used:
        ingredient.verify()  # a file that changed while it was read gives a blend of two versions: refused
    parameters = sum(t.numel() for t in merged.values())
    _log.log(
        logging.DEBUG if quiet else logging.INFO,  # a search merges many candidates; it logs its own steps
        "merged %d tensors (%.2fM parameters) from %d ingredients with %s in %.3f s (%s kernels, %s)",
        len(merged),
        parameters / 1e6,
        len(spec.ingredients),
        method.decl.name,
        time.perf_counter() - started,
        "compiled" if compiled else "eager",
        "in place" if all(ingredient.local for ingredient in used) else "streamed",
    )
    return merged


class Sink(Protocol):
    """Hears of the blend's tensors as a merge allocates them, then as each is final (a writer)."""

    def begin(self, tensors: Mapping[str, torch.Tensor]) -> None: ...

    def ready(self, keys: Sequence[str]) -> None: ...


def _merge_part(
    part: Part, method: Method, merged: dict[str, torch.Tensor], compiled: bool, meter: _Meter, sink: Sink | None
) -> None:
    """Write one part's tensors into the blend (see ``tureen.core.slices``)."""
    layout = part.layout
    plan = ParameterPlan(part.spec, list(layout), part.positions)
    base = part.spec.merge.base
    pass_ = MergePass(
        method=method,
        plan=plan,
        names=[i.name for i in plan.mixed],
        ingredients=part.ingredients,
        base=part.ingredients[base] if base else None,
        merged=merged,
        compiled=compiled,
        local=all(ingredient.local for ingredient in part.ingredients.values()),
        staging=Staging(part.ingredients[part.source].device),
    )
    for group in _groups(layout, plan, method.elementwise):
        if layout[group[0]].is_floating_point():
            pass_.merge(group)
        else:
            _check_agree(part, group[0])
            merged[group[0]].copy_(part.ingredients[part.source].whole(group[0]))
        meter.read(_bytes(layout[k] for k in group) * len(part.ingredients))
        if sink is not None:
            sink.ready(group)


class _Meter:
    """Bytes read so far and their rate, told to ``progress`` (and the log) every second or so."""

    def __init__(self, total: int, progress: Callable[[str, float], None] | None) -> None:
        self.total, self.progress = max(total, 1), progress
        self.done, self.started = 0, time.perf_counter()
        self._told = self.started

    def read(self, nbytes: int) -> None:
        self.done += nbytes
        now = time.perf_counter()
        if now - self._told < 1.0 and self.done < self.total:
            return
        self._told = now
        rate = self.done / max(now - self.started, 1e-9) / 1e6
        line = f"merging: {self.done / 1e6:,.0f}/{self.total / 1e6:,.0f} MB read at {rate:,.0f} MB/s"
        if self.progress is None:
            _log.info("%s", line)
        else:
            self.progress(line, self.done / self.total)  # a build's progress logs it


def _blend_buffer(
    reference: Mapping[str, torch.Tensor],
    out_dtype: torch.dtype,
    into: Mapping[str, torch.Tensor] | None,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """The blend's tensors on ``device``: ``into`` when its layout and device match, else fresh."""
    layout = [(key, t.shape, out_dtype if t.is_floating_point() else t.dtype) for key, t in reference.items()]
    if into is None:
        return carve(layout, device)
    if [(k, t.shape, t.dtype) for k, t in into.items()] != layout:
        raise ValueError("mix: the buffer to merge into has another layout than the blend")
    if any(t.device != device for t in into.values()):
        raise ValueError("mix: the buffer to merge into is on another device")
    return dict(into)


def _bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _groups(reference: Mapping[str, torch.Tensor], plan: ParameterPlan, elementwise: bool) -> list[list[str]]:
    """Tensor names in order, consecutive floating tensors with equal parameters grouped when
    the method is elementwise (such a group may merge as one long tensor, see ``_rows``)."""
    groups: list[list[str]] = []
    last = None
    for key, tensor in reference.items():
        values = plan.for_tensor(key) if tensor.is_floating_point() and elementwise else None
        if values is not None and values == last and groups:
            groups[-1].append(key)
        else:
            groups.append([key])
        last = values
    return groups


def _use_compiled(kernels: Kernels, spec: SoupSpec, ingredients: Mapping[str, Ingredient]) -> bool:
    if kernels != "auto":
        return kernels == "compiled"
    if ingredients[spec.ingredients[0].name].device.type != "cpu":
        return False  # on GPUs the compiled kernels are opt-in: not yet measured against eager there
    threshold = lookup(spec.merge.method).record.compile_from
    return threshold is not None and sum(ingredients[ref.name].layout_bytes for ref in spec.ingredients) >= threshold


def _check_agree(part: Part, key: str) -> None:
    reference = part.ingredients[part.source].tensors[key]
    for ref in part.spec.ingredients:
        if not torch.equal(part.ingredients[ref.name].tensors[key].to(reference.device), reference):
            raise IngredientMismatch(
                f"ingredient {ref.name!r} ({ref.location}): tensor {key!r} ({reference.dtype}) differs from "
                f"ingredient {part.source!r}; integer and bool tensors are never averaged and must agree"
            )
