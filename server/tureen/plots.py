"""Pictures of a profile (``tureen profile``), one PNG of up to three panels side by side.

matplotlib is the optional ``plot`` extra: it is imported here, only when a plot is asked for,
and drawn with the Agg canvas so no display (and no pyplot global state) is ever involved.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tureen.errors import SoupError
from tureen.profile import SOUP, UNIFORM, Profile

SOUP_COLORS = {SOUP: "tab:red", UNIFORM: "tab:orange"}
MAX_LAYER_LABELS = 30
"""Beyond this many layers the divergence panel numbers its ticks instead of naming them."""


class PlotUnavailable(SoupError):
    """matplotlib is not installed."""

    reason = "plot_unavailable"


def plot_profile(result: Profile, path: Path) -> Path:
    """Draw ``result`` into the PNG ``path``: the sweep, every ingredient against the soup(s),
    and the per-layer distance to the reference (the panels whose data the profile has)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotUnavailable("plotting needs matplotlib: pip install 'tureen[plot]'") from None
    panels = [
        *([_sweep] if result.sweep is not None else []),
        *([_ingredients] if result.scores and result.metric else []),
        *([_divergence] if result.layers else []),
    ]
    if not panels:
        raise SoupError("nothing to plot: the profile has no sweep, scores or divergence")
    figure = Figure(figsize=(5.5 * len(panels), 4.8), layout="constrained")
    FigureCanvasAgg(figure)
    for axes, draw in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels, strict=True):
        draw(axes, result)
    figure.suptitle(f"{result.model}: {result.method} soup")
    try:
        figure.savefig(path, format="png", dpi=110)
    except OSError as exc:
        raise SoupError(f"--plot: cannot write {path}: {exc.strerror or exc}") from None
    return path


def _sweep(axes: Any, result: Profile) -> None:
    sweep = result.sweep
    assert sweep is not None
    values = [scores[sweep.metric] for scores in sweep.scores]
    axes.plot(sweep.alphas, values, marker="o", color="tab:blue")
    axes.set_xlabel(f"alpha: 0 = {sweep.start}, 1 = {sweep.end}")
    axes.set_ylabel(f"{sweep.metric} on {sweep.split!r}")
    axes.set_title("interpolation sweep")
    axes.grid(alpha=0.3)


def _ingredients(axes: Any, result: Profile) -> None:
    """The model soups paper's picture: each ingredient a dot, each soup a star, on two splits;
    with one split, bars."""
    metric = str(result.metric)
    splits = list(next(iter(result.scores.values())))
    first = result.sweep.split if result.sweep is not None else splits[0]
    others = [s for s in splits if s != first]
    if others:
        labelled: set[str] = set()
        for name, by_split in result.scores.items():
            x, y = by_split[first][metric], by_split[others[0]][metric]
            if name in SOUP_COLORS:
                axes.scatter(x, y, marker="*", s=260, color=SOUP_COLORS[name], label=name, zorder=3)
            else:
                marker, kind = ("s", "base") if name == result.base else ("o", "ingredient")
                label = None if kind in labelled else kind  # one legend entry per kind, not per dot
                labelled.add(kind)
                axes.scatter(x, y, marker=marker, s=45, color="tab:gray", label=label, zorder=2)
                axes.annotate(name, (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
        axes.set_xlabel(f"{metric} on {first!r}")
        axes.set_ylabel(f"{metric} on {others[0]!r}")
        axes.legend(fontsize=8, loc="best")
        axes.grid(alpha=0.3)
    else:
        names = list(result.scores)
        values = [result.scores[name][first][metric] for name in names]
        colors = [SOUP_COLORS.get(name, "tab:gray") for name in names]
        axes.barh(names, values, color=colors)
        axes.invert_yaxis()
        axes.set_xlabel(f"{metric} on {first!r}")
        low, high = min(values), max(values)
        margin = max(0.5 * (high - low), 1e-3 * max(abs(high), 1.0))  # zoomed in: the differences are what matter
        axes.set_xlim(low - margin, high + margin / 2)
    axes.set_title("ingredients and soups")


def _divergence(axes: Any, result: Profile) -> None:
    layers = list(dict.fromkeys(row.scope for row in result.layers))
    to_reference = [row for row in result.layers if row.right == result.reference]
    for name in dict.fromkeys(row.left for row in to_reference):
        by_layer = {row.scope: row.relative_l2 for row in to_reference if row.left == name}
        axes.plot(range(len(layers)), [by_layer[layer] for layer in layers], marker=".", label=name)
    if len(layers) <= MAX_LAYER_LABELS:
        axes.set_xticks(range(len(layers)), layers, rotation=45, ha="right", fontsize=7)
    else:
        axes.set_xlabel("layer (in the checkpoint's order)")
    axes.set_ylabel(f"relative L2 to {result.reference}")
    axes.set_title("divergence per layer")
    axes.legend(fontsize=7, loc="best")
    axes.grid(alpha=0.3)
