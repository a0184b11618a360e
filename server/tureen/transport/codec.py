"""KServe v2 protobuf messages to and from the core's tensors and results.

Raw tensors are decoded as zero-copy views of the request's bytes (``torch.frombuffer``);
typed ``contents`` are converted through numpy. Outputs always go back as raw bytes, as Triton
does, which every client of the protocol reads.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb

from tureen.core.blends import Blend
from tureen.core.datatypes import DATATYPE_OF, TORCH_DTYPES
from tureen.core.engine import InferRequest, InferResponse
from tureen.core.statistics import Duration, VersionStatistics
from tureen.errors import InvalidRequest

# Request bytes are immutable and the blend never writes to its inputs, so the read-only
# view is safe; torch warns about it once per process otherwise.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)

# Typed contents field and numpy dtype per datatype; FP16 and BF16 have no typed field.
CONTENTS: dict[str, tuple[str, type]] = {
    "BOOL": ("bool_contents", np.bool_),
    "UINT8": ("uint_contents", np.uint8),
    "INT8": ("int_contents", np.int8),
    "INT16": ("int_contents", np.int16),
    "INT32": ("int_contents", np.int32),
    "INT64": ("int64_contents", np.int64),
    "FP32": ("fp32_contents", np.float32),
    "FP64": ("fp64_contents", np.float64),
}
CONFIG_TYPE = {name: mc.DataType.Value(f"TYPE_{name}") for name in TORCH_DTYPES}


def decode_infer_request(request: pb.ModelInferRequest, received_ns: int) -> InferRequest:
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
        received_ns=received_ns,
        parameters={name: _parameter_text(value) for name, value in request.parameters.items()},
    )


def _parameter_text(value: pb.InferParameter) -> str:
    """A request parameter as text (a sticky canary key compares parameters as strings)."""
    kind = value.WhichOneof("parameter_choice")
    return "" if kind is None else str(getattr(value, kind))


def _decode_tensor(tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None) -> torch.Tensor:
    name, datatype = tensor.name, tensor.datatype
    dtype = TORCH_DTYPES.get(datatype)
    if dtype is None:
        raise InvalidRequest(f"input {name!r}: unsupported datatype {datatype!r} (supported: {', '.join(TORCH_DTYPES)})")
    shape = tuple(tensor.shape)
    if any(dim < 0 for dim in shape):
        raise InvalidRequest(f"input {name!r}: shape {list(shape)} has a negative dimension")
    count = math.prod(shape)
    if raw is not None:
        expected = count * dtype.itemsize
        if len(raw) != expected:
            raise InvalidRequest(
                f"input {name!r}: raw data is {len(raw)} bytes, shape {list(shape)} of {datatype} needs {expected}"
            )
        if count == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(raw, dtype=dtype).reshape(shape)
    if not tensor.HasField("contents"):
        raise InvalidRequest(f"input {name!r}: no data in contents or raw_input_contents")
    if datatype not in CONTENTS:
        raise InvalidRequest(f"input {name!r}: {datatype} has no typed contents field; send it in raw_input_contents")
    field, np_dtype = CONTENTS[datatype]
    values = getattr(tensor.contents, field)
    if len(values) != count:
        raise InvalidRequest(f"input {name!r}: {field} holds {len(values)} values, shape {list(shape)} needs {count}")
    try:
        array = np.asarray(values, dtype=np_dtype).reshape(shape)
    except (OverflowError, ValueError) as exc:
        raise InvalidRequest(f"input {name!r}: {field} does not fit {datatype}: {exc}") from None
    return torch.from_numpy(array)


def encode_infer_response(response: InferResponse) -> pb.ModelInferResponse:
    message = pb.ModelInferResponse(model_name=response.model, model_version=str(response.version), id=response.id)
    for name, tensor in response.outputs.items():
        out = message.outputs.add()
        out.name = name
        out.datatype = DATATYPE_OF[tensor.dtype]
        out.shape.extend(tensor.shape)
        message.raw_output_contents.append(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return message


def encode_metadata(blend: Blend) -> pb.ModelMetadataResponse:
    signature = blend.signature
    return pb.ModelMetadataResponse(
        name=blend.model,
        versions=[str(blend.version)],
        platform="tureen",
        inputs=[
            pb.ModelMetadataResponse.TensorMetadata(name=s.name, datatype=s.datatype, shape=s.shape)
            for s in signature.inputs.values()
        ],
        outputs=[
            pb.ModelMetadataResponse.TensorMetadata(name=s.name, datatype=s.datatype, shape=s.shape)
            for s in signature.outputs.values()
        ],
    )


def encode_config(blend: Blend) -> pb.ModelConfigResponse:
    """Triton's ModelConfig; with batching, ``dims`` leave out the batch dimension as Triton's do."""
    signature = blend.signature
    skip = 1 if signature.max_batch_size > 0 else 0
    config = mc.ModelConfig(
        name=blend.model,
        platform="tureen",
        backend="tureen",
        max_batch_size=signature.max_batch_size,
        input=[
            mc.ModelInput(name=s.name, data_type=CONFIG_TYPE[s.datatype], dims=s.shape[skip:]) for s in signature.inputs.values()
        ],
        output=[
            mc.ModelOutput(name=s.name, data_type=CONFIG_TYPE[s.datatype], dims=s.shape[skip:])
            for s in signature.outputs.values()
        ],
    )
    return pb.ModelConfigResponse(config=config)


def encode_statistics(rows: list[tuple[str, int, VersionStatistics]]) -> pb.ModelStatisticsResponse:
    def duration(d: Duration) -> pb.StatisticDuration:
        return pb.StatisticDuration(count=d.count, ns=d.ns)

    return pb.ModelStatisticsResponse(
        model_stats=[
            pb.ModelStatistics(
                name=model,
                version=str(version),
                last_inference=stats.last_inference_ms,
                inference_count=stats.inference_count,
                execution_count=stats.execution_count,
                inference_stats=pb.InferStatistics(
                    success=duration(stats.success),
                    fail=duration(stats.fail),
                    queue=duration(stats.queue),
                    compute_input=duration(stats.compute_input),
                    compute_infer=duration(stats.compute_infer),
                    compute_output=duration(stats.compute_output),
                ),
            )
            for model, version, stats in rows
        ]
    )
