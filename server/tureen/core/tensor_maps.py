"""Mappings of tensor names to tensors that hold none themselves: what an ingredient's ``tensors``
are when its placement is ``disk`` (each read from its file when looked up), or when it is a
renamed view of another ingredient (a slice reading layer 8 as layer 0)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

from tureen.core.checkpoints import SafetensorsFile


class Renamed(Mapping[str, torch.Tensor]):
    """Some of another mapping's tensors under other names, looked up when asked for."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], names: Mapping[str, str]) -> None:
        self._tensors, self._names = tensors, names

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._tensors[self._names[key]]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


class OnDisk(Mapping[str, torch.Tensor]):
    """The tensors of ``disk`` ingredients: each read from its shard when looked up."""

    def __init__(self, shard_of: Mapping[str, SafetensorsFile]) -> None:
        self._shard_of = shard_of

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._shard_of[key].read(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._shard_of)

    def __len__(self) -> int:
        return len(self._shard_of)
