"""Reading specs: from a file or a decoded document, with paths made absolute, errors made lines.

Validation problems come back as ``SpecInvalid`` whose message names each field as a dotted
path, e.g. ``merge.weights.ft-c: no ingredient named 'ft-c'``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from tureen.errors import SpecInvalid
from tureen.spec.models import MAX_SPEC_BYTES, SoupSpec
from tureen.spec.rules import FieldProblems


def spec_from_json(text: str, field: str) -> SoupSpec:
    """A spec sent over the wire as JSON text; a size or parse failure names ``field``."""
    size = len(text.encode())
    if size > MAX_SPEC_BYTES:
        raise SpecInvalid([f"{field}: the spec is {size} bytes; at most {MAX_SPEC_BYTES} (1 MiB)"])
    try:
        document = json.loads(text)
    except ValueError as exc:
        raise SpecInvalid([f"{field}: not valid JSON: {exc}"]) from None
    return parse_spec(document, source=field)


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
        if not isinstance(item, Mapping):
            return item
        return {**item, **{k: at(item[k]) for k in ("path", "adapter") if isinstance(item.get(k), str) and item[k]}}

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
