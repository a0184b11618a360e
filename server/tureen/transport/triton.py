"""Triton's messages about models, shared by both transports: metadata, config, statistics.

They are the protobuf messages of Triton's ``grpc_service.proto`` and ``model_config.proto``
(as tritonclient ships them). The gRPC transport sends them as they are; the HTTP transport
sends their JSON form (``as_json``), which is what Triton's HTTP endpoint answers.
"""

from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb

from tureen.core.batching import BatchPolicy
from tureen.core.blends import Blend
from tureen.core.datatypes import TORCH_DTYPES
from tureen.core.statistics import Duration, VersionStatistics

EXTENSIONS = ("model_configuration", "statistics", "model_repository")
"""Triton's protocol extensions both transports serve (ServerMetadata lists them)."""
CONFIG_TYPE = {name: mc.DataType.Value(f"TYPE_{name}") for name in TORCH_DTYPES}


def metadata(blend: Blend) -> pb.ModelMetadataResponse:
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


def model_config(blend: Blend, batching: BatchPolicy | None) -> mc.ModelConfig:
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
    if batching is not None:
        config.dynamic_batching.CopyFrom(
            mc.ModelDynamicBatching(
                preferred_batch_size=sorted(batching.preferred),
                max_queue_delay_microseconds=batching.max_queue_delay_ns // 1000,
            )
        )
        if batching.max_queue_size:
            config.dynamic_batching.default_queue_policy.max_queue_size = batching.max_queue_size
    return config


def statistics(rows: list[tuple[str, int, VersionStatistics]]) -> pb.ModelStatisticsResponse:
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
                batch_stats=[
                    pb.InferBatchStatistics(
                        batch_size=size,
                        compute_input=duration(batch.compute_input),
                        compute_infer=duration(batch.compute_infer),
                        compute_output=duration(batch.compute_output),
                    )
                    for size, batch in sorted(stats.batches.items())
                ],
            )
            for model, version, stats in rows
        ]
    )


def as_json(message: Message) -> dict[str, Any]:
    """The message as Triton's HTTP endpoint writes it: proto field names, scalars and lists
    even at their defaults (a count of 0 is written), unset sub-messages left out, enums by
    name, and 64-bit integers as numbers (protobuf's own JSON writes them as strings, which
    clients of Triton's HTTP API do not expect)."""
    return {
        field.name: _json_value(field, getattr(message, field.name))
        for field in message.DESCRIPTOR.fields
        if not field.has_presence or message.HasField(field.name)
    }


def _json_value(field: FieldDescriptor, value: Any) -> Any:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        entry = field.message_type.fields_by_name["value"]
        return {key: _json_value(entry, item) for key, item in value.items()}
    if field.is_repeated:
        return [_json_scalar(field, item) for item in value]
    return _json_scalar(field, value)


def _json_scalar(field: FieldDescriptor, value: Any) -> Any:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return as_json(value)
    if field.type == FieldDescriptor.TYPE_ENUM:
        return field.enum_type.values_by_number[value].name
    return value
