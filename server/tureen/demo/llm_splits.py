"""The LLM demo's evaluation splits, written as the text files an LLM soup's spec reads.

Per part of the standard library, pieces of its held-out test text (``test-PART.jsonl``, for
perplexity) and of the tenth before it (``val.jsonl``, which the greedy search reads); and one
multiple-choice split over all parts (``next-line.jsonl``): given eight lines of one part's
held-out code, which of four lines comes next, the others being lines of the three other parts.
A model that knows the part's code picks its line; the questions cover every part.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

PIECES, PIECE_CHARS = 8, 750
"""Pieces of held-out text per part and split, spread evenly over it."""
QUESTIONS, CONTEXT_LINES, MIN_LINE = 10, 8, 12
"""Questions per part, lines of code before each, and the shortest line asked about."""
DISTRACTOR_POOL = 40
"""Random lines of another part that a wrong choice is picked from, the closest in length."""
NEXT_LINE = "next-line"


def write_splits(cache_dir: Path, held_out: Mapping[str, tuple[str, str]]) -> dict[str, dict[str, str]]:
    """Write the splits for ``held_out`` (part -> (val text, test text)); returns the spec's
    ``evaluation.splits``, ``val`` first."""
    val = [row for text, _ in held_out.values() for row in _pieces(text, PIECES // 2)]
    splits: dict[str, list[dict[str, Any]]] = {"val": val}
    questions = []
    lines = {name: _code_lines(test) for name, (_, test) in held_out.items()}
    for i, (name, (_, test)) in enumerate(sorted(held_out.items())):
        splits[f"test-{name}"] = _pieces(test, PIECES)
        questions += _next_lines(test, [lines[other] for other in sorted(lines) if other != name], seed=i)
    splits[NEXT_LINE] = questions
    for split, rows in splits.items():
        (cache_dir / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    sets = {split: {"path": f"{split}.jsonl"} for split in splits}
    sets[NEXT_LINE]["task"] = "multiple-choice"
    return sets


def _pieces(text: str, count: int) -> list[dict[str, str]]:
    step = max(0, len(text) - PIECE_CHARS) / max(1, count - 1)
    return [{"text": text[round(k * step) : round(k * step) + PIECE_CHARS]} for k in range(count)]


def _code_lines(text: str) -> list[str]:
    return sorted({line.strip() for line in text.splitlines() if len(line.strip()) >= MIN_LINE})


def _next_lines(text: str, elsewhere: list[list[str]], seed: int) -> list[dict[str, Any]]:
    """Questions whose answer is the line that follows; each other choice is a line of another
    part of about its length (a sum of log-likelihoods favours short choices). Lines are
    stripped, so indentation gives nothing away."""
    lines = text.splitlines()
    usable = [i for i in range(CONTEXT_LINES, len(lines)) if len(lines[i].strip()) >= MIN_LINE]
    rng = random.Random(seed)
    rows = []
    for i in rng.sample(usable, min(QUESTIONS, len(usable))):
        right = lines[i].strip()
        others = [min(rng.sample(pool, DISTRACTOR_POOL), key=lambda line: abs(len(line) - len(right))) for pool in elsewhere]
        answer = rng.randrange(len(others) + 1)
        prompt = "\n".join(lines[i - CONTEXT_LINES : i]) + "\n"
        rows.append({"prompt": prompt, "choices": [*others[:answer], right, *others[answer:]], "answer": answer})
    return rows
