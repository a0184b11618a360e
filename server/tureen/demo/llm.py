"""The LLM soup demo: a small Llama trained on the Python standard library, fine-tuned per package.

On first run a byte-level BPE tokenizer and a Llama base model of about 2M parameters are
trained on the standard library's top-level modules (real text that ships with the
interpreter), then four fine-tunes continue from the base, each on one part of the library
(``email``, ``asyncio``, ``json`` + ``http``, ``unittest``). The last tenth of each part's text
is held out for the test splits (text for perplexity, and a next-line multiple-choice quiz;
``llm_splits.py``) and the tenth before it for ``val``, which the greedy soup's search reads.
Everything goes to a cache folder and is reused by later runs.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sysconfig
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import yaml

from tureen.demo.llm_splits import write_splits

_log = logging.getLogger("tureen.demo")

RECIPE = 2  # bump when the training below changes, so stale caches are rebuilt
MODEL = "stdlib"
SPEC_FILE, GREEDY_SPEC_FILE = "stdlib.yaml", "stdlib-greedy.yaml"
PARTS = {"email": ("email",), "asyncio": ("asyncio",), "json-http": ("json", "http"), "unittest": ("unittest",)}
SEQUENCE, EVAL_ROWS, VOCAB = 128, 16, 2048
"""Training sequence length, evaluation rows per forward, tokenizer size."""
SIZES: dict[str, Any] = {"hidden_size": 160, "intermediate_size": 432, "num_hidden_layers": 4, "num_attention_heads": 4}
BASE_STEPS, TUNE_STEPS, BATCH = 300, 90, 16
CHAT_TEMPLATE = (
    "{% for m in messages %}# {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}# assistant:{% endif %}"
)


def default_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "tureen" / "demo-llm"


def prepare(cache_dir: Path) -> Path:
    """The uniform soup's spec in ``cache_dir``, training the base and fine-tunes first if needed."""
    try:
        manifest = json.loads((cache_dir / "demo.json").read_text())
        complete = manifest.get("recipe") == RECIPE and (cache_dir / SPEC_FILE).is_file()
    except (OSError, ValueError, AttributeError):
        complete = False
    if complete:
        _log.info("demo llm: reusing the model and fine-tunes in %s", cache_dir)
        return cache_dir / SPEC_FILE
    return _train_all(cache_dir)


def _library() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _text(files: list[Path]) -> str:
    return "\n".join(path.read_text(encoding="utf-8", errors="replace") for path in files)


def _corpus() -> tuple[str, dict[str, str]]:
    """The base corpus (top-level modules) and the text of each part (its packages, recursively)."""
    library = _library()
    base = _text(sorted(library.glob("*.py")))
    parts = {name: _text(sorted(f for p in packages for f in (library / p).rglob("*.py"))) for name, packages in PARTS.items()}
    return base, parts


END = "<|end|>"


def byte_level_bpe(texts: Iterable[str], vocab: int) -> Any:
    """A byte-level BPE tokenizer (the ``tokenizers`` package) of ``vocab`` tokens trained on
    ``texts``, with ``<|end|>`` as its one special token; the bench and the tests make theirs here."""
    import tokenizers

    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    alphabet = tokenizers.pre_tokenizers.ByteLevel.alphabet()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab, special_tokens=[END], initial_alphabet=alphabet)
    tokenizer.train_from_iterator((text[i : i + 4096] for text in texts for i in range(0, len(text), 4096)), trainer)
    return tokenizer


def save_tokenizer(tokenizer: Any, folder: Path) -> None:
    """``tokenizer.json`` and a ``tokenizer_config.json`` (end token, chat template) in a model folder."""
    tokenizer.save(str(folder / "tokenizer.json"))
    settings = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": END,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))


def _ids(tokenizer: Any, text: str) -> torch.Tensor:
    """``text``'s token ids, encoded in pieces so that the tokenizer's threads share them (one
    string is encoded on one core). A piece ends before a newline that follows a non-space
    character, where the byte-level pre-tokenizer splits anyway, so the ids are exactly the whole
    text's."""
    pieces, start = [], 0
    while start < len(text):
        end = start + 8192
        while end < len(text) and not (text[end] == "\n" and not text[end - 1].isspace()):
            end += 1
        pieces.append(text[start:end])
        start = end
    return torch.tensor([i for encoded in tokenizer.encode_batch(pieces) for i in encoded.ids], dtype=torch.long)


def _held_out(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train, val, test) token runs: the last tenth is test, the tenth before it val."""
    tenth = len(ids) // 10
    return ids[: -2 * tenth], ids[-2 * tenth : -tenth], ids[-tenth:]


def _fit(model: torch.nn.Module, ids: torch.Tensor, steps: int, lr: float, seed: int) -> float:
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    loss = torch.tensor(math.nan)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - SEQUENCE - 1, (BATCH,), generator=generator)
        batch = torch.stack([ids[s : s + SEQUENCE] for s in starts])
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
    model.eval()
    return float(loss.detach())


def _train_all(cache_dir: Path) -> Path:
    import transformers

    transformers.utils.logging.disable_progress_bar()  # the demo logs its own progress

    started = time.perf_counter()
    cache_dir.mkdir(parents=True, exist_ok=True)
    base_text, parts = _corpus()
    base_dir = cache_dir / "base"
    base_dir.mkdir(exist_ok=True)
    tokenizer = byte_level_bpe([base_text], VOCAB)
    save_tokenizer(tokenizer, base_dir)
    end = tokenizer.token_to_id(END)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, max_position_embeddings=1024, eos_token_id=end, bos_token_id=end, tie_word_embeddings=True, **SIZES
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    count = sum(p.numel() for p in model.parameters())
    base_ids = _ids(tokenizer, base_text)
    _log.info("demo llm: first run, a %.1fM-parameter Llama on the standard library (%d tokens)", count / 1e6, len(base_ids))
    loss = _fit(model, base_ids, BASE_STEPS, 3e-3, 0)
    model.save_pretrained(base_dir)
    _log.info("demo llm: base model trained (last loss %.2f, %.0f s)", loss, time.perf_counter() - started)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    held_out: dict[str, tuple[str, str]] = {}
    for i, (name, text) in enumerate(parts.items()):
        train, val, test = _held_out(_ids(tokenizer, text))
        held_out[name] = (tokenizer.decode(val.tolist()), tokenizer.decode(test.tolist()))
        model.load_state_dict(base_state)
        loss = _fit(model, train, TUNE_STEPS, 1e-3, i + 1)
        model.save_pretrained(cache_dir / f"ft-{name}")
        _log.info("demo llm: fine-tune %d/%d on %s done (last loss %.2f)", i + 1, len(parts), name, loss)
    _write_specs(cache_dir, write_splits(cache_dir, held_out))
    manifest = {"recipe": RECIPE, "parameters": count, "parts": {k: list(v) for k, v in PARTS.items()}}
    partial = cache_dir / "demo.json.tmp"
    partial.write_text(json.dumps(manifest, indent=2))
    os.replace(partial, cache_dir / "demo.json")  # last and atomic: a manifest exists only for a complete cache
    _log.info("demo llm: trained in %.1f s, written to %s", time.perf_counter() - started, cache_dir)
    return cache_dir / SPEC_FILE


def _write_specs(cache_dir: Path, splits: dict[str, dict[str, str]]) -> None:
    """The uniform soup (served first) and the greedy soup (pushed next), scored on every split."""
    evaluation = {"task": "language-modeling", "splits": splits, "select": "val", "batch_size": EVAL_ROWS}
    for file, method, alone, note in (
        (SPEC_FILE, "linear", True, "A uniform soup of the LLM demo's fine-tunes"),
        # the same fine-tunes on the same splits: version 1 has scored each alone already
        (GREEDY_SPEC_FILE, "greedy", False, "The greedy soup of the LLM demo's fine-tunes, searched on val"),
    ):
        spec = {
            "apiVersion": "tureen/v1",
            "model": MODEL,
            "architecture": {"huggingface": "base", "task": "causal-lm"},
            "ingredients": [{"name": name, "path": f"ft-{name}"} for name in PARTS],
            "merge": {"method": method},
            "dtype": "float32",
            "evaluation": {**evaluation, "ingredients": alone},
        }
        text = f"# {note}, written by `tureen serve --demo llm`.\n" + yaml.safe_dump(spec, sort_keys=False)
        (cache_dir / file).write_text(text)
