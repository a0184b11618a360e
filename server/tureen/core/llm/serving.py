"""Generation requests on the data plane: route, tokenize, check, generate, stream, count.

A transport turns its message into a ``GenerateRequest`` and iterates the ``Stream`` that
``Generations.start`` returns; the stream names the version that answers before its first
chunk, finishes on that blend whatever is swapped in meanwhile, and counts the request once
when it ends: a success, a failure, or a cancellation when its reader stops early.
"""

from __future__ import annotations

import contextlib
import itertools
import time
import weakref
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from tureen.core.blends import Blend, BlendRepository
from tureen.core.llm.generation import Chunk, Generation
from tureen.core.llm.loop import Generator
from tureen.core.llm.sampling import SamplingParameters
from tureen.core.llm.text import TextCodec
from tureen.core.observer import GenerationRecord, Observer
from tureen.core.rollout import OnlineAccuracy
from tureen.core.statistics import StatisticsBook, Timings
from tureen.errors import ArchitectureError, Cancelled, InferenceFailed, InvalidRequest, SoupError

PROTOCOL_PARAMETERS = ("priority", "timeout", "sequence_id", "sequence_start", "sequence_end")
"""Request parameters tritonclient sets for Triton's scheduler, not for sampling."""


@dataclass(frozen=True)
class GenerateRequest:
    model: str
    version: str = ""
    id: str = ""
    prompt: str | None = None
    messages: Sequence[Mapping[str, Any]] | None = None
    """A chat, rendered by the model's chat template (instead of ``prompt``)."""
    parameters: Mapping[str, Any] = field(default_factory=dict)
    prompt_field: str = "text_input"
    """What the transport calls the prompt, for error messages."""
    parameters_field: str = "parameters"
    fill_context: bool = False
    """Without ``max_tokens``, generate up to the end of the context (OpenAI's chat does)."""
    routing: Mapping[str, str] = field(default_factory=dict)
    """Request parameters a sticky canary reads."""


def _sticky(blend: Blend) -> str | None:
    rollout = blend.spec.rollout
    return rollout.canary.sticky if rollout is not None and rollout.canary is not None else None


def generative(blend: Blend) -> str | None:
    """The Hugging Face directory of a causal-LM blend (its tokenizer's home), else None."""
    arch = blend.spec.architecture
    if arch is None or arch.huggingface is None or arch.task != "causal-lm":
        return None
    return arch.huggingface


@dataclass
class _Lane:
    codec: TextCodec
    generator: Generator


class Stream:
    """One generation as its transport reads it: ``async for chunk in stream``."""

    def __init__(self, owner: Generations, blend: Blend, generation: Generation, received_ns: int, request_id: str) -> None:
        self.model, self.version, self.request_id = blend.model, blend.version, request_id
        self.prompt_tokens = len(generation.prompt)
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self._owner, self._blend, self._generation, self._received = owner, blend, generation, received_ns
        self._closed = False

    def close(self, error: SoupError | None = None) -> None:
        """End the generation (if it runs) and count the request, once: ``error`` None is a
        success, and a stream closed before its end counts as cancelled."""
        if self._closed:
            return
        self._closed = True
        self._generation.cancel()
        if error is None and self.finish_reason is None:
            error = Cancelled("the caller went away before the generation ended")
        self._owner.finished(self._blend, self._generation, self._received, self.request_id, error)

    def __del__(self) -> None:  # a response dropped before it was read (its client left at once)
        with contextlib.suppress(Exception):  # at interpreter shutdown there is nothing left to count
            self.close()

    async def text(self) -> str:
        """The whole generated text, once the generation ends."""
        async with aclosing(self.chunks()) as chunks:
            return "".join([chunk.text async for chunk in chunks])

    async def chunks(self) -> AsyncGenerator[Chunk, None]:
        """The chunks as they come; read it within ``contextlib.aclosing`` so that a reader that
        stops early cancels the generation at once."""
        error: SoupError | None = None
        try:
            while True:
                item = await self._generation.chunks.get()
                if isinstance(item, SoupError):
                    error = item
                    raise item
                self.completion_tokens += item.tokens
                if item.finish_reason is not None:
                    self.finish_reason = item.finish_reason
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            self.close(error)


class Generations:
    """The generation side of the data plane, beside the engine's tensor side."""

    def __init__(
        self,
        repository: BlendRepository,
        statistics: StatisticsBook,
        observer: Observer,
        failed: Callable[[str, int, Blend | None, SoupError], None],
        online: OnlineAccuracy,
        cpu_threads: int | None = None,
    ) -> None:
        """``failed(model, received_ns, blend, error)``: the engine's one way to count a failure;
        ``online`` remembers which version answered each request id, for feedback;
        ``cpu_threads``: torch's CPU threads on a generation loop's thread (None: torch's choice)."""
        self._cpu_threads = cpu_threads
        self._online = online
        self._repository = repository
        self._statistics = statistics
        self._observer = observer
        self._failed = failed
        self._lanes: weakref.WeakKeyDictionary[Blend, _Lane] = weakref.WeakKeyDictionary()

    def start(self, model: str, received_ns: int, decode: Callable[[], GenerateRequest]) -> Stream:
        """Decode, route and check a request for ``model`` and queue its generation; raises
        ``SoupError``, counted (an unexpected error becomes ``InferenceFailed``)."""
        blend: Blend | None = None
        try:
            request = decode()
            blend = self._repository.route(request.model, request.version, request.routing)
            parameters = SamplingParameters.of(self._sampling(request, blend), request.parameters_field)
            lane = self._lane(blend)
            prompt = self._prompt(request, lane.codec)
            parameters = self._room(request, parameters, len(prompt), lane.codec.context)
            generation = Generation(prompt, parameters, lane.codec)
        except SoupError as error:
            self._failed(model, received_ns, blend, error)
            raise
        except Exception as exc:
            failure = InferenceFailed(f"model {model!r}: cannot start the generation: {exc}")
            self._failed(model, received_ns, blend, failure)
            raise failure from exc
        lane.generator.submit(generation)
        return Stream(self, blend, generation, received_ns, request.id)

    def _sampling(self, request: GenerateRequest, blend: Blend) -> dict[str, Any]:
        """The request's parameters less those that route it (a sticky canary's key, whether a
        canary runs now or not) or belong to the protocol (Triton's scheduling parameters)."""
        ignored = set(PROTOCOL_PARAMETERS)
        canary = self._repository.canary(request.model)
        for route in (canary.sticky if canary is not None else None, _sticky(blend)):
            if route:
                ignored.add(route)
        return {name: value for name, value in request.parameters.items() if name not in ignored and value is not None}

    def _lane(self, blend: Blend) -> _Lane:
        lane = self._lanes.get(blend)
        if lane is not None:
            return lane
        where = f"model {blend.model!r} version {blend.version}"
        directory = generative(blend)
        if directory is None:
            raise InvalidRequest(f"{where} is not a causal-lm soup: it takes tensors (ModelInfer), not text")
        try:
            codec = TextCodec.load(directory)
        except ArchitectureError as exc:
            raise InvalidRequest(f"{where} cannot take text: {exc}") from None
        model, version, observer = blend.model, str(blend.version), self._observer  # the lane must not keep the blend

        def counts(running: int, waiting: int) -> None:
            observer.generations_now(model, version, running, waiting)

        self._lanes[blend] = lane = _Lane(codec, Generator(blend.module, blend.device, where, counts, self._cpu_threads))
        return lane

    @staticmethod
    def _prompt(request: GenerateRequest, codec: TextCodec) -> list[int]:
        if request.messages is not None:
            prompt = codec.chat(request.messages)
        elif request.prompt is not None:
            prompt = codec.encode(request.prompt)
        else:
            raise InvalidRequest(f"{request.prompt_field}: a prompt is required")
        if not prompt:
            raise InvalidRequest(f"{request.prompt_field}: the prompt has no tokens")
        if len(prompt) >= codec.context:
            raise InvalidRequest(
                f"{request.prompt_field}: the prompt is {len(prompt)} tokens; the model's context is {codec.context}"
            )
        return prompt

    @staticmethod
    def _room(request: GenerateRequest, parameters: SamplingParameters, prompt: int, context: int) -> SamplingParameters:
        """``parameters`` with a ``max_tokens`` that fits the context after the prompt."""
        if request.fill_context and "max_tokens" not in request.parameters:
            return parameters.model_copy(update={"max_tokens": context - prompt})
        if prompt + parameters.max_tokens > context:
            field = f"{request.parameters_field}.max_tokens" if request.parameters_field else "max_tokens"
            raise InvalidRequest(
                f"{field}: {parameters.max_tokens} tokens after a prompt of {prompt} exceed the model's context of {context}"
            )
        return parameters

    # ---- accounting ----------------------------------------------------------------------------

    def finished(self, blend: Blend, generation: Generation, received_ns: int, request_id: str, error: SoupError | None) -> None:
        now = time.perf_counter_ns()
        times, version = generation.token_ns, str(blend.version)
        if error is not None:
            self._failed(blend.model, received_ns, blend, error)
            self._observer.generation_finished(blend.model, version, GenerationRecord(len(generation.prompt), len(times)))
            return
        queue = (generation.started_ns or now) - received_ns
        timings = Timings(queue, 0, now - (generation.started_ns or now), 0)
        if request_id:  # a reward for this response can come back as feedback
            self._online.predicted(blend.model, request_id, blend.version, None)
        self._statistics.success(blend.model, blend.version, 1, now - received_ns, timings)
        self._observer.request_finished(blend.model, version, None, (now - received_ns) / 1e9, queue / 1e9, timings.compute / 1e9)
        first = (times[0] - received_ns) / 1e9 if times else None
        gaps = [(b - a) / 1e9 for a, b in itertools.pairwise(times)]
        record = GenerationRecord(len(generation.prompt), len(times), first, gaps, (now - received_ns) / 1e9)
        self._observer.generation_finished(blend.model, version, record)
