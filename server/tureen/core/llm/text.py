"""A causal-LM blend's text side: its tokenizer, chat template, stop tokens and context length.

Everything comes from the blend's ``architecture.huggingface`` directory, offline and without
running code shipped there: ``tokenizer.json`` (with ``tokenizer_config.json`` and its chat
template, rendered by transformers in a sandboxed Jinja environment), ``config.json`` and
``generation_config.json``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tureen.errors import ArchitectureError, InvalidRequest


@dataclass(frozen=True)
class TextCodec:
    tokenizer: Any
    """A transformers ``PreTrainedTokenizerFast``."""
    eos_token_ids: frozenset[int]
    context: int
    """The longest sequence (prompt and generated tokens) the model takes."""

    @classmethod
    def load(cls, directory: str | Path) -> TextCodec:
        folder = Path(directory)
        if not (folder / "tokenizer.json").is_file():
            raise ArchitectureError(f"architecture.huggingface: {folder} has no tokenizer.json, so its soup cannot take text")
        from transformers import PreTrainedTokenizerFast

        try:
            tokenizer = PreTrainedTokenizerFast.from_pretrained(str(folder), local_files_only=True)
        except Exception as exc:
            raise ArchitectureError(f"architecture.huggingface: cannot read the tokenizer in {folder}: {exc}") from None
        config = _json(folder / "config.json")
        generation = _json(folder / "generation_config.json")
        eos = generation.get("eos_token_id", config.get("eos_token_id", tokenizer.eos_token_id))
        ids = frozenset(eos if isinstance(eos, list) else [] if eos is None else [eos])
        context = int(config.get("max_position_embeddings") or tokenizer.model_max_length or 2048)
        return cls(tokenizer, frozenset(int(i) for i in ids), context)

    def encode(self, text: str, special: bool = True) -> list[int]:
        """``text``'s token ids; with ``special``, framed by the tokenizer's special tokens (a BOS)."""
        return list(self.tokenizer.encode(text, add_special_tokens=special))

    def chat(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """The prompt of a chat: the tokenizer's chat template with the assistant's turn opened."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequest("messages: this model has no chat template; use /v1/completions with a prompt")
        try:
            text = self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        except Exception as exc:
            raise InvalidRequest(f"messages: the chat template cannot render them: {exc}") from None
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        # No clean-up of spaces: it rewrites text before the last token, which a stream has sent.
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False))


def _json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ArchitectureError(f"architecture.huggingface: cannot read {path}: {exc}") from None
    return document if isinstance(document, dict) else {}
