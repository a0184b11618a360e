"""The step every use of a spec starts with: its ingredients loaded and checked, and its module's shape.

A build, ``tureen merge`` and ``tureen profile`` all need the same things before they merge or
score anything; ``prepare`` makes them once, in the order that fails cheapest first: the
architecture on the meta device (no memory, no weights) before any checkpoint is read.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from torch import nn

from tureen.core.architecture import aliases, instantiate, interface_of
from tureen.core.datatypes import BLEND_DTYPES
from tureen.core.evaluation import Evaluator
from tureen.core.ingredients import Ingredient, IngredientPool
from tureen.core.recipe import check_compatible
from tureen.core.signature import Signature
from tureen.core.vocabulary import Vocabulary, align
from tureen.spec import SoupSpec


@dataclass(frozen=True)
class Prepared:
    """A spec ready to merge: ingredients by name, checked against each other and (with a module)
    against the module's state; the module's skeleton on the meta device, its signature, and an
    evaluator when the spec has an evaluation section."""

    spec: SoupSpec
    ingredients: Mapping[str, Ingredient]
    skeleton: nn.Module | None = None
    signature: Signature | None = None
    evaluator: Evaluator | None = None
    vocabulary: Vocabulary | None = None
    """The blend's vocabulary, when the spec maps embedding rows by token (``tokenizer``)."""


def prepare(
    spec: SoupSpec, pool: IngredientPool, progress: Callable[[str, float], None] | None = None, *, module: bool = True
) -> Prepared:
    """Load and check ``spec``'s ingredients from ``pool``. With ``module`` (the caller checks
    that the spec has an architecture), the architecture is built on the meta device first and
    the ingredients must fit it (tied parameters are expected once); without, the ingredients
    are only checked against each other (``tureen merge`` needs no architecture)."""
    if not module or spec.architecture is None:
        ingredients, vocabulary = align(spec, pool.load_all(spec, progress))
        check_compatible(spec, ingredients)
        return Prepared(spec, ingredients, vocabulary=vocabulary)
    skeleton = instantiate(spec.architecture, "meta")
    signature = Signature(interface_of(spec, skeleton))
    ingredients, vocabulary = align(spec, pool.load_all(spec, progress))
    tied = aliases(skeleton)
    check_compatible(spec, ingredients, {k: v for k, v in skeleton.state_dict().items() if k not in tied})
    evaluator = None
    if spec.evaluation is not None:
        arch = spec.architecture
        tokenizer = arch.huggingface if arch.huggingface is not None and arch.task == "causal-lm" else None
        evaluator = Evaluator(spec.evaluation, signature, pool.device, BLEND_DTYPES[spec.dtype], tokenizer)
    return Prepared(spec, ingredients, skeleton, signature, evaluator, vocabulary)
