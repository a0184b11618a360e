"""The soup spec, v1: what an operator pushes, validated once and immutable afterwards.

Every model here is frozen and forbids unknown fields, so a typo is an error rather than a
silently ignored setting. Validation problems come back as ``SpecInvalid`` whose message names
each field as a dotted path, e.g. ``merge.weights.ft-c: no ingredient named 'ft-c'``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    StrictBool,
    ValidationError,
    field_validator,
    model_validator,
)

from tureen.errors import SpecInvalid
from tureen.merge.methods import MethodDecl, declaration

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
    if not re.match(NAME_PATTERN, name):
        return "names are letters, digits, '_', '.' or '-', and start with a letter or digit"
    return None


class FieldProblems(ValueError):
    """Problems found by a cross-field check, each as (field relative to the model, reason)."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{field}: {reason}" for field, reason in problems))


class FrozenDict(dict):  # type: ignore[type-arg]
    """A dict that refuses changes, so that a validated spec stays what was validated."""

    def _immutable(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("a validated spec cannot be changed; build a new one")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = __ior__ = _immutable

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (dict(self),))

    def __deepcopy__(self, memo: dict[int, Any]) -> FrozenDict:
        return self


def _frozen_dict(value: dict[str, Any]) -> dict[str, Any]:
    return FrozenDict(value)


FACTORY_PATTERN = r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$"
Kwargs = Annotated[dict[str, JsonValue], AfterValidator(_frozen_dict)]
"""A factory's keyword arguments: plain data (numbers, strings, booleans, lists, maps), never objects."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


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


class Architecture(_Frozen):
    """How to build the ``nn.Module`` the merged weights go into: a factory, or a HF config."""

    factory: str | None = Field(default=None, pattern=FACTORY_PATTERN)
    """``module:callable``; a pushed spec may name only those the operator allows (``--allow-factory``)."""
    kwargs: Kwargs = Field(default_factory=FrozenDict)
    huggingface: str | None = Field(default=None, min_length=1)
    """A directory with a Hugging Face ``config.json`` (relative to the spec file)."""
    task: Literal["causal-lm", "sequence-classification"] = "causal-lm"

    @model_validator(mode="after")
    def _one_source(self) -> Architecture:
        if (self.factory is None) == (self.huggingface is None):
            raise FieldProblems([("factory", "give exactly one of factory or huggingface")])
        if self.huggingface is not None and self.kwargs:
            raise FieldProblems([("kwargs", "kwargs go with factory; a huggingface model reads its config.json")])
        return self


ParamValue = StrictBool | int | float | str | list[float]
Parameters = Annotated[dict[str, ParamValue], AfterValidator(_frozen_dict)]


class IngredientRef(_Frozen):
    """One checkpoint: a name the spec refers to, a file, optionally its checksum and parameters."""

    name: str = Field(pattern=NAME_PATTERN)
    path: str = Field(min_length=1)
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    parameters: Parameters = Field(default_factory=FrozenDict)
    """Per-ingredient parameters of the merge method (weight, density, ...) for this ingredient."""


class Override(_Frozen):
    """Parameters for the tensors whose names match a glob; the first matching entry wins."""

    match: str = Field(min_length=1)
    ingredient: str | None = None
    """Only for this ingredient; entries naming an ingredient are consulted before the others."""
    parameters: Parameters = Field(min_length=1)


class MergeSpec(_Frozen):
    """Which merge method, with which weights and parameters."""

    method: str = "linear"
    base: str | None = None
    weights: Annotated[dict[str, float | list[float]], AfterValidator(_frozen_dict)] | None = None
    parameters: Parameters = Field(default_factory=FrozenDict)
    overrides: tuple[Override, ...] = ()
    grid: Annotated[dict[str, list[ParamValue]], AfterValidator(_frozen_dict)] | None = None
    """Values to try per parameter (every combination, at most 64); the best on held-out data is kept."""

    @model_validator(mode="after")
    def _method_and_parameters(self) -> MergeSpec:
        try:
            method = declaration(self.method)
        except ValueError as exc:
            raise FieldProblems([("method", str(exc))]) from None
        problems = _parameter_problems(method, self.parameters, "parameters", per_ingredient_allowed=True)
        if self.grid is not None:
            problems += _grid_problems(method, self.grid)
        for i, override in enumerate(self.overrides):
            problems += _parameter_problems(method, override.parameters, f"overrides[{i}].parameters", True)
        if problems:
            raise FieldProblems(problems)
        return self


class EvalSet(_Frozen):
    """One evaluation split: a safetensors file of input tensors plus labels, or a factory."""

    path: str | None = Field(default=None, min_length=1)
    """A safetensors file (relative to the spec file): a tensor per model input, plus the labels."""
    factory: str | None = Field(default=None, pattern=FACTORY_PATTERN)
    """``module:callable`` returning an iterable of batches (mappings of tensor name to tensor)."""
    kwargs: Kwargs = Field(default_factory=FrozenDict)

    @model_validator(mode="after")
    def _one_source(self) -> EvalSet:
        if (self.path is None) == (self.factory is None):
            raise FieldProblems([("path", "give exactly one of path or factory")])
        if self.path is not None and self.kwargs:
            raise FieldProblems([("kwargs", "kwargs go with factory")])
        return self


Task = Literal["classification", "language-modeling"]
Metric = Literal["accuracy", "nll", "ece", "perplexity"]
HIGHER_IS_BETTER: dict[str, bool] = {"accuracy": True, "nll": False, "ece": False, "perplexity": False}
TASK_METRICS: dict[str, tuple[str, ...]] = {
    "classification": ("accuracy", "nll", "ece"),
    "language-modeling": ("nll", "perplexity"),
}


class Evaluation(_Frozen):
    """How blends and ingredients are scored: the task, the data splits, the metric that decides."""

    task: Task = "classification"
    splits: Annotated[dict[str, EvalSet], AfterValidator(_frozen_dict)] = Field(min_length=1)
    select: str | None = None
    """The split that searches and the rollout gate use (default: the first one listed)."""
    metric: Metric | None = None
    """The metric searches and the gate compare (default: accuracy, or perplexity for language models)."""
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
            if not re.match(NAME_PATTERN, name):
                problems.append((f"splits.{name}", "split names are letters, digits, '_', '.' or '-'"))
        if self.select is not None and self.select not in self.splits:
            problems.append(("select", f"no split named {self.select!r} (splits: {', '.join(self.splits)})"))
        if self.metric is not None and self.metric not in TASK_METRICS[self.task]:
            problems.append(("metric", f"{self.task} reports {', '.join(TASK_METRICS[self.task])}, not {self.metric}"))
        if problems:
            raise FieldProblems(problems)
        return self

    @property
    def selected(self) -> str:
        return self.select or next(iter(self.splits))

    @property
    def deciding_metric(self) -> str:
        return self.metric or ("accuracy" if self.task == "classification" else "perplexity")


class Gate(_Frozen):
    """A candidate activates only if its metric is no worse than the active blend's, within a tolerance."""

    tolerance: float = Field(default=0.0, ge=0.0)
    """How much worse than the active blend the candidate may be, in the metric's units."""


class Canary(_Frozen):
    """Send a share of traffic to the candidate, then promote or roll back on labelled feedback."""

    percent: float = Field(gt=0.0, lt=100.0)
    """Share of requests the candidate takes; below 100, so that the active version is labelled too."""
    sticky: str | None = Field(default=None, min_length=1)
    """A request parameter whose value picks the blend (the same value, the same blend)."""
    min_samples: int = Field(default=200, ge=1)
    """Labelled requests each blend needs before the canary is decided."""
    margin: float = Field(default=0.0, ge=0.0, le=1.0)
    """How much lower the candidate's online accuracy may be and still count as not worse."""
    alpha: float = Field(default=0.05, gt=0.0, lt=0.5)
    """Significance level of the one-sided tests that decide (two-proportion z-tests)."""
    max_samples: int = Field(default=5000, ge=1)
    """Labelled candidate requests after which an undecided canary is rolled back."""

    @model_validator(mode="after")
    def _bounds(self) -> Canary:
        if self.max_samples < self.min_samples:
            raise FieldProblems([("max_samples", f"must be at least min_samples ({self.min_samples})")])
        return self


class Rollout(_Frozen):
    """How a new version goes live: gated on evaluation, and/or as a canary."""

    gate: Gate | None = None
    canary: Canary | None = None


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
    merge: MergeSpec = Field(default_factory=MergeSpec)
    dtype: Dtype = "float32"
    evaluation: Evaluation | None = None
    rollout: Rollout | None = None

    @model_validator(mode="after")
    def _references(self) -> SoupSpec:
        problems: list[tuple[str, str]] = []
        names: list[str] = []
        method = declaration(self.merge.method)
        for i, ingredient in enumerate(self.ingredients):
            if ingredient.name in names:
                problems.append((f"ingredients[{i}].name", f"duplicate ingredient name {ingredient.name!r}"))
            names.append(ingredient.name)
            where = f"ingredients[{i}].parameters"
            if ingredient.name == self.merge.base and ingredient.parameters:
                problems.append((where, "the base ingredient takes no parameters"))
            else:
                problems += _parameter_problems(method, ingredient.parameters, where, per_ingredient_allowed=True, only_per=True)
        problems += _merge_references(self.merge, names)
        if method.search and self.evaluation is None:
            problems.append(("evaluation", f"method {method.name!r} searches on held-out data; add an evaluation section"))
        if self.merge.grid is not None and self.evaluation is None:
            problems.append(("merge.grid", "a grid search scores each point on held-out data; add an evaluation section"))
        canary = self.rollout.canary if self.rollout is not None else None
        if canary is not None and self.evaluation is not None and self.evaluation.task != "classification":
            problems.append(("rollout.canary", "canaries are judged by online accuracy, so the task must be classification"))
        if self.rollout is not None and self.rollout.gate is not None and self.evaluation is None:
            problems.append(("rollout.gate", "the gate compares evaluations; add an evaluation section"))
        if problems:
            raise FieldProblems(problems)
        return self

    @property
    def mixed(self) -> tuple[IngredientRef, ...]:
        """The ingredients other than the base, in spec order: the ones a method combines."""
        return tuple(i for i in self.ingredients if i.name != self.merge.base)


def _parameter_problems(
    method: MethodDecl, given: Mapping[str, Any], where: str, per_ingredient_allowed: bool, only_per: bool = False
) -> list[tuple[str, str]]:
    problems = []
    declared = method.by_name
    for name, value in given.items():
        param = declared.get(name)
        if param is None:
            known = ", ".join(declared) or "none"
            problems.append((f"{where}.{name}", f"method {method.name!r} has no parameter {name!r} (parameters: {known})"))
        elif only_per and not param.per_ingredient:
            problems.append((f"{where}.{name}", f"{name!r} is a global parameter of {method.name!r}; set it in merge.parameters"))
        elif (problem := param.problem(value)) is not None:
            problems.append((f"{where}.{name}", problem))
    return problems


MAX_GRID = 64


def _grid_problems(method: MethodDecl, grid: Mapping[str, list[Any]]) -> list[tuple[str, str]]:
    if method.search:
        return [("grid", f"method {method.name!r} is a search already; a grid goes with a merge method")]
    if not grid:
        return [("grid", "name at least one parameter to search")]
    problems: list[tuple[str, str]] = []
    combinations = 1
    for name, values in grid.items():
        if not values:
            problems.append((f"grid.{name}", "give at least one value"))
            continue
        combinations *= len(values)
        for i, value in enumerate(values):
            if name in method.by_name and (problem := method.by_name[name].problem(value)) is not None:
                problems.append((f"grid.{name}[{i}]", problem))
        if name not in method.by_name:
            known = ", ".join(method.by_name) or "none"
            problems.append((f"grid.{name}", f"method {method.name!r} has no parameter {name!r} (parameters: {known})"))
    if combinations > MAX_GRID:
        problems.append(("grid", f"{combinations} combinations; at most {MAX_GRID}"))
    return problems


def _merge_references(merge: MergeSpec, names: list[str]) -> list[tuple[str, str]]:
    method = declaration(merge.method)
    problems: list[tuple[str, str]] = []
    if merge.base is not None and merge.base not in names:
        problems.append(("merge.base", f"no ingredient named {merge.base!r}"))
    if merge.base is not None and method.base == "forbidden":
        problems.append(("merge.base", f"method {method.name!r} does not use a base; list it as an ingredient"))
    if merge.base is None and method.base == "required":
        problems.append(("merge.base", f"method {method.name!r} needs a base ingredient"))
    mixed = [name for name in names if name != merge.base]
    if len(mixed) < method.min_ingredients:
        problems.append(
            ("ingredients", f"method {method.name!r} needs at least {method.min_ingredients} ingredients besides the base")
        )
    if method.max_ingredients is not None and len(mixed) > method.max_ingredients:
        problems.append(
            ("ingredients", f"method {method.name!r} takes at most {method.max_ingredients} besides the base, got {len(mixed)}")
        )
    if method.name == "slerp" and len(names) != 2:
        problems.append(("ingredients", f"slerp interpolates exactly two models (the base counts), got {len(names)}"))
    for i, override in enumerate(merge.overrides):
        if override.ingredient is not None and override.ingredient not in mixed:
            problems.append((f"merge.overrides[{i}].ingredient", f"no ingredient named {override.ingredient!r} besides the base"))
    if merge.weights is not None:
        problems += _weight_problems(merge, method, names, mixed)
    return problems


def _weight_problems(merge: MergeSpec, method: MethodDecl, names: list[str], mixed: list[str]) -> list[tuple[str, str]]:
    """``merge.weights`` names every non-base ingredient once, with acceptable values."""
    weights = merge.weights or {}
    param = method.by_name.get("weight")
    if param is None:
        return [("merge.weights", f"method {method.name!r} takes no weights")]
    problems = []
    for name, weight in weights.items():
        if name not in names:
            problems.append((f"merge.weights.{name}", f"no ingredient named {name!r}"))
        elif name == merge.base:
            problems.append((f"merge.weights.{name}", "the base ingredient takes no weight"))
        elif (problem := param.problem(weight)) is not None:
            problems.append((f"merge.weights.{name}", problem))
    problems += [("merge.weights", f"no weight for ingredient {n!r} (give all or none)") for n in mixed if n not in weights]
    if problems:
        return problems
    normalize_param = method.by_name.get("normalize")
    normalize = merge.parameters.get("normalize", normalize_param.default if normalize_param else False)
    scalars = [weights[n] for n in mixed]
    if normalize and all(isinstance(w, int | float) for w in scalars) and sum(scalars) == 0:  # type: ignore[arg-type]
        problems.append(("merge.weights", "weights sum to 0 and cannot be normalized (or set parameters.normalize: false)"))
    return problems


def parse_spec(data: object, *, source: str | None = None, base_dir: Path | None = None) -> SoupSpec:
    """Validate a decoded spec document; relative ingredient paths resolve against ``base_dir``."""
    if not isinstance(data, Mapping):
        raise SpecInvalid([f"(spec): expected a mapping at the top level, got {type(data).__name__}"], source)
    if base_dir is not None:
        data = resolve_paths(data, base_dir)
    try:
        return SoupSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecInvalid(describe(exc), source) from None


def load_spec(path: str | os.PathLike[str]) -> SoupSpec:
    """Read a spec from a YAML or JSON file; ingredient paths are relative to the file."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecInvalid([f"cannot read the file: {exc.strerror or exc}"], str(file)) from None
    try:
        data = json.loads(text) if file.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        detail = " ".join(str(exc).split())
        raise SpecInvalid([f"not valid {'JSON' if file.suffix == '.json' else 'YAML'}: {detail}"], str(file)) from None
    return parse_spec(data, source=str(file), base_dir=file.resolve().parent)


def describe(exc: ValidationError) -> list[str]:
    """One ``field.path: reason`` line per problem in a pydantic validation error."""
    lines: list[str] = []
    for err in exc.errors():
        loc = _dotted(err["loc"])
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, FieldProblems):
            lines += [f"{_join(loc, field)}: {reason}" for field, reason in cause.problems]
        else:
            lines.append(f"{loc or '(spec)'}: {_message(err)}")
    return lines


def _message(err: Any) -> str:
    if err["type"] == "missing":
        return "required field is missing"
    if err["type"] == "extra_forbidden":
        return "unknown field"
    if err["type"] == "too_long":
        ctx = err.get("ctx") or {}
        return f"at most {ctx.get('max_length')} entries, got {ctx.get('actual_length')}"
    return str(err["msg"]).removeprefix("Value error, ")


def _dotted(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _join(prefix: str, field: str) -> str:
    if not prefix:
        return field
    return f"{prefix}{field}" if field.startswith("[") else f"{prefix}.{field}"


def resolve_paths(data: Mapping[str, Any], base_dir: Path) -> dict[str, Any]:
    """A copy of a spec document whose file paths (ingredients, evaluation splits, a Hugging Face
    config folder) are relative to ``base_dir`` no longer; ``~`` is expanded."""

    def at(path: str) -> str:
        return str(base_dir / Path(path).expanduser())

    def with_path(item: Any) -> Any:
        ok = isinstance(item, Mapping) and isinstance(item.get("path"), str) and item["path"]
        return {**item, "path": at(item["path"])} if ok else item

    resolved = dict(data)
    architecture = resolved.get("architecture")
    if isinstance(architecture, Mapping) and isinstance(architecture.get("huggingface"), str):
        resolved["architecture"] = {**architecture, "huggingface": at(architecture["huggingface"])}
    evaluation = resolved.get("evaluation")
    if isinstance(evaluation, Mapping) and isinstance(evaluation.get("splits"), Mapping):
        resolved["evaluation"] = {**evaluation, "splits": {n: with_path(i) for n, i in evaluation["splits"].items()}}
    ingredients = resolved.get("ingredients")
    if isinstance(ingredients, list):
        resolved["ingredients"] = [with_path(item) for item in ingredients]
    return resolved


def spec_document(spec: SoupSpec) -> dict[str, Any]:
    """The spec as a plain JSON-able document that ``parse_spec`` reads back to an equal spec."""
    return spec.model_dump(mode="json", by_alias=True, exclude_none=True, exclude_defaults=True)
