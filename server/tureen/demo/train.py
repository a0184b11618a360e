"""Train the demo's ingredients once, the way the model soups paper makes its fine-tunes.

A base model is trained briefly on part of scikit-learn's bundled digits (our stand-in for
pre-training); several fine-tunes then continue from it with different learning rates, seeds
and augmentations. The ingredients, held-out splits and a soup spec are written to a cache
directory and reused by later runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from tureen.demo.models import DigitsMLP

_log = logging.getLogger("tureen.demo")

RECIPE = 1  # bump when the training below changes, so stale caches are rebuilt
HIDDEN = 128
SPEC_FILE = "digits.yaml"
GREEDY_SPEC_FILE = "digits-greedy.yaml"
EVALUATION = {
    "splits": {"val": {"path": "val.safetensors"}, "test": {"path": "test.safetensors"}},
    "select": "val",  # searches and gates use val; test is only ever reported
}


@dataclass(frozen=True)
class FineTune:
    name: str
    lr: float
    seed: int
    augment: str  # "none", "noise", "shift" or "noise+shift"
    weight_decay: float = 1e-4
    epochs: int = 30


FINE_TUNES = (
    FineTune("ft-lr1e-3-s1", 1e-3, 1, "none"),
    FineTune("ft-lr3e-3-s2", 3e-3, 2, "noise"),
    FineTune("ft-lr5e-4-s3", 5e-4, 3, "shift"),
    FineTune("ft-lr2e-3-s4", 2e-3, 4, "noise+shift"),
    FineTune("ft-lr1e-3-s5", 1e-3, 5, "shift", weight_decay=1e-2),
)


def default_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "tureen" / "demo"


def prepare(cache_dir: Path) -> Path:
    """Return the demo spec in ``cache_dir``, training its ingredients first if needed."""
    manifest = _cached_manifest(cache_dir)
    if manifest is not None:
        _log.info("demo: reusing the ingredients in %s", cache_dir)
        ingredients = yaml.safe_load((cache_dir / SPEC_FILE).read_text())["ingredients"]
        _write_specs(cache_dir, ingredients)  # specs follow the code; the trained ingredients stay
        return cache_dir / SPEC_FILE
    return _train_all(cache_dir)


def _cached_manifest(cache_dir: Path) -> dict | None:
    """The manifest of a complete cache made by this recipe; None means train again."""
    try:
        manifest = json.loads((cache_dir / "demo.json").read_text())
        names = list(manifest["accuracy"])
        recipe = manifest["recipe"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    files = [SPEC_FILE, "val.safetensors", "test.safetensors", *(f"{name}.safetensors" for name in names)]
    if recipe != RECIPE or not all((cache_dir / name).is_file() for name in files):
        return None
    return manifest


def splits() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Fixed train / val / test splits (60/20/20) of the 1797 bundled digit images."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = torch.tensor(digits.data, dtype=torch.float32)
    labels = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    n_train, n_val = int(0.6 * len(order)), int(0.2 * len(order))
    parts = {"train": order[:n_train], "val": order[n_train : n_train + n_val], "test": order[n_train + n_val :]}
    return {name: (pixels[idx], labels[idx]) for name, idx in parts.items()}


def accuracy(module: nn.Module, pixels: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.inference_mode():
        predicted = module(pixels)["logits"].argmax(dim=-1)
    return float((predicted.cpu() == labels.cpu()).float().mean())


def load_split(cache_dir: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    tensors = load_file(str(cache_dir / f"{split}.safetensors"))
    return tensors["pixels"], tensors["labels"]


def _train_all(cache_dir: Path) -> Path:
    started = time.perf_counter()
    cache_dir.mkdir(parents=True, exist_ok=True)
    data = splits()
    for split in ("val", "test"):
        save_file({"pixels": data[split][0], "labels": data[split][1]}, str(cache_dir / f"{split}.safetensors"))
    train_x, train_y = data["train"]
    test_x, test_y = data["test"]
    _log.info("demo: first run, training a base model and %d fine-tunes on %d images", len(FINE_TUNES), len(train_y))
    torch.manual_seed(0)
    base = DigitsMLP(hidden=HIDDEN)
    # The "pre-training": brief, on half the training images, so fine-tuning has work to do.
    half = len(train_y) // 2
    _fit(base, train_x[:half], train_y[:half], FineTune("base", 1e-3, 0, "none", epochs=3))
    save_file(base.state_dict(), str(cache_dir / "base.safetensors"))
    scores = {"base": accuracy(base, test_x, test_y)}
    ingredients = []
    for i, recipe in enumerate(FINE_TUNES, start=1):
        model = DigitsMLP(hidden=HIDDEN)
        model.load_state_dict(base.state_dict())
        _fit(model, train_x, train_y, recipe)
        path = cache_dir / f"{recipe.name}.safetensors"
        save_file(model.state_dict(), str(path))
        scores[recipe.name] = accuracy(model, test_x, test_y)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        ingredients.append({"name": recipe.name, "path": path.name, "sha256": digest})
        _log.info("demo: fine-tune %d/%d %s done (test accuracy %.4f)", i, len(FINE_TUNES), recipe.name, scores[recipe.name])
    _write_specs(cache_dir, ingredients)
    manifest = {"recipe": RECIPE, "accuracy": scores, "fine_tunes": [asdict(f) for f in FINE_TUNES]}
    # Written last and atomically: a manifest exists only for a complete cache.
    partial = cache_dir / "demo.json.tmp"
    partial.write_text(json.dumps(manifest, indent=2))
    os.replace(partial, cache_dir / "demo.json")
    _log.info("demo: trained in %.1f s, written to %s", time.perf_counter() - started, cache_dir)
    return cache_dir / SPEC_FILE


def _write_specs(cache_dir: Path, ingredients: list[dict]) -> None:
    """The uniform soup (served first) and the greedy soup (pushed next), both scored on val and test."""
    for file, method, note in (
        (SPEC_FILE, "linear", "A uniform soup of the demo's fine-tunes"),
        (GREEDY_SPEC_FILE, "greedy", "The greedy soup of the demo's fine-tunes, searched on val"),
    ):
        spec = {
            "apiVersion": "tureen/v1",
            "model": "digits",
            "architecture": {"factory": "tureen.demo.models:mlp", "kwargs": {"hidden": HIDDEN}},
            "ingredients": ingredients,
            "merge": {"method": method},
            "dtype": "float32",
            "evaluation": EVALUATION,
        }
        text = f"# {note}, written by `tureen serve --demo`.\n" + yaml.safe_dump(spec, sort_keys=False)
        (cache_dir / file).write_text(text)


def _fit(model: nn.Module, pixels: torch.Tensor, labels: torch.Tensor, recipe: FineTune) -> None:
    generator = torch.Generator().manual_seed(recipe.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    model.train()
    for _ in range(recipe.epochs):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(order), 64):
            idx = order[start : start + 64]
            batch = _augment(pixels[idx], recipe.augment, generator)
            loss = nn.functional.cross_entropy(model(batch)["logits"], labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()


def _augment(pixels: torch.Tensor, augment: str, generator: torch.Generator) -> torch.Tensor:
    if "shift" in augment and bool(torch.rand((), generator=generator) < 0.5):
        images = pixels.reshape(-1, 8, 8)
        dx, dy = (int(v) for v in torch.randint(-1, 2, (2,), generator=generator))
        images = torch.roll(images, shifts=(dy, dx), dims=(1, 2))
        pixels = images.reshape(-1, 64)
    if "noise" in augment:
        pixels = (pixels + torch.randn(pixels.shape, generator=generator)).clamp(0, 16)
    return pixels
