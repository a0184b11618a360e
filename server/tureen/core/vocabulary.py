"""Ingredients whose vocabularies differ: embedding rows mapped by token (mergekit's ``tokenizer_source``).

Fine-tunes often add tokens (chat markers, tool calls) and grow their embeddings. With
``tokenizer: {source: ...}`` the blend's vocabulary is

- ``base``: the base ingredient's (the first ingredient's without a base);
- ``union``: the base's, then every other token of the ingredients in spec order, then their
  added tokens (as mergekit builds it);
- an ingredient's name: that ingredient's.

Each ingredient's vocabulary tensors (outside the numbered layers, one row per token: the input
embeddings and the output head) are then read by token: row ``i`` of the blend's vocabulary is
the ingredient's row for the same token. Where an ingredient lacks the token, it gets the row of
the only ingredient that has it, else the base's, else the mean of those that have it (zeros if
none has), so that a token added by one fine-tune keeps that fine-tune's embedding. Tokenizers
are read from ``tokenizer.json`` with the ``tokenizers`` package: no code runs, nothing is fetched.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from tureen.core.ingredients import Ingredient
from tureen.core.slices import outside_layers
from tureen.errors import IngredientCorrupt, IngredientMismatch, IngredientMissing
from tureen.spec import SoupSpec

_log = logging.getLogger("tureen.vocabulary")


@dataclass(frozen=True)
class Vocabulary:
    """The blend's tokenizer."""

    tokenizer: Any  # tokenizers.Tokenizer
    base_folder: Path
    """Where the base's tokenizer came from."""

    def save(self, folder: Path) -> None:
        """``tokenizer.json`` into ``folder``, with the base's ``tokenizer_config.json`` minus its
        list of added tokens, which the new tokenizer.json holds."""
        self.tokenizer.save(str(folder / "tokenizer.json"))
        config = self.base_folder / "tokenizer_config.json"
        if config.is_file():
            settings = json.loads(config.read_text())
            settings.pop("added_tokens_decoder", None)
            (folder / "tokenizer_config.json").write_text(json.dumps(settings, indent=2))


def align(spec: SoupSpec, ingredients: Mapping[str, Ingredient]) -> tuple[dict[str, Ingredient], Vocabulary | None]:
    """The ingredients with their vocabulary tensors in the blend's vocabulary, and that
    vocabulary; the ingredients as they are when the spec has no ``tokenizer`` section."""
    if spec.tokenizer is None:
        return dict(ingredients), None
    names = [ref.name for ref in spec.ingredients]
    base = spec.merge.base or names[0]
    found = {ref.name: _tokenizer_of(_folder(ref.location), ref.base, spec) for ref in spec.ingredients}
    found = {name: tok if tok is not None else found[base] for name, tok in found.items()}
    if found[base] is None:
        raise IngredientMissing(f"tokenizer: the base {base!r} has no tokenizer.json beside its weights")
    sizes = {name: _vocab_size(spec, name, ingredients[name]) for name in names}
    vocabs = {name: _kept(found[name], sizes[name]) for name in names}
    source = spec.tokenizer.source
    out = _union(found, vocabs, base) if source == "union" else _copy(found[base if source == "base" else source])
    target = out.get_vocab(with_added_tokens=True)
    rows = {name: _rows(target, vocabs[name]) for name in names}
    shared = _Rows(rows, ingredients, spec.merge.base, len(target))
    aligned = {name: _aligned(ingredients[name], shared, name, sizes[name]) for name in names}
    _log.info("tokenizer: %s, %d tokens (ingredients had %s)", source, len(target), sorted(set(sizes.values())))
    base_ref = next(ref for ref in spec.ingredients if ref.name == base)
    return {**ingredients, **aligned}, Vocabulary(out, _folder(base_ref.location))


def _folder(location: str) -> Path:
    """The folder beside an ingredient's weights: the ingredient itself, or its file's folder."""
    path = Path(location)
    return path if path.is_dir() else path.parent


def _tokenizer_of(folder: Path, base: str | None, spec: SoupSpec) -> Any:
    """The tokenizer beside an ingredient's weights, None if there is none (mergekit then
    assumes the base's); an adapter without one has its base's."""
    from tokenizers import Tokenizer

    file = folder / "tokenizer.json"
    if file.is_file():
        try:
            return Tokenizer.from_file(str(file))
        except Exception as exc:
            raise IngredientCorrupt(f"tokenizer: cannot read {file}: {exc}") from None
    if base is not None:
        ref = next(r for r in spec.ingredients if r.name == base)
        return _tokenizer_of(_folder(ref.location), None, spec)
    return None


def _vocab_size(spec: SoupSpec, name: str, ingredient: Ingredient) -> int:
    """Rows of the ingredient's embeddings: ``vocab_size`` of its config.json, else the most rows
    of a matrix outside the layers."""
    ref = next(r for r in spec.ingredients if r.name == name)
    config = _folder(ref.location) / "config.json"
    if config.is_file():
        size = json.loads(config.read_text()).get("vocab_size")
        if isinstance(size, int) and size > 0:
            return size
    return max(ingredient.layout[k].shape[0] for k in outside_layers(ingredient.layout) if ingredient.layout[k].dim() == 2)


def _kept(tokenizer: Any, size: int) -> dict[str, int]:
    """Token -> row, for the tokens that have a row (ids past the embeddings are padding)."""
    return {token: i for token, i in tokenizer.get_vocab(with_added_tokens=True).items() if i < size}


def _copy(tokenizer: Any) -> Any:
    from tokenizers import Tokenizer

    return Tokenizer.from_str(tokenizer.to_str())


def _union(found: Mapping[str, Any], vocabs: Mapping[str, dict[str, int]], base: str) -> Any:
    """The base's tokenizer with every other ingredient's tokens added: plain tokens first, in
    order of appearance (ingredients in spec order, the base first), then added tokens, each
    once, with its first settings. (mergekit walks the models in set order; spec order is stable.)"""
    out = _copy(found[base])
    present = found[base].get_vocab(with_added_tokens=True)
    plain: dict[str, None] = {}
    added: dict[str, Any] = {}
    for name in [base, *[n for n in vocabs if n != base]]:
        decoder = sorted(found[name].get_added_tokens_decoder().items())  # by id: the Rust map has no order
        own = {info.content: info for i, info in decoder if vocabs[name].get(info.content) == i}
        for token, _ in sorted(vocabs[name].items(), key=lambda item: item[1]):
            if token not in own:
                plain.setdefault(token, None)
        for token, info in own.items():
            added.setdefault(token, info)
    new = [token for token in plain if token not in present and token not in added]
    if new:
        out.add_tokens(new)
    for info in added.values():
        (out.add_special_tokens if info.special else out.add_tokens)([info])
    return out


def _rows(target: Mapping[str, int], vocab: Mapping[str, int]) -> list[int]:
    rows = [-1] * len(target)
    for token, i in target.items():
        rows[i] = vocab.get(token, -1)
    return rows


class _Rows:
    """The vocabulary tensors of every ingredient in the blend's vocabulary, one tensor name at a
    time (the last one is kept: a streamed merge reads it piece by piece)."""

    def __init__(self, rows: Mapping[str, list[int]], ingredients: Mapping[str, Ingredient], base: str | None, size: int) -> None:
        """``base``: the merge's base, whose row a token lacking elsewhere takes (mergekit's rule,
        which a merge without a base skips)."""
        self.rows, self.ingredients, self.base, self.size = rows, ingredients, base, size
        self._last: tuple[str, dict[str, torch.Tensor]] | None = None

    def tensor(self, key: str, name: str) -> torch.Tensor:
        if self._last is None or self._last[0] != key:
            self._last = (key, self._build(key))
        return self._last[1][name]

    def _build(self, key: str) -> dict[str, torch.Tensor]:
        names = list(self.rows)
        tensors = {name: self.ingredients[name].whole(key) for name in names}
        dtype = tensors[names[0]].dtype
        for tensor in tensors.values():
            dtype = torch.promote_types(dtype, tensor.dtype)
        index = {name: torch.tensor(self.rows[name]) for name in names}
        fill = self._fill(key, tensors, index, dtype)
        out = {}
        for name in names:
            have = index[name] >= 0
            rows = tensors[name].new_zeros((self.size, *tensors[name].shape[1:]), dtype=dtype)
            rows[have] = tensors[name][index[name][have]].to(dtype)
            rows[~have] = fill[~have]
            out[name] = rows
        return out

    def _fill(
        self, key: str, tensors: dict[str, torch.Tensor], index: dict[str, torch.Tensor], dtype: torch.dtype
    ) -> torch.Tensor:
        """Rows for tokens some ingredient lacks: the only holder's, the base's, or the holders' mean."""
        first = next(iter(tensors.values()))
        fill = first.new_zeros((self.size, *first.shape[1:]), dtype=dtype)
        holders = torch.stack([index[name] >= 0 for name in tensors])  # [ingredients, tokens]
        count = holders.sum(0)
        for token in torch.nonzero((count > 0) & (count < len(tensors))).flatten().tolist():
            have = [name for name, held in zip(tensors, holders[:, token].tolist(), strict=True) if held]
            if len(have) == 1 or (self.base is not None and self.base in have):
                donor = have[0] if len(have) == 1 or self.base is None else self.base
                fill[token] = tensors[donor][index[donor][token]].to(dtype)
            else:
                total = torch.zeros(first.shape[1:], dtype=dtype)
                for name in have:
                    total = total + tensors[name][index[name][token]].to(dtype)
                fill[token] = total / len(have)
        if bool((count == 0).any()):
            _log.warning("tensor %s: %d token(s) of the vocabulary are in no ingredient: zero rows", key, int((count == 0).sum()))
        return fill


class _Vocabulary(Mapping[str, torch.Tensor]):
    def __init__(self, tensors: Mapping[str, torch.Tensor], shared: _Rows, keys: set[str], name: str) -> None:
        self._tensors, self._shared, self._keys, self._name = tensors, shared, keys, name

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._shared.tensor(key, self._name) if key in self._keys else self._tensors[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


def _aligned(ingredient: Ingredient, shared: _Rows, name: str, size: int) -> Ingredient:
    """``ingredient`` with its vocabulary tensors (a row per token: ``size`` rows, outside the
    layers) read in the blend's vocabulary; its other tensors as they were."""
    layout = ingredient.layout
    keys = {
        k
        for k in outside_layers(layout)
        if layout[k].is_floating_point() and 1 <= layout[k].dim() <= 2 and layout[k].shape[0] == size
    }
    if not keys:
        raise IngredientMismatch(f"tokenizer: ingredient {name!r} ({ingredient.path}) has no tensor with a row per token")
    return replace(
        ingredient,
        layout={k: (t.new_empty((shared.size, *t.shape[1:])) if k in keys else t) for k, t in layout.items()},
        tensors=_Vocabulary(ingredient.tensors, shared, keys, name),
        shards={k: f for k, f in ingredient.shards.items() if k not in keys},
        computed=True,
    )
