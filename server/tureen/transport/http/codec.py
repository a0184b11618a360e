"""KServe v2 REST inference bodies to and from the data plane's requests and responses.

A body is JSON, or JSON followed by raw tensors (Triton's binary tensor data extension): the
``Inference-Header-Content-Length`` header then says where the JSON ends, and each binary
input says its size in ``parameters.binary_data_size``, in input order. Outputs go back as
JSON ``data`` unless asked for as binary (an output's ``parameters.binary_data``, or
``binary_data_output`` for all of them, which ``tritonclient.http`` sends by default).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from tureen.core.datatypes import DATATYPE_OF
from tureen.core.engine import InferRequest, InferResponse
from tureen.errors import InvalidRequest
from tureen.transport import tensors

HEADER_LENGTH = "Inference-Header-Content-Length"


@dataclass(frozen=True)
class Encoded:
    body: bytes
    headers: Mapping[str, str]
    media_type: str


@dataclass(frozen=True)
class Decoded:
    """A request, and which of its outputs go back as binary data."""

    request: InferRequest
    binary: frozenset[str]
    binary_rest: bool
    """Outputs the request did not list go back as binary (``binary_data_output``)."""


def decode_infer(body: bytes, header_length: str | None, model: str, version: str) -> Decoded:
    """The request in ``body`` for ``model`` (and ``version``, "" for the active one)."""
    header, binary = split_body(body, header_length)
    document = json_object(header if isinstance(header, bytes) else bytes(header))
    inputs = _inputs(list_of_objects(document, "inputs"), binary)
    outputs = list_of_objects(document, "outputs", required=False)
    names = tuple(_text(o, "name", f"outputs[{i}]") for i, o in enumerate(outputs)) or None
    parameters = mapping(document.get("parameters"), "parameters")
    binary_out = frozenset(
        _text(o, "name", f"outputs[{i}]")
        for i, o in enumerate(outputs)
        if mapping(o.get("parameters"), f"outputs[{i}].parameters").get("binary_data") is True
    )
    request_id = document.get("id", "")
    if not isinstance(request_id, str):
        raise InvalidRequest("id: must be a string")
    request = InferRequest(
        model=model,
        version=version,
        id=request_id,
        inputs=inputs,
        outputs=names,
        parameters={k: _parameter_text(v) for k, v in parameters.items()},
    )
    return Decoded(request, binary_out, parameters.get("binary_data_output") is True)


def encode_infer(response: InferResponse, decoded: Decoded) -> Encoded:
    """The response body: JSON, followed by the binary outputs when there are any."""
    outputs, chunks = [], []
    for name, tensor in response.outputs.items():
        entry: dict[str, Any] = {"name": name, "datatype": DATATYPE_OF[tensor.dtype], "shape": list(tensor.shape)}
        listed = decoded.request.outputs is not None and name in decoded.request.outputs
        if name in decoded.binary or (not listed and decoded.binary_rest):
            raw = tensors.to_raw(tensor)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = _values(tensor)
        outputs.append(entry)
    document: dict[str, Any] = {"model_name": response.model, "model_version": str(response.version), "outputs": outputs}
    if response.id:
        document["id"] = response.id
    header = json.dumps(document, separators=(",", ":")).encode()
    if not chunks:
        return Encoded(header, {}, "application/json")
    return Encoded(b"".join([header, *chunks]), {HEADER_LENGTH: str(len(header))}, "application/octet-stream")


def json_object(body: bytes) -> dict[str, Any]:
    """A request body that must be one JSON object."""
    try:
        document = json.loads(body)
    except ValueError as exc:
        raise InvalidRequest(f"request body: not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise InvalidRequest("request body: expected a JSON object")
    return document


def split_body(body: bytes, header_length: str | None) -> tuple[bytes | memoryview, memoryview]:
    """The JSON header and the binary data after it."""
    if header_length is None:
        return body, memoryview(b"")
    try:
        length = int(header_length)
    except ValueError:
        raise InvalidRequest(f"{HEADER_LENGTH}: {header_length!r} is not a number") from None
    if not 0 <= length <= len(body):
        raise InvalidRequest(f"{HEADER_LENGTH}: {length} is outside the body's {len(body)} bytes")
    view = memoryview(body)
    return view[:length], view[length:]


@dataclass(frozen=True)
class InputEntry:
    """One input of a body, its data as JSON ``data`` or as its slice of the binary data."""

    name: str
    datatype: str
    shape: list[Any]
    data: Any = None
    raw: memoryview | None = None


def input_entries(entries: list[Any], binary: memoryview) -> list[InputEntry]:
    """The body's inputs, each with its data; checks names, shapes and binary sizes."""
    found: list[InputEntry] = []
    offset = 0
    for i, entry in enumerate(entries):
        where = f"inputs[{i}]"
        name, datatype = _text(entry, "name", where), _text(entry, "datatype", where)
        shape = entry.get("shape")
        if not isinstance(shape, list):
            raise InvalidRequest(f"input {name!r}: shape must be a list of integers")
        if any(e.name == name for e in found):
            raise InvalidRequest(f"input {name!r}: sent twice")
        size = mapping(entry.get("parameters"), f"{where}.parameters").get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0 or offset + size > len(binary):
                raise InvalidRequest(
                    f"input {name!r}: binary_data_size {size!r} does not fit the {len(binary) - offset} bytes left"
                )
            found.append(InputEntry(name, datatype, shape, raw=binary[offset : offset + size]))
            offset += size
        elif "data" in entry:
            found.append(InputEntry(name, datatype, shape, data=entry["data"]))
        else:
            raise InvalidRequest(f"input {name!r}: no data and no binary_data_size")
    if offset != len(binary):
        raise InvalidRequest(f"request body: {len(binary) - offset} bytes of binary data that no input claims")
    return found


def _inputs(entries: list[Any], binary: memoryview) -> dict[str, torch.Tensor]:
    return {
        e.name: tensors.from_raw(e.name, e.datatype, e.shape, e.raw)
        if e.raw is not None
        else tensors.from_values(e.name, e.datatype, e.shape, e.data, "data")
        for e in input_entries(entries, binary)
    }


def list_of_objects(document: Mapping[str, Any], key: str, required: bool = True) -> list[Any]:
    value = document.get(key)
    if value is None and not required:
        return []
    if not isinstance(value, list) or (required and not value) or not all(isinstance(v, dict) for v in value):
        raise InvalidRequest(f"{key}: expected a {'non-empty ' if required else ''}list of objects")
    return value


def mapping(value: Any, where: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidRequest(f"{where}: expected an object")
    return value


def _text(entry: Mapping[str, Any], key: str, where: str) -> str:
    value = entry.get(key)
    if not isinstance(value, str) or not value:
        raise InvalidRequest(f"{where}.{key}: expected a non-empty string")
    return value


def _parameter_text(value: Any) -> str:
    """A request parameter as text, as the gRPC transport gives it (a sticky canary key)."""
    if isinstance(value, bool):
        return str(value)
    return value if isinstance(value, str) else json.dumps(value)


def _values(tensor: torch.Tensor) -> list[Any]:
    flat = tensor.reshape(-1)
    if flat.dtype == torch.bfloat16:
        flat = flat.float()
    return flat.tolist()
