"""The parts a merge is made of: the whole model, or mergekit's slices of layers.

A spec without ``merge.slices`` merges in one part: every ingredient, every tensor. With
slices, the blend's tensors come in parts, as mergekit plans them:

- the tensors before the layers (embeddings) from the first slice's sources;
- each slice's layers, numbered on from the last slice's, each merged from the same layer of
  every source's run (a slice of ``layers: [8, 16]`` reads layer 8 as its first);
- the tensors after the layers (final norm, head) from the last slice's sources.

Each part is merged like a whole spec of its own: its sources are the ingredients (renamed
views, nothing copied), its base is the slice's, its parameters come first, and gradient
lists run over the slice's own layers (mergekit's ``t``). The layers are the tensors under the
one prefix whose names carry a layer number (``model.layers.12.mlp...``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch

from tureen.core.adapters import AdaptedTensors
from tureen.core.ingredients import Ingredient
from tureen.errors import IngredientMismatch
from tureen.merge.registry import REGISTRY
from tureen.spec import FrozenDict, Slice, SoupSpec

_NUMBERED = re.compile(r"^(.*?)\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class Part:
    """One part of a merge: a spec to merge by, its ingredients under the blend's tensor names."""

    spec: SoupSpec
    ingredients: Mapping[str, Ingredient]
    positions: Mapping[str, float] | None = None
    """Where each tensor sits along a gradient; None: by its layer number (a whole model)."""

    @property
    def source(self) -> str:
        """The ingredient integer tensors are taken from: the base, else the first."""
        return self.spec.merge.base or self.spec.ingredients[0].name

    @property
    def layout(self) -> Mapping[str, torch.Tensor]:
        """The blend's tensors this part writes (meta tensors), in order."""
        return self.ingredients[self.source].layout


def parts(spec: SoupSpec, ingredients: Mapping[str, Ingredient]) -> list[Part]:
    """The parts ``spec`` merges, in the blend's order (see the module's docstring)."""
    ingredients = exact_deltas(spec, ingredients)
    if spec.merge.slices is None:
        return [Part(spec, {ref.name: ingredients[ref.name] for ref in spec.ingredients})]
    slices = spec.merge.slices
    first = ingredients[slices[0].sources[0].ingredient].layout
    prefix = layer_prefix(first, f"ingredient {slices[0].sources[0].ingredient!r}")
    before, after = _outside(first)
    result = [_outer(spec, slices[0], ingredients, before)] if before else []
    offset = 0
    for i, piece in enumerate(slices):
        result.append(_layers(spec, i, piece, ingredients, prefix, offset))
        offset += piece.length
    if after:
        result.append(_outer(spec, slices[-1], ingredients, after))
    return result


def exact_deltas(spec: SoupSpec, ingredients: Mapping[str, Ingredient]) -> Mapping[str, Ingredient]:
    """For a task-vector method, LoRA adapters on the merge's base give their low-rank update
    itself as their task vector (``base + scale * B @ A`` unrounded), not the difference of two
    rounded weights, which loses small updates in 16-bit dtypes."""
    method = REGISTRY.get(spec.merge.method)  # a search (greedy, learned) merges linearly
    if method is None or not method.record.task_vectors:
        return ingredients
    bases = {spec.merge.base, *(piece.base for piece in spec.merge.slices or ())} - {None}
    on_base = {ref.name for ref in spec.ingredients if ref.base in bases}
    exact = {}
    for name in on_base:
        tensors = ingredients[name].tensors
        if isinstance(tensors, AdaptedTensors):
            exact[name] = replace(ingredients[name], tensors=tensors.exactly())
    return {**ingredients, **exact} if exact else ingredients


def _prefixes(layout: Mapping[str, torch.Tensor]) -> set[str]:
    """The prefixes under which tensor names carry a layer number (``model.layers``)."""
    return {found.group(1) for key in layout if (found := _NUMBERED.match(key))}


def outside_layers(layout: Mapping[str, torch.Tensor]) -> list[str]:
    """The tensors outside every stack of numbered layers (embeddings, norms, heads), in order."""
    prefixes = tuple(prefix + "." for prefix in _prefixes(layout))
    return [key for key in layout if not key.startswith(prefixes)]


def layer_prefix(layout: Mapping[str, torch.Tensor], where: str) -> str:
    """The prefix of the numbered layers (``model.layers``): the one prefix under which names
    carry a number; models with two such stacks (encoder and decoder) are refused."""
    prefixes = _prefixes(layout)
    if len(prefixes) != 1:
        what = "no numbered layers" if not prefixes else f"several stacks of numbered layers ({', '.join(sorted(prefixes))})"
        raise IngredientMismatch(f"merge.slices: {where} has {what}; slices need one stack of layers")
    return prefixes.pop()


def layers_of(layout: Mapping[str, torch.Tensor], prefix: str) -> dict[int, list[str]]:
    """Layer number -> the names after ``prefix.N.`` in that layer, in order."""
    found: dict[int, list[str]] = {}
    for key in layout:
        match = _NUMBERED.match(key)
        if match is not None and match.group(1) == prefix:
            found.setdefault(int(match.group(2)), []).append(match.group(3))
    return found


def _outside(layout: Mapping[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """Tensors outside the layers: (before them, after them). Embeddings come before (their
    names say ``embed``, or GPT-2's ``wte``/``wpe``), everything else (norms, heads) after."""
    before: list[str] = []
    after: list[str] = []
    for key in outside_layers(layout):
        (before if "embed" in key or any(part in ("wte", "wpe") for part in key.split(".")) else after).append(key)
    return before, after


def _part_spec(spec: SoupSpec, piece: Slice) -> SoupSpec:
    """``spec`` as one slice merges it: the slice's sources as ingredients (their run's
    parameters before their own), its base, its parameters and overrides first."""
    refs = {ref.name: ref for ref in spec.ingredients}
    ingredients = tuple(
        refs[s.ingredient].model_copy(update={"parameters": FrozenDict({**refs[s.ingredient].parameters, **s.parameters})})
        for s in piece.sources
    )
    merge = spec.merge.model_copy(
        update={
            "base": piece.base or spec.merge.base,
            "parameters": FrozenDict({**spec.merge.parameters, **piece.parameters}),
            "overrides": piece.overrides + spec.merge.overrides,
            "slices": None,
        }
    )
    return spec.model_copy(update={"ingredients": ingredients, "merge": merge})


def _outer(spec: SoupSpec, piece: Slice, ingredients: Mapping[str, Ingredient], keys: list[str]) -> Part:
    names = {key: key for key in keys}
    views = {s.ingredient: _view(ingredients[s.ingredient], names, s.ingredient) for s in piece.sources}
    return Part(_part_spec(spec, piece), views, dict.fromkeys(keys, 0.0))


def _layers(spec: SoupSpec, i: int, piece: Slice, ingredients: Mapping[str, Ingredient], prefix: str, offset: int) -> Part:
    """Slice ``i``: its layers numbered from ``offset`` in the blend, read from each source's run."""
    views, positions = {}, {}
    for j, source in enumerate(piece.sources):
        layout = ingredients[source.ingredient].layout
        present = layers_of(layout, prefix)
        first, end = source.layers
        if end > len(present) or any(k not in present for k in range(first, end)):
            raise IngredientMismatch(
                f"merge.slices[{i}].sources[{j}]: ingredient {source.ingredient!r} has layers 0-{len(present) - 1}; "
                f"the slice asks for [{first}, {end})"
            )
        names = {}
        for k in range(piece.length):
            for leaf in present[first + k]:
                names[f"{prefix}.{offset + k}.{leaf}"] = f"{prefix}.{first + k}.{leaf}"
                positions[f"{prefix}.{offset + k}.{leaf}"] = k / (piece.length - 1) if piece.length > 1 else 1.0
        views[source.ingredient] = ingredients[source.ingredient].renamed(names)
    return Part(_part_spec(spec, piece), views, positions)


def _view(ingredient: Ingredient, names: Mapping[str, str], name: str) -> Ingredient:
    missing = [key for key in names.values() if key not in ingredient.layout]
    if missing:
        raise IngredientMismatch(f"ingredient {name!r} ({ingredient.path}): missing tensor {missing[0]!r}")
    return ingredient.renamed(names)


def check_parts(spec: SoupSpec, found: list[Part], reference: Mapping[str, torch.Tensor] | None) -> None:
    """The parts write each of the blend's tensors once; with a reference (the architecture's
    state), exactly its tensors, so that a frankenmerge's layer count must be the module's."""
    written: dict[str, None] = {}
    for part in found:
        for key in part.layout:
            if key in written:
                raise IngredientMismatch(f"merge.slices: tensor {key!r} would be written twice")
            written[key] = None
    if reference is None:
        return
    missing = [key for key in reference if key not in written]
    extra = [key for key in written if key not in reference]
    if missing or extra:
        count = sum(piece.length for piece in spec.merge.slices or ())
        which = f"has no tensor {extra[0]!r}" if extra else f"expects {missing[0]!r}, which no slice gives"
        raise IngredientMismatch(
            f"merge.slices: the architecture {which}; the slices make {count} layers "
            "(a huggingface architecture takes architecture.config.num_hidden_layers)"
        )
