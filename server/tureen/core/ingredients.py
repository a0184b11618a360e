"""The ingredient pool: checkpoints loaded once into device memory and shared by content.

A file is read once: its bytes are hashed (for ``sha256`` checks and for sharing identical
checkpoints between specs) and decoded from the same buffer. Decoding never executes code:
safetensors, or ``torch.load(weights_only=True)`` for ``.pt``/``.bin``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch

from tureen.core.memory import carve
from tureen.core.observer import Observer
from tureen.errors import IngredientCorrupt, IngredientMissing
from tureen.spec import IngredientRef, SoupSpec

_log = logging.getLogger("tureen.ingredients")
_PICKLE_SUFFIXES = (".pt", ".pth", ".bin")


@dataclass(frozen=True, eq=False)
class Ingredient:
    """One loaded checkpoint: its tensors on the pool's device, keyed by tensor name."""

    digest: str
    path: str
    tensors: Mapping[str, torch.Tensor]
    nbytes: int


class IngredientPool:
    """Loads checkpoints onto one device and keeps them, one copy per distinct content."""

    def __init__(self, device: torch.device, observer: Observer) -> None:
        self.device = device
        self._observer = observer
        self._by_digest: dict[str, Ingredient] = {}
        self._by_stamp: dict[tuple[tuple[str, int, int, int], ...], str] = {}
        """Files' (path, size, mtime, inode) -> digest: a re-push of unchanged files skips the read."""
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return sum(ingredient.nbytes for ingredient in self._by_digest.values())

    def load_all(self, spec: SoupSpec, progress: Callable[[str, float], None] | None = None) -> dict[str, Ingredient]:
        """Load (or find pooled) every ingredient of ``spec``, by ingredient name; ``progress``
        hears each one (loading is the first 60% of a build)."""
        loaded = {}
        for i, ref in enumerate(spec.ingredients, start=1):
            _log.info("model %s: ingredient %d/%d %r", spec.model, i, len(spec.ingredients), ref.name)
            if progress is not None:
                progress(f"loading ingredient {i}/{len(spec.ingredients)} {ref.name!r}", 0.6 * (i - 1) / len(spec.ingredients))
            loaded[ref.name] = self.load(ref)
        return loaded

    def load(self, ref: IngredientRef) -> Ingredient:
        """Return the ingredient ``ref`` names, loading it unless identical content is pooled."""
        where = f"ingredient {ref.name!r} ({ref.path})"
        files = checkpoint_files(Path(ref.path), where)
        stamp = _stamp(files)
        with self._lock:
            known = self._by_stamp.get(stamp) if stamp is not None else None
            pooled = self._by_digest.get(known) if known is not None else None
        if pooled is not None and (ref.sha256 is None or ref.sha256 == pooled.digest):
            return pooled  # the same files, unchanged since they were read: no need to read and hash again
        blobs = [_read(str(file), where if len(files) == 1 else f"{where} shard {file.name}") for file in files]
        digests = [hashlib.sha256(blob).hexdigest() for blob in blobs]
        # A single file's digest is its sha256; a sharded directory's is the sha256 of its shards' digests.
        digest = digests[0] if len(files) == 1 else hashlib.sha256("".join(digests).encode()).hexdigest()
        if ref.sha256 is not None and ref.sha256 != digest:
            raise IngredientCorrupt(f"{where}: sha256 is {digest}, the spec expects {ref.sha256}")
        with self._lock:
            pooled = self._by_digest.get(digest)
            if pooled is not None and stamp is not None:
                self._by_stamp[stamp] = digest
        if pooled is not None:
            _log.info("%s: same content as %s, shared", where, pooled.path)
            return pooled
        started = time.perf_counter()
        tensors: dict[str, torch.Tensor] = {}
        for file, blob in zip(files, blobs, strict=True):
            shard = _decode(blob, str(file), where if len(files) == 1 else f"{where} shard {file.name}")
            clash = next((name for name in shard if name in tensors), None)
            if clash is not None:
                raise IngredientCorrupt(f"{where}: tensor {clash!r} appears in more than one shard")
            tensors.update(shard)
        _check_finite(tensors, where)
        # One buffer per ingredient, tensors in name order: ingredients of one architecture are
        # then laid out alike, and a merge can take runs of tensors as one (``memory.span``).
        on_device = carve(((name, tensors[name].shape, tensors[name].dtype) for name in sorted(tensors)), self.device)
        for name, tensor in on_device.items():
            tensor.copy_(tensors.pop(name))  # each decoded tensor is freed once copied
        ingredient = Ingredient(
            digest=digest,
            path=ref.path,
            tensors=on_device,
            nbytes=sum(t.numel() * t.element_size() for t in on_device.values()),
        )
        with self._lock:
            ingredient = self._by_digest.setdefault(digest, ingredient)
            if stamp is not None:
                self._by_stamp[stamp] = digest
            total = self.nbytes
        self._observer.ingredient_memory(str(self.device), total)
        _log.info(
            "loaded %s: %d tensors, %.1f MB on %s in %.2f s",
            where,
            len(on_device),
            ingredient.nbytes / 1e6,
            self.device,
            time.perf_counter() - started,
        )
        return ingredient


def _stamp(files: list[Path]) -> tuple[tuple[str, int, int, int], ...] | None:
    """What identifies the files' current content without reading them, or None if one is missing."""
    try:
        stats = [(str(f.resolve()), os.stat(f)) for f in files]
    except OSError:
        return None  # reading will report it, naming the file
    return tuple((name, st.st_size, st.st_mtime_ns, st.st_ino) for name, st in stats)


def checkpoint_files(path: Path, where: str) -> list[Path]:
    """The files of a checkpoint: the file itself, or a Hugging Face model directory's weights.

    A directory holds ``model.safetensors``, a sharded ``model.safetensors.index.json``, or
    (read with ``weights_only``) ``pytorch_model.bin`` or its sharded index; safetensors win.
    """
    if not path.is_dir():
        return [path]
    for index_name, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index = path / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                shards = sorted(set(weight_map.values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                raise IngredientCorrupt(
                    f"{where}: {index_name} is not a readable shard index (JSON with a 'weight_map')"
                ) from None
            if not all(isinstance(shard, str) and _inside(shard) for shard in shards):
                # The index is data: it may not send the read to a file outside its directory.
                raise IngredientCorrupt(f"{where}: {index_name} names a shard outside the directory")
            return [path / shard for shard in shards]
        if (path / single).is_file():
            return [path / single]
    raise IngredientMissing(
        f"{where}: directory has no model.safetensors, model.safetensors.index.json, pytorch_model.bin or its index"
    )


def _inside(shard: str) -> bool:
    relative = Path(shard)
    return bool(shard) and not relative.is_absolute() and ".." not in relative.parts


def _read(path: str, where: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise IngredientMissing(f"{where}: file not found") from None
    except OSError as exc:
        raise IngredientMissing(f"{where}: cannot read: {exc.strerror or exc}") from None


def _decode(data: bytes, path: str, where: str) -> dict[str, torch.Tensor]:
    if path.endswith(_PICKLE_SUFFIXES):
        try:
            loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise IngredientCorrupt(
                f"{where}: not a weights-only torch checkpoint ({pickle_problem(exc)}); checkpoints load without "
                "running code, so save a state dict of tensors (or safetensors)"
            ) from None
        return _as_state_dict(loaded, where)
    try:
        return safetensors.torch.load(data)
    except Exception as exc:
        raise IngredientCorrupt(f"{where}: not a readable safetensors file: {safetensors_problem(exc)}") from None


def _as_state_dict(loaded: object, where: str) -> dict[str, torch.Tensor]:
    # Training scripts often save {"state_dict": ...} or {"model": ...}; accept one such level.
    if isinstance(loaded, Mapping) and len(loaded) == 1:
        (inner,) = loaded.values()
        if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            loaded = inner
    if not isinstance(loaded, Mapping) or not loaded:
        raise IngredientCorrupt(f"{where}: expected a state dict of tensors, found {type(loaded).__name__}")
    for name, value in loaded.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise IngredientCorrupt(f"{where}: entry {name!r} is a {type(value).__name__}, not a tensor")
    return {name: value for name, value in loaded.items()}


def _check_finite(tensors: Mapping[str, torch.Tensor], where: str) -> None:
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise IngredientCorrupt(f"{where}: tensor {name!r} holds {bad} NaN/Inf value(s)")


_SAFETENSORS_PROBLEMS = (
    "header too large",
    "header too small",
    "invalid header length",
    "invalid JSON in header",
    "invalid UTF-8 in header",
    "incomplete metadata",
    "invalid offset for tensor",
    "invalid shape, data type, or offset for tensor",
)
_POSITION = re.compile(r"at line \d+ column \d+")


def safetensors_problem(exc: BaseException) -> str:
    """What is wrong with a safetensors file, in the decoder's own fixed words only: its
    messages go on to quote what they choked on, and an error must not carry a file's bytes
    back to whoever named the file."""
    text = str(exc)
    problem = next((known for known in _SAFETENSORS_PROBLEMS if known in text), "its header cannot be read")
    position = _POSITION.search(text)
    return f"{problem} {position.group(0)}" if position and problem == "invalid JSON in header" else problem


def pickle_problem(exc: BaseException) -> str:
    """Why weights-only loading refused a file, without the names or bytes torch quotes."""
    text = str(exc)
    if "Unsupported global" in text:
        return "it holds Python objects other than tensors"
    if "Unsupported operand" in text or "load key" in text or "opcode" in text:
        return "it is not a torch checkpoint"
    return "weights-only loading refused it"
