"""Scoring blends and ingredients on held-out data: accuracy, NLL and calibration, or perplexity.

An ``Evaluator`` loads a spec's evaluation splits once per build (safetensors files, text in
``.jsonl`` files, or a factory's batches), checks them against the model's interface, and
scores any forward function on them in batches, on the blend's device. Scores are plain floats keyed by metric,
so the store, the gate and Prometheus all read the same numbers.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from tureen.core.architecture import outputs_by_name
from tureen.core.checkpoints import safetensors_problem
from tureen.core.llm.text import TextCodec
from tureen.core.signature import Signature
from tureen.core.text_splits import Batch, TextSplits, choice_log_likelihoods, is_text, question_log_softmax, read_jsonl
from tureen.errors import EvaluationError, EvaluationMissing, OutOfMemory, SoupError
from tureen.spec import METRICS, TASK_METRICS, EvalSet, Evaluation

ECE_BINS = 15
Scores = dict[str, float]
Forward = Callable[[Mapping[str, torch.Tensor]], Any]
"""Runs the model on a batch of prepared inputs (on the device) and returns what forward returns."""


class Evaluator:
    """The evaluation splits of one spec, loaded and checked, ready to score forwards."""

    def __init__(
        self,
        evaluation: Evaluation,
        signature: Signature,
        device: torch.device,
        dtype: torch.dtype,
        tokenizer: str | None = None,
    ) -> None:
        """``tokenizer``: the Hugging Face directory whose tokenizer reads text splits."""
        self.evaluation = evaluation
        self.tokenizer = tokenizer
        self._codec: TextCodec | None = None
        self.signature = signature
        self.device = device
        self.dtype = dtype
        self.output = evaluation.output or next(iter(signature.outputs))
        if self.output not in signature.outputs:
            raise EvaluationError(f"evaluation.output: the interface has no output {self.output!r}")
        self._splits: dict[str, list[Batch]] = {}

    @property
    def metric(self) -> str:
        return self.evaluation.deciding_metric

    @property
    def selected(self) -> str:
        return self.evaluation.selected

    def batches(self, split: str) -> list[Batch]:
        """The split's batches on the device (loaded and checked on first use)."""
        if split not in self._splits:
            where = f"evaluation.splits.{split}"
            source = self.evaluation.splits[split]
            rows = _read(source, where)
            task = self.evaluation.task_of(split)
            text = source.jsonl or is_text(rows) or task == "multiple-choice"
            batches = self._text_batches(rows, where, task) if text else self._rebatch(rows, where, task)
            self._splits[split] = [self._to_device(b) for b in batches]
        return self._splits[split]

    def score(self, forward: Forward, split: str) -> Scores:
        """Every metric of the task for ``forward`` on ``split``."""
        where = f"evaluation.splits.{split}"
        totals = _Totals()
        task = self.evaluation.task_of(split)
        batches = self.batches(split)  # loaded outside inference mode: a learned soup trains on them
        with torch.inference_mode():
            for batch in batches:
                try:
                    produced = outputs_by_name(forward(batch.inputs), tuple(self.signature.outputs))
                    logits = produced.get(self.output)
                    if not isinstance(logits, torch.Tensor):
                        raise EvaluationError(f"evaluation.output: forward produced no tensor {self.output!r}")
                    totals.add(task, logits, batch, where)
                except torch.OutOfMemoryError as exc:  # this device's limit, not the data's fault
                    raise OutOfMemory(f"{where}: out of memory scoring a batch (lower evaluation.batch_size): {exc}") from None
                except (RuntimeError, ValueError, TypeError) as exc:
                    raise EvaluationError(f"{where}: the model cannot run on this data: {exc}") from None
        return totals.scores(task)

    def score_all(self, forward: Forward) -> dict[str, Scores]:
        """Scores on every split, by split name."""
        return {split: self.score(forward, split) for split in self.evaluation.splits}

    def value(self, scores: Scores) -> float:
        """The deciding metric of ``scores``, oriented so that higher is better."""
        value = scores[self.metric]
        if not math.isfinite(value):  # a diverged candidate (NaN, inf) ranks below every finite one
            return -math.inf
        return value if METRICS[self.metric].higher_is_better else -value

    def module_forward(self, module: nn.Module) -> Forward:
        return lambda inputs: module(**inputs)

    def functional_forward(self, module: nn.Module, state: Mapping[str, torch.Tensor]) -> Forward:
        """Run ``module`` with ``state`` in place of its own tensors (not copied into the module);
        floating tensors in another dtype (an ingredient's own) take the blend's."""
        cast = {k: t.to(self.device, self.dtype) if t.is_floating_point() else t.to(self.device) for k, t in state.items()}
        return lambda inputs: torch.func.functional_call(module, cast, args=(), kwargs=dict(inputs))

    def _split_row(
        self, row: object, i: int, names: tuple[str, ...], where: str, task: str
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """One batch of a split as (the model's inputs, the labels), or an error naming what is missing."""
        if not isinstance(row, Mapping):
            raise EvaluationError(f"{where}: batch {i} is a {type(row).__name__}, not a mapping of tensors")
        missing = [n for n in names if n not in row]
        if missing:
            raise EvaluationError(
                f"{where}: no tensor {missing[0]!r} for the model's input (inputs: {', '.join(names)}; has: {', '.join(row)})"
            )
        labels = row.get(self.evaluation.labels)
        if labels is None and task == "language-modeling":
            labels = row[names[0]]  # a language model predicts its own input ids
        if labels is None:
            raise EvaluationError(f"{where}: no {self.evaluation.labels!r} tensor (has: {', '.join(row)})")
        return {n: row[n] for n in names}, labels

    def _text_batches(self, rows: list[Any], where: str, task: str) -> list[Batch]:
        if task == "classification":
            raise EvaluationError(f"{where}: text rows score language-modeling or multiple-choice, not classification")
        if self.tokenizer is None:
            raise EvaluationError(f"{where}: text needs a tokenizer: the architecture must be huggingface, task causal-lm")
        if not rows:
            raise EvaluationError(f"{where}: the evaluation set is empty")
        if self._codec is None:  # read once, for every text split
            try:
                self._codec = TextCodec.load(self.tokenizer)
            except SoupError as exc:
                raise EvaluationError(f"{where}: {exc}") from None
        splits = TextSplits(self._codec, tuple(self.signature.inputs), self.evaluation.batch_size)
        if task == "multiple-choice":
            return splits.questions(rows, where)
        return splits.texts(rows, where)

    def _rebatch(self, rows: Iterable[Mapping[str, torch.Tensor]], where: str, task: str) -> list[Batch]:
        names = tuple(self.signature.inputs)
        label_name = self.evaluation.labels
        batches: list[Batch] = []
        for i, row in enumerate(rows):
            inputs, labels = self._split_row(row, i, names, where, task)
            rows_in = {t.shape[0] if t.dim() else 0 for t in [*inputs.values(), labels]}
            if rows_in == {0}:
                continue  # an empty batch adds nothing; a split with no rows at all is reported below
            if len(rows_in) != 1 or 0 in rows_in:
                raise EvaluationError(f"{where}: inputs and labels need the same number of rows, got {sorted(rows_in)}")
            if labels.is_floating_point():
                raise EvaluationError(f"{where}: {label_name!r} must hold integer class ids, got {labels.dtype}")
            size = min(self.evaluation.batch_size, self.signature.max_batch_size or labels.shape[0])
            for start in range(0, labels.shape[0], size):
                batches.append(Batch({n: t[start : start + size] for n, t in inputs.items()}, labels[start : start + size]))
            try:
                self.signature.check_inputs(batches[-1].inputs)
            except SoupError as exc:  # the interface's own message names the tensor and the shape
                raise EvaluationError(f"{where}: {exc}") from None
        if not batches:
            raise EvaluationError(f"{where}: the evaluation set is empty")
        return batches

    def _to_device(self, batch: Batch) -> Batch:
        inputs = {n: (t.to(self.dtype) if t.is_floating_point() else t).to(self.device) for n, t in batch.inputs.items()}
        return Batch(inputs, batch.labels.to(device=self.device, dtype=torch.int64), batch.choices)


class _Totals:
    """Running sums over batches, so a split of any size is scored in one pass."""

    def __init__(self) -> None:
        self.count = 0
        self.correct = 0
        self.nll = 0.0
        self.bin_count = torch.zeros(ECE_BINS, dtype=torch.float64)
        self.bin_confidence = torch.zeros(ECE_BINS, dtype=torch.float64)
        self.bin_correct = torch.zeros(ECE_BINS, dtype=torch.float64)
        self.correct_norm = 0

    def add(self, task: str, logits: torch.Tensor, batch: Batch, where: str) -> None:
        if task == "classification":
            self.add_classification(logits, batch.labels, where)
        elif task == "multiple-choice":
            self.add_choices(logits, batch, where)
        else:
            self.add_tokens(logits, batch.labels, where)

    def add_classification(self, logits: torch.Tensor, labels: torch.Tensor, where: str) -> None:
        if logits.dim() != 2 or logits.shape[0] != labels.shape[0]:
            raise EvaluationError(f"{where}: classification wants logits [batch, classes]; got {list(logits.shape)}")
        classes = logits.shape[1]
        labels = labels.reshape(-1)
        if bool(((labels < 0) | (labels >= classes)).any()):
            bad = int(labels[(labels < 0) | (labels >= classes)][0])
            raise EvaluationError(f"{where}: labels must lie in [0, {classes}) for {classes} classes; found {bad}")
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        self.nll += float(-log_probs.gather(1, labels[:, None]).sum())
        confidence, predicted = log_probs.exp().max(dim=-1)
        correct = predicted == labels
        self.correct += int(correct.sum())
        self.count += int(labels.numel())
        # Equal-width bins over (0, 1]; a confidence of exactly 1 falls in the last bin.
        index = (confidence.double() * ECE_BINS).ceil().clamp(1, ECE_BINS).long() - 1
        self.bin_count += torch.bincount(index.cpu(), minlength=ECE_BINS).double()
        self.bin_confidence += torch.bincount(index.cpu(), weights=confidence.double().cpu(), minlength=ECE_BINS)
        self.bin_correct += torch.bincount(index.cpu(), weights=correct.double().cpu(), minlength=ECE_BINS)

    def add_tokens(self, logits: torch.Tensor, labels: torch.Tensor, where: str) -> None:
        if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != labels.shape:
            raise EvaluationError(
                f"{where}: language modeling wants logits [batch, tokens, vocab] and labels [batch, tokens]; "
                f"got {list(logits.shape)} and {list(labels.shape)}"
            )
        vocab = logits.shape[-1]
        # Position t predicts token t + 1; -100 marks tokens that are not scored (padding).
        predicted, target = logits[:, :-1].reshape(-1, vocab).float(), labels[:, 1:].reshape(-1)
        scored = target != -100
        if bool(((target[scored] < 0) | (target[scored] >= vocab)).any()):
            raise EvaluationError(f"{where}: token ids must lie in [0, {vocab}) (or be -100 to skip)")
        self.nll += float(torch.nn.functional.cross_entropy(predicted[scored], target[scored], reduction="sum"))
        self.count += int(scored.sum())

    def add_choices(self, logits: torch.Tensor, batch: Batch, where: str) -> None:
        if batch.choices is None or logits.dim() != 3 or logits.shape[:2] != batch.labels.shape:
            raise EvaluationError(f"{where}: multiple choice wants logits [rows, tokens, vocab]; got {list(logits.shape)}")
        choices = batch.choices
        sums = choice_log_likelihoods(logits, batch.labels)
        counts = list(choices.counts)
        lengths = torch.tensor(choices.lengths, dtype=torch.float64).split(counts)
        per_question = zip(sums.double().cpu().split(counts), question_log_softmax(sums, choices), lengths, strict=True)
        for (raw, log_p, length), answer in zip(per_question, choices.answers, strict=True):
            self.nll -= float(log_p[answer])
            self.correct += int(int(raw.argmax()) == answer)
            self.correct_norm += int(int((raw / length).argmax()) == answer)
            self.count += 1

    def scores(self, task: str) -> Scores:
        if self.count == 0:
            raise EvaluationError("evaluation: no labelled rows or tokens to score")
        nll = self.nll / self.count
        if task == "multiple-choice":
            values = {"accuracy": self.correct / self.count, "accuracy_norm": self.correct_norm / self.count, "nll": nll}
        elif task == "language-modeling":
            values = {"nll": nll, "perplexity": math.exp(min(nll, 700.0))}
        else:
            filled = self.bin_count > 0
            gaps = (self.bin_confidence[filled] - self.bin_correct[filled]).abs()
            values = {"accuracy": self.correct / self.count, "nll": nll, "ece": float(gaps.sum()) / self.count}
        # The metrics table decides what a task reports (and in which order), for every reader alike.
        return {name: values[name] for name in TASK_METRICS[task]}


def _read(source: EvalSet, where: str) -> list[Any]:
    if source.path is not None:
        path = Path(source.path)
        if source.jsonl:
            return read_jsonl(path, f"{where}.path")
        if not path.is_file():
            raise EvaluationMissing(f"{where}.path: no such file: {path}")
        try:
            return [load_file(str(path))]
        except (SafetensorError, OSError, ValueError) as exc:
            raise EvaluationError(f"{where}.path: not a readable safetensors file: {safetensors_problem(exc)}") from None
    module_name, _, attribute = str(source.factory).partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
        return list(factory(**source.kwargs))
    except (ImportError, AttributeError) as exc:
        raise EvaluationError(f"{where}.factory: cannot import {source.factory!r}: {exc}") from None
    except EvaluationError:
        raise
    except Exception as exc:  # the factory is the user's code: any failure is reported, not crashed on
        raise EvaluationError(f"{where}.factory: {source.factory!r} failed: {exc}") from None
