"""Profiling a soup offline: how far apart its ingredients lie, and what lies between them.

``profile(spec, device)`` loads a spec's ingredients and reports, with no server:

- divergence: cosine similarity and relative L2 (``||a - b|| / ||b||``) per floating tensor, per
  layer (a module prefix: ``net.0`` holds ``net.0.weight`` and ``net.0.bias``, measured as if
  concatenated) and over the whole model, for each ingredient against a reference (the base, or
  the uniform mean of the ingredients when the spec has none) and for each pair of ingredients;
- a sweep: the evaluation metrics along the straight line between two state dicts;
- calibration: the task's metrics (accuracy, NLL, ECE) of every ingredient and of the soup(s).

The sweep and the calibration need the spec's ``evaluation`` and ``architecture`` sections; without
them the profile says so in its notes. ``tureen.plots`` draws the result.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from tureen.core.datatypes import BLEND_DTYPES
from tureen.core.evaluation import Evaluator, Scores
from tureen.core.ingredients import Ingredient, IngredientPool
from tureen.core.kitchen import probe_module, run_search
from tureen.core.observer import NullObserver
from tureen.core.prepare import prepare
from tureen.core.recipe import mix
from tureen.core.search import needs_search, resolved_spec
from tureen.errors import SoupError
from tureen.spec import SoupSpec

_log = logging.getLogger("tureen.profile")

MEAN = "(uniform mean)"
"""The divergence reference without a base; parentheses cannot occur in ingredient names."""
SOUP = "soup"
UNIFORM = "uniform soup"
CHUNK = 1 << 22
"""Elements per float64 chunk when measuring divergence (32 MiB per copy)."""
State = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class Divergence:
    """How far ``left`` lies from ``right`` over ``scope`` (a tensor, a layer, or ``model``)."""

    scope: str
    left: str
    right: str
    cosine: float
    relative_l2: float
    """``||left - right|| / ||right||``: relative to the second of the pair (the reference)."""


@dataclass(frozen=True)
class Sweep:
    """Scores of ``(1 - alpha) * start + alpha * end`` for each alpha, on one split."""

    start: str
    end: str
    split: str
    metric: str
    alphas: list[float]
    scores: list[Scores]


@dataclass
class Profile:
    model: str
    method: str
    reference: str
    """The base ingredient's name, or ``MEAN``."""
    tensors: list[Divergence]
    layers: list[Divergence]
    overall: list[Divergence]
    sweep: Sweep | None = None
    metric: str | None = None
    """The evaluation's deciding metric, which the plot shows."""
    scores: dict[str, dict[str, Scores]] = field(default_factory=dict)
    """By model (each ingredient, ``SOUP``, maybe ``UNIFORM``), then by split."""
    base: str | None = None
    notes: list[str] = field(default_factory=list)

    def document(self) -> dict[str, Any]:
        """The profile as JSON-able data; undefined numbers (a zero-norm tensor) become ``null``."""
        return _finite(asdict(self))


def profile(
    spec: SoupSpec, device: torch.device, between: tuple[str, str] | None = None, points: int = 11, split: str | None = None
) -> Profile:
    """Profile ``spec`` on ``device``; ``between`` picks the sweep's ends (default: base or best
    single ingredient to the soup), ``points`` its resolution, ``split`` its data."""
    names = [ref.name for ref in spec.ingredients]
    for name in between or ():
        if name not in names:
            raise SoupError(f"--between: no ingredient named {name!r} (ingredients: {', '.join(names)})")
    if points < 2:
        raise SoupError(f"--points: a sweep needs at least 2 points, got {points}")
    if split is not None and spec.evaluation is not None and split not in spec.evaluation.splits:
        raise SoupError(f"--split: no split named {split!r} (splits: {', '.join(spec.evaluation.splits)})")
    evaluates = spec.evaluation is not None and spec.architecture is not None
    prepared = prepare(spec, IngredientPool(device, NullObserver()), module=evaluates)
    ingredients = prepared.ingredients
    states = {name: ingredient.tensors for name, ingredient in ingredients.items()}
    mixed = [ref.name for ref in spec.mixed]
    uniform = _uniform(states, mixed)
    reference = spec.merge.base or MEAN
    against = {**states, MEAN: uniform}  # the mean is measured against only without a base
    pairs = [(name, reference) for name in mixed] + list(itertools.combinations(mixed, 2))
    tensors, layers, overall = divergence(against, pairs)
    result = Profile(spec.model, spec.merge.method, reference, tensors, layers, overall, base=spec.merge.base)
    if spec.evaluation is None or spec.architecture is None:
        missing = "evaluation" if spec.evaluation is None else "architecture"
        result.notes.append(f"no sweep or calibration: the spec has no {missing} section (divergence needs neither)")
        return result
    assert prepared.evaluator is not None
    return _evaluate(result, spec, ingredients, uniform, prepared.evaluator, between, points, split)


def _evaluate(
    result: Profile,
    spec: SoupSpec,
    ingredients: Mapping[str, Ingredient],
    uniform: State,
    evaluator: Evaluator,
    between: tuple[str, str] | None,
    points: int,
    split: str | None,
) -> Profile:
    """Score every ingredient and soup on every split, then sweep: all run the architecture functionally."""
    assert spec.evaluation is not None and spec.architecture is not None
    device = evaluator.device
    probe = probe_module(spec.architecture, device)
    models = {name: ingredient.tensors for name, ingredient in ingredients.items()}
    models |= _soups(spec, ingredients, uniform, device, evaluator, result.notes)
    result.metric = evaluator.metric
    result.scores = {name: evaluator.score_all(evaluator.functional_forward(probe, state)) for name, state in models.items()}
    chosen = split or evaluator.selected
    if between is None:
        best = max(spec.mixed, key=lambda ref: evaluator.value(result.scores[ref.name][chosen])).name
        between = (spec.merge.base or best, SOUP)
    start, end = models[between[0]], models[between[1]]
    alphas = [i / (points - 1) for i in range(points)]
    # The ends are the two models themselves, scored above; only the points between run again.
    inner = [evaluator.score(evaluator.functional_forward(probe, interpolate(start, end, a)), chosen) for a in alphas[1:-1]]
    sweep = [result.scores[between[0]][chosen], *inner, result.scores[between[1]][chosen]]
    result.sweep = Sweep(between[0], between[1], chosen, evaluator.metric, alphas, sweep)
    return result


def _soups(
    spec: SoupSpec,
    ingredients: Mapping[str, Ingredient],
    uniform: State,
    device: torch.device,
    evaluator: Evaluator,
    notes: list[str],
) -> dict[str, State]:
    """The spec's soup, as the server would build it, and the uniform soup unless that is the same."""
    recipe = spec
    if needs_search(spec):  # searched the way a build searches, on the same split and metric
        found = run_search(spec, ingredients, device, evaluator, lambda line, _: _log.info("%s", line))
        recipe = resolved_spec(spec, found.merge)
        notes.append(f"the soup is the {spec.merge.method} search's result: {dict(found.merge)}")
    soup = mix(recipe, ingredients, quiet=True)
    # Tolerances of the blend's dtype: a uniform linear soup rounds alike but may sum in another order.
    eps = torch.finfo(BLEND_DTYPES[spec.dtype]).eps
    same = all(torch.allclose(uniform[k], t.float(), rtol=4 * eps, atol=1e-6) for k, t in soup.items() if t.is_floating_point())
    return {SOUP: soup} if same else {SOUP: soup, UNIFORM: uniform}  # the paper's baseline beside another soup


def divergence(
    states: Mapping[str, State], pairs: list[tuple[str, str]]
) -> tuple[list[Divergence], list[Divergence], list[Divergence]]:
    """Per tensor, per layer and whole-model divergence of each pair, over floating tensors."""
    keys = [k for k, t in states[pairs[0][0]].items() if t.is_floating_point()] if pairs else []
    sums = {(pair, key): _sums(states[pair[0]][key], states[pair[1]][key]) for pair in pairs for key in keys}
    layers: dict[str, list[str]] = {}
    for key in keys:
        layers.setdefault(key.rpartition(".")[0] or key, []).append(key)

    def rows(scope: str, members: list[str]) -> list[Divergence]:
        # Sums of the parts are the sums of the concatenation: a layer is measured as one vector.
        return [_row(scope, pair, sum((sums[pair, k] for k in members), torch.zeros(4, dtype=torch.float64))) for pair in pairs]

    return (
        [row for key in keys for row in rows(key, [key])],
        [row for layer, members in layers.items() for row in rows(layer, members)],
        rows("model", keys),
    )


def interpolate(start: State, end: State, alpha: float) -> dict[str, torch.Tensor]:
    """``(1 - alpha) * start + alpha * end`` in float32 for floating tensors; others from ``start``."""
    return {k: torch.lerp(t.float(), end[k].float(), alpha) if t.is_floating_point() else t for k, t in start.items()}


def _uniform(states: Mapping[str, State], names: list[str]) -> dict[str, torch.Tensor]:
    # Accumulated in float32 like every merge; integer tensors agree across ingredients (checked).
    first = states[names[0]]
    return {
        k: sum((states[n][k].float() for n in names), torch.zeros_like(t, dtype=torch.float32)) / len(names)
        if t.is_floating_point()
        else t
        for k, t in first.items()
    }


def _sums(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[a.b, a.a, b.b, |a-b|^2]`` in float64: fine-tunes lie close, so the difference is taken
    elementwise (from the norms it would cancel to noise); chunks bound the float64 copies' memory."""
    x, y = a.flatten(), b.flatten()
    total = torch.zeros(4, dtype=torch.float64, device=x.device)
    for start in range(0, x.numel(), CHUNK):
        u, v = x[start : start + CHUNK].double(), y[start : start + CHUNK].double()
        d = u - v
        total += torch.stack([u @ v, u @ u, v @ v, d @ d])
    return total.cpu()


def _row(scope: str, pair: tuple[str, str], sums: torch.Tensor) -> Divergence:
    dot, aa, bb, dd = (float(v) for v in sums)
    cosine = dot / math.sqrt(aa * bb) if aa > 0 and bb > 0 else math.nan
    relative = math.sqrt(dd / bb) if bb > 0 else (0.0 if dd == 0 else math.nan)
    return Divergence(scope, pair[0], pair[1], cosine, relative)


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def render(result: Profile) -> str:
    """The profile as aligned text tables, the way the other commands print."""
    ref = f"the base {result.reference!r}" if result.base else "the uniform mean of the ingredients (the spec has no merge.base)"
    lines = [
        f"profile of {result.model!r} ({result.method} soup); divergence reference: {ref}",
        "cosine similarity, and relative L2 = ||A - B|| / ||B||",
    ]
    for title, column, rows in (("per tensor", "TENSOR", result.tensors), ("per layer", "LAYER", result.layers)):
        lines += ["", f"{title}:", *_table([[column, "A", "B", "COSINE", "REL. L2"]] + [_cells(r, True) for r in rows])]
    lines += ["", "whole model:", *_table([["A", "B", "COSINE", "REL. L2"]] + [_cells(r, False) for r in result.overall])]
    if result.scores:
        metrics = list(next(iter(next(iter(result.scores.values())).values())))
        table = [["MODEL", "SPLIT", *(m.upper() for m in metrics)]]
        table += [[name, s, *(f"{v[m]:.4f}" for m in metrics)] for name, by in result.scores.items() for s, v in by.items()]
        lines += ["", "calibration:", *_table(table)]
    if result.sweep is not None:
        sweep = result.sweep
        metrics = list(sweep.scores[0]) if sweep.scores else []
        table = [["ALPHA", *(m.upper() for m in metrics)]]
        table += [[f"{a:.3f}", *(f"{s[m]:.4f}" for m in metrics)] for a, s in zip(sweep.alphas, sweep.scores, strict=True)]
        lines += ["", f"sweep on {sweep.split!r}: alpha 0 = {sweep.start}, alpha 1 = {sweep.end}:", *_table(table)]
    lines += [f"note: {note}" for note in result.notes]
    return "\n".join(lines)


def _cells(row: Divergence, scoped: bool) -> list[str]:
    numbers = ["n/a" if math.isnan(v) else f"{v:.6f}" for v in (row.cosine, row.relative_l2)]
    return [*([row.scope] if scoped else []), row.left, row.right, *numbers]


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
