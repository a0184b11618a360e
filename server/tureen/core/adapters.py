"""LoRA adapters (PEFT's format) as ingredients: base + scale * B @ A, one tensor at a time.

An adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors``, whose
tensors are named after the base model's modules under ``base_model.model.``:

- ``M.lora_A.weight`` [r, in] and ``M.lora_B.weight`` [out, r] for a linear module ``M``, whose
  weight becomes ``W + scale * B @ A`` (transposed with ``fan_in_fan_out``, as GPT-2's Conv1D
  stores it);
- ``M.lora_embedding_A`` [r, num] and ``M.lora_embedding_B`` [dim, r] for an embedding, whose
  weight becomes ``W + scale * (B @ A)^T``;
- any other tensor (``modules_to_save``, trained biases, a resized ``M.base_layer.weight``)
  replaces the base's tensor of the same name.

``scale`` is ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``), per module when
``rank_pattern`` or ``alpha_pattern`` say so. The sum is computed as PEFT's
``merge_and_unload`` computes it: ``B @ A`` times the scale, in float32 for 16-bit weights on a
CPU, rounded to the weight's dtype, then added to the weight in its dtype. The adapted
checkpoint is never written anywhere: a merge asks for one tensor, and gets it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from tureen.core.checkpoints import SafetensorsFile
from tureen.errors import IngredientCorrupt, IngredientMismatch, IngredientMissing

PREFIX = "base_model.model."
REFUSED = {
    "use_dora": "DoRA adapters",
    "layer_replication": "adapters with layer_replication",
    "trainable_token_indices": "adapters with trainable_token_indices",
    "target_parameters": "adapters on target_parameters",
    "lora_bias": "adapters with lora_bias",
}


@dataclass(frozen=True)
class Lora:
    """One module's low-rank update."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float
    transpose: bool
    """The weight is stored [in, out] (``fan_in_fan_out``), or the module is an embedding."""

    def delta(self, device: torch.device) -> torch.Tensor:
        """``scale * B @ A`` in float32, shaped as the weight: the update itself, unrounded."""
        product = self.b.to(device).float() @ self.a.to(device).float()
        return (product.T if self.transpose else product).mul_(self.scale)

    def apply(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight + scale * B @ A`` as PEFT's merge computes it: the product in the factors'
        dtype (float32 on a CPU for 16-bit factors, rounded back), added in the wider dtype of the
        two and rounded to the weight's."""
        a, b = self.a.to(weight.device), self.b.to(weight.device)
        dtype = b.dtype
        if weight.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
            a, b = a.float(), b.float()
        product = b @ a
        delta = ((product.T if self.transpose else product) * self.scale).to(dtype)
        return torch.add(weight, delta).to(weight.dtype)


@dataclass(frozen=True)
class Adapter:
    """A loaded adapter: updates and replacements by the base's tensor names."""

    folder: str
    loras: Mapping[str, Lora]
    replaced: Mapping[str, torch.Tensor]

    @property
    def nbytes(self) -> int:
        tensors = [t for lora in self.loras.values() for t in (lora.a, lora.b)] + list(self.replaced.values())
        return sum(t.numel() * t.element_size() for t in tensors)


def load_adapter(folder: Path, where: str) -> Adapter:
    """Read and check ``folder``'s config and tensors (not yet against a base)."""
    config = _config(folder, where)
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise IngredientMissing(f"{where}: no adapter_model.safetensors in the adapter folder")
    file = SafetensorsFile.open(weights, where)
    tensors = {name: file.read(name) for name in file.entries}
    if any(not name.startswith(PREFIX) for name in tensors):
        bad = next(name for name in tensors if not name.startswith(PREFIX))
        raise IngredientCorrupt(f"{where}: tensor {bad!r} is not named base_model.model.* as PEFT saves adapters")
    factors: dict[str, dict[str, torch.Tensor]] = {}
    replaced = {}
    for name, tensor in tensors.items():
        module, part = _split(name[len(PREFIX) :])
        if part is None:
            replaced[name[len(PREFIX) :].replace(".base_layer.", ".")] = tensor
        else:
            factors.setdefault(module, {})[part] = tensor
    loras = {f"{module}.weight": _lora(module, parts, config, where) for module, parts in factors.items()}
    return Adapter(str(folder), loras, replaced)


def _config(folder: Path, where: str) -> dict[str, object]:
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
    except FileNotFoundError:
        raise IngredientMissing(f"{where}: no adapter_config.json in the adapter folder") from None
    except (OSError, ValueError):
        raise IngredientCorrupt(f"{where}: adapter_config.json is not readable JSON") from None
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        raise IngredientCorrupt(f"{where}: adapter_config.json does not describe a LoRA adapter (peft_type LORA)")
    for field, what in REFUSED.items():
        if config.get(field):
            raise IngredientCorrupt(f"{where}: {what} are not supported (adapter_config.json: {field})")
    for field in ("r", "lora_alpha"):
        if not isinstance(config.get(field), int | float) or config[field] <= 0:
            raise IngredientCorrupt(f"{where}: adapter_config.json: {field} must be a positive number")
    return config


def _split(name: str) -> tuple[str, str | None]:
    """(module, "A" | "B" | "EA" | "EB") for a LoRA factor's name, else (name, None)."""
    for suffix, part in ((".lora_A.weight", "A"), (".lora_B.weight", "B")):
        if name.endswith(suffix):
            return name[: -len(suffix)], part
    for suffix, part in ((".lora_embedding_A", "EA"), (".lora_embedding_B", "EB")):
        if name.endswith(suffix):
            return name[: -len(suffix)], part
    return name, None


def _lora(module: str, parts: Mapping[str, torch.Tensor], config: Mapping[str, object], where: str) -> Lora:
    embedding = "EA" in parts or "EB" in parts
    a, b = (parts.get("EA"), parts.get("EB")) if embedding else (parts.get("A"), parts.get("B"))
    if a is None or b is None or a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
        raise IngredientCorrupt(f"{where}: module {module!r} lacks a matching pair of LoRA factors (A [r, in], B [out, r])")
    rank = _pattern(config.get("rank_pattern"), module, config["r"])
    alpha = _pattern(config.get("alpha_pattern"), module, config["lora_alpha"])
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return Lora(a, b, float(scale), transpose=embedding or bool(config.get("fan_in_fan_out")))


def _pattern(patterns: object, module: str, default: object) -> float:
    """A ``rank_pattern`` / ``alpha_pattern`` value for ``module`` (PEFT matches a key against the
    module name's tail), else the default."""
    for key, value in (patterns or {}).items() if isinstance(patterns, dict) else ():
        if re.fullmatch(rf"(.*\.)?({key})", module):
            return float(value)
    return float(default)  # type: ignore[arg-type]


class AdaptedTensors(Mapping[str, torch.Tensor]):
    """The tensors of base + adapter: each computed when looked up (the last one is kept, so a
    merge reading one tensor piece by piece computes it once). ``exact``: updated tensors are
    ``base + scale * B @ A`` in float32, not rounded to the weight's dtype as PEFT's merge
    rounds them, so that a task vector against the same base is the update itself."""

    def __init__(
        self,
        base: Mapping[str, torch.Tensor],
        layout: Mapping[str, torch.Tensor],
        adapter: Adapter,
        device: torch.device,
        exact: bool = False,
    ) -> None:
        self._base, self._layout, self._adapter, self._device = base, layout, adapter, device
        self.exact = exact
        self._last: tuple[str, torch.Tensor] | None = None

    def exactly(self) -> AdaptedTensors:
        """The same tensors with updates unrounded (see the class docstring)."""
        return AdaptedTensors(self._base, self._layout, self._adapter, self._device, exact=True)

    def __getitem__(self, key: str) -> torch.Tensor:
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        adapter = self._adapter
        # A saved base layer (an embedding PEFT saved whole) replaces the base's before its update.
        tensor = (adapter.replaced[key] if key in adapter.replaced else self._base[key]).to(self._device)
        if key in adapter.loras:
            lora = adapter.loras[key]
            tensor = tensor.float() + lora.delta(tensor.device) if self.exact else lora.apply(tensor)
        self._last = (key, tensor)
        return tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self._layout)

    def __len__(self) -> int:
        return len(self._layout)


def check_fits(adapter: Adapter, layout: Mapping[str, torch.Tensor], where: str, base: str) -> None:
    """Every tensor the adapter changes must be one of the base's, of the shape it makes."""
    for key, lora in adapter.loras.items():
        if key not in layout:
            raise IngredientMismatch(f"{where}: the adapter updates {key!r}, which base {base!r} does not have")
        out = (lora.b.shape[0], lora.a.shape[1])
        shape = tuple(layout[key].shape)
        if (out[::-1] if lora.transpose else out) != shape:
            raise IngredientMismatch(
                f"{where}: the adapter's update of {key!r} is {list(out[::-1] if lora.transpose else out)}, "
                f"base {base!r} has {list(shape)}: the adapter was trained on another base"
            )
    for key, tensor in adapter.replaced.items():
        if key not in layout:
            raise IngredientMismatch(f"{where}: the adapter replaces {key!r}, which base {base!r} does not have")
        if tuple(tensor.shape) != tuple(layout[key].shape):
            raise IngredientMismatch(
                f"{where}: the adapter's {key!r} is {list(tensor.shape)}, base {base!r} has {list(layout[key].shape)}"
            )
