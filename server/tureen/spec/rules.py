"""The spec's cross-field rules: what a field may hold depends on the method and on other fields.

Each rule returns its problems as (field, reason) pairs with the field relative to the model
that checks it, so that one validation reports every problem at once; the models raise them
together as ``FieldProblems``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from tureen.merge.params import MethodDecl

if TYPE_CHECKING:  # the models call these rules, so they cannot be imported here at run time
    from tureen.spec.models import MergeSpec, Slice, SoupSpec

Problems = list[tuple[str, str]]
MAX_GRID = 64
_NUMBERS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


class FieldProblems(ValueError):
    """Problems found by a cross-field check, each as (field relative to the model, reason)."""

    def __init__(self, problems: Problems) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{field}: {reason}" for field, reason in problems))


def parameter_problems(method: MethodDecl, given: Mapping[str, Any], where: str, only_per: bool = False) -> Problems:
    """Parameters the method does not declare, values it does not accept; with ``only_per``
    (an ingredient's own parameters), global ones too."""
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


def slice_parameter_problems(method: MethodDecl, slices: Sequence[Slice]) -> Problems:
    """The parameters a slice and its sources give (one section of the merge: no references)."""
    problems: Problems = []
    for i, piece in enumerate(slices):
        where = f"slices[{i}]"
        problems += parameter_problems(method, piece.parameters, f"{where}.parameters")
        for k, override in enumerate(piece.overrides):
            problems += parameter_problems(method, override.parameters, f"{where}.overrides[{k}].parameters")
        for j, source in enumerate(piece.sources):
            problems += parameter_problems(method, source.parameters, f"{where}.sources[{j}].parameters", only_per=True)
    return problems


def grid_problems(method: MethodDecl, grid: Mapping[str, list[Any]]) -> Problems:
    if method.search:
        return [("grid", f"method {method.name!r} is a search already; a grid goes with a merge method")]
    if not grid:
        return [("grid", "name at least one parameter to search")]
    problems: Problems = []
    combinations = 1
    for name, values in grid.items():
        if not values:
            problems.append((f"grid.{name}", "give at least one value"))
            continue
        combinations *= len(values)
        problems += _grid_values(method, name, values)
    if combinations > MAX_GRID:
        problems.append(("grid", f"{combinations} combinations; at most {MAX_GRID}"))
    return problems


def _grid_values(method: MethodDecl, name: str, values: list[Any]) -> Problems:
    param = method.by_name.get(name)
    if param is None:
        known = ", ".join(method.by_name) or "none"
        return [(f"grid.{name}", f"method {method.name!r} has no parameter {name!r} (parameters: {known})")]
    return [(f"grid.{name}[{i}]", problem) for i, value in enumerate(values) if (problem := param.problem(value)) is not None]


def soup_problems(spec: SoupSpec) -> Problems:
    """Everything about a whole spec that no single section can check on its own."""
    method = spec.merge.declaration
    names = [ingredient.name for ingredient in spec.ingredients]
    problems = _ingredient_problems(spec, method)
    problems += merge_references(spec.merge, method, names)
    problems += slice_problems(spec, method)
    if spec.tokenizer is not None and spec.tokenizer.source not in ("base", "union", *names):
        problems.append(("tokenizer.source", f"expected base, union or an ingredient's name, got {spec.tokenizer.source!r}"))
    return problems + _evaluation_needed(spec, method) + _batching_problems(spec)


def _batching_problems(spec: SoupSpec) -> Problems:
    batching = spec.serving.batching if spec.serving is not None else None
    if batching is None or spec.interface is None:
        return []
    largest = spec.interface.max_batch_size
    if largest == 0:
        return [("serving.batching", "the interface has no batch dimension (max_batch_size is 0)")]
    return [
        (f"serving.batching.preferred_batch_sizes[{i}]", f"{size} exceeds the interface's max_batch_size {largest}")
        for i, size in enumerate(batching.preferred_batch_sizes)
        if size > largest
    ]


def _adapter_problems(spec: SoupSpec) -> Problems:
    """An adapter's base must be another ingredient of the spec, and a full checkpoint."""
    full = {i.name for i in spec.ingredients if i.adapter is None}
    problems: Problems = []
    for i, ingredient in enumerate(spec.ingredients):
        if ingredient.base is None or ingredient.base in full:
            continue
        known = ingredient.base in {other.name for other in spec.ingredients}
        why = "is an adapter itself; an adapter's base is a full checkpoint" if known else "names no ingredient"
        problems.append((f"ingredients[{i}].base", f"{ingredient.base!r} {why}"))
    return problems


def _ingredient_problems(spec: SoupSpec, method: MethodDecl) -> Problems:
    problems: Problems = _adapter_problems(spec)
    seen: set[str] = set()
    for i, ingredient in enumerate(spec.ingredients):
        if ingredient.name in seen:
            problems.append((f"ingredients[{i}].name", f"duplicate ingredient name {ingredient.name!r}"))
        seen.add(ingredient.name)
        where = f"ingredients[{i}].parameters"
        if ingredient.name == spec.merge.base and ingredient.parameters:
            problems.append((where, "the base ingredient takes no parameters"))
        else:
            problems += parameter_problems(method, ingredient.parameters, where, only_per=True)
    return problems


def _evaluation_needed(spec: SoupSpec, method: MethodDecl) -> Problems:
    """Sections that only work with an evaluation section, or with a causal LM's tokenizer."""
    problems: Problems = []
    if method.search and spec.evaluation is None:
        problems.append(("evaluation", f"method {method.name!r} searches on held-out data; add an evaluation section"))
    if spec.merge.grid is not None and spec.evaluation is None:
        problems.append(("merge.grid", "a grid search scores each point on held-out data; add an evaluation section"))
    problems += _text_needs_tokenizer(spec)
    if spec.rollout is not None and spec.rollout.gate is not None and spec.evaluation is None:
        problems.append(("rollout.gate", "the gate compares evaluations; add an evaluation section"))
    return problems


def _text_needs_tokenizer(spec: SoupSpec) -> Problems:
    """Text splits are read by the model's tokenizer: only a Hugging Face causal LM has one."""
    evaluation, arch = spec.evaluation, spec.architecture
    if evaluation is None:
        return []
    choices = [n for n in evaluation.splits if evaluation.task_of(n) == "multiple-choice"]
    tensors = [n for n in choices if evaluation.splits[n].path is not None and not evaluation.splits[n].jsonl]
    if tensors:
        return [(f"evaluation.splits.{tensors[0]}.path", "multiple-choice reads .jsonl rows of prompt, choices, answer")]
    if arch is not None and arch.huggingface is not None and arch.task == "causal-lm":
        return []
    why = "needs a causal LM's tokenizer (architecture: huggingface, task causal-lm)"
    if choices:
        field = "evaluation.task" if evaluation.task == "multiple-choice" else f"evaluation.splits.{choices[0]}.task"
        return [(field, f"multiple-choice {why}")]
    texts = [n for n, split in evaluation.splits.items() if split.jsonl]
    return [(f"evaluation.splits.{name}.path", f"a .jsonl split is text, which {why}") for name in texts]


def merge_references(merge: MergeSpec, method: MethodDecl, names: list[str]) -> Problems:
    """The merge section against the ingredients: the base, how many, overrides and weights."""
    mixed = [name for name in names if name != merge.base]
    problems = _base_problems(merge, method, names)
    if merge.slices is None:  # with slices, each slice is counted on its own
        problems += _count_problems(method, names, mixed)
    for i, override in enumerate(merge.overrides):
        if override.ingredient is not None and override.ingredient not in mixed:
            problems.append((f"merge.overrides[{i}].ingredient", f"no ingredient named {override.ingredient!r} besides the base"))
    if merge.weights is not None:
        problems += weight_problems(merge, method, names, mixed)
    return problems


def _base_problems(merge: MergeSpec, method: MethodDecl, names: list[str]) -> Problems:
    problems: Problems = []
    if merge.base is not None and merge.base not in names:
        problems.append(("merge.base", f"no ingredient named {merge.base!r}"))
    if merge.base is not None and method.base == "forbidden":
        problems.append(("merge.base", f"method {method.name!r} does not use a base; list it as an ingredient"))
    unbased = merge.slices is None or any(piece.base is None for piece in merge.slices)
    if merge.base is None and method.base == "required" and unbased:
        problems.append(("merge.base", f"method {method.name!r} needs a base ingredient"))
    return problems


def slice_problems(spec: SoupSpec, method: MethodDecl) -> Problems:
    """Each slice against the ingredients and the method: who it names, how many, its base."""
    slices = spec.merge.slices
    if slices is None:
        return []
    if method.search:
        return [("merge.slices", f"method {method.name!r} searches over whole models; slices go with a merge method")]
    problems: Problems = []
    for i, piece in enumerate(slices):
        problems += _one_slice(spec, method, i, piece)
    used = {source.ingredient for piece in slices for source in piece.sources}
    used |= {i.base for i in spec.ingredients if i.base is not None and i.name in used}
    problems += [
        (f"ingredients[{k}]", f"{ref.name!r} is in no slice (and is no adapter's base)")
        for k, ref in enumerate(spec.ingredients)
        if ref.name not in used
    ]
    return problems


def _one_slice(spec: SoupSpec, method: MethodDecl, i: int, piece: Slice) -> Problems:
    where = f"merge.slices[{i}]"
    known = {ref.name for ref in spec.ingredients}
    names = [source.ingredient for source in piece.sources]
    problems: Problems = []
    for j, name in enumerate(names):
        if name not in known:
            problems.append((f"{where}.sources[{j}].ingredient", f"no ingredient named {name!r}"))
        elif name in names[:j]:
            problems.append((f"{where}.sources[{j}].ingredient", f"{name!r} is a source of this slice already"))
    lengths = sorted({source.layers[1] - source.layers[0] for source in piece.sources})
    if len(lengths) > 1:
        problems.append((f"{where}.sources", f"every source must give as many layers; got runs of {lengths}"))
    base = piece.base or spec.merge.base
    if piece.base is not None and method.base == "forbidden":
        problems.append((f"{where}.base", f"method {method.name!r} does not use a base"))
    elif base is not None and base not in names:
        problems.append((f"{where}.sources", f"the base {base!r} must be one of the slice's sources"))
    mixed = [name for name in names if name != base]
    return problems + [(f"{where}.sources", text) for _, text in _count_problems(method, names, mixed)]


def _count_problems(method: MethodDecl, names: list[str], mixed: list[str]) -> Problems:
    problems: Problems = []
    if len(mixed) < method.min_ingredients:
        problems.append(
            ("ingredients", f"method {method.name!r} needs at least {method.min_ingredients} ingredients besides the base")
        )
    if method.max_ingredients is not None and len(mixed) > method.max_ingredients:
        problems.append(
            ("ingredients", f"method {method.name!r} takes at most {method.max_ingredients} besides the base, got {len(mixed)}")
        )
    if method.exact_models is not None and len(names) != method.exact_models:
        exact = _NUMBERS[method.exact_models] if method.exact_models < len(_NUMBERS) else str(method.exact_models)
        problems.append(("ingredients", f"{method.name} interpolates exactly {exact} models (the base counts), got {len(names)}"))
    return problems


def weight_problems(merge: MergeSpec, method: MethodDecl, names: list[str], mixed: list[str]) -> Problems:
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
    return _zero_sum(merge, method, [weights[n] for n in mixed])


def _zero_sum(merge: MergeSpec, method: MethodDecl, scalars: list[Any]) -> Problems:
    normalize_param = method.by_name.get("normalize")
    normalize = merge.parameters.get("normalize", normalize_param.default if normalize_param else False)
    if normalize and all(isinstance(w, int | float) for w in scalars) and sum(scalars) == 0:
        return [("merge.weights", "weights sum to 0 and cannot be normalized (or set parameters.normalize: false)")]
    return []
