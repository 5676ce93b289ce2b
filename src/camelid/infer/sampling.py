"""Sampling parameters and the logits processing that turns a row of logits into a token.

Order of operations (as vLLM and Hugging Face apply them): repetition penalty, presence and
frequency penalties, temperature, then the truncations top-k, top-p and min-p, then a draw.
A temperature of 0 means greedy decoding: the penalties still apply, the truncations do not
matter, and the argmax is taken.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from camelid.errors import RequestError


@dataclass(frozen=True)
class SamplingParams:
    """What to generate and how; every field is checked when the object is made.

    The defaults are camelid's one set, used by the API and by ``camelid generate`` and
    ``chat``: mild sampling (temperature 0.8, top_p 0.95) that cuts the unlikely tail a raw
    draw wanders into; ``temperature=0`` is greedy, ``temperature=1, top_p=1`` samples the
    model's own distribution.

    - ``max_new_tokens``: at most this many tokens are generated (fewer if the context fills).
    - ``temperature``: 0 is greedy; otherwise logits are divided by it before sampling.
    - ``top_k`` (0 = off), ``top_p`` (1 = off), ``min_p`` (0 = off): keep the k most likely
      tokens / the smallest set whose probability reaches p / tokens at least min_p times as
      likely as the most likely one.
    - ``repetition_penalty`` (1 = off): logits of tokens already in the prompt or the output are
      divided by it when positive and multiplied by it when negative (CTRL, as in HF).
    - ``presence_penalty`` / ``frequency_penalty`` (0 = off): subtracted from the logits of
      tokens already generated, once / once per occurrence (as in the OpenAI API).
    - ``seed``: a seeded request samples the same tokens every time, batched or not.
    - ``stop``: strings that end generation; the text is cut just before the first one.
    - ``stop_token_ids``: extra token ids that end generation (the model's end-of-turn and
      end-of-text tokens always do unless ``ignore_eos``). Stop tokens are not part of the output.
    - ``logprobs``: return each generated token's log-probability and this many alternatives.
    - ``prompt_logprobs``: also score the prompt's tokens, with this many alternatives.
    - ``truncate_prompt``: drop the oldest prompt tokens to make room for ``max_new_tokens``
      (keeping at least half the context) instead of refusing a prompt that does not fit.
    """

    max_new_tokens: int = 256
    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 0.95
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    truncate_prompt: bool = False

    def __post_init__(self) -> None:
        # Accept a single stop string or any sequence, keep a tuple (hashable, immutable).
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        _check(self)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalised(self) -> bool:
        return (
            self.repetition_penalty != 1
            or self.presence_penalty != 0
            or self.frequency_penalty != 0
        )

    def replace(self, **changes) -> SamplingParams:
        return dataclasses.replace(self, **changes)


def _check(p: SamplingParams) -> None:
    def bad(name: str, want: str) -> RequestError:
        return RequestError(f"invalid {name}={getattr(p, name)!r}: must be {want}")

    def finite(name: str) -> bool:
        value = getattr(p, name)
        return isinstance(value, (int, float)) and math.isfinite(value)

    if not isinstance(p.max_new_tokens, int) or p.max_new_tokens < 1:
        raise bad("max_new_tokens", "an integer >= 1")
    if not finite("temperature") or p.temperature < 0:
        raise bad("temperature", ">= 0 (0 is greedy)")
    if not isinstance(p.top_k, int) or p.top_k < 0:
        raise bad("top_k", "an integer >= 0 (0 is off)")
    if not finite("top_p") or not 0 < p.top_p <= 1:
        raise bad("top_p", "in (0, 1]")
    if not finite("min_p") or not 0 <= p.min_p <= 1:
        raise bad("min_p", "in [0, 1]")
    if not finite("repetition_penalty") or p.repetition_penalty <= 0:
        raise bad("repetition_penalty", "> 0 (1 is off)")
    for name in ("presence_penalty", "frequency_penalty"):
        if not finite(name) or not -2 <= getattr(p, name) <= 2:
            raise bad(name, "in [-2, 2] (0 is off)")
    if p.seed is not None and (not isinstance(p.seed, int) or not 0 <= p.seed < 2**64):
        raise bad("seed", "an integer in [0, 2**64)")  # what torch.Generator accepts
    if any(not isinstance(s, str) or not s for s in p.stop):
        raise bad("stop", "non-empty strings")
    if any(t < 0 for t in p.stop_token_ids):
        raise bad("stop_token_ids", "non-negative token ids")
    for name in ("logprobs", "prompt_logprobs"):
        value = getattr(p, name)
        if value is not None and (not isinstance(value, int) or not 0 <= value <= 20):
            raise bad(name, "an integer in [0, 20] or None")


def apply_penalties(
    logits: torch.Tensor,
    params: SamplingParams,
    seen: torch.Tensor | None,
    counts: torch.Tensor | None,
) -> torch.Tensor:
    """Penalise one row of logits (vocab,) in place. ``seen`` marks tokens in the prompt or
    output (repetition penalty); ``counts`` counts generated tokens (presence/frequency)."""
    if params.repetition_penalty != 1 and seen is not None:
        r = params.repetition_penalty
        penalised = torch.where(logits > 0, logits / r, logits * r)
        logits = torch.where(seen, penalised, logits)
    if counts is not None and (params.presence_penalty or params.frequency_penalty):
        logits = (
            logits
            - params.presence_penalty * (counts > 0).to(logits.dtype)
            - params.frequency_penalty * counts.to(logits.dtype)
        )
    return logits


def sample_row(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> int:
    """Draw a token from one row of (already penalised) fp32 logits (vocab,)."""
    if params.greedy:
        return int(logits.argmax())
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, -math.inf)
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        # Keep a token if the mass strictly before it is below top_p (the first always stays).
        drop = (sorted_probs.cumsum(0) - sorted_probs) >= params.top_p
        probs = probs.scatter(0, order, sorted_probs.masked_fill(drop, 0.0))
    if params.min_p > 0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    return int(torch.multinomial(probs, 1, generator=generator))


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A generator of its own for each request: seeded ones repeat, whatever they share a
    batch with; unseeded ones draw a fresh seed."""
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def top_logprobs(logprobs: torch.Tensor, n: int) -> list[dict[int, float]]:
    """For each row of log-probabilities (N, vocab), the ``n`` most likely tokens."""
    if n == 0:
        return [{} for _ in range(len(logprobs))]
    values, ids = torch.topk(logprobs, n, dim=-1)
    return [
        dict(zip(row_ids, row_values, strict=True))
        for row_ids, row_values in zip(ids.tolist(), values.tolist(), strict=True)
    ]


def params_from(params: SamplingParams | None, overrides: dict) -> SamplingParams:
    """``params`` with keyword ``overrides`` applied (unknown names are a RequestError)."""
    base = params or SamplingParams()
    unknown = set(overrides) - {f.name for f in dataclasses.fields(SamplingParams)}
    if unknown:
        raise RequestError(f"unknown sampling parameter(s): {', '.join(sorted(unknown))}")
    return base.replace(**overrides) if overrides else base


def stop_set(params: SamplingParams, defaults: Sequence[int]) -> frozenset[int]:
    """Token ids that end this request."""
    ids = set(params.stop_token_ids)
    if not params.ignore_eos:
        ids.update(defaults)
    return frozenset(ids)
