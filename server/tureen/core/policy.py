"""What a pushed spec may name: the code it runs and the files it reads.

A spec given on the command line (``--spec``, ``tureen merge``, ``tureen profile``) is the
operator's own and may name anything. A spec pushed over the wire is anyone's who reaches the
admin API, so ``SpecPolicy.check`` holds it to the operator's flags before it is stored: before
any module it names is imported (an import runs the module's code) and before any file it
names is opened.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

from tureen.errors import PermissionDenied
from tureen.spec import SoupSpec

BUILTIN_FACTORIES = ("tureen.demo.models:*",)
"""Tureen's own architectures, always allowed (the Hugging Face builder needs no factory)."""


def factory_allowed(factory: str, pattern: str) -> bool:
    """Whether ``module:callable`` matches a ``--allow-factory`` glob.

    The module part is a glob over the dotted name (``mycompany.*`` takes its submodules too);
    the callable part is matched segment by segment, so ``mycompany.models:*`` allows
    ``mycompany.models:build`` but not ``mycompany.models:os.system``, an attribute path through
    a module that ``mycompany.models`` happens to import.
    """
    module, _, attribute = factory.partition(":")
    want_module, _, want_attribute = pattern.partition(":")
    parts, wanted = attribute.split("."), want_attribute.split(".")
    return (
        fnmatchcase(module, want_module)
        and len(parts) == len(wanted)
        and all(fnmatchcase(part, want) for part, want in zip(parts, wanted, strict=True))
    )


def pattern_problem(pattern: str) -> str | None:
    """Why ``pattern`` cannot be a ``--allow-factory`` value, or None."""
    module, colon, attribute = pattern.partition(":")
    if not colon or not module or not attribute:
        return f"{pattern!r} is not module:callable (a glob, e.g. 'mycompany.models:*')"
    return None


@dataclass(frozen=True)
class SpecPolicy:
    """The factories and folders a pushed spec may name; everything else is PERMISSION_DENIED."""

    factories: tuple[str, ...] = BUILTIN_FACTORIES
    """Globs over ``module:callable`` (see ``factory_allowed``) and exact factory names."""
    roots: tuple[Path, ...] = ()
    """Resolved folders: a pushed spec's ingredient, evaluation and config paths must lie inside one."""

    @classmethod
    def of(
        cls, allow_factories: Iterable[str], roots: Iterable[str | os.PathLike[str]], startup: Iterable[SoupSpec] = ()
    ) -> SpecPolicy:
        """The operator's flags, plus what the start-up specs name: their exact factories and the
        folders of their files, so that a served spec, edited and pushed again, is accepted."""
        specs = list(startup)
        factories = [*BUILTIN_FACTORIES, *allow_factories]
        folders = [*roots]
        for spec in specs:
            factories += [f for _, f in _factories(spec) if not any(factory_allowed(f, known) for known in factories)]
            folders += [path if Path(path).is_dir() else Path(path).parent for _, path in _paths(spec)]
        resolved: list[Path] = []
        for folder in folders:
            real = Path(os.path.realpath(folder))
            if real not in resolved:
                resolved.append(real)
        return cls(tuple(factories), tuple(resolved))

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
        real = Path(os.path.realpath(path))  # symlinks and '..' resolved before the check
        if any(real == root or real.is_relative_to(root) for root in self.roots):
            return None
        if not self.roots:
            return f"{field}: this server reads no files for pushed specs; start it with --ingredient-root DIR"
        roots = ", ".join(str(root) for root in self.roots)
        return (
            f"{field}: {path!r} lies outside the ingredient roots ({roots}); "
            "the operator can add a folder with --ingredient-root DIR"
        )


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
        yield f"ingredients[{i}].path", ingredient.path
    if spec.evaluation is not None:
        for name, split in spec.evaluation.splits.items():
            if split.path is not None:
                yield f"evaluation.splits.{name}.path", split.path
