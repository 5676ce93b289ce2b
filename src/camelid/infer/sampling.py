"""Sampling parameters and the batched sampler that turns a batch of logits into tokens.

Order of operations (as vLLM and Hugging Face apply them): repetition penalty, presence and
frequency penalties, temperature, then the truncations top-k, top-p and min-p, then a draw.
A temperature of 0 means greedy decoding: the penalties still apply, the truncations do not
matter, and the argmax is taken.

The sampler works on a whole batch of logits (B, vocab) whose rows carry their own settings
(:class:`SamplingRows`, built when the batch changes) and penalty state (:class:`Penalties`,
kept on the device by index operations), and returns the tokens as a device tensor. Waiting
for the device costs far more than the arithmetic of a row, so the caller moves the tokens to
the host once per step for the whole batch, never row by row. Which stages run is decided from
the settings on the host (deciding from device data would be a wait): no sort unless a row
uses top-k or top-p (and only the top ``max(top_k)`` tokens when every such row has a top-k),
no penalties unless a row is penalised, an all-greedy batch is one argmax.

Randomness is counter-based, not a generator per request (which would cost one small random
call per row per step, and a generator's state to carry along): a row's draw is inverse
transform sampling with one uniform number u, the step-th output of SplitMix64 seeded with the
request's seed. u depends on (seed, step) and nothing else, so a seeded request repeats its
tokens alone or in any batch, at any row; an unseeded one draws a random 64-bit seed once,
when it starts. One number per row (not one per token, as Gumbel-max or an exponential race
needs) is cheap enough to compute on the host with exact 64-bit integers.

A row's result must not depend on its neighbours, so a stage that runs for the batch leaves a
row that does not use it bit for bit unchanged (top-k at -inf, a top-p threshold of 0, min-p
0, penalties 1 and 0), every reduction runs along a row, and the top-p cut is a probability
threshold: every token at least as likely as the last one needed to reach p stays, which is the
same however ties were ordered and however many tokens were ranked.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from camelid.errors import RequestError


@dataclass(frozen=True)
class SamplingParams:
    """What to generate and how; every field's type and range are checked when it is made.

    The defaults are camelid's one set, used by the API and by ``camelid generate`` and
    ``chat``: mild sampling (temperature 0.8, top_p 0.95) that cuts the unlikely tail a raw
    draw wanders into; ``temperature=0`` is greedy, ``temperature=1, top_p=1`` samples the
    model's own distribution.

    - ``max_new_tokens``: at most this many tokens are generated (fewer if the context fills);
      0 with ``prompt_logprobs`` scores the prompt only.
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


def _is_int(value: object) -> bool:
    """An integer, NumPy's included, but not a bool (``True`` is not a token count)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    """A finite real number (an int or a float), not a bool and not a numeric string."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an int too large for a float
        return False


def _check(p: SamplingParams) -> None:
    """Check every field's type and range, and normalise the containers to tuples.

    The types are checked, not coerced: a server passes JSON values straight through, and
    ``int(1.5)`` or ``bool("no")`` would silently answer a different request than was asked.
    """

    def bad(name: str, want: str) -> RequestError:
        return RequestError(f"invalid {name}={getattr(p, name)!r}: must be {want}")

    def set_(name: str, value: object) -> None:
        object.__setattr__(p, name, value)

    def integer(name: str, low: int, high: int | None, want: str, optional: bool = False):
        value = getattr(p, name)
        if optional and value is None:
            return
        if not _is_int(value) or value < low or (high is not None and value > high):
            raise bad(name, want)
        set_(name, int(value))

    def number(name: str, ok, want: str) -> None:
        value = getattr(p, name)
        if not _is_number(value):
            raise bad(name, f"a number {want}")
        if not ok(value):
            raise bad(name, want)
        set_(name, float(value))

    def sequence(name: str, single: type | None = None) -> tuple:
        value = getattr(p, name)
        if single is not None and isinstance(value, single):
            return (value,)
        if isinstance(value, (str, bytes, bytearray)) or not isinstance(
            value, (Sequence, set, frozenset)
        ):
            raise bad(name, _SEQUENCE_WANT[name])
        return tuple(value)

    # 0 means "score the prompt only" (OpenAI's max_tokens=0 with echo), so it needs
    # prompt_logprobs; without them a request of 0 tokens would have no result at all.
    low = 0 if _is_int(p.prompt_logprobs) else 1
    integer("max_new_tokens", low, None, "an integer >= 1 (0 only with prompt_logprobs)")
    number("temperature", lambda v: v >= 0, ">= 0 (0 is greedy)")
    integer("top_k", 0, None, "an integer >= 0 (0 is off)")
    number("top_p", lambda v: 0 < v <= 1, "in (0, 1]")
    number("min_p", lambda v: 0 <= v <= 1, "in [0, 1]")
    number("repetition_penalty", lambda v: v > 0, "> 0 (1 is off)")
    for name in ("presence_penalty", "frequency_penalty"):
        number(name, lambda v: -2 <= v <= 2, "in [-2, 2] (0 is off)")
    # What torch.Generator accepts.
    integer("seed", 0, 2**64 - 1, "an integer in [0, 2**64) or None", optional=True)

    # A single stop string is accepted as a one-element list; keep tuples (hashable, immutable).
    stop = sequence("stop", single=str)
    if any(not isinstance(s, str) or not s for s in stop):
        raise bad("stop", _SEQUENCE_WANT["stop"])
    set_("stop", stop)
    ids = sequence("stop_token_ids")
    if any(not _is_int(t) or t < 0 for t in ids):
        raise bad("stop_token_ids", _SEQUENCE_WANT["stop_token_ids"])
    set_("stop_token_ids", tuple(int(t) for t in ids))

    for name in ("ignore_eos", "truncate_prompt"):
        if not isinstance(getattr(p, name), bool):
            raise bad(name, "true or false (a boolean)")
    for name in ("logprobs", "prompt_logprobs"):
        integer(name, 0, 20, "an integer in [0, 20] or None", optional=True)


_SEQUENCE_WANT = {
    "stop": "a string or a list of non-empty strings",
    "stop_token_ids": "a list of non-negative integer token ids",
}


def derive_seed(seed: int | None, index: int) -> int:
    """The seed of choice ``index`` of a request that asks for several (OpenAI's ``n``):
    ``seed`` itself for the first (so ``n=1`` and the first of ``n=4`` agree), then distinct,
    reproducible seeds from (seed, index); a fresh random one for each when ``seed`` is None."""
    if seed is None:
        return secrets.randbits(64)
    if index == 0:
        return seed
    # An odd multiplier makes (seed + index * c) distinct for each index, and SplitMix64's
    # finaliser is a bijection, so different indices never share a seed.
    return _mix64((seed + index * 0xD1B54A32D192ED03) & _MASK64)


def request_seed(params: SamplingParams) -> int:
    """The seed a request samples with: its own, or (unseeded) a random one drawn once, here."""
    return params.seed if params.seed is not None else secrets.randbits(64)


class SamplingRows:
    """The sampling settings of a batch, one row per request: (B,) tensors on the device for
    the arithmetic, and host-side flags that say which stages some row needs. Build it once
    when the batch changes; ``seeds`` come from :func:`request_seed` (default: drawn here)."""

    def __init__(
        self,
        params: Sequence[SamplingParams],
        seeds: Sequence[int] | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        self.params = tuple(params)
        self.seeds = tuple(request_seed(p) for p in params) if seeds is None else tuple(seeds)
        if len(self.seeds) != len(self.params):
            raise ValueError(f"{len(self.seeds)} seeds for {len(self.params)} rows")

        def column(values, dtype=torch.float32) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        ps = self.params
        sampled = [p for p in ps if not p.greedy]
        self.greedy = column([p.greedy for p in ps], torch.bool)
        # A greedy row takes the argmax: its distribution is the plain softmax, untruncated.
        self.temperature = column([1.0 if p.greedy else p.temperature for p in ps])
        self.top_k = column([0 if p.greedy else p.top_k for p in ps], torch.int64)
        self.top_p = column([1.0 if p.greedy else p.top_p for p in ps])
        self.min_p = column([0.0 if p.greedy else p.min_p for p in ps])
        self.repetition = column([p.repetition_penalty for p in ps])
        self.presence = column([p.presence_penalty for p in ps])
        self.frequency = column([p.frequency_penalty for p in ps])
        # What the batch needs, from the settings alone (a decision on device data would sync).
        self.all_greedy = not sampled
        self.any_greedy = len(sampled) < len(ps)
        self.any_repetition = any(p.repetition_penalty != 1 for p in ps)
        self.any_presence_frequency = any(p.presence_penalty or p.frequency_penalty for p in ps)
        self.any_min_p = any(p.min_p > 0 for p in sampled)
        self.any_top_p = any(p.top_p < 1 for p in sampled)
        ranked = [p for p in sampled if p.top_k or p.top_p < 1]
        # How many of the most likely tokens top-k and top-p rank (None: no row truncates; 0:
        # all, a full sort): max(top_k) when every row that truncates has a top-k, which also
        # bounds its top-p set.
        self.rank_width: int | None = None
        if ranked:
            self.rank_width = (
                0 if any(not p.top_k for p in ranked) else max(p.top_k for p in ranked)
            )

    def __len__(self) -> int:
        return len(self.params)


class Penalties:
    """Penalty state of a batch on the device: ``seen`` (B, vocab) marks the tokens of each
    row's prompt and output (repetition penalty), ``counts`` (B, vocab) counts each row's
    generated tokens (presence and frequency penalties); each is None when no row uses it."""

    def __init__(self, seen: torch.Tensor | None, counts: torch.Tensor | None) -> None:
        self.seen, self.counts = seen, counts

    @classmethod
    def start(
        cls,
        rows: SamplingRows,
        prompts: Sequence[Sequence[int]],
        vocab_size: int,
        device: torch.device | str = "cpu",
        outputs: Sequence[Sequence[int]] | None = None,
    ) -> Penalties | None:
        """The state after ``outputs`` (default: none yet) were generated for ``prompts``
        (None if no row is penalised). A scheduler rebuilds it this way when its batch
        changes."""
        if not (rows.any_repetition or rows.any_presence_frequency):
            return None
        outputs = outputs or [[] for _ in prompts]
        shape = (len(rows), vocab_size)
        seen = counts = None

        def index(lists: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
            row_of = [b for b, ids in enumerate(lists) for _ in ids]
            token = [t for ids in lists for t in ids]
            return torch.tensor(row_of, device=device, dtype=torch.int64), torch.tensor(
                token, device=device, dtype=torch.int64
            )

        if rows.any_repetition:
            seen = torch.zeros(shape, dtype=torch.bool, device=device)
            seen[index([[*p, *o] for p, o in zip(prompts, outputs, strict=True)])] = True
        if rows.any_presence_frequency:
            counts = torch.zeros(shape, dtype=torch.int32, device=device)
            ones = torch.ones(sum(map(len, outputs)), dtype=torch.int32, device=device)
            counts.index_put_(index(outputs), ones, accumulate=True)
        return cls(seen, counts)

    def update(self, tokens: torch.Tensor) -> None:
        """Record one generated token per row, (B,) on the device."""
        rows = torch.arange(len(tokens), device=tokens.device)
        if self.seen is not None:
            self.seen[rows, tokens] = True
        if self.counts is not None:
            self.counts[rows, tokens] += 1


def penalise(logits: torch.Tensor, rows: SamplingRows, penalties: Penalties | None) -> torch.Tensor:
    """The logits (B, vocab) with each row's repetition, presence and frequency penalties
    (a new tensor: the caller's logits stay as the model made them)."""
    if penalties is None:
        return logits
    if rows.any_repetition and penalties.seen is not None:
        r = rows.repetition[:, None]
        logits = torch.where(
            penalties.seen, torch.where(logits > 0, logits / r, logits * r), logits
        )
    if rows.any_presence_frequency and penalties.counts is not None:
        counts = penalties.counts.to(logits.dtype)
        logits = (
            logits
            - rows.presence[:, None] * (counts > 0).to(logits.dtype)
            - rows.frequency[:, None] * counts
        )
    return logits


def probabilities(logits: torch.Tensor, rows: SamplingRows) -> torch.Tensor:
    """Each row's sampling distribution (B, vocab) from its (penalised) logits: temperature,
    top-k, top-p, min-p. Dropped tokens get 0 and the rest are not renormalised (the draw
    does not need it). Greedy rows get their plain softmax (they take the argmax)."""
    logits = logits / rows.temperature[:, None]
    order = None
    if rows.rank_width is not None:
        vocab = logits.shape[-1]
        width = min(rows.rank_width or vocab, vocab)
        if width == vocab:
            ranked, order = logits.sort(dim=-1, descending=True)
        else:
            ranked, order = logits.topk(width, dim=-1)
        k = rows.top_k.clamp(1, width)[:, None]
        kth = torch.where(rows.top_k[:, None] > 0, ranked.gather(1, k - 1), -math.inf)
        logits = logits.masked_fill(logits < kth, -math.inf)
    probs = torch.softmax(logits, dim=-1)
    if rows.any_top_p:
        # Keep a token if the mass of the more likely ones is below top_p (the first always
        # stays), as a threshold: every token at least as likely as the last one kept stays,
        # so the cut does not depend on how ties were ordered or how many tokens were ranked.
        ranked_probs = probs.gather(1, order)
        before = ranked_probs.cumsum(-1) - ranked_probs
        kept = (before < rows.top_p[:, None]).sum(-1, keepdim=True)
        cut = ranked_probs.gather(1, kept - 1)
        cut = torch.where(rows.top_p[:, None] < 1, cut, 0.0)
        probs = probs.masked_fill(probs < cut, 0.0)
    if rows.any_min_p:
        probs = probs.masked_fill(probs < rows.min_p[:, None] * probs.amax(-1, keepdim=True), 0.0)
    return probs


_MASK64 = (1 << 64) - 1


def uniform(seed: int, step: int) -> float:
    """A number in (0, 1) that depends only on (seed, step): the step-th output of SplitMix64
    seeded with ``seed`` (Steele, Lea & Flood 2014), scaled from its top 53 bits."""
    z = _mix64((seed + (step + 1) * 0x9E3779B97F4A7C15) & _MASK64)
    return ((z >> 11) + 0.5) / (1 << 53)


def _mix64(z: int) -> int:
    """SplitMix64's finaliser: a bijection of 64-bit integers that scatters every input bit."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-transform sampling: for each row of probabilities (B, vocab), not necessarily
    normalised, the first token whose cumulative probability exceeds ``u`` (B,) × the row's
    total. float64 keeps u × total below the total, so a token of probability 0 is never
    drawn."""
    cdf = probs.double().cumsum(-1)
    target = u[:, None] * cdf[:, -1:]
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=probs.shape[-1] - 1)


def sample(
    logits: torch.Tensor,
    rows: SamplingRows,
    steps: Sequence[int],
    penalties: Penalties | None = None,
) -> torch.Tensor:
    """The next token of every row of fp32 logits (B, vocab) under its own settings, as a
    (B,) int64 tensor on the logits' device. ``steps[b]`` is how many tokens row b has
    generated (its draw's counter). Nothing here waits for the device: one ``.tolist()`` of
    the result per step serves the whole batch."""
    logits = penalise(logits, rows, penalties)
    if rows.all_greedy:
        return logits.argmax(-1)
    u = torch.tensor(
        [uniform(seed, step) for seed, step in zip(rows.seeds, steps, strict=True)],
        dtype=torch.float64,
        device=logits.device,
    )
    tokens = draw(probabilities(logits, rows), u)
    if rows.any_greedy:
        tokens = torch.where(rows.greedy, logits.argmax(-1), tokens)
    return tokens


def apply_penalties(
    logits: torch.Tensor,
    params: SamplingParams,
    seen: torch.Tensor | None,
    counts: torch.Tensor | None,
) -> torch.Tensor:
    """Penalise one row of logits (vocab,): :func:`penalise` on a batch of one. ``seen`` marks
    tokens in the prompt or output (repetition penalty); ``counts`` counts generated tokens
    (presence/frequency)."""
    penalties = Penalties(
        None if seen is None else seen[None], None if counts is None else counts[None]
    )
    return penalise(logits[None], SamplingRows([params], [0], logits.device), penalties)[0]


def sample_row(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> int:
    """Draw a token from one row of (already penalised) fp32 logits (vocab,): :func:`sample`
    on a batch of one, seeded from ``generator`` (torch's default one if None), so successive
    calls with one generator draw independently and a reseeded generator repeats them."""
    device = generator.device if generator is not None else "cpu"
    seed = int(torch.randint(0, 2**63 - 1, (), generator=generator, device=device))
    return int(sample(logits[None], SamplingRows([params], [seed], logits.device), [0])[0])


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
