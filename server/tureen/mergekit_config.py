"""Convert a mergekit YAML config (the ``models:`` form) into a Tureen soup spec.

What converts: ``merge_method`` for the methods Tureen has, ``base_model``, ``models`` with
their ``parameters``, ``slices`` (sources with layer ranges and parameters, the slice's
``base_model`` and parameters: ``merge.slices``), global ``parameters``, gradients, and
``filter`` lists (mergekit's filters are substrings of tensor names; they become ``*FILTER*``
globs). What does not is reported: fatal things (``modules``, revision references, unknown methods) raise
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
    "chat_template": "Tureen serves tensors; chat templates stay with the client",
    "out_dtype": None,  # used, see _dtype
    "tokenizer_source": None,  # used, see _tokenizer
    "tokenizer": None,
}
NO_EFFECT_PARAMETERS = {"int8_mask": "only changes the dtype of mergekit's masks"}
# mergekit adds base_model as an ordinary input of these methods.
BASE_AS_INGREDIENT = {"linear", "karcher"}


def from_mergekit(config: Mapping[str, Any], model: str, source: str = "mergekit config") -> tuple[SoupSpec, list[str]]:
    """The Tureen spec equivalent to ``config``, and notes on what was dropped."""
    _refuse_unconvertible(config, source)
    method = config["merge_method"]
    refs = _References(source)
    merge: dict[str, Any] = {"method": method}
    base = config.get("base_model")
    if base is not None and method not in BASE_AS_INGREDIENT:
        merge["base"] = refs.ingredient(str(base), "base_model")
    elif base is not None and "slices" in config:
        refs.notes.append(f"base_model: dropped ({method!r} uses no base, and slices name their sources)")
        base = None
    declared = DECLARATIONS[method].by_name
    parameters, overrides = _settings(config.get("parameters") or {}, "parameters", declared, method, refs.notes, source)
    globally_filtered = {key for o in overrides for key in o["parameters"]}
    if "slices" in config:
        merge["slices"] = [
            _slice(entry, f"slices[{i}]", declared, method, refs, globally_filtered) for i, entry in enumerate(config["slices"])
        ]
        own_overrides: list[dict[str, Any]] = []
    else:
        own_overrides = _models(config["models"], declared, method, refs, globally_filtered)
    if base is not None and method in BASE_AS_INGREDIENT:
        refs.ingredient(str(base), "base_model")
        refs.notes.append(f"base_model: mergekit treats it as one more input of {method!r}; listed as an ingredient")
    tokenizer = _tokenizer(config, refs)
    if "slices" not in config:  # a slice names its sources: a model outside them is no input anyway
        _weigh_out(refs.helpers - {merge.get("base")}, refs.ingredients, declared, method, refs.notes, source)
    if parameters:
        merge["parameters"] = parameters
    if own_overrides or overrides:
        merge["overrides"] = own_overrides + overrides
    document: dict[str, Any] = {
        "apiVersion": "tureen/v1",
        "model": model,
        "ingredients": refs.ingredients,
        "merge": merge,
        "dtype": _dtype(config, source),
    }
    if tokenizer is not None:
        document["tokenizer"] = {"source": tokenizer}
    for key, why in DROPPED.items():
        if key in config and why is not None:
            refs.notes.append(f"{key}: dropped ({why})")
    return parse_spec(document, source=source), refs.notes


class _References:
    """The ingredients a config's model references become, each once, and notes on the way."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.names: dict[str, str] = {}
        self.ingredients: list[dict[str, Any]] = []
        self.helpers: set[str] = set()
        """Models named only as the base of a LoRA reference (``model+lora``): not inputs themselves."""
        self.notes: list[str] = []

    def ingredient(self, reference: str, field: str, helper: bool = False) -> str:
        model, plus, lora = reference.partition("+")
        if not helper:
            self.helpers.discard(self.names.get(reference, ""))
        if reference not in self.names:
            if plus:  # mergekit's model+lora: the adapter applied to the model, as an adapter ingredient
                base_name = self.ingredient(model, field, helper=True)
                self.names[reference] = _unique_name(lora, set(self.names.values()))
                adapter = _local_path(lora, field, self.source)
                self.ingredients.append({"name": self.names[reference], "adapter": adapter, "base": base_name})
            else:
                self.names[reference] = _unique_name(reference, set(self.names.values()))
                self.ingredients.append({"name": self.names[reference], "path": _local_path(reference, field, self.source)})
                if helper:
                    self.helpers.add(self.names[reference])
        return self.names[reference]

    def item(self, name: str) -> dict[str, Any]:
        return next(x for x in self.ingredients if x["name"] == name)


def _settings(
    given: Mapping[str, Any], where: str, declared: Mapping[str, Any], method: str, notes: list[str], source: str
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A config's (or a slice's) global ``parameters``: plain values, and overrides for filtered ones."""
    parameters, overrides = {}, []
    for key, value in given.items():
        if key in NO_EFFECT_PARAMETERS:
            notes.append(f"{where}.{key}: dropped ({NO_EFFECT_PARAMETERS[key]})")
            continue
        if key not in declared:
            raise SpecInvalid([f"{where}.{key}: method {method!r} has no such parameter in Tureen"], source)
        plain, filtered = _split_setting(value, f"{where}.{key}", notes)
        overrides += [{"match": glob, "parameters": {key: v}} for glob, v in filtered]
        if plain is not None:
            parameters[key] = plain
    return parameters, overrides


def _own(
    name: str,
    given: Mapping[str, Any],
    where: str,
    declared: Mapping[str, Any],
    method: str,
    notes: list[str],
    filtered: set[str],
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One model's (or source's) ``parameters``: its plain values, and overrides naming it where
    filters elsewhere would otherwise win over its value (in mergekit its own value comes first)."""
    plain_values, overrides = {}, []
    for key, value in given.items():
        param = declared.get(key)
        if param is None or not param.per_ingredient:
            notes.append(f"{where}.{key}: dropped (mergekit ignores it: not a per-model parameter of {method!r})")
            continue
        plain, entries = _split_setting(value, f"{where}.{key}", notes)
        overrides += [{"match": glob, "ingredient": name, "parameters": {key: v}} for glob, v in entries]
        if plain is None:
            continue
        if key in filtered:
            overrides.append({"match": "*", "ingredient": name, "parameters": {key: plain}})
        else:
            plain_values[key] = plain
    return plain_values, overrides


def _models(models: Any, declared: Mapping[str, Any], method: str, refs: _References, filtered: set[str]) -> list[dict[str, Any]]:
    """The ``models`` form: each model an ingredient with its own parameters; their overrides."""
    if not isinstance(models, list) or not models:
        raise SpecInvalid(["models: expected a non-empty list of {model, parameters}"], refs.source)
    own_overrides = []
    for i, entry in enumerate(models):
        if not isinstance(entry, Mapping) or "model" not in entry:
            raise SpecInvalid([f"models[{i}]: expected a mapping with a 'model' key"], refs.source)
        name = refs.ingredient(str(entry["model"]), f"models[{i}].model")
        given = entry.get("parameters") or {}
        plain, overrides = _own(name, given, f"models[{i}].parameters", declared, method, refs.notes, filtered)
        if plain:
            refs.item(name).setdefault("parameters", {}).update(plain)
        own_overrides += overrides
    return own_overrides


def _slice(
    entry: Any, where: str, declared: Mapping[str, Any], method: str, refs: _References, filtered: set[str]
) -> dict[str, Any]:
    """One of mergekit's ``slices``: sources with layer ranges, the slice's base and parameters."""
    if not isinstance(entry, Mapping) or not isinstance(entry.get("sources"), list) or not entry["sources"]:
        raise SpecInvalid([f"{where}: expected a mapping with a non-empty 'sources' list"], refs.source)
    parameters, overrides = _settings(
        entry.get("parameters") or {}, f"{where}.parameters", declared, method, refs.notes, refs.source
    )
    for key in [key for key in parameters if key in filtered]:  # else the config's filters would beat it
        overrides.append({"match": "*", "parameters": {key: parameters.pop(key)}})
    filtered = filtered | {key for o in overrides for key in o["parameters"]}
    sources, own_overrides = [], []
    for j, source in enumerate(entry["sources"]):
        at = f"{where}.sources[{j}]"
        if not isinstance(source, Mapping) or "model" not in source or "layer_range" not in source:
            raise SpecInvalid([f"{at}: expected a mapping with 'model' and 'layer_range'"], refs.source)
        name = refs.ingredient(str(source["model"]), f"{at}.model")
        plain, more = _own(name, source.get("parameters") or {}, f"{at}.parameters", declared, method, refs.notes, filtered)
        sources.append({"ingredient": name, "layers": list(source["layer_range"]), **({"parameters": plain} if plain else {})})
        own_overrides += more
    piece: dict[str, Any] = {"sources": sources}
    if entry.get("base_model") is not None:
        piece["base"] = refs.ingredient(str(entry["base_model"]), f"{where}.base_model")
    if parameters:
        piece["parameters"] = parameters
    if own_overrides or overrides:
        piece["overrides"] = own_overrides + overrides
    return piece


def _tokenizer(config: Mapping[str, Any], refs: _References) -> str | None:
    """``tokenizer_source`` (or ``tokenizer.source``): base, union, or a model, named as its ingredient."""
    section = config.get("tokenizer")
    if section is not None:
        if not isinstance(section, Mapping) or set(section) - {"source"}:
            extra = sorted(set(section) - {"source"}) if isinstance(section, Mapping) else [section]
            raise SpecInvalid([f"tokenizer: only 'source' converts (not {', '.join(map(str, extra))})"], refs.source)
        value = section.get("source")
    else:
        value = config.get("tokenizer_source")
    if value is None or value in ("base", "union"):
        return value
    return refs.ingredient(str(value), "tokenizer_source", helper=True)  # a model named only here is no input


def _weigh_out(
    helpers: set[str], ingredients: list[dict[str, Any]], declared: Mapping[str, Any], method: str, notes: list[str], source: str
) -> None:
    """Models that are only the base of LoRA references, or only the tokenizer source, take part with weight 0."""
    for name in sorted(helpers):
        if "weight" not in declared:
            raise SpecInvalid(
                [
                    f"models: {name!r} is only the base of LoRA references or the tokenizer source; {method!r} has no "
                    "weights to leave it out with "
                    "(make it the base_model)"
                ],
                source,
            )
        item = next(x for x in ingredients if x["name"] == name)
        item.setdefault("parameters", {})["weight"] = 0.0
        notes.append(f"models: {name!r} is only the base of LoRA references or the tokenizer source: an ingredient with weight 0")


def _refuse_unconvertible(config: Mapping[str, Any], source: str) -> None:
    problems = []
    if "modules" in config:
        problems.append("modules: only the 'models' and 'slices' forms convert")
    if ("models" in config) == ("slices" in config):
        problems.append("models: give exactly one of models or slices")
    method = config.get("merge_method")
    if method not in DECLARATIONS:
        problems.append(f"merge_method: {method!r} has no Tureen equivalent (supported: {', '.join(sorted(DECLARATIONS))})")
    known = {"merge_method", "models", "slices", "base_model", "parameters", "dtype", *DROPPED}
    problems += [f"{key}: not understood" for key in config if key not in known and key != "modules"]
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
