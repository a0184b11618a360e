"""The soup spec's models: frozen pydantic classes that forbid unknown fields.

A typo is an error rather than a silently ignored setting. Each model checks its own fields;
the checks that span fields live in ``tureen.spec.rules`` and report through ``FieldProblems``.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, Self

from pydantic import (
    AfterValidator,
    Field,
    JsonValue,
    PrivateAttr,
    StrictBool,
    StringConstraints,
    field_validator,
    model_validator,
)

from tureen.merge.methods import MethodDecl, declaration
from tureen.spec.frozen import Frozen as _Frozen
from tureen.spec.frozen import FrozenDict, Parameters, ParamValue, frozen_dict
from tureen.spec.layers import Override, Slice
from tureen.spec.metrics import DEFAULT_METRIC, TASK_METRICS, Metric, Task
from tureen.spec.rules import FieldProblems, grid_problems, parameter_problems, slice_parameter_problems, soup_problems

API_VERSION = "tureen/v1"
Datatype = Literal["BOOL", "UINT8", "INT8", "INT16", "INT32", "INT64", "FP16", "BF16", "FP32", "FP64"]
Dtype = Literal["float32", "float16", "bfloat16"]
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
RESERVED_MODEL_NAMES = ("liveness", "inference.GRPCInferenceService")
"""Health service names of their own (each model name is one too, so these cannot be models)."""
MAX_NAME = 128
"""Longest model name: names become store folders, metric labels and health service names."""
MAX_INGREDIENTS = 256
MAX_SPEC_BYTES = 1024 * 1024
"""Largest spec document a transport accepts (its JSON text, in bytes)."""


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a model's name, or None when it can."""
    if len(name) > MAX_NAME:
        return f"names are at most {MAX_NAME} characters, got {len(name)}"
    if not re.fullmatch(NAME_PATTERN, name):
        return "names are letters, digits, '_', '.' or '-', and start with a letter or digit"
    return None


FACTORY_PATTERN = r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$"
Factory = Annotated[str, StringConstraints(pattern=FACTORY_PATTERN)]
"""``module:callable``, imported when the spec is built."""
Kwargs = Annotated[dict[str, JsonValue], AfterValidator(frozen_dict)]
"""A factory's keyword arguments: plain data (numbers, strings, booleans, lists, maps), never objects."""


class _FactoryOr(_Frozen):
    """A model built by a ``factory`` (with ``kwargs``) or from one other source, never both."""

    sources: ClassVar[tuple[str, str]]
    """The two fields, in the order the error names them; the first is the field it points at."""
    kwargs_note: ClassVar[str] = ""
    if TYPE_CHECKING:  # declared by each subclass, where they take their place in the field order
        factory: str | None
        kwargs: dict[str, Any]

    @model_validator(mode="after")
    def _one_source(self) -> Self:
        first, second = self.sources
        if (getattr(self, first) is None) == (getattr(self, second) is None):
            raise FieldProblems([(first, f"give exactly one of {first} or {second}")])
        if self.factory is None and self.kwargs:
            raise FieldProblems([("kwargs", f"kwargs go with factory{self.kwargs_note}")])
        return self


class TensorSpec(_Frozen):
    """One named tensor of the model's interface; ``-1`` marks a variable dimension."""

    name: str = Field(min_length=1)
    datatype: Datatype
    shape: tuple[int, ...] = Field(min_length=1)

    @field_validator("shape")
    @classmethod
    def _dims(cls, shape: tuple[int, ...]) -> tuple[int, ...]:
        if any(dim == 0 or dim < -1 for dim in shape):
            raise ValueError(f"dimensions must be positive or -1, got {list(shape)}")
        return shape


class Interface(_Frozen):
    """Inputs and outputs the served model speaks; feeds ModelMetadata and ModelConfig.

    With ``max_batch_size > 0`` the first dimension of every tensor is the batch (``-1``).
    """

    inputs: tuple[TensorSpec, ...] = Field(min_length=1)
    outputs: tuple[TensorSpec, ...] = Field(min_length=1)
    max_batch_size: int = Field(default=1024, ge=0)

    @model_validator(mode="after")
    def _consistent(self) -> Interface:
        problems: list[tuple[str, str]] = []
        for kind, tensors in (("inputs", self.inputs), ("outputs", self.outputs)):
            seen: set[str] = set()
            for i, tensor in enumerate(tensors):
                if tensor.name in seen:
                    problems.append((f"{kind}[{i}].name", f"duplicate tensor name {tensor.name!r}"))
                seen.add(tensor.name)
                if self.max_batch_size > 0 and tensor.shape[0] != -1:
                    problems.append((f"{kind}[{i}].shape", "the first dimension must be -1 (the batch) when max_batch_size > 0"))
        if problems:
            raise FieldProblems(problems)
        return self


class Architecture(_FactoryOr):
    """How to build the ``nn.Module`` the merged weights go into: a factory, or a HF config."""

    sources = ("factory", "huggingface")
    kwargs_note = "; a huggingface model reads its config.json"

    factory: Factory | None = None
    """``module:callable``; a pushed spec may name only those the operator allows (``--allow-factory``)."""
    kwargs: Kwargs = Field(default_factory=FrozenDict)
    huggingface: str | None = Field(default=None, min_length=1)
    """A directory with a Hugging Face ``config.json`` (relative to the spec file)."""
    task: Literal["causal-lm", "sequence-classification"] = "causal-lm"
    config: Kwargs = Field(default_factory=FrozenDict)
    """Values that replace ``config.json``'s (``num_hidden_layers`` of a frankenmerge)."""

    @model_validator(mode="after")
    def _config_with_huggingface(self) -> Self:
        if self.config and self.huggingface is None:
            raise FieldProblems([("config", "config goes with huggingface; a factory takes kwargs")])
        return self


class IngredientRef(_Frozen):
    """One checkpoint: a name the spec refers to, a file (or a LoRA adapter on another
    ingredient), optionally its checksum and parameters."""

    name: str = Field(pattern=NAME_PATTERN)
    path: str | None = Field(default=None, min_length=1)
    adapter: str | None = Field(default=None, min_length=1)
    """A PEFT LoRA adapter directory (``adapter_config.json``, ``adapter_model.safetensors``)."""
    base: str | None = None
    """With ``adapter``: the ingredient the adapter was trained on."""
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    parameters: Parameters = Field(default_factory=FrozenDict)
    """Per-ingredient parameters of the merge method (weight, density, ...) for this ingredient."""

    @model_validator(mode="after")
    def _one_source(self) -> Self:
        if (self.path is None) == (self.adapter is None):
            raise FieldProblems([("path", "give exactly one of path or adapter")])
        if self.adapter is not None and self.base is None:
            raise FieldProblems([("base", "an adapter needs the ingredient it was trained on as its base")])
        if self.adapter is None and self.base is not None:
            raise FieldProblems([("base", "base goes with adapter")])
        return self

    @property
    def location(self) -> str:
        """The file or folder it is read from (the adapter's folder for an adapter)."""
        return self.path if self.path is not None else str(self.adapter)


class MergeSpec(_Frozen):
    """Which merge method, with which weights and parameters."""

    method: str = "linear"
    base: str | None = None
    weights: Annotated[dict[str, float | list[float]], AfterValidator(frozen_dict)] | None = None
    parameters: Parameters = Field(default_factory=FrozenDict)
    overrides: tuple[Override, ...] = ()
    grid: Annotated[dict[str, list[ParamValue]], AfterValidator(frozen_dict)] | None = None
    """Values to try per parameter (every combination, at most 64); the best on held-out data is kept."""
    slices: tuple[Slice, ...] | None = Field(default=None, min_length=1)
    """The blend's layers, slice by slice (mergekit's ``slices``; a frankenmerge with ``passthrough``)."""
    _declaration: MethodDecl | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _method_and_parameters(self) -> MergeSpec:
        try:
            self._declaration = method = declaration(self.method)
        except ValueError as exc:
            raise FieldProblems([("method", str(exc))]) from None
        problems = parameter_problems(method, self.parameters, "parameters")
        if self.grid is not None:
            problems += grid_problems(method, self.grid)
        for i, override in enumerate(self.overrides):
            problems += parameter_problems(method, override.parameters, f"overrides[{i}].parameters")
        problems += slice_parameter_problems(method, self.slices or ())
        if problems:
            raise FieldProblems(problems)
        return self

    @property
    def declaration(self) -> MethodDecl:
        """The method's declaration, looked up once, when this section was validated."""
        assert self._declaration is not None  # every validated section has one
        return self._declaration


class EvalSet(_FactoryOr):
    """One evaluation split: a safetensors file of input tensors plus labels, text, or a factory."""

    sources = ("path", "factory")

    path: str | None = Field(default=None, min_length=1)
    """A safetensors file (relative to the spec file): a tensor per model input, plus the labels;
    or, for a causal LM, a ``.jsonl`` file of ``{"text"}`` or ``{"prompt", "choices", "answer"}`` rows."""
    factory: Factory | None = None
    """``module:callable`` returning an iterable of batches (mappings of tensor name to tensor) or text rows."""
    kwargs: Kwargs = Field(default_factory=FrozenDict)
    task: Task | None = None
    """This split's task when it is not the evaluation's (a multiple-choice split beside text)."""

    @property
    def jsonl(self) -> bool:
        """Whether the split is a file of text rows (``.jsonl``), not of tensors."""
        return self.path is not None and self.path.endswith(".jsonl")


class Evaluation(_Frozen):
    """How blends and ingredients are scored: the task, the data splits, the metric that decides."""

    task: Task = "classification"
    splits: Annotated[dict[str, EvalSet], AfterValidator(frozen_dict)] = Field(min_length=1)
    select: str | None = None
    """The split that searches and the rollout gate use (default: the first one listed)."""
    metric: Metric | None = None
    """The metric searches and the gate compare (default: accuracy; perplexity for language modeling)."""
    output: str | None = None
    """The output holding the logits (default: the interface's first output)."""
    labels: str = Field(default="labels", min_length=1)
    """The tensor holding the labels (language models: token ids, -100 ignored; default: the input ids)."""
    batch_size: int = Field(default=256, ge=1)
    ingredients: StrictBool = True
    """Also score every ingredient alone (once per build, so it costs N forward passes over the data)."""

    @model_validator(mode="after")
    def _consistent(self) -> Evaluation:
        problems: list[tuple[str, str]] = []
        for name in self.splits:
            if not re.fullmatch(NAME_PATTERN, name):
                problems.append((f"splits.{name}", "split names are letters, digits, '_', '.' or '-'"))
        if self.select is not None and self.select not in self.splits:
            problems.append(("select", f"no split named {self.select!r} (splits: {', '.join(self.splits)})"))
        task = self.task_of(self.selected) if self.select is None or self.select in self.splits else self.task
        if self.metric is not None and self.metric not in TASK_METRICS[task]:
            where = f"the selected split {self.selected!r} is {task}, which" if task != self.task else task
            problems.append(("metric", f"{where} reports {', '.join(TASK_METRICS[task])}, not {self.metric}"))
        if problems:
            raise FieldProblems(problems)
        return self

    @property
    def selected(self) -> str:
        return self.select or next(iter(self.splits))

    @property
    def deciding_metric(self) -> str:
        return self.metric or DEFAULT_METRIC[self.task_of(self.selected)]

    def task_of(self, split: str) -> Task:
        """The task a split is scored as: its own, else the evaluation's."""
        return self.splits[split].task or self.task


class Gate(_Frozen):
    """A candidate activates only if its metric is no worse than the active blend's, within a tolerance."""

    tolerance: float = Field(default=0.0, ge=0.0)
    """How much worse than the active blend the candidate may be, in the metric's units."""


class Canary(_Frozen):
    """Send a share of traffic to the candidate, then promote or roll back on live feedback
    (labels of a classifier's rows, or rewards for any response)."""

    percent: float = Field(gt=0.0, lt=100.0)
    """Share of requests the candidate takes; below 100, so that the active version is labelled too."""
    sticky: str | None = Field(default=None, min_length=1)
    """A request parameter whose value picks the blend (the same value, the same blend)."""
    min_samples: int = Field(default=200, ge=1)
    """Feedback outcomes (labelled rows, or rewards) each blend needs before the canary is decided."""
    margin: float = Field(default=0.0, ge=0.0, le=1.0)
    """How much lower the candidate's online accuracy (or mean reward) may be and still count as not worse."""
    alpha: float = Field(default=0.05, gt=0.0, lt=0.5)
    """Significance level of the one-sided tests that decide (two-proportion z-tests)."""
    max_samples: int = Field(default=5000, ge=1)
    """Candidate outcomes after which an undecided canary is rolled back."""

    @model_validator(mode="after")
    def _bounds(self) -> Canary:
        if self.max_samples < self.min_samples:
            raise FieldProblems([("max_samples", f"must be at least min_samples ({self.min_samples})")])
        return self


class Rollout(_Frozen):
    """How a new version goes live: gated on evaluation, and/or as a canary."""

    gate: Gate | None = None
    canary: Canary | None = None


class Batching(_Frozen):
    """Triton's dynamic batcher: requests queue per model and version and run as one forward.

    A batch holds up to the interface's ``max_batch_size`` rows; it is formed at once when a
    preferred size (or the maximum) can be filled, else after the oldest request waited
    ``max_queue_delay_us`` (0: never wait, a lone request runs at once).
    """

    max_queue_delay_us: int = Field(default=0, ge=0, le=1_000_000)
    preferred_batch_sizes: tuple[Annotated[int, Field(ge=1)], ...] = ()
    max_queue_size: int = Field(default=0, ge=0)
    """Requests that may wait; one more is answered UNAVAILABLE at once. 0: no limit."""


class Serving(_Frozen):
    """How the blend is served (nothing here changes its weights)."""

    batching: Batching | None = None


class TokenizerSource(_Frozen):
    """The blend's vocabulary when the ingredients' differ (mergekit's ``tokenizer_source``)."""

    source: str = Field(default="base", min_length=1)
    """``base`` (the base's, else the first ingredient's), ``union`` (every ingredient's tokens), or
    an ingredient's name; embedding rows are mapped by token (see docs/spec.md)."""


class SoupSpec(_Frozen):
    """A soup spec as pushed by an operator (apiVersion ``tureen/v1``)."""

    api_version: Literal["tureen/v1"] = Field(alias="apiVersion")
    model: str = Field(pattern=NAME_PATTERN)
    architecture: Architecture | None = None

    @field_validator("model")
    @classmethod
    def _name(cls, model: str) -> str:
        if (problem := name_problem(model)) is not None:
            raise ValueError(problem)
        if model in RESERVED_MODEL_NAMES:
            raise ValueError(f"{model!r} is a name the health service reports on; choose another model name")
        return model

    interface: Interface | None = None
    ingredients: tuple[IngredientRef, ...] = Field(min_length=1, max_length=MAX_INGREDIENTS)
    placement: Literal["device", "host", "disk"] | None = None
    """Where the ingredients live between merges; None: the server's ``--ingredient-placement``."""
    merge: MergeSpec = Field(default_factory=MergeSpec)
    tokenizer: TokenizerSource | None = None
    dtype: Dtype = "float32"
    evaluation: Evaluation | None = None
    rollout: Rollout | None = None
    serving: Serving | None = None

    @model_validator(mode="after")
    def _references(self) -> SoupSpec:
        problems = soup_problems(self)
        if problems:
            raise FieldProblems(problems)
        return self

    @property
    def mixed(self) -> tuple[IngredientRef, ...]:
        """The ingredients other than the base, in spec order: the ones a method combines."""
        return tuple(i for i in self.ingredients if i.name != self.merge.base)
