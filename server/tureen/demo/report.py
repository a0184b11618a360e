"""The demo's second act: push the greedy soup, then compare it honestly on the test split.

The uniform soup is seeded as version 1; on a fresh store the greedy soup (searched on the val
split) is pushed as version 2. The log then shows, on the test split that no search has seen,
every ingredient alone, both soups and an ensemble of all ingredients, with what each costs
per request. Whatever the numbers say is what gets logged.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import load_file

from tureen.core.controller import Controller
from tureen.core.store import StoredVersion
from tureen.demo import train
from tureen.demo.models import DigitsMLP
from tureen.spec import load_spec

_log = logging.getLogger("tureen.demo")
MODEL = "digits"


def finish(controller: Controller, cache_dir: Path) -> None:
    """Push the greedy soup when the store holds only the seeded uniform one, then report."""
    versions = controller.store.versions(MODEL)
    if len(versions) == 1 and versions[0].pushed_by.startswith("seed"):
        _log.info("demo: pushing the greedy soup (searched on 'val')")
        controller.push(load_spec(cache_dir / train.GREEDY_SPEC_FILE), "demo", wait=True)
    report(controller.store.versions(MODEL), cache_dir)


def report(versions: list[StoredVersion], cache_dir: Path) -> None:
    uniform = next((v for v in versions if v.spec.merge.method == "linear" and v.evaluation), None)
    greedy = next((v for v in reversed(versions) if v.spec.merge.method == "greedy" and v.evaluation), None)
    scored = greedy or uniform
    if scored is None or not scored.ingredient_evaluation:
        _log.info("demo: no evaluated version of %r in the store to report", MODEL)
        return
    pixels, labels = train.load_split(cache_dir, "test")
    ingredients = {name: by_split["test"]["accuracy"] for name, by_split in scored.ingredient_evaluation.items()}
    ensemble = _ensemble_accuracy(scored, pixels, labels)
    _log.info(
        "demo: accuracy on 'test' (%d images; the greedy search only saw 'val'), and forward passes per request:", len(labels)
    )
    for name, score in ingredients.items():
        _log.info("demo:   ingredient %-22s %.4f  1", name, score)
    rows = [(f"uniform soup (version {v.version})", v) for v in (uniform,) if v is not None]
    rows += [(f"greedy soup (version {v.version})", v) for v in (greedy,) if v is not None]
    for label, version in rows:
        _log.info("demo:   %-33s %.4f  1", label, version.evaluation["test"]["accuracy"])
    _log.info("demo:   %-33s %.4f  %d", f"ensemble of {len(ingredients)} ingredients", ensemble, len(ingredients))
    if greedy is not None and greedy.resolution is not None:
        kept = [name for name, weight in greedy.resolution["merge"]["weights"].items() if weight]
        best_val = greedy.resolution["log"]["best"]
        _log.info("demo: the greedy soup kept %s (val accuracy %.4f)", ", ".join(kept), best_val)
        _verdict(greedy.evaluation["test"]["accuracy"], ingredients, len(labels))


def _verdict(greedy: float, ingredients: dict[str, float], images: int) -> None:
    best = max(ingredients, key=ingredients.__getitem__)
    if greedy > ingredients[best]:
        _log.info(
            "demo: the greedy soup beats the best single fine-tune on test (%.4f vs %s %.4f)", greedy, best, ingredients[best]
        )
        return
    if greedy == ingredients[best]:
        _log.info("demo: the greedy soup matches the best single fine-tune on test (%s, %.4f)", best, greedy)
        return
    gap = round((ingredients[best] - greedy) * images)
    _log.info(
        "demo: the greedy soup does not beat the best single fine-tune on test here (%.4f vs %s %.4f, %d of %d images): "
        "the search picks by val, and these small fine-tunes differ by a few images on either split, "
        "so val's ranking does not carry over to test",
        greedy,
        best,
        ingredients[best],
        gap,
        images,
    )


def _ensemble_accuracy(version: StoredVersion, pixels: torch.Tensor, labels: torch.Tensor) -> float:
    """Average the ingredients' predicted probabilities: N forward passes for every request."""
    total = torch.zeros(len(labels), 10)
    for ref in version.spec.ingredients:
        module = DigitsMLP(hidden=train.HIDDEN)
        module.load_state_dict(load_file(ref.location))
        with torch.inference_mode():
            total += module.eval()(pixels)["probabilities"]
    return float((total.argmax(dim=-1) == labels).float().mean())
