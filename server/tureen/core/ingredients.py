"""The ingredient pool: checkpoints, each kept where its placement says, shared while unchanged.

An ingredient's placement says where its tensors live between merges:

- ``device``: in the serving device's memory, read once (what merges read fastest);
- ``host``: in host memory (pinned when the device is a GPU), copied to the device piece by
  piece as a merge reads it; on a CPU server host and device are the same memory;
- ``disk``: nowhere: a merge reads each tensor, or each range of one, from the file when it
  needs it, so the checkpoint is never held whole.

``auto`` picks by size: the device when every ingredient of the spec fits in half of its free
memory, else host memory on the same terms, else disk; on a CPU server, disk from 1 GiB of
ingredients when the spec has no evaluation (see ``CPU_STREAM_FROM``). Loading reads each safetensors file's
header and, for resident placements, its data straight into the ingredient's buffer with no
decode step. The sha256 of the files is computed only when a spec pins one (then cached for
those files while they are unchanged). NaN and Inf are checked by the merge, on the tensors it
reads (``tureen.core.passes``), not in a pass of their own.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, TypeVar

import torch

from tureen.core.adapters import AdaptedTensors, check_fits, load_adapter
from tureen.core.checkpoints import (
    PICKLE_SUFFIXES,
    SafetensorsFile,
    Stamp,
    checkpoint_files,
    load_pickle,
    sha256_of,
    stamp_of,
)
from tureen.core.memory import available_bytes
from tureen.core.observer import Observer
from tureen.core.tensor_maps import OnDisk, Renamed
from tureen.errors import IngredientChanged, IngredientCorrupt, IngredientMissing
from tureen.spec import IngredientRef, SoupSpec

_log = logging.getLogger("tureen.ingredients")

T = TypeVar("T")
Placement = Literal["device", "host", "disk"]
PLACEMENTS: tuple[Placement, ...] = ("device", "host", "disk")
CPU_STREAM_FROM = 1 << 30
"""On a CPU server, ``auto`` leaves a spec's ingredients on disk from this many bytes when nothing
reads them more than once (no evaluation: no search, no scoring alone): host and device are the
page cache's own memory there, and holding a copy costs its first touch. A 4 x 2 GB bf16 Llama
soup serves in 3.5 s from disk against 32.5 s held (linear; TIES 24.3 against 42.1), 12 MB
beyond the blend against 8 GB (``python bench/llm_merge.py --params 1.0``, 2 cores)."""
READ_BLOCK = 64 << 20
"""Bytes per read while loading: a GPU-bound load stages one block at a time in host memory."""


@dataclass(frozen=True, eq=False)
class Ingredient:
    """One checkpoint where its placement keeps it.

    ``layout`` gives every tensor's shape and dtype (meta tensors: no memory) whatever the
    placement; ``tensors`` gives the tensors themselves: held ones (on the device, or in host
    memory), or for ``disk`` each one freshly read from its file when asked for.
    """

    path: str
    placement: Placement
    device: torch.device
    """Where merges of this ingredient compute."""
    layout: Mapping[str, torch.Tensor]
    tensors: Mapping[str, torch.Tensor]
    nbytes: int
    shards: Mapping[str, SafetensorsFile] = field(default_factory=dict)
    """For ``disk``: the file each tensor is read from."""
    digest: str | None = None
    computed: bool = False
    """Its tensors are computed when read (a LoRA adapter applied to its base)."""
    sources: Mapping[str, str] = field(default_factory=dict)
    """For a renamed view: the name each tensor has in its file, where it differs."""

    @classmethod
    def held(cls, path: str, tensors: Mapping[str, torch.Tensor]) -> Ingredient:
        """An ingredient of tensors already in memory, on their own device (placement ``device``)."""
        device = next(iter(tensors.values())).device
        return Ingredient(path, "device", device, _meta(tensors), tensors, _bytes(tensors))

    @property
    def layout_bytes(self) -> int:
        """Bytes a merge reads from it (for an adapter: the whole adapted model's)."""
        return _bytes(self.layout)

    @property
    def local(self) -> bool:
        """Its tensors already lie where merges compute: a merge may read them in place."""
        if self.computed:
            return False
        return self.placement == "device" or (self.placement == "host" and self.device.type == "cpu")

    def window(self, key: str, begin: int, end: int, scratch: dict[torch.dtype, torch.Tensor] | None = None) -> torch.Tensor:
        """Elements ``[begin, end)`` of tensor ``key``, flattened, on the merge's device. A ``disk``
        ingredient reads them into ``scratch``'s buffer of their dtype when it is large enough
        (and makes one there otherwise), so a streamed merge reuses its memory window after window."""
        if key not in self.shards:
            return self.tensors[key].reshape(-1)[begin:end].to(self.device, non_blocking=True)
        dtype = self.layout[key].dtype
        buffer = None if scratch is None else scratch.get(dtype)
        if buffer is None or buffer.numel() < end - begin:
            buffer = torch.empty(end - begin, dtype=dtype)
            if scratch is not None:
                scratch[dtype] = buffer
        piece = buffer[: end - begin]
        self.shards[key].read_into(self.sources.get(key, key), piece, begin)
        return piece.to(self.device)  # blocking: the next read overwrites ``scratch`` once the copy is done

    def renamed(self, names: Mapping[str, str]) -> Ingredient:
        """A view of the tensors ``names`` maps to (new name -> name here), by their new names:
        how a slice reads layer 8 of an ingredient as the blend's layer 0. Nothing is copied."""
        return replace(
            self,
            layout={new: self.layout[old] for new, old in names.items()},
            tensors=Renamed(self.tensors, names),
            shards={new: self.shards[old] for new, old in names.items() if old in self.shards},
            sources={new: self.sources.get(old, old) for new, old in names.items()},
        )

    def whole(self, key: str) -> torch.Tensor:
        """Tensor ``key`` on the merge's device."""
        return self.tensors[key].to(self.device, non_blocking=True)

    def verify(self) -> None:
        """Raise ``IngredientChanged`` if a file read on demand changed since it was loaded (held
        tensors were copied at load: later changes to their files cannot reach them)."""
        for file in {id(f): f for f in self.shards.values()}.values():
            if file.changed():
                raise IngredientChanged(
                    f"{file.where}: the file changed on disk (size, mtime or inode) since it was loaded; "
                    "a build reads it again on the next push"
                )


class IngredientPool:
    """Loads checkpoints for merges on one device and keeps them, one copy per unchanged file set
    and placement."""

    def __init__(self, device: torch.device, observer: Observer, placement: Placement | Literal["auto"] = "auto") -> None:
        """``placement``: the server's default (``--ingredient-placement``) for specs naming none."""
        self.device = device
        self.placement = placement
        self._observer = observer
        self._pooled: dict[tuple[tuple[Stamp, ...], Placement], Ingredient] = {}
        self._digests: dict[tuple[Stamp, ...], str] = {}
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        """Bytes of ingredient tensors held in memory (device and host placements)."""
        return sum(b for placement, b in self.bytes_by_placement().items() if placement != "disk")

    def bytes_by_placement(self) -> dict[str, int]:
        with self._lock:
            pooled = list(self._pooled.values())
        return {p: sum(i.nbytes for i in pooled if i.placement == p) for p in PLACEMENTS}

    def placement_for(self, spec: SoupSpec) -> Placement:
        """Where ``spec``'s ingredients go: the spec's placement, the server's, or by size."""
        chosen = spec.placement or self.placement
        if chosen != "auto":
            return chosen
        total = 0
        for ref in spec.ingredients:
            if ref.path is None:
                continue  # an adapter is held whatever the placement: it is small
            try:
                files, _ = checkpoint_files(Path(ref.path), f"ingredient {ref.name!r} ({ref.path})")
                total += sum(stamp_of(f)[1] for f in files)
            except (OSError, IngredientMissing, IngredientCorrupt):
                pass  # loading names the problem
        if self.device.type == "cpu" and spec.evaluation is None and total >= CPU_STREAM_FROM:
            return "disk"
        return choose_placement(total, self.device)

    def load_all(self, spec: SoupSpec, progress: Callable[[str, float], None] | None = None) -> dict[str, Ingredient]:
        """Load (or find pooled) every ingredient of ``spec``, by ingredient name; ``progress``
        hears each one with bytes and rates (loading is the first 60% of a build)."""
        placement = self.placement_for(spec)
        loaded: dict[str, Ingredient] = {}
        started, done = time.perf_counter(), 0
        # Adapters last: each one applies to an ingredient loaded before it.
        order = sorted(spec.ingredients, key=lambda ref: ref.adapter is not None)
        for i, ref in enumerate(order, start=1):
            rate = done / max(time.perf_counter() - started, 1e-9) / 1e6
            line = f"loading ingredient {i}/{len(order)} {ref.name!r} ({'adapter' if ref.adapter else placement})"
            if done:
                line += f", {done / 1e6:,.0f} MB so far at {rate:,.0f} MB/s"
            _log.info("model %s: %s", spec.model, line)
            if progress is not None:
                progress(line, 0.6 * (i - 1) / len(order))
            if ref.adapter is not None:
                assert ref.base is not None  # the spec requires it
                loaded[ref.name] = self.load_adapter(ref, loaded[ref.base])
            else:
                loaded[ref.name] = self.load(ref, placement)
            done += loaded[ref.name].nbytes
        return {ref.name: loaded[ref.name] for ref in spec.ingredients}

    def load_adapter(self, ref: IngredientRef, base: Ingredient) -> Ingredient:
        """The ingredient ``base`` + the LoRA adapter ``ref`` names, tensors computed when read."""
        where = f"ingredient {ref.name!r} ({ref.adapter})"
        folder = Path(str(ref.adapter))
        if not folder.is_dir():
            raise IngredientMissing(f"{where}: adapter folder not found")
        weights = folder / "adapter_model.safetensors"
        digest = self._check_digest(ref, [weights], (stamp_of(weights),), where) if weights.is_file() else None
        adapter = load_adapter(folder, where)
        check_fits(adapter, base.layout, where, str(ref.base))
        layout = {
            k: torch.empty(t.shape, dtype=adapter.replaced[k].dtype, device="meta") if k in adapter.replaced else t
            for k, t in base.layout.items()
        }
        tensors = AdaptedTensors(base.tensors, layout, adapter, self.device)
        _log.info(
            "loaded %s: %d LoRA updates, %d replaced tensors on base %r",
            where,
            len(adapter.loras),
            len(adapter.replaced),
            ref.base,
        )
        # No shards of its own: its base, an ingredient of the same spec, is verified as itself.
        return Ingredient(
            str(ref.adapter), base.placement, self.device, layout, tensors, adapter.nbytes, digest=digest, computed=True
        )

    def load(self, ref: IngredientRef, placement: Placement = "device") -> Ingredient:
        """The ingredient ``ref`` names at ``placement``, read unless its unchanged files are pooled."""
        where = f"ingredient {ref.name!r} ({ref.path})"
        files, weight_map = checkpoint_files(Path(ref.location), where)
        try:
            stamps = tuple(stamp_of(f) for f in files)
        except FileNotFoundError:
            missing = next(f for f in files if not f.exists())
            raise IngredientMissing(f"{where}{'' if len(files) == 1 else f' shard {missing.name}'}: file not found") from None
        except OSError as exc:
            raise IngredientMissing(f"{where}: cannot read: {exc.strerror or exc}") from None
        digest = self._check_digest(ref, files, stamps, where)
        with self._lock:
            pooled = self._pooled.get((stamps, placement))
        if pooled is not None:
            return pooled
        started = time.perf_counter()
        ingredient = self._read(files, weight_map, placement, where, ref.location, digest)
        with self._lock:
            ingredient = self._pooled.setdefault((stamps, placement), ingredient)
            self._forget_stale(stamps)
        placed = self.bytes_by_placement()
        for p in PLACEMENTS:
            self._observer.ingredient_memory(p, "disk" if p == "disk" else str(self._memory_of(p)), placed[p])
        seconds = time.perf_counter() - started
        _log.info(
            "loaded %s: %d tensors, %.1f MB (%s) in %.2f s (%.0f MB/s)",
            where,
            len(ingredient.layout),
            ingredient.nbytes / 1e6,
            placement,
            seconds,
            ingredient.nbytes / 1e6 / max(seconds, 1e-9),
        )
        return ingredient

    def _memory_of(self, placement: Placement) -> torch.device:
        return self.device if placement == "device" else torch.device("cpu")

    def _check_digest(self, ref: IngredientRef, files: list[Path], stamps: tuple[Stamp, ...], where: str) -> str | None:
        """The files' sha256 when the spec pins one (hashed once per unchanged file set)."""
        with self._lock:
            digest = self._digests.get(stamps)
        if ref.sha256 is None:
            return digest
        if digest is None:
            digest = sha256_of(files, where)
            with self._lock:
                self._digests[stamps] = digest
        if digest != ref.sha256:
            raise IngredientCorrupt(f"{where}: sha256 is {digest}, the spec expects {ref.sha256}")
        return digest

    def _forget_stale(self, stamps: tuple[Stamp, ...]) -> None:
        """Drop pooled copies of the same files from before they changed (called holding the lock)."""
        names = {s[0] for s in stamps}
        for key in [k for k in self._pooled if {s[0] for s in k[0]} == names and k[0] != stamps]:
            del self._pooled[key]

    def _read(
        self,
        files: list[Path],
        weight_map: Mapping[str, str] | None,
        placement: Placement,
        where: str,
        path: str,
        digest: str | None,
    ) -> Ingredient:
        shard_where = (lambda f: where) if len(files) == 1 else (lambda f: f"{where} shard {f.name}")
        if any(f.name.endswith(PICKLE_SUFFIXES) for f in files):
            if placement == "disk":
                _log.info("%s: pickled checkpoints cannot be read in pieces; held in host memory", where)
                placement = "host"
            pickled = _unique([load_pickle(f, shard_where(f)) for f in files], where)
            held = _place({k: t.contiguous() for k, t in pickled.items()}, self._memory_of(placement), self._pinned(placement))
            return Ingredient(path, placement, self.device, _meta(held), held, _bytes(held), digest=digest)
        opened = [SafetensorsFile.open(f, shard_where(f)) for f in files]
        shards = _shards(opened, weight_map, where)
        if placement == "disk":
            layout = {k: torch.empty(f.entries[k].shape, dtype=f.entries[k].dtype, device="meta") for k, f in shards.items()}
            return Ingredient(path, placement, self.device, layout, OnDisk(shards), _bytes(layout), shards, digest)
        held = {}
        for file in opened:
            held.update(_read_file(file, self._memory_of(placement), self._pinned(placement)))
        ordered = {k: held[k] for k in shards}
        return Ingredient(path, placement, self.device, _meta(ordered), ordered, _bytes(ordered), digest=digest)

    def _pinned(self, placement: Placement) -> bool:
        return placement == "host" and self.device.type == "cuda"


def choose_placement(nbytes: int, device: torch.device) -> Placement:
    """``auto``: the device when ``nbytes`` fit in half its free memory, else host memory, else disk."""
    free = available_bytes(device)
    if free is None or nbytes <= free // 2:
        return "device"
    if device.type != "cpu":
        host = available_bytes(torch.device("cpu"))
        if host is None or nbytes <= host // 2:
            return "host"
    return "disk"


def _meta(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Shapes and dtypes as meta tensors (no memory)."""
    return {k: torch.empty(t.shape, dtype=t.dtype, device="meta") for k, t in tensors.items()}


def _bytes(tensors: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _unique(shards: Sequence[Mapping[str, T]], where: str) -> dict[str, T]:
    """The shards' entries in one map; a tensor in two shards is an error."""
    union: dict[str, T] = {}
    for shard in shards:
        clash = next((name for name in shard if name in union), None)
        if clash is not None:
            raise IngredientCorrupt(f"{where}: tensor {clash!r} appears in more than one shard")
        union.update(shard)
    return union


def _shards(opened: list[SafetensorsFile], weight_map: Mapping[str, str] | None, where: str) -> dict[str, SafetensorsFile]:
    """Tensor name -> the shard holding it, in the files' own order; checked against the index."""
    in_order = [{n: f for n in sorted(f.entries, key=lambda n: f.entries[n].start)} for f in opened]
    shard_of = _unique(in_order, where)
    for name, shard in (weight_map or {}).items():
        if name not in shard_of or shard_of[name].path.name != shard:
            raise IngredientCorrupt(f"{where}: the shard index puts tensor {name!r} in {shard}, which does not hold it")
    return shard_of


def _read_file(file: SafetensorsFile, memory: torch.device, pinned: bool) -> dict[str, torch.Tensor]:
    """Every tensor of ``file`` in one buffer on ``memory``: the file's data read straight in."""
    size = max((e.stop for e in file.entries.values()), default=0)
    if memory.type == "cpu":
        buffer = torch.empty(size, dtype=torch.uint8, pin_memory=pinned)
        file.read_data(buffer, 0)
    else:
        buffer = torch.empty(size, dtype=torch.uint8, device=memory)
        stage = torch.empty(min(size, READ_BLOCK), dtype=torch.uint8)
        for begin in range(0, size, READ_BLOCK):
            piece = stage[: min(READ_BLOCK, size - begin)]
            file.read_data(piece, begin)
            buffer[begin : begin + piece.numel()].copy_(piece)
    tensors = {}
    for name, entry in file.entries.items():
        raw = buffer[entry.start : entry.stop]
        if entry.start % entry.dtype.itemsize:
            raw = raw.clone()  # not aligned to its dtype in the file: its own copy
        tensors[name] = raw.view(entry.dtype).view(entry.shape)
    return tensors


def _place(tensors: Mapping[str, torch.Tensor], memory: torch.device, pinned: bool) -> dict[str, torch.Tensor]:
    if memory.type == "cpu":
        return {k: (t.pin_memory() if pinned else t) for k, t in tensors.items()}
    return {k: t.to(memory) for k, t in tensors.items()}
