"""Evaluation splits of text for causal-LM soups, turned into the batches the evaluator scores.

Two kinds of rows, one JSON object per line of a ``.jsonl`` file (or per item of a factory):

- ``{"text": ...}`` (task ``language-modeling``): the text is tokenized after the special
  tokens a prompt starts with (a BOS; never one a tokenizer appends at the end), or after the
  end-of-sequence token when there is no BOS (the harness's prefix token), and cut into
  windows of the model's context that overlap by one token, so that every token of the text
  is predicted exactly once; perplexity is over all of them.
- ``{"prompt": ..., "choices": [...], "answer": i}`` (task ``multiple-choice``): scored the way
  lm-evaluation-harness scores such tasks: each choice is a continuation of the prompt after a
  space, its log-likelihood the sum over its tokens (the tokens the whole text has beyond the
  prompt's own), and the most likely choice is the model's answer; ``accuracy_norm`` divides
  each log-likelihood by the choice's length in characters first (the harness's ``acc_norm``).

Rows are right-padded within a batch (``attention_mask`` 0, labels -100): a causal model's
scores at real positions do not depend on what follows them. A question's choices always
share a batch, so a learned soup can train on the softmax over them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tureen.core.llm.text import TextCodec
from tureen.errors import EvaluationError, EvaluationMissing

IGNORED = -100
DELIMITER = " "
"""Between a prompt and each choice (lm-evaluation-harness's default ``target_delimiter``)."""


@dataclass(frozen=True)
class Choices:
    """How a multiple-choice batch's rows group into questions, in row order."""

    counts: tuple[int, ...]
    """Choices per question."""
    answers: tuple[int, ...]
    """The index of each question's right choice."""
    lengths: tuple[int, ...]
    """Each row's choice length in characters."""


Row = tuple[list[int], list[int]]
"""A row's token ids and its labels (the ids, or -100 where a token is not scored)."""


@dataclass(frozen=True)
class _Question:
    rows: list[Row]
    """One per choice."""
    answer: int
    lengths: list[int]
    """Each choice's length in characters."""


@dataclass(frozen=True)
class Batch:
    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor
    choices: Choices | None = None


def read_jsonl(path: Path, where: str) -> list[Mapping[str, Any]]:
    """The objects of a JSON-lines file (blank lines skipped), or an error naming the line."""
    if not path.is_file():
        raise EvaluationMissing(f"{where}: no such file: {path}")
    rows: list[Mapping[str, Any]] = []
    try:
        with path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as exc:
                    raise EvaluationError(f"{where}: line {number} is not JSON: {exc}") from None
                if not isinstance(row, dict):
                    raise EvaluationError(f"{where}: line {number} is a {type(row).__name__}, not an object")
                rows.append(row)
    except (OSError, UnicodeDecodeError) as exc:
        raise EvaluationError(f"{where}: cannot read {path}: {exc}") from None
    return rows


def is_text(rows: Sequence[object]) -> bool:
    """Whether a split's rows are text objects (not mappings of tensors)."""
    first = rows[0] if rows else None
    return isinstance(first, Mapping) and any(isinstance(first.get(key), str) for key in ("text", "prompt"))


class TextSplits:
    """Text rows to batches for one model: its tokenizer, context and input names."""

    def __init__(self, codec: TextCodec, inputs: Sequence[str], batch_size: int) -> None:
        unknown = [name for name in inputs if name not in ("input_ids", "attention_mask")]
        if "input_ids" not in inputs or unknown:
            raise EvaluationError(f"evaluation: text splits feed input_ids and attention_mask; the model takes {list(inputs)}")
        self.codec = codec
        self.inputs = tuple(inputs)
        self.batch_size = batch_size
        tokenizer = codec.tokenizer
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad = int(pad) if pad is not None else 0
        self.leading = _leading_specials(codec)
        """What a prompt starts with (a BOS), or else a token to predict a first one from."""

    def texts(self, rows: Iterable[Mapping[str, Any]], where: str) -> list[Batch]:
        """Windows of every text, as language-modeling batches."""
        windows: list[Row] = []
        for i, row in enumerate(rows):
            text = row.get("text") if isinstance(row, Mapping) else None
            if not isinstance(text, str):
                has = ", ".join(row) if isinstance(row, Mapping) else f"a {type(row).__name__}"
                raise EvaluationError(f"{where}: row {i + 1} has no string 'text' (has: {has})")
            windows += [(ids, ids) for ids in self._windows(self.leading + self.codec.encode(text, special=False))]
        if not windows:
            raise EvaluationError(f"{where}: no text to score (every text is empty)")
        return [self._batch(windows[s : s + self.batch_size]) for s in range(0, len(windows), self.batch_size)]

    def questions(self, rows: Iterable[Mapping[str, Any]], where: str) -> list[Batch]:
        """Every choice of every question as a row, questions kept whole within a batch."""
        batches: list[Batch] = []
        pending: list[_Question] = []
        for i, row in enumerate(rows):
            question = self._question(row, f"{where}: row {i + 1}")
            if pending and sum(len(q.rows) for q in pending) + len(question.rows) > self.batch_size:
                batches.append(self._choice_batch(pending))
                pending = []
            pending.append(question)
        if not pending:
            raise EvaluationError(f"{where}: the evaluation set is empty")
        batches.append(self._choice_batch(pending))
        return batches

    def _windows(self, ids: list[int]) -> list[list[int]]:
        size = self.codec.context
        if len(ids) < 2:
            return []
        return [ids[start : start + size] for start in range(0, max(1, len(ids) - 1), size - 1)]

    def _question(self, row: Mapping[str, Any], where: str) -> _Question:
        if not isinstance(row, Mapping):
            raise EvaluationError(f"{where}: expected an object with prompt, choices and answer")
        prompt, choices, answer = row.get("prompt"), row.get("choices"), row.get("answer")
        if not isinstance(prompt, str):
            raise EvaluationError(f"{where}: 'prompt' must be a string")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise EvaluationError(f"{where}: 'choices' must be a list of two or more non-empty strings")
        if isinstance(answer, str) and answer in choices:
            answer = choices.index(answer)
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise EvaluationError(f"{where}: 'answer' must be the index of a choice (0 to {len(choices) - 1}) or one of them")
        rows = [self._continuation(prompt, choice, f"{where}: choice {j}") for j, choice in enumerate(choices)]
        return _Question(rows, answer, [len(choice) for choice in choices])

    def _continuation(self, prompt: str, choice: str, where: str) -> Row:
        """(ids, labels) of prompt and choice: only the choice's tokens are scored."""
        continuation = DELIMITER + choice
        spaces = len(prompt) - len(prompt.rstrip())
        if spaces:  # the harness moves a prompt's trailing whitespace onto the continuation
            prompt, continuation = prompt[:-spaces], prompt[-spaces:] + continuation
        context = self.codec.encode(prompt, special=False)
        whole = self.codec.encode(prompt + continuation, special=False)
        scored = len(whole) - len(context)
        whole = self.leading + whole  # so that even a first token has something that predicts it
        if scored < 1:
            raise EvaluationError(f"{where}: the choice adds no tokens to the prompt")
        if scored >= self.codec.context:
            raise EvaluationError(f"{where}: the choice is {scored} tokens; the model's context is {self.codec.context}")
        whole = whole[-self.codec.context :]  # a long prompt loses its start, as the harness truncates
        labels = [IGNORED] * (len(whole) - scored) + whole[len(whole) - scored :]
        return whole, labels

    def _choice_batch(self, questions: list[_Question]) -> Batch:
        choices = Choices(
            tuple(len(q.rows) for q in questions),
            tuple(q.answer for q in questions),
            tuple(n for q in questions for n in q.lengths),
        )
        batch = self._batch([row for q in questions for row in q.rows])
        return Batch(batch.inputs, batch.labels, choices)

    def _batch(self, rows: list[Row]) -> Batch:
        width = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), width), self.pad, dtype=torch.int64)
        labels = torch.full((len(rows), width), IGNORED, dtype=torch.int64)
        mask = torch.zeros((len(rows), width), dtype=torch.int64)
        for r, (row_ids, row_labels) in enumerate(rows):
            ids[r, : len(row_ids)] = torch.tensor(row_ids)
            labels[r, : len(row_labels)] = torch.tensor(row_labels)
            mask[r, : len(row_ids)] = 1
        inputs = {"input_ids": ids, "attention_mask": mask}
        return Batch({name: inputs[name] for name in self.inputs}, labels)


def choice_log_likelihoods(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each row's summed log-probability of its scored tokens (position t predicts t + 1)."""
    predicting = logits[:, :-1]
    target = labels[:, 1:]
    scored = target != IGNORED
    # The target's logit less the log-sum-exp: no second [rows, tokens, vocab] tensor as log_softmax makes.
    picked = predicting.gather(-1, target.clamp(min=0)[..., None]).squeeze(-1).float()
    log_probs = picked - torch.logsumexp(predicting.float(), dim=-1)
    return torch.where(scored, log_probs, 0.0).sum(dim=-1)


def _leading_specials(codec: TextCodec) -> list[int]:
    """The special tokens a prompt starts with (a BOS); with none, the end-of-sequence token,
    as lm-evaluation-harness predicts a text's first token from its prefix token."""
    bare = codec.encode("a", special=False)
    framed = codec.encode("a")
    starts = [i for i in range(len(framed) - len(bare) + 1) if framed[i : i + len(bare)] == bare]
    leading = framed[: starts[0]] if starts else []
    if leading:
        return leading
    bos = codec.tokenizer.bos_token_id
    fallback = bos if bos is not None else min(codec.eos_token_ids, default=None)
    return [int(fallback)] if fallback is not None else []


def question_log_softmax(log_likelihoods: torch.Tensor, choices: Choices) -> list[torch.Tensor]:
    """Per question, the log-softmax over its choices' log-likelihoods."""
    return [torch.log_softmax(part, dim=0) for part in torch.split(log_likelihoods, list(choices.counts))]
