"""Sampling parameters, by the names of Triton's vLLM backend and the OpenAI API, and the sampler.

A request's parameters arrive from several places (KServe request parameters, the vLLM
backend's ``sampling_parameters`` JSON input, scalar inputs, a generate or OpenAI body); each
transport gathers them into one mapping and ``SamplingParameters.of`` checks it, so every
protocol refuses the same bad values with the same message naming the field.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tureen.errors import InvalidRequest

MAX_STOPS = 16


class SamplingParameters(BaseModel):
    """How one generation picks its tokens; temperature 0 is greedy decoding."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    max_tokens: int = Field(default=16, ge=1)
    """Tokens to generate at most (the prompt's tokens do not count)."""
    temperature: float = Field(default=1.0, ge=0.0, le=100.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=-1)
    """0 or -1: every token is a candidate."""
    stop: tuple[str, ...] = ()
    """Strings that end the generation; the text returned stops before them."""
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    """The same seed and prompt give the same text."""
    stream: bool = False
    ignore_eos: bool = False

    @field_validator("stop", mode="before")
    @classmethod
    def _stops(cls, value: Any) -> Any:
        stops = [value] if isinstance(value, str) else value
        if isinstance(stops, list | tuple):
            if len(stops) > MAX_STOPS:
                raise ValueError(f"at most {MAX_STOPS} stop strings")
            if any(isinstance(s, str) and not s for s in stops):
                raise ValueError("a stop string cannot be empty")
        return stops

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @classmethod
    def of(cls, values: Mapping[str, Any], where: str = "parameters") -> SamplingParameters:
        """The parameters in ``values``, or ``InvalidRequest`` naming the first bad field."""
        prefix = f"{where}." if where else ""
        for name, value in values.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise InvalidRequest(f"{prefix}{name}: must be a finite number, not {value}")
        try:
            return cls.model_validate(dict(values))
        except ValidationError as exc:
            error = exc.errors()[0]
            field = ".".join(str(part) for part in error["loc"]) or "?"
            message = "unknown sampling parameter" if error["type"] == "extra_forbidden" else error["msg"]
            raise InvalidRequest(f"{prefix}{field}: {message}") from None


class Sampler:
    """Picks each next token of one generation: argmax when greedy, else a draw from its own
    seeded generator, so a row's tokens do not depend on the other rows of its batch."""

    def __init__(self, parameters: SamplingParameters) -> None:
        self.parameters = parameters
        self._generator: torch.Generator | None = None
        if not parameters.greedy:  # draws happen on the CPU copy of the logits, whatever the device
            seed = parameters.seed if parameters.seed is not None else random.getrandbits(63)
            self._generator = torch.Generator().manual_seed(seed)

    def next_token(self, logits: torch.Tensor) -> int:
        """The next token for ``logits`` [vocab] (float32)."""
        if self._generator is None:
            return int(logits.argmax())
        p = self.parameters
        scores = (logits.float() - logits.float().max()) / p.temperature  # a tiny temperature overflows to -inf, not NaN
        if p.top_k > 0 and p.top_k < scores.shape[-1]:
            kth = torch.topk(scores, p.top_k).values[-1]
            scores = scores.masked_fill(scores < kth, -math.inf)
        if p.top_p < 1.0:
            ordered, order = torch.sort(scores, descending=True)
            cumulative = ordered.softmax(-1).cumsum(-1)
            drop = cumulative - ordered.softmax(-1) >= p.top_p  # keep the smallest prefix reaching top_p
            scores = scores.scatter(-1, order, ordered.masked_fill(drop, -math.inf))
        probabilities = scores.softmax(-1)
        return int(torch.multinomial(probabilities, 1, generator=self._generator))
