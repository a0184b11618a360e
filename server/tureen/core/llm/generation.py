"""The generation loop of one causal-LM blend: batches of generations, a KV cache, token by token.

Generations that wait when the loop is free start together as one batch: their prompts are
left-padded into one prefill, then every step is one forward of one token per row over the
cache. A row leaves the batch (and its cache rows go) as soon as it finishes or its caller goes
away; generations that arrive meanwhile form the next batch (static batching: transformers'
continuous batching needs one sampling configuration and one seed for every request, and paged
attention kernels, which this loop does not). The loop runs on a thread of its own while its
blend has generations, and holds the module only: a blend swapped out finishes its batch and
the thread ends.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from tureen.core.llm.sampling import Sampler, SamplingParameters
from tureen.core.llm.text import TextCodec
from tureen.errors import InferenceFailed, SoupError

MAX_GENERATIONS = 16
"""Rows in one batch at most."""


@dataclass(frozen=True)
class Chunk:
    """New text of one generation; the last chunk carries why it ended."""

    text: str
    tokens: int
    """Tokens this chunk adds."""
    finish_reason: str | None = None
    """``stop`` (an end-of-sequence token or a stop string), ``length`` (max_tokens) or None."""


class Generation:
    """One request's generation: fed by the loop's thread, read on the serving event loop."""

    def __init__(self, prompt: Sequence[int], parameters: SamplingParameters, codec: TextCodec, device: torch.device) -> None:
        self.prompt = list(prompt)
        self.parameters = parameters
        self.sampler = Sampler(parameters, device)
        self._codec = codec
        self._loop = asyncio.get_running_loop()
        self.chunks: asyncio.Queue[Chunk | SoupError] = asyncio.Queue()
        self.ids: list[int] = []
        self._sent = 0
        self.cancelled = False
        self.queued_ns = time.perf_counter_ns()
        self.started_ns = 0
        """When its batch began (0: still waiting)."""
        self.token_ns: list[int] = []
        """When each generated token was sampled."""

    def cancel(self) -> None:
        self.cancelled = True

    def fail(self, error: SoupError) -> None:
        self._loop.call_soon_threadsafe(self.chunks.put_nowait, error)

    def send(self, chunk: Chunk) -> None:
        self._loop.call_soon_threadsafe(self.chunks.put_nowait, chunk)

    def take(self, token: int) -> Chunk:
        """Add the sampled ``token``: the chunk of text it adds (with a reason once it is the last)."""
        self.token_ns.append(time.perf_counter_ns())
        p = self.parameters
        ended = token in self._codec.eos_token_ids and not p.ignore_eos
        if not ended:
            self.ids.append(token)
        text = self._codec.decode(self.ids)
        reason = "stop" if ended else "length" if len(self.token_ns) >= p.max_tokens else None
        end = len(text)
        for stop in p.stop:
            found = text.find(stop, max(0, self._sent - len(stop) + 1))
            if found != -1 and found < end:
                end, reason = found, "stop"
        if reason is None:
            held = max((len(s) - 1 for s in p.stop), default=0)  # a stop string may be starting
            end = len(text) - held
            if text.endswith("\ufffd"):  # a character whose bytes are still coming
                end = min(end, len(text) - 1)
        piece = text[self._sent : max(end, self._sent)]
        self._sent = max(end, self._sent)
        return Chunk(piece, 1, reason)


class Generator:
    """The generations of one blend, run in batches on a thread while there are any."""

    def __init__(
        self, module: nn.Module, device: torch.device, name: str, counts: Callable[[int, int], None] = lambda r, w: None
    ) -> None:
        """``counts(running, waiting)`` hears each change of the numbers of generations."""
        self._module = module
        self._counts = counts
        self._device = device
        self._name = name
        self._pending: deque[Generation] = deque()
        self._lock = threading.Lock()
        self._running = False
        self.active = 0
        """Generations in the batch being run."""
        # transformers 5.24 renamed the forward's past_key_values to cache (the old name goes in 5.40).
        self._cache_argument = "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"

    @property
    def waiting(self) -> int:
        return len(self._pending)

    def submit(self, generation: Generation) -> None:
        with self._lock:
            self._pending.append(generation)
            self._counts(self.active, len(self._pending))
            if self._running:
                return
            self._running = True
        threading.Thread(target=self._work, name=f"tureen-generate {self._name}", daemon=True).start()

    def _work(self) -> None:
        while True:
            with self._lock:
                live = [g for g in self._pending if not g.cancelled]
                batch, self._pending = live[:MAX_GENERATIONS], deque(live[MAX_GENERATIONS:])
                if not batch:
                    self._running = False
                    return
                self._running_now(len(batch))
            try:
                self._run(batch)
            except Exception as exc:  # a failed batch fails its own generations, never the loop
                failure = InferenceFailed(f"{self._name}: generation failed: {exc}")
                for generation in batch:
                    generation.fail(failure)
            finally:
                self._running_now(0)

    def _running_now(self, rows: int) -> None:
        self.active = rows
        self._counts(rows, len(self._pending))

    @torch.inference_mode()
    def _run(self, rows: list[Generation]) -> None:
        from transformers import DynamicCache

        started = time.perf_counter_ns()
        for g in rows:
            g.started_ns = started
        width = max(len(g.prompt) for g in rows)
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, g in enumerate(rows):
            ids[i, width - len(g.prompt) :] = torch.tensor(g.prompt)
            mask[i, width - len(g.prompt) :] = 1
        ids, mask = ids.to(self._device), mask.to(self._device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = {self._cache_argument: DynamicCache()}
        out = self._module(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1, **cache)
        last = positions[:, -1:]
        while True:
            logits = out.logits[:, -1, :].float().cpu()
            tokens = [g.sampler.next_token(logits[i]) for i, g in enumerate(rows)]
            chunks = [g.take(token) for g, token in zip(rows, tokens, strict=True)]
            keep = [i for i, (g, c) in enumerate(zip(rows, chunks, strict=True)) if c.finish_reason is None and not g.cancelled]
            if len(keep) < len(rows):
                self._running_now(len(keep))  # before the last chunks go: a caller that got its text sees the count
            for g, chunk in zip(rows, chunks, strict=True):
                g.send(chunk)
            if not keep:
                return
            if len(keep) < len(rows):
                index = torch.tensor(keep, device=self._device)
                cache[self._cache_argument].reorder_cache(cast(torch.LongTensor, index))
                mask, last = mask[index], last[index]
                rows = [rows[i] for i in keep]
            step = torch.tensor([[tokens[i]] for i in keep], device=self._device)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            last = last + 1
            out = self._module(input_ids=step, attention_mask=mask, position_ids=last, use_cache=True, **cache)
