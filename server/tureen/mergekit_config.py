"""Convert a mergekit YAML config (the ``models:`` form) into a Tureen soup spec.

What converts: ``merge_method`` for the methods Tureen has, ``base_model``, ``models`` with
their ``parameters``, global ``parameters``, gradients, and ``filter`` lists (mergekit's
filters are substrings of tensor names; they become ``*FILTER*`` globs). What does not is
reported: fatal things (``slices``, revision references, unknown methods) raise
``SpecInvalid``; things without effect on the weights (tokenizer settings, ``int8_mask``) are
dropped and listed in the returned notes.

Precedence is kept: in mergekit a model's own setting beats every global one, so when a
parameter also has global filters, the model's value becomes an override naming the
ingredient (consulted first) rather than a plain ingredient parameter.

A ``model+lora`` reference becomes an adapter ingredient on the model; a model named only that
way is an ingredient with weight 0 (mergekit never feeds it to the merge) unless it is the
``base_model``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from tureen.errors import SpecInvalid
from tureen.merge.methods import DECLARATIONS
from tureen.spec import SoupSpec, parse_spec

DROPPED = {
    "tokenizer_source": "Tureen serves tensors; tokenizers stay with the client",
    "tokenizer": "Tureen serves tensors; tokenizers stay with the client",
    "chat_template": "Tureen serves tensors; chat templates stay with the client",
    "out_dtype": None,  # used, see _dtype
}
NO_EFFECT_PARAMETERS = {"int8_mask": "only changes the dtype of mergekit's masks"}
# mergekit adds base_model as an ordinary input of these methods.
BASE_AS_INGREDIENT = {"linear", "karcher"}


def from_mergekit(config: Mapping[str, Any], model: str, source: str = "mergekit config") -> tuple[SoupSpec, list[str]]:
    """The Tureen spec equivalent to ``config``, and notes on what was dropped."""
    notes: list[str] = []
    _refuse_unconvertible(config, source)
    method = config["merge_method"]
    decl = DECLARATIONS[method]
    declared = decl.by_name
    names: dict[str, str] = {}
    ingredients: list[dict[str, Any]] = []
    helpers: set[str] = set()
    """Models named only as the base of a LoRA reference (``model+lora``): not inputs themselves."""

    def ingredient(reference: str, field: str, helper: bool = False) -> str:
        model, plus, lora = reference.partition("+")
        if not helper:
            helpers.discard(names.get(reference, ""))
        if reference not in names:
            if plus:  # mergekit's model+lora: the adapter applied to the model, as an adapter ingredient
                base_name = ingredient(model, field, helper=True)
                names[reference] = _unique_name(lora, set(names.values()))
                ingredients.append({"name": names[reference], "adapter": _local_path(lora, field, source), "base": base_name})
            else:
                names[reference] = _unique_name(reference, set(names.values()))
                ingredients.append({"name": names[reference], "path": _local_path(reference, field, source)})
                if helper:
                    helpers.add(names[reference])
        return names[reference]

    merge: dict[str, Any] = {"method": method}
    base = config.get("base_model")
    if base is not None and method not in BASE_AS_INGREDIENT:
        merge["base"] = ingredient(str(base), "base_model")

    parameters, overrides = {}, []
    for key, value in (config.get("parameters") or {}).items():
        if key in NO_EFFECT_PARAMETERS:
            notes.append(f"parameters.{key}: dropped ({NO_EFFECT_PARAMETERS[key]})")
            continue
        if key not in declared:
            raise SpecInvalid([f"parameters.{key}: method {method!r} has no such parameter in Tureen"], source)
        plain, filtered = _split_setting(value, f"parameters.{key}", notes)
        overrides += [{"match": glob, "parameters": {key: v}} for glob, v in filtered]
        if plain is not None:
            parameters[key] = plain
    globally_filtered = {key for o in overrides for key in o["parameters"]}

    models = config["models"]
    if not isinstance(models, list) or not models:
        raise SpecInvalid(["models: expected a non-empty list of {model, parameters}"], source)
    own_overrides = []
    for i, entry in enumerate(models):
        if not isinstance(entry, Mapping) or "model" not in entry:
            raise SpecInvalid([f"models[{i}]: expected a mapping with a 'model' key"], source)
        name = ingredient(str(entry["model"]), f"models[{i}].model")
        item = next(x for x in ingredients if x["name"] == name)
        for key, value in (entry.get("parameters") or {}).items():
            where = f"models[{i}].parameters.{key}"
            param = declared.get(key)
            if param is None or not param.per_ingredient:
                notes.append(f"{where}: dropped (mergekit ignores it: not a per-model parameter of {method!r})")
                continue
            plain, filtered = _split_setting(value, where, notes)
            own_overrides += [{"match": glob, "ingredient": name, "parameters": {key: v}} for glob, v in filtered]
            if plain is None:
                continue
            if key in globally_filtered:
                own_overrides.append({"match": "*", "ingredient": name, "parameters": {key: plain}})
            else:
                item.setdefault("parameters", {})[key] = plain
    if base is not None and method in BASE_AS_INGREDIENT:
        ingredient(str(base), "base_model")
        notes.append(f"base_model: mergekit treats it as one more input of {method!r}; listed as an ingredient")

    _weigh_out(helpers - {merge.get("base")}, ingredients, declared, method, notes, source)
    if parameters:
        merge["parameters"] = parameters
    if own_overrides or overrides:
        merge["overrides"] = own_overrides + overrides
    document: dict[str, Any] = {
        "apiVersion": "tureen/v1",
        "model": model,
        "ingredients": ingredients,
        "merge": merge,
        "dtype": _dtype(config, source),
    }
    for key, why in DROPPED.items():
        if key in config and why is not None:
            notes.append(f"{key}: dropped ({why})")
    return parse_spec(document, source=source), notes


def _weigh_out(
    helpers: set[str], ingredients: list[dict[str, Any]], declared: Mapping[str, Any], method: str, notes: list[str], source: str
) -> None:
    """Models that are only the base of LoRA references take part with weight 0."""
    for name in sorted(helpers):
        if "weight" not in declared:
            raise SpecInvalid(
                [
                    f"models: {name!r} is only the base of LoRA references; {method!r} has no weights to leave it out with "
                    "(make it the base_model)"
                ],
                source,
            )
        item = next(x for x in ingredients if x["name"] == name)
        item.setdefault("parameters", {})["weight"] = 0.0
        notes.append(f"models: {name!r} is only the base of LoRA references: an ingredient with weight 0")


def _refuse_unconvertible(config: Mapping[str, Any], source: str) -> None:
    problems = []
    if "slices" in config or "modules" in config:
        problems.append("slices/modules: only the 'models' form converts (layer ranges are not supported)")
    if "models" not in config:
        problems.append("models: required")
    method = config.get("merge_method")
    if method not in DECLARATIONS:
        problems.append(f"merge_method: {method!r} has no Tureen equivalent (supported: {', '.join(sorted(DECLARATIONS))})")
    known = {"merge_method", "models", "base_model", "parameters", "dtype", *DROPPED}
    problems += [f"{key}: not understood" for key in config if key not in known and key not in ("slices", "modules")]
    if problems:
        raise SpecInvalid(problems, source)


def _split_setting(value: Any, where: str, notes: list[str]) -> tuple[Any, list[tuple[str, Any]]]:
    """(catch-all value or None, [(glob, value) for filtered entries]) of a mergekit setting."""
    entries = value if isinstance(value, list) and value and all(isinstance(e, Mapping) for e in value) else None
    if isinstance(value, Mapping):
        entries = [value]
    if entries is None:
        return value, []
    filtered: list[tuple[str, Any]] = []
    for j, entry in enumerate(entries):
        if "value" not in entry:
            raise SpecInvalid([f"{where}[{j}]: a filter entry needs a 'value'"])
        pattern = entry.get("filter")
        if pattern in (None, "*"):
            if j != len(entries) - 1:
                notes.append(f"{where}[{j + 1}:]: dropped (after a catch-all, mergekit never reaches them)")
            return entry["value"], filtered
        filtered.append((f"*{pattern}*", entry["value"]))
    return None, filtered


def _unique_name(reference: str, taken: set[str]) -> str:
    stem = PurePosixPath(reference.rstrip("/")).name or "model"
    for suffix in (".safetensors", ".pt", ".pth", ".bin"):
        stem = stem.removesuffix(suffix)
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", stem).lstrip("-._") or "model"
    candidate, k = name, 2
    while candidate in taken:
        candidate, k = f"{name}-{k}", k + 1
    return candidate


def _local_path(reference: str, field: str, source: str) -> str:
    if "@" in reference:
        raise SpecInvalid([f"{field}: {reference!r}: revision ('@') references do not convert (name a local directory)"], source)
    return reference


def missing_paths(spec: SoupSpec, base_dir: Path) -> list[str]:
    """Notes for ingredients not found on disk: Tureen reads local checkpoints, never a hub."""
    return [
        f"ingredients: {i.location!r} is not a local file or directory; download it first (Tureen does not fetch models)"
        for i in spec.ingredients
        if not (base_dir / i.location).exists()
    ]


def _dtype(config: Mapping[str, Any], source: str) -> str:
    raw = str(config.get("out_dtype") or config.get("dtype") or "float32").removeprefix("torch.")
    if raw not in ("float32", "float16", "bfloat16"):
        raise SpecInvalid([f"dtype: {raw!r} cannot be served (use float32, float16 or bfloat16)"], source)
    return raw
