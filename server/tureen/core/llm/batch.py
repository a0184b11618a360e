"""One running batch of generations over a KV cache: a prefill, decode steps, rows that leave
when they end and rows that join between steps.

Rows are left-padded: every row's cache holds the same number of positions, the attention mask
says which are real, and each row has its own position ids. A row that ends leaves with its
cache rows at once; generations that arrive while the batch runs are prefilled as a group of
their own, take their first token, and join: the shorter of the two caches is padded on the
left (masked) and the two are stacked. Joining needs transformers' plain ``DynamicLayer``
caches (full attention); for other caches (sliding windows, quantized) batches run to their
end and newcomers wait for the next one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from tureen.core.llm.generation import Generation


@dataclass
class Batch:
    rows: list[Generation]
    cache: Any
    """transformers' ``DynamicCache``."""
    mask: torch.Tensor
    """[rows, positions]: 1 where a cached position is a real token."""
    last: torch.Tensor
    """[rows, 1]: the position id of each row's last token."""
    tokens: list[int]
    """Each row's token to feed at the next step."""


class Stepper:
    """Runs the batches of one module; ``rows_left(n)`` hears how many rows end at a step before
    their last chunks are sent, so a caller that got its last chunk sees the count."""

    def __init__(self, module: nn.Module, device: torch.device, rows_left: Callable[[int], None]) -> None:
        import inspect

        self._module = module
        self._device = device
        self._rows_left = rows_left
        # transformers 5.24 renamed the forward's past_key_values to cache (the old name goes in 5.40).
        self._cache_argument = "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"

    def start(self, rows: list[Generation]) -> Batch | None:
        """Prefill ``rows`` together and take their first tokens; None when all of them ended."""
        from transformers import DynamicCache

        width = max(len(g.prompt) for g in rows)
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, g in enumerate(rows):
            ids[i, width - len(g.prompt) :] = torch.tensor(g.prompt)
            mask[i, width - len(g.prompt) :] = 1
        ids, mask = ids.to(self._device), mask.to(self._device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        out = self._forward(ids, mask, positions, cache, logits_to_keep=1)
        return self._advance(Batch(rows, cache, mask, positions[:, -1:], []), out.logits[:, -1, :])

    def step(self, batch: Batch) -> Batch | None:
        """One decode step for every row; None when all of them ended."""
        step = torch.tensor([[token] for token in batch.tokens], device=self._device)
        batch.mask = torch.cat([batch.mask, torch.ones_like(batch.mask[:, :1])], dim=1)
        batch.last = batch.last + 1
        out = self._forward(step, batch.mask, batch.last, batch.cache)
        return self._advance(batch, out.logits[:, -1, :])

    @staticmethod
    def can_join(batch: Batch) -> bool:
        from transformers.cache_utils import DynamicLayer

        layers = getattr(batch.cache, "layers", None) or []
        return bool(layers) and all(type(layer) is DynamicLayer and layer.is_initialized for layer in layers)

    @staticmethod
    def join(batch: Batch, fresh: Batch) -> Batch:
        """``fresh``'s rows added to ``batch`` (both ``can_join``)."""
        width = max(batch.mask.shape[1], fresh.mask.shape[1])
        for mine, theirs in zip(batch.cache.layers, fresh.cache.layers, strict=True):
            mine.keys = torch.cat([_left_padded(mine.keys, width, 2), _left_padded(theirs.keys, width, 2)])
            mine.values = torch.cat([_left_padded(mine.values, width, 2), _left_padded(theirs.values, width, 2)])
        batch.mask = torch.cat([_left_padded(batch.mask, width, 1), _left_padded(fresh.mask, width, 1)])
        batch.last = torch.cat([batch.last, fresh.last])
        batch.rows, batch.tokens = batch.rows + fresh.rows, batch.tokens + fresh.tokens
        return _trimmed(batch)

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any, **extra: Any) -> Any:
        return self._module(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **{self._cache_argument: cache}, **extra
        )

    def _advance(self, batch: Batch, logits: torch.Tensor) -> Batch | None:
        """Sample each row's next token, send its chunk, and drop the rows that ended."""
        scores = logits.float().cpu()
        tokens = [g.sampler.next_token(scores[i]) for i, g in enumerate(batch.rows)]
        chunks = [g.take(token) for g, token in zip(batch.rows, tokens, strict=True)]
        keep = [i for i, (g, c) in enumerate(zip(batch.rows, chunks, strict=True)) if c.finish_reason is None and not g.cancelled]
        if len(keep) < len(batch.rows):
            self._rows_left(len(batch.rows) - len(keep))
        for g, chunk in zip(batch.rows, chunks, strict=True):
            g.send(chunk)
        if not keep:
            return None
        if len(keep) < len(batch.rows):
            index = torch.tensor(keep, device=self._device)
            batch.cache.reorder_cache(cast(torch.LongTensor, index))
            batch.mask, batch.last = batch.mask[index], batch.last[index]
            batch.rows = [batch.rows[i] for i in keep]
            batch = _trimmed(batch)
        batch.tokens = [tokens[i] for i in keep]
        return batch


def _trimmed(batch: Batch) -> Batch:
    """``batch`` without the leading positions that are padding in every row (those of rows that
    left, or of a longer prompt that did), so that a batch newcomers keep joining does not grow."""
    real = batch.mask.any(dim=0).nonzero()
    start = int(real[0]) if len(real) else 0
    if start == 0 or not Stepper.can_join(batch):
        return batch
    for layer in batch.cache.layers:
        layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]
    batch.mask = batch.mask[:, start:]
    return batch


def _left_padded(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """``tensor`` with zeros before it along ``dim`` up to ``width``."""
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)
