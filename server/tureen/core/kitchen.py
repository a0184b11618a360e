"""The kitchen turns a spec into a blend: load ingredients, check them, merge, warm up.

Everything happens off the request path into fresh buffers; nothing that serves is touched
until the repository swaps the finished blend in.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from tureen.core.architecture import aliases, instantiate, retie
from tureen.core.blends import Blend
from tureen.core.datatypes import BLEND_DTYPES
from tureen.core.evaluation import Evaluator, Scores
from tureen.core.ingredients import Ingredient, IngredientPool
from tureen.core.observer import Observer
from tureen.core.prepare import Prepared, prepare
from tureen.core.recipe import Sink, mix
from tureen.core.search import Resolution, needs_search, resolved_spec, search
from tureen.core.slices import parts
from tureen.errors import ArchitectureError, MergeError, OutOfMemory, SoupError, SpecInvalid
from tureen.merge.kernels import Kernels
from tureen.spec import Architecture, SoupSpec

_log = logging.getLogger("tureen.kitchen")

Progress = Callable[[str, float], None]
"""Told the stage a build is in and about how far along it is, from 0 to 1."""


class MemoryBudget(Protocol):
    """What memory a build may take (``Residency.budget`` offers one per model and version)."""

    def donor(self) -> Mapping[str, torch.Tensor] | None:
        """Weights of a retired blend no request uses any more, handed over once the ingredients
        are loaded and checked: when their layout fits, the merge writes there (no new memory)."""

    def room(self, nbytes: int) -> None:
        """Raise ``OutOfMemory`` if a new blend of ``nbytes`` would not fit beside those held."""


class Kitchen:
    """Builds blends from specs with ingredients from one pool (and so on one device)."""

    def __init__(self, pool: IngredientPool, observer: Observer, kernels: Kernels = "auto") -> None:
        """``kernels``: merge with the compiled kernels, eagerly, or as the merge's size suggests."""
        self.pool = pool
        self._observer = observer
        self.kernels: Kernels = kernels

    def merge(self, spec: SoupSpec, tokenizer_to: Path | None = None, sink: Sink | None = None) -> dict[str, torch.Tensor]:
        """The merged state dict alone, checked across ingredients only (no architecture needed,
        except by a searched recipe, which runs the model on its evaluation data). With
        ``tokenizer_to``, a spec's ``tokenizer`` (the blend's vocabulary) is saved in that folder;
        ``sink`` hears of each tensor as it is final (``tureen merge`` writes it meanwhile)."""
        searched = needs_search(spec)
        if searched and (spec.architecture is None or spec.evaluation is None):
            raise SpecInvalid([f"architecture: merge.method {spec.merge.method!r} runs the model; give an architecture"])
        prepared = prepare(spec, self.pool, module=searched)
        if searched:
            assert prepared.evaluator is not None
            found = run_search(spec, prepared.ingredients, self.pool.device, prepared.evaluator, _stage(None, 0.0, 1.0))
            spec = resolved_spec(spec, found.merge)
        merged = mix(spec, prepared.ingredients, kernels=self.kernels, sink=sink)
        if tokenizer_to is not None and prepared.vocabulary is not None:
            prepared.vocabulary.save(tokenizer_to)
        return merged

    def build(
        self,
        spec: SoupSpec,
        version: int,
        progress: Progress | None = None,
        budget: MemoryBudget | None = None,
        resolution: Mapping[str, Any] | None = None,
    ) -> Blend:
        """Build the blend of ``spec`` as ``version``; raises a ``SoupError`` naming what is wrong.

        ``progress(stage, fraction)`` hears where the build is, for status reports. ``budget``
        says what memory the blend may take (``MemoryBudget``). A searched recipe (greedy,
        learned, a grid) is searched here unless ``resolution`` (what an earlier build of this
        version settled on) is given; the blend carries the resolution and, when the spec has an
        evaluation section, its scores and its ingredients' scores.
        """
        started = time.perf_counter()
        if spec.architecture is None:
            raise SpecInvalid(["architecture: required to serve a model (only `tureen merge` works without one)"])
        prepared = prepare(spec, self.pool, progress)
        recipe, resolution = self._recipe(prepared, resolution, progress)
        start = 0.8 if resolution else 0.6
        if progress is not None:
            progress("merging", start)
        merged = self._merge(recipe, prepared.ingredients, budget, _stage(progress, start, 0.9 - start))
        if progress is not None:
            progress("warming up", 0.9)
        assert prepared.skeleton is not None and prepared.signature is not None
        device = self.pool.device
        blend = Blend(
            model=spec.model,
            version=version,
            module=_materialize(spec.architecture, prepared.skeleton, merged, device),
            signature=prepared.signature,
            device=device,
            dtype=BLEND_DTYPES[spec.dtype],
            nbytes=sum(t.numel() * t.element_size() for t in merged.values()),
            build_seconds=time.perf_counter() - started,
            spec=spec,
            checksums={name: i.digest for name, i in prepared.ingredients.items() if i.digest is not None},
            placement=",".join(sorted({i.placement for i in prepared.ingredients.values()})),
            weights=merged,
            resolution=resolution,
        )
        blend = _warm_up(blend)
        if prepared.evaluator is not None:
            if progress is not None:
                progress("evaluating", 0.95)
            blend = _evaluate(blend, prepared.evaluator, prepared.ingredients, spec)
            blend = replace(blend, build_seconds=time.perf_counter() - started)
            self._observer.blend_evaluated(spec.model, version, blend.evaluation, blend.ingredient_evaluation)
        self._observer.blend_built(spec.model, version, blend.build_seconds)
        _log.info("model %s: version %d built in %.2f s", spec.model, version, blend.build_seconds)
        return blend

    def _recipe(
        self, prepared: Prepared, resolution: Mapping[str, Any] | None, progress: Progress | None
    ) -> tuple[SoupSpec, Mapping[str, Any] | None]:
        """The spec to merge by: the spec itself, or a searched one resolved (searching unless an
        earlier build's ``resolution`` says what it settled on)."""
        spec = prepared.spec
        if not needs_search(spec):
            return spec, resolution
        assert prepared.evaluator is not None  # the spec requires an evaluation section for a search
        if resolution is None:
            found = run_search(spec, prepared.ingredients, self.pool.device, prepared.evaluator, _stage(progress, 0.6, 0.2))
            resolution = {"merge": found.merge, "log": found.log}
        return resolved_spec(spec, resolution["merge"]), resolution

    def _merge(
        self,
        recipe: SoupSpec,
        ingredients: Mapping[str, Ingredient],
        budget: MemoryBudget | None,
        progress: Progress | None = None,
    ) -> dict[str, torch.Tensor]:
        """Merge into the budget's donor when its layout fits, else into new memory the budget has room for."""
        try:
            into = budget.donor() if budget is not None else None
            if into is not None:
                try:
                    return mix(recipe, ingredients, kernels=self.kernels, into=into, progress=progress)
                except ValueError:  # another layout (architecture or dtype changed): fresh memory
                    pass
            if budget is not None:
                budget.room(_blend_bytes(recipe, ingredients))
            return mix(recipe, ingredients, kernels=self.kernels, progress=progress)
        except (MemoryError, torch.OutOfMemoryError) as exc:
            raise OutOfMemory(f"merging the blend ran out of memory on {self.pool.device}: {exc}") from None


def _evaluate(blend: Blend, evaluator: Evaluator, ingredients: Mapping[str, Ingredient], spec: SoupSpec) -> Blend:
    """Score the blend on every split, and each ingredient alone when the spec asks."""
    scores = evaluator.score_all(evaluator.module_forward(blend.module))
    alone: dict[str, dict[str, Scores]] = {}
    if evaluator.evaluation.ingredients and spec.merge.slices is None:  # a sliced blend's module fits no ingredient
        probe = probe_module(spec.architecture, blend.device)  # type: ignore[arg-type]
        for ref in spec.ingredients:
            alone[ref.name] = evaluator.score_all(evaluator.functional_forward(probe, ingredients[ref.name].tensors))
    for split, values in scores.items():
        _log.info(
            "model %s: version %d on %r: %s",
            blend.model,
            blend.version,
            split,
            ", ".join(f"{k} {v:.4f}" for k, v in values.items()),
        )
    return replace(blend, evaluation=scores, ingredient_evaluation=alone)


def run_search(
    spec: SoupSpec, ingredients: Mapping[str, Ingredient], device: torch.device, evaluator: Evaluator, report: Progress
) -> Resolution:
    """Run the spec's search (greedy, learned, a grid); failures of the search itself come back as
    ``SoupError``s naming the method, never as tracebacks."""
    assert spec.architecture is not None
    try:
        return search(spec, ingredients, probe_module(spec.architecture, device), evaluator, report)
    except SoupError:
        raise
    except (MemoryError, torch.OutOfMemoryError) as exc:
        raise OutOfMemory(f"merge.method {spec.merge.method!r}: the search ran out of memory on {device}: {exc}") from None
    except Exception as exc:  # a diverging learned soup, an architecture that cannot run functionally...
        raise MergeError(f"merge.method {spec.merge.method!r}: the search failed: {exc}") from None


def probe_module(arch: Architecture, device: torch.device) -> nn.Module:
    """A module to run functionally with other weights: free on the meta device unless it keeps
    buffers outside its state dict, which the supplied weights would not cover."""
    skeleton = instantiate(arch, "meta")
    return instantiate(arch, device).eval() if _loose_buffers(skeleton) else skeleton.eval()


def _loose_buffers(module: nn.Module) -> bool:
    """Whether ``module`` keeps buffers outside its state dict (no merged or supplied value fills them)."""
    persistent = set(module.state_dict())
    return any(name not in persistent for name, _ in module.named_buffers())


def _stage(progress: Progress | None, start: float, width: float) -> Callable[[str, float], None]:
    def report(line: str, fraction: float) -> None:
        _log.info("%s", line)
        if progress is not None:
            progress(line, start + width * fraction)

    return report


def _blend_bytes(spec: SoupSpec, ingredients: Mapping[str, Ingredient]) -> int:
    """The size of the blend ``mix`` would allocate: the spec's dtype for floating tensors."""
    itemsize = BLEND_DTYPES[spec.dtype].itemsize
    source = [t for part in parts(spec, ingredients) for t in part.layout.values()]
    return sum(t.numel() * (itemsize if t.is_floating_point() else t.element_size()) for t in source)


def _materialize(arch: Architecture, skeleton: nn.Module, merged: dict[str, torch.Tensor], device: torch.device) -> nn.Module:
    # The skeleton was built on the meta device so that big models cost no init time or memory;
    # merged tensors are assigned into it. Buffers outside the state dict have no merged value,
    # so such modules are built again with their buffers on the device, parameters still on meta.
    module = instantiate(arch, device, parameters_on_meta=True) if _loose_buffers(skeleton) else skeleton
    tied = aliases(module)
    result = module.load_state_dict(merged, strict=False, assign=True)
    unexpected = list(result.unexpected_keys) + [k for k in result.missing_keys if k not in tied]
    if unexpected:
        raise ArchitectureError(f"architecture: the merged state does not fit the module at {unexpected[0]!r}")
    retie(module, tied)  # assignment replaced the shared parameter; its other names follow it again
    leftovers = [name for name, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if leftovers:
        raise ArchitectureError(f"architecture: tensor {leftovers[0]!r} was not filled by the merge")
    return module.requires_grad_(False).eval()


def _warm_up(blend: Blend) -> Blend:
    """One forward on a zero batch: the blend must work, and fit its interface, before it serves.

    Requests hand ``forward`` read-only views of their bytes; a forward seen writing into its
    inputs here gets private copies of them on every request instead.
    """
    zeros = {
        slot.name: torch.zeros([1 if dim == -1 else dim for dim in slot.shape], dtype=slot.dtype)
        for slot in blend.signature.inputs.values()
    }
    try:
        prepared = blend.prepare(zeros)
        versions = {name: tensor._version for name, tensor in prepared.items()}
        outputs = blend.collect(blend.forward(prepared), tuple(blend.signature.outputs))
    except SoupError:
        raise
    except Exception as exc:
        raise ArchitectureError(f"interface: a forward pass on a zero batch shaped by the interface failed: {exc}") from None
    for name, tensor in outputs.items():
        slot = blend.signature.outputs[name]
        expected = list(slot.shape)
        if blend.signature.max_batch_size > 0:
            expected[0] = 1  # the zero batch has one row; other -1 dimensions accept any size
        got = list(tensor.shape)
        if len(got) != len(expected) or any(w not in (-1, g) for w, g in zip(expected, got, strict=True)):
            raise ArchitectureError(
                f"interface.outputs: {name!r} is declared {list(slot.shape)} but a batch of 1 gave shape {got}"
            )
    if any(tensor._version != versions[name] for name, tensor in prepared.items()):
        _log.warning("model %s: forward writes into its inputs; requests will copy them first", blend.model)
        return replace(blend, copy_inputs=True)
    return blend
