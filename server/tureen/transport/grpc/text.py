"""Text requests on KServe v2 gRPC, as Triton's LLM backends take them: ``text_input`` (BYTES)
and scalar inputs in, ``text_output`` (BYTES) out, decoupled responses on a stream."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from tritonclient.grpc import service_pb2 as pb

from tureen.core.engine import Engine
from tureen.core.llm.serving import GenerateRequest, Stream
from tureen.errors import InvalidRequest
from tureen.transport import tensors
from tureen.transport.grpc.codec import CONTENTS
from tureen.transport.text import TEXT_INPUT, TEXT_OUTPUT, bytes_element, bytes_elements, one_string, sampling_fields

FINAL = "triton_final_response"


def is_text(request: pb.ModelInferRequest) -> bool:
    return any(tensor.name == TEXT_INPUT for tensor in request.inputs)


def decode(request: pb.ModelInferRequest) -> tuple[GenerateRequest, dict[str, Any]]:
    """The generation a text request asks for, and its controls (``exclude_input_in_output``...)."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidRequest(f"raw_input_contents: {len(raw)} buffers for {len(request.inputs)} inputs")
    values = {t.name: _scalar(t, raw[i] if raw else None) for i, t in enumerate(request.inputs)}
    prompt = values.pop(TEXT_INPUT)
    if not isinstance(prompt, str):
        raise InvalidRequest(f"input {TEXT_INPUT!r}: expected BYTES (text), not {type(prompt).__name__}")
    parameters = {name: _parameter(value) for name, value in request.parameters.items()}
    fields, controls = sampling_fields(values, parameters, "parameters")
    routing = {name: str(value) for name, value in parameters.items()}
    generate = GenerateRequest(
        request.model_name, request.model_version, request.id, prompt=prompt, parameters=fields, routing=routing
    )
    return generate, controls


def response(stream: Stream, request_id: str, text: str, final: bool | None = None, empty: bool = False) -> pb.ModelInferResponse:
    """A text response; ``empty``: Triton's empty final response, with no output at all."""
    message = pb.ModelInferResponse(model_name=stream.model, model_version=str(stream.version), id=request_id)
    if not empty:
        out = message.outputs.add()
        out.name, out.datatype = TEXT_OUTPUT, "BYTES"
        out.shape.append(1)
        message.raw_output_contents.append(bytes_element(text))
    if final is not None:
        message.parameters[FINAL].bool_param = final
    return message


def _start(engine: Engine, request: pb.ModelInferRequest) -> tuple[Stream, GenerateRequest, dict[str, Any]]:
    decoded: list[tuple[GenerateRequest, dict[str, Any]]] = []

    def decoding() -> GenerateRequest:
        decoded.append(decode(request))
        return decoded[0][0]

    stream = engine.generate(request.model_name, time.perf_counter_ns(), decoding)
    return stream, *decoded[0]


async def _whole(
    stream: Stream, generate: GenerateRequest, controls: dict[str, Any], final: bool | None
) -> pb.ModelInferResponse:
    text = await stream.text()
    prefix = "" if controls.get("exclude_input_in_output") else generate.prompt or ""
    return response(stream, generate.id, prefix + text, final)


async def infer(engine: Engine, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
    """A text request on ``ModelInfer``: the whole text in one response."""
    return await _whole(*_start(engine, request), None)


async def stream_infer(engine: Engine, request: pb.ModelInferRequest) -> AsyncIterator[pb.ModelInferResponse]:
    """A text request on ``ModelStreamInfer``: with ``stream`` set, one response per chunk of
    text, flagged ``triton_final_response`` as Triton's decoupled models are; else one."""
    stream, generate, controls = _start(engine, request)
    empty_final = bool(controls.get("triton_enable_empty_final_response"))
    if not generate.parameters.get("stream", False):
        answer = await _whole(stream, generate, controls, not empty_final)
        yield answer
        if empty_final:
            yield _empty_final(answer)
        return
    async with aclosing(stream.chunks()) as chunks:
        async for chunk in chunks:
            last = chunk.finish_reason is not None
            if chunk.text or (last and not empty_final):
                yield response(stream, request.id, chunk.text, False if empty_final else last)
    if empty_final:
        yield response(stream, request.id, "", True, empty=True)


def _empty_final(answer: pb.ModelInferResponse) -> pb.ModelInferResponse:
    message = pb.ModelInferResponse(model_name=answer.model_name, model_version=answer.model_version, id=answer.id)
    message.parameters[FINAL].bool_param = True
    return message


def _scalar(tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None) -> Any:
    """The one value of a text request's input: a string for BYTES, else a number or a bool."""
    name = tensor.name
    if tensor.datatype == "BYTES":
        return one_string(name, _strings(tensor, raw))
    if raw is not None:
        value = tensors.from_raw(name, tensor.datatype, tensor.shape, raw)
    elif tensor.datatype in CONTENTS and tensor.HasField("contents"):
        field = CONTENTS[tensor.datatype]
        value = tensors.from_values(name, tensor.datatype, tensor.shape, getattr(tensor.contents, field), field)
    else:
        raise InvalidRequest(f"input {name!r}: no data in contents or raw_input_contents")
    if value.numel() != 1:
        raise InvalidRequest(f"input {name!r}: expected one value, got {value.numel()}")
    return value.reshape(-1)[0].item()


def _strings(tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None) -> list[bytes]:
    return list(tensor.contents.bytes_contents) if raw is None else bytes_elements(tensor.name, raw)


def _parameter(value: pb.InferParameter) -> Any:
    kind = value.WhichOneof("parameter_choice")
    return None if kind is None else getattr(value, kind)
