"""The tensor interface a blend serves, prepared for fast checks on the request path."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from tureen.core.datatypes import DATATYPE_OF, TORCH_DTYPES
from tureen.errors import InvalidRequest
from tureen.spec import Interface, TensorSpec


@dataclass(frozen=True)
class Slot:
    """One input or output: its name, KServe datatype, torch dtype and shape (-1 = any)."""

    name: str
    datatype: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @classmethod
    def of(cls, spec: TensorSpec) -> Slot:
        return cls(spec.name, spec.datatype, TORCH_DTYPES[spec.datatype], spec.shape)


class Signature:
    """Checks requests against an ``Interface`` and keeps its slots by name."""

    def __init__(self, interface: Interface) -> None:
        self.interface = interface
        self.max_batch_size = interface.max_batch_size
        self.inputs = {spec.name: Slot.of(spec) for spec in interface.inputs}
        self.outputs = {spec.name: Slot.of(spec) for spec in interface.outputs}

    def check_inputs(self, inputs: Mapping[str, torch.Tensor]) -> int:
        """Raise ``InvalidRequest`` unless ``inputs`` fit; return the batch size (1 if unbatched)."""
        for name in inputs:
            if name not in self.inputs:
                raise InvalidRequest(f"input {name!r}: the model has no such input (inputs: {', '.join(self.inputs)})")
        batch: int | None = None
        for slot in self.inputs.values():
            tensor = inputs.get(slot.name)
            if tensor is None:
                raise InvalidRequest(f"input {slot.name!r}: required by the model but not sent")
            if tensor.dtype != slot.dtype:
                sent = DATATYPE_OF.get(tensor.dtype, str(tensor.dtype))
                raise InvalidRequest(f"input {slot.name!r}: datatype {sent} does not match the model's {slot.datatype}")
            shape = tuple(tensor.shape)
            if len(shape) != len(slot.shape) or any(w != -1 and w != s for w, s in zip(slot.shape, shape, strict=True)):
                raise InvalidRequest(f"input {slot.name!r}: shape {list(shape)} does not match the model's {list(slot.shape)}")
            if self.max_batch_size > 0:
                if batch is not None and shape[0] != batch:
                    raise InvalidRequest(f"input {slot.name!r}: batch size {shape[0]} differs from the other inputs' {batch}")
                batch = shape[0]
        if batch is not None and batch > self.max_batch_size:
            raise InvalidRequest(f"batch size {batch} exceeds the model's max_batch_size {self.max_batch_size}")
        return batch if batch is not None else 1

    def check_outputs(self, requested: tuple[str, ...] | None) -> tuple[str, ...]:
        """The output names to return: those requested, or all when none are named."""
        if not requested:
            return tuple(self.outputs)
        for name in requested:
            if name not in self.outputs:
                raise InvalidRequest(f"output {name!r}: the model has no such output (outputs: {', '.join(self.outputs)})")
        return requested
