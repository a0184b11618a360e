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
