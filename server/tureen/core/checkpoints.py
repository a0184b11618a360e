"""Checkpoint files as they lie on disk: which files, what they hold, and reading them safely.

A safetensors file is an 8-byte header length, a JSON header (name -> dtype, shape, byte
range) and the tensors' bytes. The header is read and checked here without reading the data,
so a checkpoint's layout is known before (or without) loading it, and any tensor, or any
range of one, can be read later with ``pread`` into memory the caller owns: no mapping of the
file (a mapped file that shrinks kills the process with SIGBUS on the next touch), no bytes
object and decode step in between. Pickled ``.pt``/``.bin`` files are read whole, with
``torch.load(weights_only=True)``: they never execute code.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from tureen.errors import IngredientChanged, IngredientCorrupt, IngredientMissing

PICKLE_SUFFIXES = (".pt", ".pth", ".bin")
MAX_HEADER = 100 << 20
"""The safetensors format's own bound on a header."""

DTYPES: Mapping[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "BOOL": torch.bool,
}

NAMES: Mapping[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}
WRITE_BLOCK = 64 << 20

Stamp = tuple[str, int, int, int]
"""(real path, size, mtime in ns, inode): what identifies a file's content without reading it."""


def stamp_of(path: Path) -> Stamp:
    st = os.stat(path)
    return (os.path.realpath(path), st.st_size, st.st_mtime_ns, st.st_ino)


@dataclass(frozen=True)
class Entry:
    """One tensor of a safetensors file: where its bytes lie (from the file's start)."""

    dtype: torch.dtype
    shape: torch.Size
    start: int
    stop: int


@dataclass(frozen=True)
class SafetensorsFile:
    """A safetensors file's checked header; ``read`` fetches tensors (or ranges of them)."""

    path: Path
    where: str
    stamp: Stamp
    entries: Mapping[str, Entry]
    data_start: int

    @classmethod
    def open(cls, path: Path, where: str) -> SafetensorsFile:
        try:
            stamp = stamp_of(path)
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise IngredientCorrupt(f"{where}: not a readable safetensors file: header too small")
                (length,) = struct.unpack("<Q", head)
                if length > MAX_HEADER or length + 8 > stamp[1]:
                    raise IngredientCorrupt(f"{where}: not a readable safetensors file: header too large")
                header = f.read(length)
        except FileNotFoundError:
            raise IngredientMissing(f"{where}: file not found") from None
        except OSError as exc:
            raise IngredientMissing(f"{where}: cannot read: {exc.strerror or exc}") from None
        entries = _entries(header, stamp[1] - 8 - length, where)
        return cls(path, where, stamp, entries, 8 + length)

    def read(self, name: str, begin: int = 0, end: int | None = None) -> torch.Tensor:
        """Elements ``[begin, end)`` of tensor ``name`` (flattened), freshly read into CPU memory;
        the whole tensor, in its shape, without a range."""
        entry = self.entries[name]
        count = entry.shape.numel()
        end = count if end is None else end
        out = torch.empty(end - begin, dtype=entry.dtype)
        self.read_into(name, out, begin)
        return out.view(entry.shape) if (begin, end) == (0, count) else out

    def read_into(self, name: str, out: torch.Tensor, begin: int = 0) -> None:
        """Fill the contiguous CPU tensor ``out`` with tensor ``name``'s elements from ``begin``."""
        entry = self.entries[name]
        self.read_data(out.view(-1).view(torch.uint8), entry.start + begin * entry.dtype.itemsize)

    def read_data(self, out: torch.Tensor, offset: int) -> None:
        """Fill the uint8 CPU tensor ``out`` with the data section's bytes from ``offset``."""
        if out.numel() == 0:
            return
        view = memoryview(out.numpy())  # type: ignore[arg-type]  # numpy arrays are buffers
        with open(self.path, "rb") as f:
            if os.fstat(f.fileno()).st_ino != self.stamp[3]:
                raise IngredientChanged(f"{self.where}: the file was replaced since it was loaded")
            got = 0
            while got < len(view):
                n = os.preadv(f.fileno(), [view[got:]], self.data_start + offset + got)
                if n == 0:
                    raise IngredientChanged(f"{self.where}: the file is shorter than when it was loaded")
                got += n

    def changed(self) -> bool:
        try:
            return stamp_of(self.path) != self.stamp
        except OSError:
            return True


def _entries(header: bytes, data_bytes: int, where: str) -> dict[str, Entry]:
    bad = f"{where}: not a readable safetensors file: "
    try:
        parsed = json.loads(header.decode("utf-8"))
    except UnicodeDecodeError:
        raise IngredientCorrupt(bad + "invalid UTF-8 in header") from None
    except ValueError as exc:
        found = re.search(r"line \d+ column \d+", str(exc))
        raise IngredientCorrupt(bad + "invalid JSON in header" + (f" at {found.group(0)}" if found else "")) from None
    if not isinstance(parsed, dict):
        raise IngredientCorrupt(bad + "incomplete metadata")
    entries: dict[str, Entry] = {}
    for name, raw in parsed.items():
        if name == "__metadata__":
            continue
        entry = _entry(raw)
        if entry is None or entry.stop > data_bytes:
            raise IngredientCorrupt(bad + "invalid shape, data type, or offset for tensor")
        entries[name] = entry
    spans = sorted((e.start, e.stop) for e in entries.values())
    for (_, stop), (start, _) in itertools.pairwise(spans):
        if start < stop:  # overlapping tensors (their names are the file's bytes: not quoted)
            raise IngredientCorrupt(bad + "invalid offset for tensor")
    return entries


def _entry(raw: object) -> Entry | None:
    """The header's description of one tensor, or None when it is not a consistent one."""
    if not isinstance(raw, dict) or raw.get("dtype") not in DTYPES:
        return None
    shape, offsets = raw.get("shape"), raw.get("data_offsets")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        return None
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) and o >= 0 for o in offsets):
        return None
    dtype = DTYPES[raw["dtype"]]
    size = torch.Size(shape)
    if offsets[1] - offsets[0] != size.numel() * dtype.itemsize:
        return None
    return Entry(dtype, size, offsets[0], offsets[1])


def safetensors_header(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """The length prefix and JSON header of a safetensors file of ``tensors``, in their order;
    the data starts 8-byte aligned after it, as the format's own writer does."""
    header: dict[str, object] = {}
    offset = 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": NAMES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = dict(metadata)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> None:
    """Write ``tensors`` as a safetensors file, tensor by tensor (a GPU tensor block by block), so
    writing costs no second copy of the blend in memory; the file appears whole or not at all."""
    partial = path.with_name(f".{path.name}.partial")
    with open(partial, "wb") as f:
        f.write(safetensors_header(tensors, metadata))
        for tensor in tensors.values():
            flat = tensor.detach().contiguous().view(-1).view(torch.uint8)
            for begin in range(0, flat.numel(), WRITE_BLOCK):
                f.write(memoryview(flat[begin : begin + WRITE_BLOCK].cpu().numpy()))  # type: ignore[arg-type]
    os.replace(partial, path)


def checkpoint_files(path: Path, where: str) -> tuple[list[Path], dict[str, str] | None]:
    """The files of a checkpoint, and a shard index's tensor -> shard map when it has one.

    ``path`` is a file, or a Hugging Face model directory holding ``model.safetensors``, a
    sharded ``model.safetensors.index.json``, or (read with ``weights_only``) ``pytorch_model.bin``
    or its sharded index; safetensors win.
    """
    if not path.is_dir():
        return [path], None
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
            return [path / shard for shard in shards], {str(k): v for k, v in weight_map.items()}
        if (path / single).is_file():
            return [path / single], None
    raise IngredientMissing(
        f"{where}: directory has no model.safetensors, model.safetensors.index.json, pytorch_model.bin or its index"
    )


def _inside(shard: str) -> bool:
    relative = Path(shard)
    return bool(shard) and not relative.is_absolute() and ".." not in relative.parts


def sha256_of(files: list[Path], where: str) -> str:
    """A single file's sha256; for shards, the sha256 of their sha256s in name order. Read in
    blocks, never whole."""
    digests = []
    for file in files:
        h = hashlib.sha256()
        try:
            with open(file, "rb") as f:
                while block := f.read(8 << 20):
                    h.update(block)
        except OSError as exc:
            raise IngredientMissing(f"{where}: cannot read {file.name}: {exc.strerror or exc}") from None
        digests.append(h.hexdigest())
    return digests[0] if len(digests) == 1 else hashlib.sha256("".join(digests).encode()).hexdigest()


def load_pickle(path: Path, where: str) -> dict[str, torch.Tensor]:
    """A ``.pt``/``.bin`` state dict, read whole with ``weights_only`` (no code runs)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise IngredientMissing(f"{where}: file not found") from None
    except OSError as exc:
        raise IngredientMissing(f"{where}: cannot read: {exc.strerror or exc}") from None
    try:
        loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise IngredientCorrupt(
            f"{where}: not a weights-only torch checkpoint ({pickle_problem(exc)}); checkpoints load without "
            "running code, so save a state dict of tensors (or safetensors)"
        ) from None
    return _as_state_dict(loaded, where)


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
