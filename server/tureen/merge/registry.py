"""The one explicit registry: each merge method's record with its tensor function resolved.

The records live in ``tureen.merge.methods``, which names each function as ``module:function``
so that it stays free of torch; this module imports them once, here, and nothing registers
itself on import. A function receives a ``TensorJob`` and returns the merged tensor: the
job's ``out`` when it wrote there directly, else a float32 tensor that the caller rounds into
``out``. Adding a method is one entry in ``METHODS`` and its function (``tureen.merge.combine``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import cast

from tureen.merge.job import Combine, Fit, TensorJob
from tureen.merge.methods import METHODS, MergeMethod, MethodDecl, named_function

__all__ = ["REGISTRY", "Combine", "Method", "TensorJob", "lookup", "resolve"]


@dataclass(frozen=True)
class Method:
    """A merge method ready to run: its record and the function the record names."""

    record: MergeMethod
    combine: Combine
    fit: Fit | None = None

    @property
    def decl(self) -> MethodDecl:
        return self.record.decl

    @property
    def elementwise(self) -> bool:
        return self.record.elementwise


def resolve(reference: str) -> Combine:
    """The merge function named by ``module:function``."""
    return cast(Combine, named_function(reference))


REGISTRY: Mapping[str, Method] = {
    record.decl.name: Method(record, resolve(record.function), cast(Fit, named_function(record.fit)) if record.fit else None)
    for record in METHODS
}


def lookup(name: str) -> Method:
    """The method called ``name``; the error lists the methods that exist."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown merge method {name!r} (known: {', '.join(sorted(REGISTRY))})") from None
