"""Text requests on KServe v2 REST ``/infer``, as on gRPC ``ModelInfer``: a ``text_input``
BYTES input (JSON ``data`` or binary), scalar inputs and request parameters for sampling, and
one ``text_output`` BYTES output back, binary when the request asks for binary outputs (as
``tritonclient.http`` does by default)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tureen.core.llm.serving import GenerateRequest, Stream
from tureen.errors import InvalidRequest
from tureen.transport import tensors
from tureen.transport.http.codec import (
    HEADER_LENGTH,
    Encoded,
    InputEntry,
    input_entries,
    json_object,
    list_of_objects,
    mapping,
    split_body,
)
from tureen.transport.text import TEXT_INPUT, TEXT_OUTPUT, bytes_element, bytes_elements, one_string, sampling_fields

ENCODING_PARAMETERS = ("binary_data_output",)
"""Request parameters that shape the response's encoding, not the sampling."""


@dataclass(frozen=True)
class TextCall:
    request: GenerateRequest
    controls: Mapping[str, Any]
    binary: bool
    """Whether ``text_output`` goes back as binary data."""


def is_text(body: bytes, header_length: str | None) -> bool:
    """Whether an ``/infer`` body is a text request: it has an input named ``text_input``."""
    if b'"' + TEXT_INPUT.encode() + b'"' not in body[: _header_end(body, header_length)]:
        return False  # the common tensor request pays one byte search, no second parse
    try:
        header, _ = split_body(body, header_length)
        inputs = json_object(bytes(header)).get("inputs")
    except InvalidRequest:
        return False  # the tensor path reports it, counted
    return isinstance(inputs, list) and any(isinstance(i, dict) and i.get("name") == TEXT_INPUT for i in inputs)


def decode(body: bytes, header_length: str | None, model: str, version: str) -> TextCall:
    header, binary = split_body(body, header_length)
    document = json_object(bytes(header))
    values = _values(document, binary)
    prompt = values.pop(TEXT_INPUT)
    if not isinstance(prompt, str):
        raise InvalidRequest(f"input {TEXT_INPUT!r}: expected BYTES (text), not {type(prompt).__name__}")
    parameters = document.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InvalidRequest("parameters: expected an object")
    binary_out = parameters.get("binary_data_output") is True or _binary_output(document.get("outputs"))
    parameters = {k: v for k, v in parameters.items() if k not in ENCODING_PARAMETERS}
    fields, controls = sampling_fields(values, parameters, "parameters")
    if fields.get("stream"):
        raise InvalidRequest("parameters.stream: /infer answers once; use /generate_stream to stream")
    request_id = document.get("id", "")
    if not isinstance(request_id, str):
        raise InvalidRequest("id: must be a string")
    routing = {name: value if isinstance(value, str) else json.dumps(value) for name, value in parameters.items()}
    generate = GenerateRequest(model, version, request_id, prompt=prompt, parameters=fields, routing=routing)
    return TextCall(generate, controls, binary_out)


def encode(stream: Stream, call: TextCall, text: str) -> Encoded:
    if not call.controls.get("exclude_input_in_output"):
        text = (call.request.prompt or "") + text
    output: dict[str, Any] = {"name": TEXT_OUTPUT, "datatype": "BYTES", "shape": [1]}
    raw = bytes_element(text) if call.binary else b""
    if call.binary:
        output["parameters"] = {"binary_data_size": len(raw)}
    else:
        output["data"] = [text]
    document: dict[str, Any] = {"model_name": stream.model, "model_version": str(stream.version), "outputs": [output]}
    if call.request.id:
        document["id"] = call.request.id
    head = json.dumps(document, separators=(",", ":")).encode()
    if not call.binary:
        return Encoded(head, {}, "application/json")
    return Encoded(head + raw, {HEADER_LENGTH: str(len(head))}, "application/octet-stream")


def _header_end(body: bytes, header_length: str | None) -> int:
    digits = header_length is not None and header_length.isascii() and header_length.isdigit()
    return int(header_length) if digits and header_length is not None else len(body)


def _binary_output(outputs: Any) -> bool:
    if outputs is None:
        return False
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise InvalidRequest("outputs: expected a list of objects")
    for i, output in enumerate(outputs):
        if output.get("name") != TEXT_OUTPUT:
            raise InvalidRequest(f"outputs[{i}].name: a text request answers only {TEXT_OUTPUT!r}")
    return any(mapping(o.get("parameters"), f"outputs[{i}].parameters").get("binary_data") is True for i, o in enumerate(outputs))


def _values(document: Mapping[str, Any], binary: memoryview) -> dict[str, Any]:
    """Each input's one value: the text for BYTES, else a number or a bool."""
    return {e.name: _value(e) for e in input_entries(list_of_objects(document, "inputs"), binary)}


def _value(entry: InputEntry) -> Any:
    name, raw = entry.name, entry.raw
    if entry.datatype == "BYTES":
        if raw is not None:
            return one_string(name, bytes_elements(name, raw))
        items = entry.data if isinstance(entry.data, list) else [entry.data]
        while len(items) == 1 and isinstance(items[0], list):
            items = items[0]
        if not all(isinstance(item, str) for item in items):
            raise InvalidRequest(f"input {name!r}: BYTES data must be strings")
        return one_string(name, [item.encode() for item in items])
    if raw is not None:
        tensor = tensors.from_raw(name, entry.datatype, entry.shape, raw)
    else:
        tensor = tensors.from_values(name, entry.datatype, entry.shape, entry.data, "data")
    if tensor.numel() != 1:
        raise InvalidRequest(f"input {name!r}: expected one value, got {tensor.numel()}")
    return tensor.reshape(-1)[0].item()
