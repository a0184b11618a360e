"""Applying a spec's merge to whole state dicts: compatibility checks, then one tensor at a time.

The per-tensor math lives in ``tureen.merge``; this module decides which tensors go in, in
which order and with which weights, and what happens to tensors that must not be averaged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

import torch

from tureen.core.datatypes import BLEND_DTYPES
from tureen.core.ingredients import Ingredient
from tureen.core.parameters import ParameterPlan
from tureen.errors import IngredientMismatch, MergeError
from tureen.merge.registry import TensorJob, lookup
from tureen.spec import SoupSpec

_log = logging.getLogger("tureen.recipe")


def check_compatible(
    spec: SoupSpec, ingredients: Mapping[str, Ingredient], reference: Mapping[str, torch.Tensor] | None = None
) -> None:
    """Every ingredient must have the reference's keys, shapes and kinds of dtype.

    The reference is the architecture's own ``state_dict()`` when serving, else the first
    ingredient. Floating dtypes may differ (a bf16 and an fp32 fine-tune mix fine); integer and
    bool tensors must match exactly.
    """
    first = spec.ingredients[0]
    against = "the architecture" if reference is not None else f"ingredient {first.name!r}"
    expected = reference if reference is not None else ingredients[first.name].tensors
    for ref in spec.ingredients:
        tensors = ingredients[ref.name].tensors
        where = f"ingredient {ref.name!r} ({ref.path})"
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


def mix(spec: SoupSpec, ingredients: Mapping[str, Ingredient]) -> dict[str, torch.Tensor]:
    """Merge the ingredients' tensors by the spec's method into the spec's dtype.

    Floating tensors are merged in float32 with parameters resolved per tensor (see
    ``tureen.core.parameters``) and cast once at the end. Integer and bool tensors (step
    counters, index buffers) are never averaged: they must agree across all ingredients and
    are taken from the base, or the first ingredient when there is no base.
    """
    started = time.perf_counter()
    method = lookup(spec.merge.method)
    source = spec.merge.base or spec.ingredients[0].name
    reference = ingredients[source].tensors
    plan = ParameterPlan(spec, list(reference))
    names = [i.name for i in plan.mixed]
    out_dtype = BLEND_DTYPES[spec.dtype]
    merged: dict[str, torch.Tensor] = {}
    for done, (key, model_tensor) in enumerate(reference.items(), start=1):
        if model_tensor.is_floating_point():
            glob, per = plan.for_tensor(key)
            job = TensorJob(
                name=key,
                tensors=[ingredients[name].tensors[key] for name in names],
                ingredients=names,
                base=ingredients[spec.merge.base].tensors[key] if spec.merge.base else None,
                glob=glob,
                per=per,
                out_dtype=out_dtype,
            )
            try:
                merged[key] = method.combine(job).to(out_dtype)
            except ValueError as exc:
                raise MergeError(f"merge ({method.decl.name}): tensor {key!r}: {exc}") from None
        else:
            _check_agree(spec, ingredients, key, source)
            merged[key] = model_tensor.clone()
        if done % 100 == 0:
            _log.info("merging: %d/%d tensors", done, len(reference))
    parameters = sum(t.numel() for t in merged.values())
    _log.info(
        "merged %d tensors (%.2fM parameters) from %d ingredients with %s in %.3f s",
        len(merged),
        parameters / 1e6,
        len(spec.ingredients),
        method.decl.name,
        time.perf_counter() - started,
    )
    return merged


def _check_agree(spec: SoupSpec, ingredients: Mapping[str, Ingredient], key: str, source: str) -> None:
    reference = ingredients[source].tensors[key]
    for ref in spec.ingredients:
        if not torch.equal(ingredients[ref.name].tensors[key], reference):
            raise IngredientMismatch(
                f"ingredient {ref.name!r} ({ref.path}): tensor {key!r} ({reference.dtype}) differs from "
                f"ingredient {source!r}; integer and bool tensors are never averaged and must agree"
            )
