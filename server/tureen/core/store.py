"""The durable, versioned spec store: a directory that several server processes may share.

Layout under the root::

    models/<model>/versions/00000007.json        the pushed spec and who pushed it: written once
    models/<model>/versions/00000007.state.json  build state, failure reason, checksums: rewritten
    models/<model>/versions/00000006.deleted     a deleted version: its number stays taken
    models/<model>/active.json                   the active version and the versions active before

Every file is written whole to a temporary name, fsynced, then renamed (or linked) into place
and the directory fsynced, so a process killed at any moment leaves each file either as it was
or as it was meant to be, never torn. Version numbers are claimed by hard-linking the finished
file to its final name: the link fails if another process (another replica on the same shared
volume) took that number first, and the push tries the next one. No number is given twice and
no stored version is lost.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from tureen.errors import InvalidRequest, ModelNotFound, SoupError, StoreError, VersionConflict
from tureen.spec import SoupSpec, name_problem, parse_spec, spec_document

State = Literal["stored", "building", "ready", "failed", "rejected"]
Origin = Literal["operator", "pushed"]
_VERSION_FILE = re.compile(r"^(\d{8})\.json$")
_TAKEN = re.compile(r"^(\d{8})\.(?:json|deleted)$")


@dataclass(frozen=True)
class StoredVersion:
    """One pushed spec version and what became of it."""

    model: str
    version: int
    spec: SoupSpec
    pushed_by: str
    pushed_at: float
    state: State = "stored"
    reason: str = ""
    build_seconds: float | None = None
    checksums: dict[str, str] = field(default_factory=dict)
    """sha256 of each ingredient, by ingredient name, as resolved by the build."""
    evaluation: dict[str, dict[str, float]] = field(default_factory=dict)
    """Held-out scores of the blend, by split and metric."""
    ingredient_evaluation: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    """Each ingredient's scores alone, by ingredient, split and metric."""
    resolution: dict[str, Any] | None = None
    """A searched recipe's outcome: the merge section it resolved to and the search's log."""
    origin: Origin = "pushed"
    """``operator``: seeded from the command line; ``pushed``: arrived over the wire, so every
    build holds it to the policy of the replica that builds it (a version without one: pushed)."""


@dataclass(frozen=True)
class Pointer:
    """Which version of a model is active, and the versions that were active before it."""

    version: int
    history: tuple[int, ...] = ()
    by: str = ""
    at: float = 0.0
    canary: int = 0
    """A version taking a share of traffic beside ``version`` (0: none)."""


def pointing(previous: Pointer | None, version: int, by: str, at: float, history: tuple[int, ...] | None = None) -> Pointer:
    """The pointer once ``version`` is activated: the version it replaces joins the history
    (unless it is that version; ``history`` overrides, as a rollback does), and any canary ends."""
    if history is None:
        if previous is None:
            history = ()
        elif previous.version == version:
            history = previous.history
        else:
            history = (*previous.history, previous.version)
    return Pointer(version, history, by, at)


class SpecStore:
    """Specs and their states in a directory; safe to share between processes."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        try:
            (self.root / "models").mkdir(parents=True, exist_ok=True)
            probe = self.root / f".probe-{uuid.uuid4().hex}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise StoreError(f"--store {self.root}: not a writable directory: {exc.strerror or exc}") from None

    # ---- versions --------------------------------------------------------------------------

    def push(self, spec: SoupSpec, pushed_by: str, origin: Origin = "pushed") -> StoredVersion:
        """Store ``spec`` as the model's next version, durably, and return it."""
        folder = self._versions(spec.model)
        record = {
            "model": spec.model,
            "spec": spec_document(spec),
            "pushed_by": pushed_by,
            "pushed_at": time.time(),
            "origin": origin,
        }
        tmp = self._write_temp(folder, record)
        try:
            version = self._next_version(spec.model)
            while True:
                try:
                    os.link(tmp, folder / f"{version:08d}.json")  # fails if the number is taken
                    break
                except FileExistsError:
                    version += 1
            _fsync_dir(folder)
        except OSError as exc:
            raise StoreError(f"store {self.root}: cannot store a version of {spec.model!r}: {exc.strerror or exc}") from None
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
        return StoredVersion(spec.model, version, spec, pushed_by, record["pushed_at"], origin=origin)  # type: ignore[arg-type]

    def get(self, model: str, version: int) -> StoredVersion:
        path = self._versions(model, create=False) / f"{version:08d}.json"
        record = _read_json(path)
        if record is None:
            raise ModelNotFound(f"model {model!r} has no version {version}")
        try:
            spec = parse_spec(record["spec"], source=f"{model} version {version}")
        except SoupError as exc:  # a store written by another release, or edited by hand
            raise StoreError(f"store {path}: unreadable spec: {exc}") from None
        state = _read_json(path.with_suffix(".state.json")) or {}
        return StoredVersion(
            model=model,
            version=version,
            spec=spec,
            pushed_by=str(record.get("pushed_by", "")),
            pushed_at=float(record.get("pushed_at", 0.0)),
            state=state.get("state", "stored"),
            reason=str(state.get("reason", "")),
            build_seconds=state.get("build_seconds"),
            checksums=dict(state.get("checksums", {})),
            evaluation=dict(state.get("evaluation", {})),
            ingredient_evaluation=dict(state.get("ingredient_evaluation", {})),
            resolution=state.get("resolution"),
            origin="operator" if record.get("origin") == "operator" else "pushed",
        )

    def versions(self, model: str) -> list[StoredVersion]:
        """Every stored version of ``model``, oldest first."""
        return [self.get(model, v) for v in self.version_numbers(model)]

    def version_numbers(self, model: str) -> list[int]:
        folder = self._versions(model, create=False)
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise StoreError(f"store {folder}: cannot list: {exc.strerror or exc}") from None
        return sorted(int(m.group(1)) for m in map(_VERSION_FILE.match, names) if m)

    def models(self) -> list[str]:
        """Every model with at least one stored version."""
        try:
            names = sorted(os.listdir(self.root / "models"))
        except OSError as exc:
            raise StoreError(f"store {self.root}: cannot list models: {exc.strerror or exc}") from None
        # Folders that are no model's (a volume's lost+found) are not models either.
        return [name for name in names if name_problem(name) is None and self.version_numbers(name)]

    def record(self, stored: StoredVersion, state: State, reason: str = "", **more: Any) -> StoredVersion:
        """Record a version's new build state (with ``build_seconds``, ``checksums``, ``evaluation``,
        ``ingredient_evaluation`` or ``resolution`` when known; the others are kept)."""
        current: dict[str, Any] = {
            "state": state,
            "reason": reason,
            "build_seconds": stored.build_seconds,
            "checksums": stored.checksums,
            "evaluation": stored.evaluation,
            "ingredient_evaluation": stored.ingredient_evaluation,
            "resolution": stored.resolution,
        }
        current.update(more)
        spec_file = self._versions(stored.model) / f"{stored.version:08d}.json"
        if not spec_file.is_file():  # deleted meanwhile: no state file may outlive its spec
            raise ModelNotFound(f"model {stored.model!r} has no version {stored.version}")
        self._replace(spec_file.with_suffix(".state.json"), current)
        return replace(stored, **current)

    def delete(self, model: str, version: int) -> None:
        """Forget a version that is not active."""
        pointer = self.pointer(model)
        if pointer is not None and pointer.version == version:
            raise VersionConflict(f"model {model!r} version {version} is active; activate another version first")
        folder = self._versions(model, create=False)
        if not (folder / f"{version:08d}.json").exists():
            raise ModelNotFound(f"model {model!r} has no version {version}")
        try:
            with contextlib.suppress(FileNotFoundError):
                (folder / f"{version:08d}.state.json").unlink()
            # A tombstone keeps the number taken: a later push never reuses it, so a number in
            # an old pointer history or a log always means the spec it meant then.
            os.replace(folder / f"{version:08d}.json", folder / f"{version:08d}.deleted")
            _fsync_dir(folder)
        except OSError as exc:
            raise StoreError(f"store {folder}: cannot delete version {version}: {exc.strerror or exc}") from None

    # ---- the active pointer ----------------------------------------------------------------

    def pointer(self, model: str) -> Pointer | None:
        record = _read_json(self._folder(model) / "active.json")
        if record is None:
            return None
        return Pointer(
            int(record["version"]),
            tuple(record.get("history", ())),
            record.get("by", ""),
            record.get("at", 0.0),
            int(record.get("canary", 0)),
        )

    def point(self, model: str, pointer: Pointer) -> None:
        """Make ``pointer`` the model's active pointer (the last writer wins between replicas)."""
        record = {
            "version": pointer.version,
            "history": list(pointer.history[-100:]),
            "by": pointer.by,
            "at": pointer.at,
            "canary": pointer.canary,
        }
        self._replace(self._folder(model) / "active.json", record)

    # ---- files -----------------------------------------------------------------------------

    def _folder(self, model: str) -> Path:
        """The model's folder; a name that is not a model name (``..``, a path) never becomes one."""
        if (problem := name_problem(model)) is not None:
            raise InvalidRequest(f"model: {problem}")
        return self.root / "models" / model

    def _versions(self, model: str, create: bool = True) -> Path:
        folder = self._folder(model) / "versions"
        if create and not folder.is_dir():
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"store {folder}: cannot create: {exc.strerror or exc}") from None
            _fsync_dir(folder.parent)  # a new model's folders must survive a crash too
            _fsync_dir(folder.parent.parent)
        return folder

    def _next_version(self, model: str) -> int:
        folder = self._versions(model)
        try:
            names = os.listdir(folder)
        except OSError as exc:
            raise StoreError(f"store {folder}: cannot list: {exc.strerror or exc}") from None
        numbers = [int(m.group(1)) for m in map(_TAKEN.match, names) if m]
        return max(numbers, default=0) + 1

    def _write_temp(self, folder: Path, record: dict[str, Any]) -> Path:
        tmp = folder / f".{uuid.uuid4().hex}.tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as handle:
                json.dump(record, handle, indent=1, sort_keys=True)
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise StoreError(f"store {folder}: cannot write: {exc.strerror or exc}") from None
        return tmp

    def _replace(self, path: Path, record: dict[str, Any]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._write_temp(path.parent, record)
        try:
            os.replace(tmp, path)
            _fsync_dir(path.parent)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise StoreError(f"store {path}: cannot write: {exc.strerror or exc}") from None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as handle:
            loaded = json.load(handle)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise StoreError(f"store {path}: unreadable: {exc}") from None
    if not isinstance(loaded, dict):
        raise StoreError(f"store {path}: unreadable: not a JSON object")
    return loaded


def _fsync_dir(folder: Path) -> None:
    """Make a rename or link in ``folder`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
