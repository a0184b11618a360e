"""Blends and the repository that says which blend serves each model.

The swap is one reference assignment under a lock. A request holds the ``Blend`` it got from
``active()`` for its whole life, so it finishes on that blend even if another is swapped in,
and the old blend's memory goes when its last request drops the reference.
"""

from __future__ import annotations

import random
import threading
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tureen.core.architecture import outputs_by_name
from tureen.core.observer import Observer
from tureen.core.signature import Signature
from tureen.errors import ArchitectureError, BlendNotReady, InvalidRequest, ModelNotFound, SoupError
from tureen.spec import SoupSpec, name_problem


@dataclass(frozen=True, eq=False)
class Blend:
    """The single module built from one spec version; serving it costs one forward pass."""

    model: str
    version: int
    module: nn.Module
    signature: Signature
    device: torch.device
    dtype: torch.dtype
    nbytes: int
    build_seconds: float
    spec: SoupSpec
    copy_inputs: bool = False
    """Set when warm-up saw ``forward`` write into its inputs, which are views of request bytes."""
    checksums: Mapping[str, str] = field(default_factory=dict)
    """sha256 of each ingredient it was merged from whose spec pins one, by ingredient name."""
    placement: str = ""
    """Where its ingredients live between merges (device, host or disk)."""
    weights: Mapping[str, torch.Tensor] = field(default_factory=dict, repr=False)
    """The merged tensors (views of one buffer) that ``module`` holds; a later build may reuse them."""
    resolution: Mapping[str, Any] | None = None
    """For a searched recipe: the merge section it resolved to, and the search's log."""
    evaluation: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    """Scores on each evaluation split, by split then metric."""
    ingredient_evaluation: Mapping[str, Mapping[str, Mapping[str, float]]] = field(default_factory=dict)
    """Each ingredient's scores alone, by ingredient, split, metric."""

    def prepare(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Move inputs to the blend's device; floating inputs take the blend's dtype."""
        prepared = {}
        for name, tensor in inputs.items():
            moved = tensor
            if moved.is_floating_point() and moved.dtype != self.dtype:
                moved = moved.to(self.dtype)
            moved = moved.to(self.device, non_blocking=True)
            if self.copy_inputs and moved is tensor:
                moved = moved.clone()
            prepared[name] = moved
        return prepared

    def forward(self, prepared: Mapping[str, torch.Tensor]) -> Any:
        with torch.inference_mode():
            return self.module(**prepared)

    def collect(self, result: Any, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """Pick the requested outputs, cast to the interface's datatypes, on the CPU."""
        produced = outputs_by_name(result, tuple(self.signature.outputs))
        collected = {}
        for name in names:
            slot = self.signature.outputs[name]
            tensor = produced.get(name)
            if not isinstance(tensor, torch.Tensor):
                raise ArchitectureError(f"forward produced no tensor for output {name!r}")
            collected[name] = tensor.to(device="cpu", dtype=slot.dtype)
        return collected

    def predicted_classes(self, result: Any) -> list[int] | None:
        """The class each row of a classification forward predicts (argmax of the logits output),
        or None for models that are not scored as classifiers."""
        evaluation = self.spec.evaluation
        if evaluation is not None and evaluation.task_of(evaluation.selected) != "classification":
            return None
        name = evaluation.output if evaluation is not None and evaluation.output else next(iter(self.signature.outputs))
        logits = outputs_by_name(result, tuple(self.signature.outputs)).get(name)
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2:  # [batch, classes] only: never token logits
            return None
        return [int(c) for c in logits.argmax(dim=-1).reshape(-1).tolist()]


@dataclass(frozen=True)
class CanaryRoute:
    """A candidate blend taking ``percent`` of a model's traffic beside the active one."""

    blend: Blend
    percent: float
    sticky: str | None = None
    """A request parameter whose value picks the blend: the same value, the same blend."""

    def takes(self, parameters: Mapping[str, str]) -> bool:
        key = parameters.get(self.sticky) if self.sticky else None
        if key is not None:
            return zlib.crc32(key.encode()) % 10_000 < self.percent * 100
        return random.random() * 100 < self.percent


class BlendRepository:
    """Which blend serves each model right now (and which candidate, during a canary)."""

    def __init__(self, observer: Observer) -> None:
        self._observer = observer
        self._canaries: dict[str, CanaryRoute] = {}
        self._active: dict[str, Blend | None] = {}
        self._expected: set[str] = set()
        self._lock = threading.Lock()
        self._listeners: list[Callable[[], None]] = []

    def declare(self, model: str, expected: bool = False) -> None:
        """Make ``model`` known before it has a blend: requests get UNAVAILABLE, not NOT_FOUND.

        ``expected``: the server is not ready until it serves (a model active at start-up). Any
        model becomes expected once it first serves; a model pushed later does not hold up a
        server that already serves others while its first blend builds.
        """
        with self._lock:
            changed = model not in self._active or (expected and model not in self._expected)
            self._active.setdefault(model, None)
            if expected:
                self._expected.add(model)
        if changed:  # the store watcher declares every model on every poll: only news is told
            self._notify()

    def swap(self, blend: Blend) -> Blend | None:
        """Make ``blend`` the one serving its model; return the blend it replaced."""
        with self._lock:
            previous = self._active.get(blend.model)
            self._active[blend.model] = blend
            self._expected.add(blend.model)
        self._observer.blend_activated(blend.model, blend.version, blend.nbytes)
        self._notify()
        return previous

    def unload(self, model: str, pause: bool = False) -> Blend | None:
        """Stop serving ``model`` (it stays declared: requests get UNAVAILABLE); return its blend.
        ``pause``: it comes back soon (an in-place swap), and the server is not ready meanwhile."""
        with self._lock:
            previous = self._active.get(model)
            if model in self._active:
                self._active[model] = None
            if not pause:
                self._expected.discard(model)
        self._notify()
        return previous

    def active(self, model: str, version: str = "") -> Blend:
        """The blend serving ``model``; ``version`` ("" = any) must match when given. The canary's
        version names the canary's blend (its metadata, config and statistics are asked for too)."""
        canary = self._canaries.get(model)
        if version and canary is not None and version == str(canary.blend.version):
            return canary.blend
        try:
            blend = self._active[model]
        except KeyError:
            if (problem := name_problem(model)) is not None:  # never a model here; and not echoed back whole
                raise InvalidRequest(f"model: {problem}") from None
            raise ModelNotFound(f"model {model!r} is not served here") from None
        if blend is None:
            raise BlendNotReady(f"model {model!r} has no ready blend yet")
        if version and version != str(blend.version):
            raise ModelNotFound(f"model {model!r} version {version} is not loaded (serving version {blend.version})")
        return blend

    def route(self, model: str, version: str = "", parameters: Mapping[str, str] | None = None) -> Blend:
        """The blend a request goes to: the canary for its share of requests, else the active one.
        A request naming a version gets that version, the canary's included."""
        canary = self._canaries.get(model)
        if canary is not None and not version and canary.takes(parameters or {}):
            return canary.blend
        return self.active(model, version)

    def start_canary(self, route: CanaryRoute) -> CanaryRoute | None:
        """Send ``route.percent`` of its model's traffic to ``route.blend``; return the canary it replaced."""
        with self._lock:
            previous = self._canaries.get(route.blend.model)
            self._canaries[route.blend.model] = route
        self._observer.canary_changed(route.blend.model, route.blend.version, route.percent)
        self._notify()
        return previous

    def end_canary(self, model: str) -> CanaryRoute | None:
        """Stop the model's canary (all traffic to the active blend); return it."""
        with self._lock:
            route = self._canaries.pop(model, None)
        if route is not None:
            self._observer.canary_changed(model, 0, 0.0)
            self._notify()
        return route

    def canary(self, model: str) -> CanaryRoute | None:
        return self._canaries.get(model)

    def models(self) -> dict[str, Blend | None]:
        """A snapshot: every declared model and its active blend, if any."""
        with self._lock:
            return dict(self._active)

    def index(self, ready_only: bool = False) -> list[tuple[str, str, str, str]]:
        """Triton's repository index: (name, version, state, reason) of every declared model."""
        rows = []
        for name, blend in sorted(self.models().items()):
            if blend is not None:
                rows.append((name, str(blend.version), "READY", ""))
            elif not ready_only:
                rows.append((name, "", "UNAVAILABLE", "no active blend"))
        return rows

    def is_ready(self, model: str, version: str = "") -> bool:
        try:
            self.active(model, version)
        except SoupError:
            return False
        return True

    def all_ready(self) -> bool:
        """True when every expected model has a blend (see ``declare``; vacuously true with none):
        the models active at start-up are built, and none is paused by an in-place swap."""
        with self._lock:
            return all(self._active.get(model) is not None for model in self._expected)

    def subscribe(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` after every declare and swap (health status follows this)."""
        self._listeners.append(listener)
        listener()

    def _notify(self) -> None:
        for listener in list(self._listeners):
            listener()
