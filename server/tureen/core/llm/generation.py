"""One generation's state: its prompt, its sampler, the text it has produced and sent.

The generation loop (``loop.py``) feeds it tokens on its own thread; the chunks of text go to
the serving event loop through an asyncio queue, which the request's ``Stream`` reads.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

from tureen.core.llm.sampling import Sampler, SamplingParameters
from tureen.core.llm.text import TextCodec
from tureen.errors import SoupError


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

    def __init__(self, prompt: Sequence[int], parameters: SamplingParameters, codec: TextCodec) -> None:
        self.prompt = list(prompt)
        self.parameters = parameters
        self.sampler = Sampler(parameters)
        self._codec = codec
        self._loop = asyncio.get_running_loop()
        self.chunks: asyncio.Queue[Chunk | SoupError] = asyncio.Queue()
        self.ids: list[int] = []
        self._sent = 0
        self._text = ""
        """The text of ``ids[:_read]``, built a piece at a time."""
        self._prefix = self._read = 0
        """``ids[_prefix:_read]``: the last piece, decoded again before new tokens as their context."""
        self.cancelled = False
        self.finished = False
        """Its last chunk is made (set on the loop's thread)."""
        self.started_ns = 0
        """When its batch began (0: still waiting)."""
        self.token_ns: list[int] = []
        """When each generated token was sampled."""

    def cancel(self) -> None:
        self.cancelled = True

    def fail(self, error: SoupError) -> None:
        if not self.finished:
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
        reason = "stop" if ended else "length" if len(self.token_ns) >= p.max_tokens else None
        text = self._decoded(final=reason is not None)
        end = len(text)
        for stop in p.stop:
            found = text.find(stop, max(0, self._sent - len(stop) + 1))
            if found != -1 and found < end:
                end, reason = found, "stop"
        if reason is None:
            held = max((len(s) - 1 for s in p.stop), default=0)  # a stop string may be starting
            end = len(text) - held
        piece = text[self._sent : max(end, self._sent)]
        self._sent = max(end, self._sent)
        self.finished = reason is not None
        return Chunk(piece, 1, reason)

    def _decoded(self, final: bool) -> str:
        """The text so far, decoding only the tokens since the last piece (and that piece again,
        so that a tokenizer's spacing at the join comes out as in one decode of them all). New
        tokens that end inside a character (its bytes still coming decode as replacement marks)
        wait for the rest, unless the generation ends here."""
        context = self._codec.decode(self.ids[self._prefix : self._read])
        fresh = self._codec.decode(self.ids[self._prefix :])
        if not fresh.startswith(context):  # a tokenizer that rewrites text before new tokens: decode it all
            self._prefix, context, fresh = 0, self._codec.decode(self.ids[: self._read]), self._codec.decode(self.ids)
            self._text = context
        if len(fresh) > len(context) and (final or not fresh.endswith("\ufffd")):
            self._text += fresh[len(context) :]
            self._prefix, self._read = self._read, len(self.ids)
        return self._text
