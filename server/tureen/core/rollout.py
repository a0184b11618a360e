"""Rollouts decided by accuracy: the evaluation gate, and canaries judged on live feedback.

The gate compares a candidate's held-out metric with the active version's before any traffic
reaches it. A canary then takes a share of live requests; applications report, for request
ids (Feedback), the true labels (one outcome per row: right or wrong) or a reward for the
whole response (a score from 0 to 1, or thumbs up as 1 and down as 0: how a generation is
judged). Each version's online accuracy, the mean outcome, decides the canary:

- nothing is decided before each version has ``min(min_samples, 30)`` outcomes: one wrong
  answer out of one is no evidence;
- it is **rolled back** as soon as a one-sided two-proportion z-test finds it worse than the
  active version at level ``alpha``: z = (p_c - p_a) / se with the pooled standard error
  se = sqrt(p (1 - p) (1 / n_c + 1 / n_a)), p = (correct_c + correct_a) / (n_c + n_a), and
  rollback when P(Z <= z) < alpha (z is 0 when se is 0: both always right, or always wrong);
- it is **promoted** once both versions have ``min_samples`` labels, that test does not find it
  worse, and its accuracy is at least the active one's minus ``margin``;
- still undecided at ``max_samples`` canary labels, it is rolled back.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tureen.errors import GateRejected, InvalidRequest
from tureen.spec import HIGHER_IS_BETTER, Canary, SoupSpec

REMEMBERED_REQUESTS = 100_000
"""Predictions kept per process for feedback to find; the oldest are forgotten first."""
MIN_LABELS = 30
"""Labels each version needs before any decision, rollback included (fewer with a smaller min_samples)."""
ROLLING_WINDOW = 1000
"""Labelled requests behind each version's rolling online accuracy."""


def check_gate(
    spec: SoupSpec,
    version: int,
    candidate: Mapping[str, Mapping[str, float]],
    active: tuple[int, Mapping[str, Mapping[str, float]]] | None,
) -> str:
    """Raise ``GateRejected`` (with both numbers) when the candidate is worse than the active
    version by more than the tolerance; return a line saying why it passed."""
    gate = spec.rollout.gate if spec.rollout is not None else None
    if gate is None or spec.evaluation is None:
        return "no gate"
    split, metric = spec.evaluation.selected, spec.evaluation.deciding_metric
    mine = candidate.get(split, {}).get(metric)
    if mine is None:
        raise GateRejected(f"rollout.gate: version {version} has no {metric} on split {split!r} to compare")
    if active is None:
        return f"gate: no active version to compare with; version {version} passes ({metric} {mine:.4f})"
    active_version, active_scores = active
    theirs = active_scores.get(split, {}).get(metric)
    if theirs is None:  # the active version was never evaluated on this split: nothing to hold against it
        return f"gate: active version {active_version} has no {metric} on {split!r}; version {version} passes"
    worse_by = (theirs - mine) if HIGHER_IS_BETTER[metric] else (mine - theirs)
    line = (
        f"{metric} on {split!r}: version {version} {mine:.4f}, active version {active_version} {theirs:.4f} "
        f"(tolerance {gate.tolerance:g})"
    )
    if not math.isfinite(mine) or worse_by > gate.tolerance:  # NaN compares false: refuse it outright
        raise GateRejected(f"rollout.gate: rejected: {line}")
    return f"gate: passed: {line}"


@dataclass(frozen=True)
class Prediction:
    """What a version answered for one request id, remembered until its feedback comes back."""

    version: int
    classes: tuple[int, ...] | None
    """The predicted class of each row; None for an answer without classes (a generation)."""


@dataclass(frozen=True)
class Feedback:
    """What an application says about one response: exactly one of the three."""

    labels: tuple[int, ...] = ()
    score: float | None = None
    thumbs: bool | None = None
    """Thumbs up (True) or down (False)."""

    def reward(self) -> float | None:
        """The reward for the whole response, or None when labels are given; raises
        ``InvalidRequest`` naming the field when the feedback is not exactly one valid thing."""
        fields = (("labels", self.labels), ("score", self.score), ("thumbs", self.thumbs))
        given = [name for name, value in fields if value not in ((), None)]
        if not given:
            raise InvalidRequest("labels: give the true class of each row, a score from 0 to 1, or thumbs up or down")
        if len(given) > 1:
            raise InvalidRequest(f"{given[1]}: give one of labels, score and thumbs, not {' and '.join(given)}")
        if self.score is not None and not 0.0 <= self.score <= 1.0:  # NaN too
            raise InvalidRequest(f"score: a reward from 0 (bad) to 1 (good), got {self.score}")
        if self.labels:
            return None
        return self.score if self.score is not None else float(bool(self.thumbs))


class OnlineAccuracy:
    """Predictions by request id, labels that come back for them, and accuracy per version."""

    def __init__(self, remembered: int = REMEMBERED_REQUESTS, window: int = ROLLING_WINDOW) -> None:
        self._predictions: OrderedDict[tuple[str, str], Prediction] = OrderedDict()
        self._remembered = remembered
        self._window = window
        self._rolling: dict[tuple[str, int], deque[float]] = {}
        self._totals: dict[tuple[str, int], list[float]] = {}  # sum of outcomes, outcomes: since counting began
        self._lock = threading.Lock()

    def predicted(self, model: str, request_id: str, version: int, classes: Sequence[int] | None) -> None:
        with self._lock:
            self._predictions[(model, request_id)] = Prediction(version, None if classes is None else tuple(classes))
            self._predictions.move_to_end((model, request_id))
            while len(self._predictions) > self._remembered:
                self._predictions.popitem(last=False)

    def scored(self, model: str, request_id: str, feedback: Feedback) -> Prediction | None:
        """Score the prediction made for ``request_id``; None when it is unknown (or forgotten).
        Each prediction is scored once. Raises ``InvalidRequest`` (keeping the prediction for a
        corrected retry) when the feedback does not fit it."""
        reward = feedback.reward()
        with self._lock:
            prediction = self._predictions.get((model, request_id))
            if prediction is None:
                return None
            outcomes = [reward] if reward is not None else _outcomes(prediction, feedback.labels)
            del self._predictions[(model, request_id)]
            key = (model, prediction.version)
            self._rolling.setdefault(key, deque(maxlen=self._window)).extend(outcomes)
            totals = self._totals.setdefault(key, [0.0, 0])
            totals[0] += sum(outcomes)
            totals[1] += len(outcomes)
            return prediction

    def rolling(self, model: str, version: int) -> tuple[float, int]:
        """(accuracy, outcomes) over the last window of them."""
        with self._lock:
            window = self._rolling.get((model, version), deque())
            return (sum(window) / len(window) if window else 0.0), len(window)

    def totals(self, model: str, version: int) -> tuple[float, int]:
        """(sum of outcomes, outcomes) since ``restart`` was last called for this version."""
        with self._lock:
            correct, labelled = self._totals.get((model, version), [0.0, 0])
            return correct, int(labelled)

    def restart(self, model: str, version: int) -> None:
        """Start counting ``version`` afresh (a canary compares both versions over the same period)."""
        with self._lock:
            self._totals[(model, version)] = [0.0, 0]


def _outcomes(prediction: Prediction, labels: Sequence[int]) -> list[float]:
    if prediction.classes is None:
        raise InvalidRequest(
            f"labels: version {prediction.version} answered this request without classes to compare them with "
            "(a generation, or logits not shaped [batch, classes]); give a score or thumbs"
        )
    if len(labels) != len(prediction.classes):
        raise InvalidRequest(f"labels: the request had {len(prediction.classes)} rows, got {len(labels)} labels")
    return [float(predicted == label) for predicted, label in zip(prediction.classes, labels, strict=True)]


@dataclass(frozen=True)
class Verdict:
    decision: str | None
    """``promote``, ``rollback``, or None while undecided."""
    line: str


def decide(canary: Canary, candidate: tuple[float, int], active: tuple[float, int]) -> Verdict:
    """The canary's fate from (sum of outcomes, outcomes) of the candidate and of the active version."""
    (c_ok, c_n), (a_ok, a_n) = candidate, active
    if c_n >= canary.max_samples and a_n == 0:
        return Verdict("rollback", f"undecided after {c_n} outcomes: the active version got none to compare with")
    needed = min(canary.min_samples, MIN_LABELS)
    if c_n < needed or a_n < needed:
        return Verdict(None, f"waiting for feedback (canary {c_n}, active {a_n} outcomes; {needed} each before any decision)")
    p_c, p_a = c_ok / c_n, a_ok / a_n
    pooled = (c_ok + a_ok) / (c_n + a_n)
    se = math.sqrt(pooled * (1 - pooled) * (1 / c_n + 1 / a_n))
    z = (p_c - p_a) / se if se > 0 else 0.0
    p_worse = 0.5 * (1 + math.erf(z / math.sqrt(2)))  # P(Z <= z): small when the canary looks worse
    line = f"canary {p_c:.4f} ({c_n} outcomes) vs active {p_a:.4f} ({a_n} outcomes): z {z:+.2f}, one-sided p {p_worse:.4f}"
    if p_worse < canary.alpha:
        return Verdict("rollback", f"worse at level {canary.alpha:g}: {line}")
    if c_n >= canary.min_samples and a_n >= canary.min_samples and p_c >= p_a - canary.margin:
        return Verdict("promote", f"not worse (margin {canary.margin:g}): {line}")
    if c_n >= canary.max_samples:
        return Verdict("rollback", f"undecided after {c_n} outcomes: {line}")
    return Verdict(None, line)
