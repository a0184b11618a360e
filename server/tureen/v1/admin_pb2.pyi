from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Thumbs(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    THUMBS_UNSPECIFIED: _ClassVar[Thumbs]
    THUMBS_UP: _ClassVar[Thumbs]
    THUMBS_DOWN: _ClassVar[Thumbs]
THUMBS_UNSPECIFIED: Thumbs
THUMBS_UP: Thumbs
THUMBS_DOWN: Thumbs

class FeedbackRequest(_message.Message):
    __slots__ = ("model", "request_id", "labels", "score", "thumbs")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    THUMBS_FIELD_NUMBER: _ClassVar[int]
    model: str
    request_id: str
    labels: _containers.RepeatedScalarFieldContainer[int]
    score: float
    thumbs: Thumbs
    def __init__(self, model: _Optional[str] = ..., request_id: _Optional[str] = ..., labels: _Optional[_Iterable[int]] = ..., score: _Optional[float] = ..., thumbs: _Optional[_Union[Thumbs, str]] = ...) -> None: ...

class FeedbackReply(_message.Message):
    __slots__ = ("matched", "version")
    MATCHED_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    matched: bool
    version: int
    def __init__(self, matched: _Optional[bool] = ..., version: _Optional[int] = ...) -> None: ...

class CanaryRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class Scores(_message.Message):
    __slots__ = ("metrics",)
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    METRICS_FIELD_NUMBER: _ClassVar[int]
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class IngredientScores(_message.Message):
    __slots__ = ("ingredient", "splits")
    class SplitsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Scores
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Scores, _Mapping]] = ...) -> None: ...
    INGREDIENT_FIELD_NUMBER: _ClassVar[int]
    SPLITS_FIELD_NUMBER: _ClassVar[int]
    ingredient: str
    splits: _containers.MessageMap[str, Scores]
    def __init__(self, ingredient: _Optional[str] = ..., splits: _Optional[_Mapping[str, Scores]] = ...) -> None: ...

class VersionInfo(_message.Message):
    __slots__ = ("model", "version", "state", "reason", "pushed_by", "pushed_at", "build_seconds", "checksums", "evaluation", "ingredient_evaluation", "resolution_json")
    class ChecksumsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class EvaluationEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Scores
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Scores, _Mapping]] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    PUSHED_BY_FIELD_NUMBER: _ClassVar[int]
    PUSHED_AT_FIELD_NUMBER: _ClassVar[int]
    BUILD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CHECKSUMS_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_FIELD_NUMBER: _ClassVar[int]
    INGREDIENT_EVALUATION_FIELD_NUMBER: _ClassVar[int]
    RESOLUTION_JSON_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    state: str
    reason: str
    pushed_by: str
    pushed_at: float
    build_seconds: float
    checksums: _containers.ScalarMap[str, str]
    evaluation: _containers.MessageMap[str, Scores]
    ingredient_evaluation: _containers.RepeatedCompositeFieldContainer[IngredientScores]
    resolution_json: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., state: _Optional[str] = ..., reason: _Optional[str] = ..., pushed_by: _Optional[str] = ..., pushed_at: _Optional[float] = ..., build_seconds: _Optional[float] = ..., checksums: _Optional[_Mapping[str, str]] = ..., evaluation: _Optional[_Mapping[str, Scores]] = ..., ingredient_evaluation: _Optional[_Iterable[_Union[IngredientScores, _Mapping]]] = ..., resolution_json: _Optional[str] = ...) -> None: ...

class PushSpecRequest(_message.Message):
    __slots__ = ("spec_json", "activate", "wait", "pushed_by", "in_place")
    SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    ACTIVATE_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    PUSHED_BY_FIELD_NUMBER: _ClassVar[int]
    IN_PLACE_FIELD_NUMBER: _ClassVar[int]
    spec_json: str
    activate: bool
    wait: bool
    pushed_by: str
    in_place: bool
    def __init__(self, spec_json: _Optional[str] = ..., activate: _Optional[bool] = ..., wait: _Optional[bool] = ..., pushed_by: _Optional[str] = ..., in_place: _Optional[bool] = ...) -> None: ...

class VersionReply(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: VersionInfo
    def __init__(self, version: _Optional[_Union[VersionInfo, _Mapping]] = ...) -> None: ...

class GetSpecRequest(_message.Message):
    __slots__ = ("model", "version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class GetSpecReply(_message.Message):
    __slots__ = ("version", "spec_json")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    version: VersionInfo
    spec_json: str
    def __init__(self, version: _Optional[_Union[VersionInfo, _Mapping]] = ..., spec_json: _Optional[str] = ...) -> None: ...

class ListVersionsRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class ListVersionsReply(_message.Message):
    __slots__ = ("versions",)
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    versions: _containers.RepeatedCompositeFieldContainer[VersionInfo]
    def __init__(self, versions: _Optional[_Iterable[_Union[VersionInfo, _Mapping]]] = ...) -> None: ...

class ActivateRequest(_message.Message):
    __slots__ = ("model", "version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("model", "to_version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TO_VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    to_version: int
    def __init__(self, model: _Optional[str] = ..., to_version: _Optional[int] = ...) -> None: ...

class DeleteVersionRequest(_message.Message):
    __slots__ = ("model", "version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class DeleteVersionReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class BuildProgress(_message.Message):
    __slots__ = ("version", "stage", "fraction", "started_at")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    version: int
    stage: str
    fraction: float
    started_at: float
    def __init__(self, version: _Optional[int] = ..., stage: _Optional[str] = ..., fraction: _Optional[float] = ..., started_at: _Optional[float] = ...) -> None: ...

class ModelStatus(_message.Message):
    __slots__ = ("model", "active_version", "building", "resident_versions", "active_bytes", "resident_bytes", "canary_version", "canary_percent", "online", "canary_note", "placement")
    class OnlineEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: Online
        def __init__(self, key: _Optional[int] = ..., value: _Optional[_Union[Online, _Mapping]] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_VERSION_FIELD_NUMBER: _ClassVar[int]
    BUILDING_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_BYTES_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    CANARY_VERSION_FIELD_NUMBER: _ClassVar[int]
    CANARY_PERCENT_FIELD_NUMBER: _ClassVar[int]
    ONLINE_FIELD_NUMBER: _ClassVar[int]
    CANARY_NOTE_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    model: str
    active_version: int
    building: BuildProgress
    resident_versions: _containers.RepeatedScalarFieldContainer[int]
    active_bytes: int
    resident_bytes: int
    canary_version: int
    canary_percent: float
    online: _containers.MessageMap[int, Online]
    canary_note: str
    placement: str
    def __init__(self, model: _Optional[str] = ..., active_version: _Optional[int] = ..., building: _Optional[_Union[BuildProgress, _Mapping]] = ..., resident_versions: _Optional[_Iterable[int]] = ..., active_bytes: _Optional[int] = ..., resident_bytes: _Optional[int] = ..., canary_version: _Optional[int] = ..., canary_percent: _Optional[float] = ..., online: _Optional[_Mapping[int, Online]] = ..., canary_note: _Optional[str] = ..., placement: _Optional[str] = ...) -> None: ...

class Online(_message.Message):
    __slots__ = ("accuracy", "samples")
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    accuracy: float
    samples: int
    def __init__(self, accuracy: _Optional[float] = ..., samples: _Optional[int] = ...) -> None: ...

class GetStatusReply(_message.Message):
    __slots__ = ("models", "device", "ingredient_bytes", "ingredient_bytes_by_placement")
    class IngredientBytesByPlacementEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    MODELS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    INGREDIENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    INGREDIENT_BYTES_BY_PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelStatus]
    device: str
    ingredient_bytes: int
    ingredient_bytes_by_placement: _containers.ScalarMap[str, int]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelStatus, _Mapping]]] = ..., device: _Optional[str] = ..., ingredient_bytes: _Optional[int] = ..., ingredient_bytes_by_placement: _Optional[_Mapping[str, int]] = ...) -> None: ...
