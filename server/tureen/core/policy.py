"""What a pushed spec may name: the code it runs and the files it reads.

A spec given on the command line (``--spec``, ``tureen merge``, ``tureen profile``) is the
operator's own and may name anything. A spec pushed over the wire is anyone's who reaches the
admin API, so ``SpecPolicy.check`` holds it to the operator's flags before it is stored: before
any module it names is imported (an import runs the module's code) and before any file it
names is opened.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

from tureen.errors import PermissionDenied, SoupError
from tureen.spec import SoupSpec

_log = logging.getLogger("tureen.policy")

BUILTIN_FACTORIES = ("tureen.demo.models:*",)
"""Tureen's own architectures, always allowed (the Hugging Face builder needs no factory)."""


def factory_allowed(factory: str, pattern: str) -> bool:
    """Whether ``module:callable`` matches a ``--allow-factory`` glob.

    The module part is a glob over the dotted name (``mycompany.*`` takes its submodules too);
    the callable part is matched segment by segment, so ``mycompany.models:*`` allows
    ``mycompany.models:build`` but not ``mycompany.models:os.system``, an attribute path through
    a module that ``mycompany.models`` happens to import, nor ``_private`` or ``__dunder__``
    names unless the pattern writes the underscore. It does allow every other name the module
    has, the ones it imports included: name the factories when the module imports callables.
    """
    module, _, attribute = factory.partition(":")
    want_module, _, want_attribute = pattern.partition(":")
    parts, wanted = attribute.split("."), want_attribute.split(".")
    return (
        fnmatchcase(module, want_module)
        and len(parts) == len(wanted)
        and all(_segment_allowed(part, want) for part, want in zip(parts, wanted, strict=True))
    )


def _segment_allowed(part: str, want: str) -> bool:
    # A glob never reaches private or dunder names (``__init__`` of a live module, say): only a
    # pattern that spells the underscore out does.
    return fnmatchcase(part, want) and (not part.startswith("_") or want.startswith("_"))


def pattern_problem(pattern: str) -> str | None:
    """Why ``pattern`` cannot be a ``--allow-factory`` value, or None."""
    module, colon, attribute = pattern.partition(":")
    if not colon or not module or not attribute:
        return f"{pattern!r} is not module:callable (a glob, e.g. 'mycompany.models:*')"
    return None


@dataclass(frozen=True)
class SpecPolicy:
    """The factories and files a pushed spec may name; everything else is PERMISSION_DENIED."""

    factories: tuple[str, ...] = BUILTIN_FACTORIES
    """Globs over ``module:callable`` (see ``factory_allowed``) and exact factory names."""
    roots: tuple[Path, ...] = ()
    """Resolved folders: a pushed spec's ingredient, evaluation and config paths may lie inside one."""
    files: frozenset[Path] = frozenset()
    """Resolved files a pushed spec may name besides: those the start-up specs name."""

    @classmethod
    def of(
        cls,
        allow_factories: Iterable[str],
        roots: Iterable[str | os.PathLike[str]],
        startup: Iterable[SoupSpec] = (),
        startup_folders: Iterable[str | os.PathLike[str]] = (),
    ) -> SpecPolicy:
        """The operator's flags, plus what the start-up specs name: their exact factories and
        files, the folders they name, and the folders their spec files lie in (so that a served
        spec, edited and pushed again, is accepted). A folder taken implicitly that would open
        too much (``/``, the home folder, the temporary folder itself) is left out, with a warning."""
        given = list(allow_factories)
        for pattern in given:
            if (problem := pattern_problem(pattern)) is not None:
                raise SoupError(f"--allow-factory: {problem}")
        factories = [*BUILTIN_FACTORIES, *given]
        folders = [_real(root) for root in roots]
        implicit = [*startup_folders]
        files: set[Path] = set()
        for spec in startup:
            factories += [f for _, f in _factories(spec) if not any(factory_allowed(f, known) for known in factories)]
            for _, path in _paths(spec):
                if Path(path).is_dir():
                    implicit.append(path)
                else:
                    files.add(_real(path))
        for folder in map(_real, implicit):
            if folder in _too_broad():
                _log.warning(
                    "not letting pushed specs read everything under %s (a start-up spec lies there); "
                    "use --ingredient-root DIR for the folders they may read",
                    folder,
                )
            elif folder not in folders:
                folders.append(folder)
        return cls(tuple(factories), tuple(dict.fromkeys(folders)), frozenset(files))

    def check(self, spec: SoupSpec) -> None:
        """Raise ``PermissionDenied`` naming every field that reaches outside this policy."""
        problems = [self._factory_problem(field, factory) for field, factory in _factories(spec)]
        problems += [self._path_problem(field, path) for field, path in _paths(spec)]
        found = [problem for problem in problems if problem is not None]
        if found:
            raise PermissionDenied("; ".join(found))

    def _factory_problem(self, field: str, factory: str) -> str | None:
        if any(factory_allowed(factory, pattern) for pattern in self.factories):
            return None
        allowed = ", ".join(self.factories)
        return (
            f"{field}: {factory!r} is not allowed in a pushed spec (allowed: {allowed}); "
            f"the operator can allow it by starting the server with --allow-factory '{factory}'"
        )

    def _path_problem(self, field: str, path: str) -> str | None:
        real = _real(path)  # symlinks and '..' resolved before the check
        if real in self.files or any(real == root or real.is_relative_to(root) for root in self.roots):
            return None
        if not self.roots and not self.files:
            return f"{field}: this server reads no files for pushed specs; start it with --ingredient-root DIR"
        roots = ", ".join(str(root) for root in self.roots) or "none: only the files the start-up specs name"
        return (
            f"{field}: {path!r} lies outside the ingredient roots ({roots}); "
            "the operator can add a folder with --ingredient-root DIR"
        )


def _real(path: str | os.PathLike[str]) -> Path:
    return Path(os.path.realpath(os.path.expanduser(path)))


def _too_broad() -> set[Path]:
    return {_real("/"), _real(Path.home()), _real(tempfile.gettempdir())}


def _factories(spec: SoupSpec) -> Iterator[tuple[str, str]]:
    """(field, ``module:callable``) of every factory the spec names."""
    if spec.architecture is not None and spec.architecture.factory is not None:
        yield "architecture.factory", spec.architecture.factory
    if spec.evaluation is not None:
        for name, split in spec.evaluation.splits.items():
            if split.factory is not None:
                yield f"evaluation.splits.{name}.factory", split.factory


def _paths(spec: SoupSpec) -> Iterator[tuple[str, str]]:
    """(field, path) of every file or folder the spec names."""
    if spec.architecture is not None and spec.architecture.huggingface is not None:
        yield "architecture.huggingface", spec.architecture.huggingface
    for i, ingredient in enumerate(spec.ingredients):
        yield (
            (f"ingredients[{i}].path", ingredient.location)
            if ingredient.adapter is None
            else (
                f"ingredients[{i}].adapter",
                ingredient.location,
            )
        )
    if spec.evaluation is not None:
        for name, split in spec.evaluation.splits.items():
            if split.path is not None:
                yield f"evaluation.splits.{name}.path", split.path
