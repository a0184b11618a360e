"""One merge pass over a part's floating tensors: in place when every ingredient lies on the
merge's device, else streamed piece by piece (``Staging`` keeps the next piece's copies in
flight on a GPU). Every merged value is checked finite, and a NaN or Inf names its ingredient.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from tureen.core.ingredients import Ingredient
from tureen.core.memory import span
from tureen.core.parameters import ParameterPlan
from tureen.core.staging import Staging
from tureen.errors import IngredientCorrupt, MergeError
from tureen.merge.registry import Method, TensorJob

WINDOW = 1 << 20
"""Elements per piece when an elementwise merge streams a tensor from host memory or disk on a
CPU (4 MiB of float32): the merge then holds one piece per ingredient, never the checkpoints,
and merges each piece while it is still in cache; much smaller pieces pay their per-piece
costs (a read, a job) too often. GPU pieces are 16 times larger: a launch per small piece
would dominate."""


@dataclass(frozen=True)
class MergePass:
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
    staging: Staging
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
        # Checked once per tensor where pieces overlap: a check per piece would wait for each one.
        whole = self.staging.overlaps
        for begin, end, (pieces, base) in self._ahead(key, out):
            self._run(key, [key], pieces, base, flat[begin:end], glob, per, offset=begin, fitted=fitted, check=not whole)
        if whole and not _finite(out):
            self._blame([key], out.dtype)

    def _fit(self, key: str, glob: dict[str, Any], per: dict[str, list[Any]], out: torch.Tensor) -> Sequence[Any] | None:
        """The method's fit over the tensor's pieces (thresholds from two sweeps), or None when
        it has none or needs the whole tensor."""
        if self.method.fit is None or self.base is None:
            return None

        def sweep() -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
            for _, _, (pieces, base) in self._ahead(key, out):
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

    def _ahead(self, key: str, out: torch.Tensor) -> Iterator[tuple[int, int, tuple[list[torch.Tensor], torch.Tensor | None]]]:
        """Each piece of ``key`` with its span, read ahead of the merge on a GPU."""
        return self.staging.ahead(_windows(out), lambda begin, end: self._pieces(key, begin, end), _tensors_of)

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
        check: bool = True,
    ) -> None:
        """One job of the method, written into ``out``, which must come out finite (checked
        here unless ``check`` is False: then the caller checks)."""
        job = self._job(label, tensors, base, out, glob, per, offset=offset, fitted=fitted)
        try:
            result = self.method.combine(job)
        except ValueError as exc:
            raise MergeError(f"merge ({self.method.decl.name}): tensor {label!r}: {exc}") from None
        if result is not out:
            out.copy_(result)
        if check and not _finite(out):
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


def _tensors_of(piece: tuple[list[torch.Tensor], torch.Tensor | None]) -> list[torch.Tensor]:
    pieces, base = piece
    return pieces if base is None else [*pieces, base]


def _windows(out: torch.Tensor) -> Iterator[tuple[int, int]]:
    """The pieces a streamed merge reads a tensor in: WINDOW elements (16 times more on a GPU)."""
    window = WINDOW if out.device.type == "cpu" else WINDOW << 4
    for begin in range(0, out.numel(), window):
        yield begin, min(begin + window, out.numel())


def _finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf in ``tensor``: its minimum and maximum are finite (NaN propagates through
    both). One reduction and no temporary, where ``isfinite().all()`` writes a bool per entry."""
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor.reshape(-1))
    return bool(torch.isfinite(low) & torch.isfinite(high))


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
