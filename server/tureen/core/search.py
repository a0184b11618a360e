"""Recipes searched on held-out data at build time: greedy soups, learned soups, grid searches.

Each search ends in an ordinary merge section (``linear`` weights for greedy and learned, the
method with fixed parameters for a grid) that is stored with the version, with a log of every
step. A later build of that version (a restart, another replica) merges the stored resolution
directly: the same weights, bit for bit, without searching again.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from tureen.core.architecture import outputs_by_name
from tureen.core.evaluation import Evaluator, Scores
from tureen.core.ingredients import Ingredient
from tureen.core.recipe import mix
from tureen.core.text_splits import Batch, choice_log_likelihoods, question_log_softmax
from tureen.errors import SpecInvalid
from tureen.merge.methods import SEARCH_METHODS, SEARCHES, MethodDecl, SearchMethod, named_function
from tureen.spec import MergeSpec, SoupSpec

_log = logging.getLogger("tureen.search")

Report = Callable[[str, float], None]
"""Hears each step: a line such as ``greedy 3/5: accuracy 0.9611`` and the fraction done."""


@dataclass
class Resolution:
    """What a search settled on (the merge section to build) and how it got there."""

    merge: dict[str, Any]
    log: dict[str, Any] = field(default_factory=dict)


Run = Callable[[SoupSpec, Mapping[str, Ingredient], nn.Module, Evaluator, Report], Resolution]
"""Runs one search: the spec, its ingredients, the architecture, the evaluator, a progress hook."""


@dataclass(frozen=True)
class Search:
    """One search ready to run: its record (in ``tureen.merge.methods``, which specs validate
    against without torch) and the function the record names."""

    record: SearchMethod
    run: Run

    @property
    def decl(self) -> MethodDecl:
        return self.record.decl


def needs_search(spec: SoupSpec) -> bool:
    return spec.merge.method in SEARCHES or spec.merge.grid is not None


def lookup_search(name: str) -> Search:
    """The search called ``name``; the error lists the searches that exist."""
    try:
        return SEARCH_REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown search {name!r} (known: {', '.join(sorted(SEARCH_REGISTRY))})") from None


def resolved_spec(spec: SoupSpec, merge: Mapping[str, Any]) -> SoupSpec:
    """``spec`` with its merge section replaced by a resolved one (checked like a pushed one)."""
    try:
        section = MergeSpec.model_validate(dict(merge))
    except ValueError as exc:
        raise SpecInvalid([f"merge (resolved): {exc}"]) from None
    return spec.model_copy(update={"merge": section})


def search(
    spec: SoupSpec, ingredients: Mapping[str, Ingredient], module: nn.Module, evaluator: Evaluator, report: Report
) -> Resolution:
    """Run the spec's search; ``module`` is the architecture, run functionally with each candidate.

    A grid belongs to the spec's merge method (``merge.grid``), not to a named search, so it is
    routed on its own; the spec refuses a grid on a search method.
    """
    run = _grid if spec.merge.grid is not None else lookup_search(spec.merge.method).run
    return run(spec, ingredients, module, evaluator, report)


def _score(
    spec: SoupSpec, merge: Mapping[str, Any], ingredients: Mapping[str, Ingredient], module: nn.Module, ev: Evaluator
) -> Scores:
    state = mix(resolved_spec(spec, merge), ingredients, kernels="eager", quiet=True)
    return ev.score(ev.functional_forward(module, state), ev.selected)


def _uniform(names: list[str], kept: list[str]) -> dict[str, Any]:
    return {"method": "linear", "weights": {n: (1.0 if n in kept else 0.0) for n in names}}


def greedy_search(
    spec: SoupSpec, ingredients: Mapping[str, Ingredient], module: nn.Module, ev: Evaluator, report: Report
) -> Resolution:
    """The model soups paper's greedy soup: best ingredient first, then add each next one if the
    held-out metric does not get worse; the soup is the uniform average of those kept."""
    names = [ref.name for ref in spec.mixed]
    metric, split = ev.metric, ev.selected
    alone = {}
    for i, name in enumerate(names, start=1):
        alone[name] = _score(spec, _uniform(names, [name]), ingredients, module, ev)[metric]
        report(f"greedy: scoring ingredient {i}/{len(names)} {name!r}: {metric} {alone[name]:.4f}", 0.5 * i / len(names))
    order = sorted(names, key=lambda n: -ev.value({metric: alone[n]}))
    kept, best = [order[0]], alone[order[0]]
    steps = [{"ingredient": order[0], metric: best, "kept": True, "soup": list(kept)}]
    for i, name in enumerate(order[1:], start=2):
        value = _score(spec, _uniform(names, [*kept, name]), ingredients, module, ev)[metric]
        keep = ev.value({metric: value}) >= ev.value({metric: best})
        if keep:
            kept, best = [*kept, name], value
        steps.append({"ingredient": name, metric: value, "kept": keep, "soup": list(kept)})
        verdict = "kept" if keep else "left out"
        report(
            f"greedy {i}/{len(order)}: {name!r} {verdict}, {metric} {value:.4f} (soup: {best:.4f})", 0.5 + 0.5 * i / len(order)
        )
    _log.info("model %s: greedy soup of %s: %s %.4f on %s", spec.model, kept, metric, best, split)
    log = {"search": "greedy", "split": split, "metric": metric, "alone": alone, "order": order, "steps": steps, "best": best}
    return Resolution(_uniform(names, kept), log)


def _grid(spec: SoupSpec, ingredients: Mapping[str, Ingredient], module: nn.Module, ev: Evaluator, report: Report) -> Resolution:
    """Every combination of the grid's values on top of the spec's parameters; the best one wins."""
    grid = dict(spec.merge.grid or {})
    base = spec.merge.model_dump(mode="json", exclude_none=True, exclude={"grid"})
    points = [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]
    metric = ev.metric
    tried: list[dict[str, Any]] = []
    best: tuple[float, dict[str, Any]] | None = None
    for i, point in enumerate(points, start=1):
        merge = {**base, "parameters": {**base.get("parameters", {}), **point}}
        value = _score(spec, merge, ingredients, module, ev)[metric]
        tried.append({"parameters": point, metric: value})
        if best is None or ev.value({metric: value}) > ev.value({metric: best[0]}):
            best = (value, merge)
        report(f"grid {i}/{len(points)}: {point} {metric} {value:.4f} (best {best[0]:.4f})", i / len(points))
    assert best is not None  # the spec forbids an empty grid
    log = {"search": "grid", "split": ev.selected, "metric": metric, "tried": tried, "best": best[0]}
    return Resolution(best[1], log)


def learned_search(
    spec: SoupSpec, ingredients: Mapping[str, Ingredient], module: nn.Module, ev: Evaluator, report: Report
) -> Resolution:
    """Mixing weights trained by gradient descent on the held-out split's loss.

    The weights are a softmax over ingredients, so they stay on the simplex: one vector for the
    whole model, or one per layer (tensors that share a module prefix, such as ``net.0.weight``
    and ``net.0.bias``). Training starts at the uniform soup, and the best point seen on the split,
    uniform included, is the one kept, so the result is never worse than uniform there.
    """
    params = spec.merge.parameters
    per_layer = params.get("granularity", "model") == "layer"
    steps, lr = int(params.get("steps", 60)), float(params.get("lr", 0.1))  # type: ignore[arg-type]
    names = [ref.name for ref in spec.mixed]
    keys = [k for k, t in ingredients[names[0]].layout.items() if t.is_floating_point()]
    layers = sorted({k.rpartition(".")[0] for k in keys}) if per_layer else [""]
    layer_of = {k: layers.index(k.rpartition(".")[0]) if per_layer else 0 for k in keys}
    stacked = {k: torch.stack([ingredients[n].tensors[k].to(ev.device, ev.dtype) for n in names]) for k in keys}
    fixed = {k: ingredients[names[0]].whole(k) for k, t in ingredients[names[0]].layout.items() if not t.is_floating_point()}
    logits = torch.zeros(len(layers), len(names), device=ev.device, requires_grad=True)
    optimizer = torch.optim.Adam([logits], lr=lr)

    def state(weights: torch.Tensor) -> dict[str, torch.Tensor]:
        mixed = {k: torch.tensordot(weights[layer_of[k]].to(ev.dtype), stacked[k], dims=1) for k in keys}
        return {**mixed, **fixed}

    def held_out(weights: torch.Tensor) -> float:
        return ev.score(ev.functional_forward(module, state(weights.detach())), ev.selected)[ev.metric]

    metric = ev.metric
    best_value = held_out(torch.softmax(logits, dim=-1))
    best_weights = torch.softmax(logits, dim=-1).detach().clone()
    history = [{"step": 0, metric: best_value}]
    batches = ev.batches(ev.selected)
    for step in range(1, steps + 1):
        batch = batches[(step - 1) % len(batches)]
        with torch.enable_grad():
            loss = _loss(
                torch.func.functional_call(module, state(torch.softmax(logits, dim=-1)), (), dict(batch.inputs)), batch, ev
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if step % max(1, steps // 10) == 0 or step == steps:
            weights = torch.softmax(logits, dim=-1)
            value = held_out(weights)
            history.append({"step": step, metric: value})
            if ev.value({metric: value}) > ev.value({metric: best_value}):
                best_value, best_weights = value, weights.detach().clone()
            report(f"learned {step}/{steps}: {metric} {value:.4f} (best {best_value:.4f})", step / steps)
    top_level = [k for k in keys if "." not in k]
    merge = _learned_merge(names, layers, best_weights.cpu(), per_layer, top_level)
    log = {"search": "learned", "split": ev.selected, "metric": metric, "history": history, "best": best_value}
    return Resolution(merge, log)


SEARCH_REGISTRY: Mapping[str, Search] = {
    record.decl.name: Search(record, cast(Run, named_function(record.function))) for record in SEARCH_METHODS
}
"""Every search by name, from its one record in ``tureen.merge.methods``."""


def _loss(result: Any, batch: Batch, ev: Evaluator) -> torch.Tensor:
    logits = outputs_by_name(result, tuple(ev.signature.outputs))[ev.output].float()
    if ev.evaluation.task_of(ev.selected) == "classification":
        return torch.nn.functional.cross_entropy(logits, batch.labels)
    if batch.choices is not None:  # multiple choice: the right answer's share of each question's softmax
        per_question = question_log_softmax(choice_log_likelihoods(logits, batch.labels), batch.choices)
        return -torch.stack([log_p[a] for log_p, a in zip(per_question, batch.choices.answers, strict=True)]).mean()
    vocab = logits.shape[-1]
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, vocab), batch.labels[:, 1:].reshape(-1), ignore_index=-100
    )


def _learned_merge(
    names: list[str], layers: list[str], weights: torch.Tensor, per_layer: bool, top_level: list[str]
) -> dict[str, Any]:
    """Learned weights as a linear merge: per layer through overrides, one per (layer, ingredient)."""
    exact = weights.double()
    rows = (exact / exact.sum(dim=-1, keepdim=True)).tolist()  # float32's softmax sums to 1 only within 1e-7
    merge: dict[str, Any] = {"method": "linear", "parameters": {"normalize": False}}
    merge["weights"] = {n: float(w) for n, w in zip(names, rows[0], strict=True)}
    if per_layer:
        # A layer is a module prefix; top-level tensors (no prefix) are matched by their own names.
        # The first matching override wins and `head.*` also matches `head.proj.weight`, so deeper
        # layers are listed first.
        deepest_first = sorted(range(len(layers)), key=lambda i: (-layers[i].count(".") - bool(layers[i]), layers[i]))
        merge["overrides"] = [
            {"match": pattern, "ingredient": name, "parameters": {"weight": float(rows[i][j])}}
            for i in deepest_first
            for pattern in ([f"{layers[i]}.*"] if layers[i] else top_level)
            for j, name in enumerate(names)
        ]
    return merge
