"""The text side of Triton's LLM conventions, shared by both transports.

Triton's vLLM and TensorRT-LLM backends take ``text_input`` and answer ``text_output``; the
sampling parameters come as request parameters, as scalar inputs of their own (``max_tokens``,
``temperature``...), or as the vLLM backend's ``sampling_parameters`` JSON string. Non-streamed
answers repeat the prompt before the generated text unless ``exclude_input_in_output`` is set,
as those backends do.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from tureen.errors import InvalidRequest

TEXT_INPUT, TEXT_OUTPUT = "text_input", "text_output"
CONTROLS = ("exclude_input_in_output", "triton_enable_empty_final_response")
"""Request fields that shape the answer, not the sampling."""


def sampling_fields(
    inputs: Mapping[str, Any], parameters: Mapping[str, Any], where: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(sampling parameters, controls) from a request's scalar inputs and its parameters; the
    vLLM backend's ``sampling_parameters`` JSON is unpacked in place."""
    fields: dict[str, Any] = {}
    for source in (inputs, parameters):
        for name, value in source.items():
            if name == "sampling_parameters":
                fields.update(_unpacked(value, f"{where}.sampling_parameters"))
            else:
                fields[name] = value
    controls = {name: fields.pop(name) for name in CONTROLS if name in fields}
    for name in controls:
        if not isinstance(controls[name], bool):
            raise InvalidRequest(f"{where}.{name}: expected true or false")
    return fields, controls


def _unpacked(value: Any, where: str) -> dict[str, Any]:
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise InvalidRequest(f"{where}: not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise InvalidRequest(f"{where}: expected a JSON object of sampling parameters")
    return value


def bytes_elements(name: str, raw: bytes | memoryview) -> list[bytes]:
    """A raw BYTES tensor's elements: each is a 4-byte little-endian length, then its bytes."""
    items, at = [], 0
    while at < len(raw):
        if at + 4 > len(raw):
            raise InvalidRequest(f"input {name!r}: raw BYTES data ends inside a length prefix")
        size = int.from_bytes(raw[at : at + 4], "little")
        if at + 4 + size > len(raw):
            raise InvalidRequest(f"input {name!r}: a raw BYTES element claims {size} bytes past the end")
        items.append(bytes(raw[at + 4 : at + 4 + size]))
        at += 4 + size
    return items


def bytes_element(text: str) -> bytes:
    """One string as raw BYTES tensor data."""
    data = text.encode()
    return len(data).to_bytes(4, "little") + data


def one_string(name: str, items: list[bytes]) -> str:
    """The text of a BYTES input that must hold exactly one UTF-8 string."""
    if len(items) != 1:
        raise InvalidRequest(f"input {name!r}: expected one string, got {len(items)}")
    try:
        return items[0].decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest(f"input {name!r}: the text is not UTF-8") from None
