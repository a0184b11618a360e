"""Hugging Face ``transformers`` models as architectures (the optional ``tureen[hf]`` extra).

``architecture: {huggingface: DIR, task: causal-lm}`` builds the model from ``DIR/config.json``
alone, without reading any weights there and without network access: the weights come from
the merged ingredients. The tensor interface is ``input_ids`` and ``attention_mask`` (INT64,
batch by sequence) in, ``logits`` out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from tureen.errors import ArchitectureError

TASKS = {"causal-lm": "AutoModelForCausalLM", "sequence-classification": "AutoModelForSequenceClassification"}


def build(directory: str, task: str, overrides: dict[str, Any] | None = None) -> nn.Module:
    """The model of ``task`` for the config in ``directory`` (with ``overrides`` replacing its
    values), with its ``tureen_interface`` set."""
    try:
        import transformers
    except ImportError:
        raise ArchitectureError("architecture.huggingface: needs the transformers package: pip install 'tureen[hf]'") from None
    if not (Path(directory) / "config.json").is_file():
        raise ArchitectureError(f"architecture.huggingface: {directory} has no config.json")
    try:
        # Code shipped beside a config (``auto_map``) never runs: no remote code, no download.
        config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True, trust_remote_code=False)
        for key, value in (overrides or {}).items():
            if not hasattr(config, key):
                raise ArchitectureError(f"architecture.config.{key}: {type(config).__name__} has no such setting")
            setattr(config, key, value)
        model = getattr(transformers, TASKS[task]).from_config(config, trust_remote_code=False)
    except ArchitectureError:
        raise
    except Exception as exc:
        raise ArchitectureError(f"architecture.huggingface: cannot build a {task} model from {directory}: {exc}") from None
    model.tureen_interface = interface(task, config)
    return model


def interface(task: str, config: Any) -> dict[str, Any]:
    tokens = [-1, -1]
    logits = [-1, -1, int(config.vocab_size)] if task == "causal-lm" else [-1, int(config.num_labels)]
    return {
        "inputs": [
            {"name": "input_ids", "datatype": "INT64", "shape": tokens},
            {"name": "attention_mask", "datatype": "INT64", "shape": tokens},
        ],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": logits}],
        "max_batch_size": 64,
    }
