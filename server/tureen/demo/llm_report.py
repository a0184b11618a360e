"""The LLM demo's second act: push the greedy soup, then compare perplexities on held-out text.

The uniform soup is seeded as version 1; on a fresh store the greedy soup (searched on ``val``)
is pushed as version 2. The log then shows, on each part's test text, the perplexity of every
fine-tune alone, of both soups, and of an ensemble of the fine-tunes (their token probabilities
averaged: four forward passes per token instead of one), then each one's accuracy on the
next-line quiz. Whatever the numbers say is logged.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from tureen.core.controller import Controller
from tureen.core.llm.text import TextCodec
from tureen.core.store import StoredVersion
from tureen.core.text_splits import IGNORED, Batch, TextSplits, read_jsonl
from tureen.demo import llm
from tureen.demo.llm_splits import NEXT_LINE
from tureen.spec import load_spec

_log = logging.getLogger("tureen.demo")


def finish(controller: Controller, cache_dir: Path) -> None:
    versions = controller.store.versions(llm.MODEL)
    if len(versions) == 1 and versions[0].pushed_by.startswith("seed"):
        _log.info("demo llm: pushing the greedy soup (searched on 'val')")
        controller.push(load_spec(cache_dir / llm.GREEDY_SPEC_FILE), "demo", wait=True)
    report(controller.store.versions(llm.MODEL), cache_dir)


def report(versions: list[StoredVersion], cache_dir: Path) -> None:
    uniform = next((v for v in versions if v.spec.merge.method == "linear" and v.evaluation), None)
    greedy = next((v for v in reversed(versions) if v.spec.merge.method == "greedy" and v.evaluation), None)
    scored = next((v for v in (uniform, greedy) if v is not None and v.ingredient_evaluation), None)
    if scored is None:  # the fine-tunes alone are scored with the uniform soup (the greedy spec skips them)
        _log.info("demo llm: no evaluated version of %r in the store to report", llm.MODEL)
        return
    names = list(scored.ingredient_evaluation)
    soups = [(f"uniform v{v.version}", v) for v in (uniform,) if v is not None]
    soups += [(f"greedy v{v.version}", v) for v in (greedy,) if v is not None]
    header = [*names, *(label for label, _ in soups), f"ensemble of {len(names)}"]
    _log.info("demo llm: perplexity on each part's held-out test text (lower is better; the ensemble: %d forwards):", len(names))
    _log.info("demo llm:   %-16s %s", "test split", " ".join(f"{h:>14}" for h in header))
    ensemble_perplexity = _ensemble(scored)
    for split in (s for s in scored.evaluation if s.startswith("test-")):
        row = [scored.ingredient_evaluation[n][split]["perplexity"] for n in names]
        row += [version.evaluation[split]["perplexity"] for _, version in soups]
        row.append(ensemble_perplexity(cache_dir / f"{split}.jsonl"))
        _log.info("demo llm:   %-16s %s", split, " ".join(f"{value:>14.2f}" for value in row))
    if NEXT_LINE in scored.evaluation:
        quiz = [scored.ingredient_evaluation[n][NEXT_LINE]["accuracy"] for n in names]
        quiz += [version.evaluation[NEXT_LINE]["accuracy"] for _, version in soups]
        _log.info(
            "demo llm: accuracy on the next-line quiz (which of %d lines, one per part, comes next; higher is better):",
            len(names),
        )
        _log.info("demo llm:   %-16s %s", NEXT_LINE, " ".join(f"{value:>14.3f}" for value in quiz))
    if greedy is not None and greedy.resolution is not None:
        kept = [name for name, weight in greedy.resolution["merge"]["weights"].items() if weight]
        _log.info("demo llm: the greedy soup kept %s (val perplexity %.2f)", ", ".join(kept), greedy.resolution["log"]["best"])


def _ensemble(version: StoredVersion) -> Callable[[Path], float]:
    """The perplexity of the fine-tunes' averaged token probabilities on a split, on the windows
    the server scores; the model, tokenizer and fine-tunes are read once for every split."""
    import transformers

    transformers.utils.logging.disable_progress_bar()

    first = str(Path(version.spec.ingredients[0].location))
    assert version.spec.architecture is not None and version.spec.architecture.huggingface is not None
    codec = TextCodec.load(version.spec.architecture.huggingface)  # the tokenizer lives with the base
    splits = TextSplits(codec, ("input_ids", "attention_mask"), llm.EVAL_ROWS)
    model = transformers.AutoModelForCausalLM.from_pretrained(first).eval()
    states = [load_file(str(Path(ref.location) / "model.safetensors")) for ref in version.spec.ingredients]
    return lambda split: _perplexity(model, states, splits.texts(read_jsonl(split, split.name), split.name))


def _perplexity(model: Any, states: list[dict[str, torch.Tensor]], batches: list[Batch]) -> float:
    nll, count = 0.0, 0
    for batch in batches:
        each = []
        for state in states:
            model.load_state_dict(state, strict=False)
            with torch.inference_mode():
                each.append(model(**batch.inputs).logits[:, :-1].float().softmax(-1))
        target = batch.labels[:, 1:]
        scored = target != IGNORED
        chosen = torch.stack(each).mean(0).gather(-1, target.clamp(min=0)[..., None]).squeeze(-1)
        nll -= float(chosen[scored].log().sum())
        count += int(scored.sum())
    return math.exp(nll / count)
