"""The merge section's parts that name tensors and layers: overrides by glob, and slices of layers."""

from __future__ import annotations

from pydantic import Field, field_validator

from tureen.spec.frozen import Frozen as _Frozen
from tureen.spec.frozen import FrozenDict, Parameters


class Override(_Frozen):
    """Parameters for the tensors whose names match a glob; the first matching entry wins."""

    match: str = Field(min_length=1)
    ingredient: str | None = None
    """Only for this ingredient; entries naming an ingredient are consulted before the others."""
    parameters: Parameters = Field(min_length=1)


class SliceSource(_Frozen):
    """A run of one ingredient's layers, ``layers: [first, end)`` (mergekit's ``layer_range``)."""

    ingredient: str
    layers: tuple[int, int]
    parameters: Parameters = Field(default_factory=FrozenDict)
    """Per-ingredient parameters for this run; they come before the ingredient's own."""

    @field_validator("layers")
    @classmethod
    def _range(cls, layers: tuple[int, int]) -> tuple[int, int]:
        if layers[0] < 0 or layers[1] <= layers[0]:
            raise ValueError(f"expected [first, end) with 0 <= first < end, got {list(layers)}")
        return layers


class Slice(_Frozen):
    """Layers of the blend merged from equally long runs of layers of its sources.

    The blend's layers are the slices' layers one after the other; tensors outside the layers
    (embeddings before them, final norm and head after) come from the first and the last slice.
    """

    sources: tuple[SliceSource, ...] = Field(min_length=1)
    base: str | None = None
    """This slice's base ingredient (one of its sources); default ``merge.base``."""
    parameters: Parameters = Field(default_factory=FrozenDict)
    """Parameters for this slice; they come before ``merge.parameters``."""
    overrides: tuple[Override, ...] = ()
    """Overrides for this slice's tensors, consulted before ``merge.overrides``."""

    @property
    def length(self) -> int:
        first, end = self.sources[0].layers
        return end - first
