"""Building the ``nn.Module`` a blend lives in, and finding the tensor interface it speaks."""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn

from tureen.errors import ArchitectureError
from tureen.spec import Architecture, Interface, SoupSpec, describe


def resolve_factory(arch: Architecture) -> Callable[..., Any]:
    """Import ``module:callable`` without calling it (a HF config's builder for ``huggingface``)."""
    if arch.huggingface is not None:
        from tureen.core import huggingface

        directory, task, config = arch.huggingface, arch.task, dict(arch.config)
        return lambda: huggingface.build(directory, task, config)
    assert arch.factory is not None  # the spec validates that one of the two is given
    module_name, _, attr_path = arch.factory.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as exc:
        raise ArchitectureError(f"architecture.factory: cannot import module {module_name!r}: {exc}") from None
    for attr in attr_path.split("."):
        try:
            target = getattr(target, attr)
        except AttributeError:
            raise ArchitectureError(f"architecture.factory: module {module_name!r} has no {attr_path!r}") from None
    if not callable(target):
        raise ArchitectureError(f"architecture.factory: {arch.factory!r} is not callable")
    return target


def instantiate(arch: Architecture, device: torch.device | str, *, parameters_on_meta: bool = False) -> nn.Module:
    """Call the factory with its kwargs under ``device``; ``meta`` allocates no memory.

    With ``parameters_on_meta``, buffers are made on ``device`` and parameters on the meta
    device (no memory, no init time): for modules whose buffers outside the state dict (rotary
    frequencies, masks) must be real while the weights come from a merge.
    """
    factory = resolve_factory(arch)
    try:
        with torch.device(device), _parameters_on_meta(parameters_on_meta):
            module = factory(**arch.kwargs)
    except ArchitectureError:
        raise
    except Exception as exc:
        raise ArchitectureError(f"architecture: {arch.factory}(**{arch.kwargs}) failed: {exc}") from None
    if not isinstance(module, nn.Module):
        raise ArchitectureError(f"architecture.factory: {arch.factory!r} returned {type(module).__name__}, not an nn.Module")
    return module


@contextlib.contextmanager
def _parameters_on_meta(enabled: bool) -> Iterator[None]:
    """Every parameter registered meanwhile goes to the meta device (as accelerate's
    ``init_empty_weights`` does); buffers stay where they are made."""
    if not enabled:
        yield
        return
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:  # one already on meta keeps its identity: ties stay tied
            param = type(param)(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign, assignment]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def aliases(module: nn.Module) -> dict[str, str]:
    """Parameter names that are a second name for another parameter (tied embeddings), mapped to
    the first name.

    Checkpoints store such a tensor once (Hugging Face drops ``lm_head.weight`` when it is tied
    to the input embeddings), so they are not expected from the ingredients.
    """
    first: dict[int, str] = {}
    tied = {}
    for name, parameter in module.named_parameters(remove_duplicate=False):
        canonical = first.setdefault(id(parameter), name)
        if canonical != name:
            tied[name] = canonical
    return tied


def retie(module: nn.Module, tied: dict[str, str]) -> None:
    """Point each alias at its canonical parameter again, after assignment replaced that one."""
    for alias, canonical in tied.items():
        owner_name, _, leaf = alias.rpartition(".")
        setattr(module.get_submodule(owner_name), leaf, module.get_parameter(canonical))


def interface_of(spec: SoupSpec, module: nn.Module) -> Interface:
    """The spec's ``interface`` when given, else the module's ``tureen_interface`` attribute."""
    if spec.interface is not None:
        return spec.interface
    declared = getattr(module, "tureen_interface", None)
    if declared is None:
        raise ArchitectureError(f"interface: the spec gives none and {type(module).__name__} has no tureen_interface attribute")
    if isinstance(declared, Interface):
        return declared
    try:
        return Interface.model_validate(declared)
    except ValidationError as exc:
        raise ArchitectureError(f"{type(module).__name__}.tureen_interface: " + "; ".join(describe(exc))) from None


def outputs_by_name(result: object, names: tuple[str, ...]) -> Mapping[str, torch.Tensor]:
    """Name what ``forward`` returned: a mapping by key, a tuple by position, a tensor as the only output."""
    if isinstance(result, torch.Tensor):
        if len(names) != 1:
            raise ArchitectureError(f"forward returned one tensor but the interface declares outputs {list(names)}")
        return {names[0]: result}
    if isinstance(result, Mapping):
        return result
    if isinstance(result, (tuple, list)):
        if len(result) < len(names):
            raise ArchitectureError(f"forward returned {len(result)} values for outputs {list(names)}")
        return dict(zip(names, result, strict=False))
    raise ArchitectureError(f"forward returned {type(result).__name__}; expected a tensor, tuple or mapping")
