"""Applying a spec's merge to whole state dicts: compatibility checks, then one tensor at a time.

The per-tensor math lives in ``tureen.merge``; this module decides which tensors go in, in
which order and with which weights, and what happens to tensors that must not be averaged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from tureen.core.datatypes import BLEND_DTYPES
from tureen.core.ingredients import Ingredient
from tureen.core.memory import carve, span
from tureen.core.parameters import ParameterPlan
from tureen.core.slices import Part, check_parts, parts
from tureen.errors import IngredientCorrupt, IngredientMismatch, MergeError
from tureen.merge.kernels import Kernels
from tureen.merge.registry import Method, TensorJob, lookup
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
    pass_ = _Pass(
        method=method,
        plan=plan,
        names=[i.name for i in plan.mixed],
        ingredients=part.ingredients,
        base=part.ingredients[base] if base else None,
        merged=merged,
        compiled=compiled,
        local=all(ingredient.local for ingredient in part.ingredients.values()),
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


WINDOW = 1 << 20
"""Elements per piece when an elementwise merge streams a tensor from host memory or disk on a
CPU (4 MiB of float32): the merge then holds one piece per ingredient, never the checkpoints,
and merges each piece while it is still in cache; much smaller pieces pay their per-piece
costs (a read, a job) too often. GPU pieces are 16 times larger: a launch per small piece
would dominate."""


@dataclass(frozen=True)
class _Pass:
    """One merge pass over a state dict: what every group of floating tensors needs."""

    method: Method
    plan: ParameterPlan
    names: list[str]
    ingredients: Mapping[str, Ingredient]
    base: Ingredient | None
    merged: dict[str, torch.Tensor]
    compiled: bool
    local: bool
    """Every ingredient lies on the merge's device: tensors are read in place, runs of them as one."""
    scratch: dict[str, dict[torch.dtype, torch.Tensor]] = field(default_factory=dict)
    """Per ingredient: the buffers its disk reads of a piece reuse, piece after piece."""

    def merge(self, group: list[str]) -> None:
        if not self.local:
            for key in group:
                self._stream(key)
            return
        glob, per = self.plan.for_tensor(group[0])
        columns = [[self.ingredients[name].tensors[k] for k in group] for name in self.names]
        if self.base is not None:
            columns.append([self.base.tensors[k] for k in group])
        columns.append([self.merged[k] for k in group])
        count = len(self.names)
        for label, keys, row in _rows(group, columns):
            self._run(label, keys, row[:count], row[count] if self.base is not None else None, row[-1], glob, per)

    def _stream(self, key: str) -> None:
        """One tensor read piece by piece (elementwise methods, and those whose ``fit`` sweeps the
        pieces first), else whole, onto the merge's device."""
        glob, per = self.plan.for_tensor(key)
        out = self.merged[key]
        fitted = None
        if not self.method.elementwise:
            fitted = self._fit(key, glob, per, out)
            if fitted is None:
                tensors = [self.ingredients[name].whole(key) for name in self.names]
                base = self.base.whole(key) if self.base is not None else None
                self._run(key, [key], tensors, base, out, glob, per)
                return
        flat = out.view(-1)
        for begin, end in _windows(out):
            pieces, base = self._pieces(key, begin, end)
            self._run(key, [key], pieces, base, flat[begin:end], glob, per, offset=begin, fitted=fitted)

    def _fit(self, key: str, glob: dict[str, Any], per: dict[str, list[Any]], out: torch.Tensor) -> Sequence[Any] | None:
        """The method's fit over the tensor's pieces (thresholds from two sweeps), or None when
        it has none or needs the whole tensor."""
        if self.method.fit is None or self.base is None:
            return None

        def sweep() -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
            for begin, end in _windows(out):
                pieces, base = self._pieces(key, begin, end)
                assert base is not None  # checked above
                yield pieces, base

        return self.method.fit(self._job(key, [], None, out, glob, per, sweep=sweep))

    def _job(
        self,
        label: str,
        tensors: list[torch.Tensor],
        base: torch.Tensor | None,
        out: torch.Tensor,
        glob: Any,
        per: Any,
        **more: Any,
    ) -> TensorJob:
        return TensorJob(label, tensors, self.names, base, glob, per, out=out, compiled=self.compiled, **more)

    def _pieces(self, key: str, begin: int, end: int) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Elements ``[begin, end)`` of ``key`` in each mixed ingredient, and in the base when there is one."""
        pieces = [self._window(name, key, begin, end) for name in self.names]
        base = self._window(str(self.plan.spec.merge.base), key, begin, end) if self.base is not None else None
        return pieces, base

    def _window(self, name: str, key: str, begin: int, end: int) -> torch.Tensor:
        return self.ingredients[name].window(key, begin, end, self.scratch.setdefault(name, {}))

    def _run(
        self,
        label: str,
        keys: list[str],
        tensors: list[torch.Tensor],
        base: torch.Tensor | None,
        out: torch.Tensor,
        glob: dict[str, Any],
        per: dict[str, list[Any]],
        offset: int = 0,
        fitted: Sequence[Any] | None = None,
    ) -> None:
        """One job of the method, written into ``out``, which must come out finite."""
        job = self._job(label, tensors, base, out, glob, per, offset=offset, fitted=fitted)
        try:
            result = self.method.combine(job)
        except ValueError as exc:
            raise MergeError(f"merge ({self.method.decl.name}): tensor {label!r}: {exc}") from None
        if result is not out:
            out.copy_(result)
        if not _finite(out):
            self._blame(keys, out.dtype)

    def _blame(self, keys: list[str], dtype: torch.dtype) -> None:
        """NaN or Inf in the merged values of ``keys``: name the ingredient and tensor that hold
        them (read whole: this is the error path), else the overflow."""
        base = self.plan.spec.merge.base
        for key in keys:
            for name in [*self.names, *([base] if base is not None else [])]:
                tensor = self.ingredients[name].tensors[key]
                if tensor.is_floating_point() and not _finite(tensor):
                    bad = int((~torch.isfinite(tensor)).sum())
                    where = f"ingredient {name!r} ({self.ingredients[name].path})"
                    raise IngredientCorrupt(f"{where}: tensor {key!r} holds {bad} NaN/Inf value(s)")
        raise MergeError(f"merge ({self.method.decl.name}): tensor {keys[0]!r}: the merged values overflow {dtype}")


def _windows(out: torch.Tensor) -> Iterator[tuple[int, int]]:
    """The pieces a streamed merge reads a tensor in: WINDOW elements (16 times more on a GPU)."""
    window = WINDOW if out.device.type == "cpu" else WINDOW << 4
    for begin in range(0, out.numel(), window):
        yield begin, min(begin + window, out.numel())


def _bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf in ``tensor``: its minimum and maximum are finite (NaN propagates through
    both). One reduction and no temporary, where ``isfinite().all()`` writes a bool per entry."""
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor.reshape(-1))
    return bool(torch.isfinite(low) & torch.isfinite(high))


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


def _rows(group: list[str], columns: list[list[torch.Tensor]]) -> list[tuple[str, list[str], list[torch.Tensor]]]:
    """The jobs of a group, each with the tensor names it covers: one over flat views when every
    column (ingredients, base, blend) lays the group's tensors out alike in one buffer, else one
    per tensor."""
    if len(group) > 1:
        spans = [span(column) for column in columns]
        if all(s is not None and s[1] == spans[0][1] for s in spans):  # type: ignore[index]
            label = f"{group[0]} .. {group[-1]} ({len(group)} tensors)"
            return [(label, group, [s[0] for s in spans])]  # type: ignore[index]
    return [(key, [key], [column[i] for column in columns]) for i, key in enumerate(group)]


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
