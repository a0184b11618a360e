"""KServe v2 tensors from and to bytes and values, the same checks for both transports.

Raw tensors are decoded as zero-copy views of the request's bytes (``numpy.frombuffer``);
typed values (gRPC ``contents``, HTTP JSON ``data``) are converted through numpy. Error
messages name the input, so a client sees which tensor was wrong and why.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from tureen.core.datatypes import TORCH_DTYPES
from tureen.errors import InvalidRequest

# Request bytes are immutable and the blend never writes to its inputs, so the read-only
# view is safe; torch warns about it once per process otherwise.
warnings.filterwarnings("ignore", message="The given (buffer|NumPy array) is not writable", category=UserWarning)

NUMPY_DTYPES: dict[str, type] = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}
"""Datatypes that typed values can carry; BF16 has no numpy type and travels as raw bytes only."""


def checked(name: str, datatype: str, shape: Sequence[int]) -> tuple[torch.dtype, tuple[int, ...], int]:
    """The torch dtype, the shape and the element count of input ``name``, or ``InvalidRequest``."""
    dtype = TORCH_DTYPES.get(datatype)
    if dtype is None:
        raise InvalidRequest(f"input {name!r}: unsupported datatype {datatype!r} (supported: {', '.join(TORCH_DTYPES)})")
    dims = tuple(shape)
    if any(not isinstance(dim, int) or isinstance(dim, bool) for dim in dims):
        raise InvalidRequest(f"input {name!r}: shape {list(dims)} must be a list of integers")
    if any(dim < 0 for dim in dims):
        raise InvalidRequest(f"input {name!r}: shape {list(dims)} has a negative dimension")
    return dtype, dims, math.prod(dims)


def from_raw(name: str, datatype: str, shape: Sequence[int], raw: bytes | memoryview) -> torch.Tensor:
    """Input ``name`` from its raw little-endian bytes."""
    dtype, dims, count = checked(name, datatype, shape)
    expected = count * dtype.itemsize
    if len(raw) != expected:
        raise InvalidRequest(f"input {name!r}: raw data is {len(raw)} bytes, shape {list(dims)} of {datatype} needs {expected}")
    if count == 0:
        return torch.empty(dims, dtype=dtype)
    np_dtype = NUMPY_DTYPES.get(datatype)
    if np_dtype is None:  # BF16
        return torch.frombuffer(raw, dtype=dtype).reshape(dims)
    # Through numpy, the view costs no torch op: each op releases the GIL, and on the serving
    # loop every release lets a forward's thread in between two of the loop's requests.
    return torch.from_numpy(np.frombuffer(raw, dtype=np_dtype).reshape(dims))


def from_values(name: str, datatype: str, shape: Sequence[int], values: Any, field: str) -> torch.Tensor:
    """Input ``name`` from typed values (flat or nested) found in ``field``."""
    _, dims, count = checked(name, datatype, shape)
    np_dtype = NUMPY_DTYPES.get(datatype)
    if np_dtype is None:
        raise InvalidRequest(f"input {name!r}: {datatype} cannot be sent as values; send it as raw (binary) data")
    try:
        array: np.ndarray[Any, Any] = np.asarray(values, dtype=np_dtype)
    except (OverflowError, ValueError, TypeError) as exc:
        raise InvalidRequest(f"input {name!r}: {field} does not fit {datatype}: {exc}") from None
    if array.size != count:
        raise InvalidRequest(f"input {name!r}: {field} holds {array.size} values, shape {list(dims)} needs {count}")
    return torch.from_numpy(array.reshape(dims))


def to_raw(tensor: torch.Tensor) -> bytes:
    """An output's bytes, row-major and little-endian, as both transports send them."""
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: the same bytes as int16
        tensor = tensor.view(torch.int16)
    return tensor.numpy().tobytes()  # numpy writes row-major whatever the strides
