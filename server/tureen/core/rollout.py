"""Rollouts decided by accuracy: the evaluation gate, and canaries judged on labelled traffic.

The gate compares a candidate's held-out metric with the active version's before any traffic
reaches it. A canary then takes a share of live requests; applications report true labels
for request ids (Feedback), and each version's online accuracy decides the canary:

- nothing is decided before each version has ``min(min_samples, 30)`` labels: one wrong answer
  out of one is no evidence;
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

from tureen.errors import GateRejected
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
    """What a version answered for one request id, remembered until its labels come back."""

    version: int
    classes: tuple[int, ...]


class OnlineAccuracy:
    """Predictions by request id, labels that come back for them, and accuracy per version."""

    def __init__(self, remembered: int = REMEMBERED_REQUESTS, window: int = ROLLING_WINDOW) -> None:
        self._predictions: OrderedDict[tuple[str, str], Prediction] = OrderedDict()
        self._remembered = remembered
        self._window = window
        self._rolling: dict[tuple[str, int], deque[bool]] = {}
        self._totals: dict[tuple[str, int], list[int]] = {}  # correct, labelled: since counting began
        self._lock = threading.Lock()

    def predicted(self, model: str, request_id: str, version: int, classes: Sequence[int]) -> None:
        with self._lock:
            self._predictions[(model, request_id)] = Prediction(version, tuple(classes))
            self._predictions.move_to_end((model, request_id))
            while len(self._predictions) > self._remembered:
                self._predictions.popitem(last=False)

    def labelled(self, model: str, request_id: str, labels: Sequence[int]) -> Prediction | None:
        """Score the prediction made for ``request_id``; None when it is unknown (or forgotten).
        Each prediction is scored once. Raises ``ValueError`` (keeping the prediction for a
        corrected retry) when the labels do not match its rows."""
        with self._lock:
            prediction = self._predictions.get((model, request_id))
            if prediction is None:
                return None
            if len(labels) != len(prediction.classes):
                raise ValueError(f"the request had {len(prediction.classes)} rows, got {len(labels)} labels")
            del self._predictions[(model, request_id)]
            key = (model, prediction.version)
            rolling = self._rolling.setdefault(key, deque(maxlen=self._window))
            totals = self._totals.setdefault(key, [0, 0])
            for predicted, label in zip(prediction.classes, labels, strict=True):
                rolling.append(predicted == label)
                totals[0] += int(predicted == label)
                totals[1] += 1
            return prediction

    def rolling(self, model: str, version: int) -> tuple[float, int]:
        """(accuracy, labelled samples) over the last window of labelled requests."""
        with self._lock:
            window = self._rolling.get((model, version), deque())
            return (sum(window) / len(window) if window else 0.0), len(window)

    def totals(self, model: str, version: int) -> tuple[int, int]:
        """(correct, labelled) since ``restart`` was last called for this version."""
        with self._lock:
            correct, labelled = self._totals.get((model, version), [0, 0])
            return correct, labelled

    def restart(self, model: str, version: int) -> None:
        """Start counting ``version`` afresh (a canary compares both versions over the same period)."""
        with self._lock:
            self._totals[(model, version)] = [0, 0]


@dataclass(frozen=True)
class Verdict:
    decision: str | None
    """``promote``, ``rollback``, or None while undecided."""
    line: str


def decide(canary: Canary, candidate: tuple[int, int], active: tuple[int, int]) -> Verdict:
    """The canary's fate from (correct, labelled) of the candidate and of the active version."""
    (c_ok, c_n), (a_ok, a_n) = candidate, active
    if c_n >= canary.max_samples and a_n == 0:
        return Verdict("rollback", f"undecided after {c_n} labels: the active version got none to compare with")
    needed = min(canary.min_samples, MIN_LABELS)
    if c_n < needed or a_n < needed:
        return Verdict(None, f"waiting for labels (canary {c_n}, active {a_n}; {needed} each before any decision)")
    p_c, p_a = c_ok / c_n, a_ok / a_n
    pooled = (c_ok + a_ok) / (c_n + a_n)
    se = math.sqrt(pooled * (1 - pooled) * (1 / c_n + 1 / a_n))
    z = (p_c - p_a) / se if se > 0 else 0.0
    p_worse = 0.5 * (1 + math.erf(z / math.sqrt(2)))  # P(Z <= z): small when the canary looks worse
    line = f"canary {p_c:.4f} ({c_n} labels) vs active {p_a:.4f} ({a_n} labels): z {z:+.2f}, one-sided p {p_worse:.4f}"
    if p_worse < canary.alpha:
        return Verdict("rollback", f"worse at level {canary.alpha:g}: {line}")
    if c_n >= canary.min_samples and a_n >= canary.min_samples and p_c >= p_a - canary.margin:
        return Verdict("promote", f"not worse (margin {canary.margin:g}): {line}")
    if c_n >= canary.max_samples:
        return Verdict("rollback", f"undecided after {c_n} labels: {line}")
    return Verdict(None, line)
