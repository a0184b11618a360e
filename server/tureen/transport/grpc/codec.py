"""KServe v2 inference messages (protobuf) to and from the data plane's requests and responses.

Raw tensors are zero-copy views of the request's bytes; typed ``contents`` go through numpy
(``tureen.transport.tensors``). Outputs always go back as raw bytes, as Triton does, which
every client of the protocol reads.
"""

from __future__ import annotations

import torch
from tritonclient.grpc import service_pb2 as pb

from tureen.core.datatypes import DATATYPE_OF
from tureen.core.engine import InferRequest, InferResponse
from tureen.errors import InvalidRequest
from tureen.transport import tensors

CONTENTS: dict[str, str] = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}
"""The typed contents field of each datatype; FP16 and BF16 have none (raw bytes only)."""


def decode_infer_request(request: pb.ModelInferRequest) -> InferRequest:
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidRequest(f"raw_input_contents: {len(raw)} buffers for {len(request.inputs)} inputs")
    inputs: dict[str, torch.Tensor] = {}
    for i, tensor in enumerate(request.inputs):
        if tensor.name in inputs:
            raise InvalidRequest(f"input {tensor.name!r}: sent twice")
        inputs[tensor.name] = _decode_tensor(tensor, raw[i] if raw else None)
    outputs = tuple(output.name for output in request.outputs) or None
    return InferRequest(
        model=request.model_name,
        version=request.model_version,
        id=request.id,
        inputs=inputs,
        outputs=outputs,
        parameters={name: _parameter_text(value) for name, value in request.parameters.items()},
    )


def _parameter_text(value: pb.InferParameter) -> str:
    """A request parameter as text (a sticky canary key compares parameters as strings)."""
    kind = value.WhichOneof("parameter_choice")
    return "" if kind is None else str(getattr(value, kind))


def _decode_tensor(tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None) -> torch.Tensor:
    name, datatype = tensor.name, tensor.datatype
    if raw is not None:
        return tensors.from_raw(name, datatype, tensor.shape, raw)
    tensors.checked(name, datatype, tensor.shape)
    if not tensor.HasField("contents"):
        raise InvalidRequest(f"input {name!r}: no data in contents or raw_input_contents")
    if datatype not in CONTENTS:
        raise InvalidRequest(f"input {name!r}: {datatype} has no typed contents field; send it in raw_input_contents")
    field = CONTENTS[datatype]
    return tensors.from_values(name, datatype, tensor.shape, getattr(tensor.contents, field), field)


def encode_infer_response(response: InferResponse) -> pb.ModelInferResponse:
    message = pb.ModelInferResponse(model_name=response.model, model_version=str(response.version), id=response.id)
    for name, tensor in response.outputs.items():
        out = message.outputs.add()
        out.name = name
        out.datatype = DATATYPE_OF[tensor.dtype]
        out.shape.extend(tensor.shape)
        message.raw_output_contents.append(tensors.to_raw(tensor))
    return message
