"""The generation engine: prefill and decode over a preallocated KV cache.

    engine = camelid.Engine(model, tokenizer)
    engine.generate("Once upon a time", max_new_tokens=64, temperature=0.8, seed=1).text
    for piece in engine.stream("Once upon a time"):
        print(piece, end="", flush=True)
    engine.score("The cat sat on the mat.")        # log-probabilities of the text's tokens

Each prompt is prefilled on its own (so batched and unbatched results agree), then all prompts
of a batch decode together, one token per step, each at its own position in its own cache row.
Rows that finish keep stepping with the batch until the last one ends (static batching; a
continuous-batching scheduler can reuse the same cache rows). Each step samples the whole batch
at once, every row with its own settings (:mod:`camelid.infer.sampling`), and moves the chosen
tokens to the host in one transfer.

Speed: the decode step is the loop's only model call. With ``compile=True`` it is compiled
as a static graph per (batch, cache length), both rounded up to powers of two; on CUDA as a
CUDA graph (``mode="reduce-overhead"``) over a cache whose addresses never change, on CPU with
the row-dot form of the weight products. On CPU, fp32 weight products go to oneDNN rather than
MKL, compiled or not (about twice as fast for a batch of rows; see :mod:`camelid.infer.linear`).
``int8=True`` (or "row") decodes with int8 weight-only linear layers, one scale per output row;
``int8="q8_0"`` with llama.cpp's Q8_0 blocks (a scale per 32 inputs; a model loaded from a Q8_0
GGUF decodes from its file's very bytes), by a kernel of its own at batch 1 on AVX2 CPUs
(:mod:`camelid.infer.kernels`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from camelid.errors import RequestError
from camelid.infer.detok import TextStream
from camelid.infer.linear import copyable, decode_copy, int8_form
from camelid.infer.sampling import (
    Penalties,
    SamplingParams,
    SamplingRows,
    params_from,
    request_seed,
    sample,
    stop_set,
    top_logprobs,
)
from camelid.model import KVCache, Transformer
from camelid.tokenizer import Tokenizer

Prompt = str | Sequence[int]

CACHE_BLOCK = 256  # eager cache lengths are rounded up to a multiple of this


def _compiled_shape(batch: int, length: int, max_batch: int) -> tuple[int, int]:
    """The (batch, cache length) a compiled step runs at: powers of two (cache length at least
    CACHE_BLOCK), so a long-lived engine compiles a handful of static graphs, not one per
    request. Static graphs run faster than one dynamic-shape graph (measured on CPU)."""
    return min(1 << (batch - 1).bit_length(), max_batch), max(
        CACHE_BLOCK, 1 << (length - 1).bit_length()
    )


@dataclass
class TokenLogprob:
    """One token's log-probability under the model (before any sampling transform), its rank
    among all tokens (1 = the most likely, i.e. greedy) and the top alternatives (id → logprob)."""

    token: int
    logprob: float
    rank: int
    top: dict[int, float] = field(default_factory=dict)

    def to_dict(self, tokenizer: Tokenizer) -> dict[str, Any]:
        """As JSON, each token with its text (ids alone cannot be read)."""
        return {
            "token": self.token,
            "text": tokenizer.decode([self.token]),
            "logprob": self.logprob,
            "rank": self.rank,
            "top": [
                {"token": t, "text": tokenizer.decode([t]), "logprob": v}
                for t, v in self.top.items()
            ],
        }


@dataclass
class Completion:
    """One prompt's result. ``finish_reason`` is "stop" (a stop token or string) or "length"
    (``max_new_tokens`` or the context ran out); a scheduler's request may also end "abort"
    (cancelled) or "error" (the step failed; ``error`` says why). Stop tokens and stop strings
    are not part of ``text``; ``token_ids`` holds every generated token except a final stop
    token, which is ``stop_logprob`` (with its logprob, when logprobs were asked for: a scoring
    client that slices prompt-plus-sampled tokens needs it). ``cached_tokens``: prompt tokens
    whose keys and values came from the prefix cache."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # the first token has none
    cached_tokens: int = 0
    error: str | None = None
    stop_logprob: TokenLogprob | None = None

    def to_dict(self, tokenizer: Tokenizer, *, index: int, prompt: str) -> dict[str, Any]:
        """As JSON, with the prompt it completes and its place in a batch (one record of
        ``camelid generate --json``); logprobs only when they were asked for."""
        out: dict[str, Any] = {
            "index": index,
            "prompt": prompt,
            "text": self.text,
            "token_ids": self.token_ids,
            "finish_reason": self.finish_reason,
            "prompt_tokens": len(self.prompt_token_ids),
            "completion_tokens": len(self.token_ids),
        }
        if self.logprobs is not None:
            out["logprobs"] = [lp.to_dict(tokenizer) for lp in self.logprobs]
        if self.prompt_logprobs is not None:
            out["prompt_logprobs"] = [
                None if lp is None else lp.to_dict(tokenizer) for lp in self.prompt_logprobs
            ]
        return out


@dataclass
class Score:
    """Log-probabilities of a given text's tokens; ``tokens[0]`` (nothing before it) is None."""

    token_ids: list[int]
    tokens: list[TokenLogprob | None]

    @property
    def logprob(self) -> float:
        """Sum over every scored token."""
        return sum(t.logprob for t in self.tokens if t is not None)

    def logprob_of(self, start: int) -> tuple[float, bool]:
        """Summed log-probability of tokens ``start:`` and whether each was the greedy choice
        (what an evaluation harness's ``loglikelihood`` needs for a continuation)."""
        rest = [t for t in self.tokens[max(start, 1) :] if t is not None]
        return sum(t.logprob for t in rest), all(t.rank == 1 for t in rest)


class _Sequence:
    """One request's state while it decodes (shared by the Engine and the Scheduler)."""

    def __init__(self, prompt: list[int], params: SamplingParams, engine: Engine) -> None:
        self.prompt, self.params = prompt, params
        self.seed = request_seed(params)  # an unseeded request draws its seed once, here
        self.out: list[int] = []
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        self.prompt_logprobs: list[TokenLogprob | None] | None = None
        self.stream = TextStream(engine.tokenizer.decode, params.stop)
        self.stops = stop_set(params, engine.stop_token_ids)
        self.finish_reason: str | None = None
        self.stop_logprob: TokenLogprob | None = None
        self.limit = min(params.max_new_tokens, engine.max_seq_len - len(prompt))

    @property
    def position(self) -> int:
        """Where the last accepted token is fed to the model."""
        return len(self.prompt) + len(self.out) - 1

    def accept(self, token: int) -> str:
        """Record a chosen token; return the text it releases."""
        if token in self.stops:
            self.finish_reason = "stop"
            if self.logprobs:  # the stop token is not part of the output
                self.stop_logprob = self.logprobs.pop()
            return self.stream.finish()
        self.out.append(token)
        piece = self.stream.push(token)
        if self.stream.stopped:
            self.finish_reason = "stop"
        elif len(self.out) >= self.limit:
            self.finish_reason = "length"
        if self.finish_reason is not None:
            piece += self.stream.finish()
        return piece

    def result(self) -> Completion:
        return Completion(
            text=self.stream.text,
            token_ids=self.out,
            finish_reason=self.finish_reason or "length",
            prompt_token_ids=self.prompt,
            logprobs=self.logprobs,
            prompt_logprobs=self.prompt_logprobs,
            stop_logprob=self.stop_logprob,
        )


def _token_logprobs(logits: torch.Tensor, tokens: Sequence[int], top: int) -> list[TokenLogprob]:
    """Log-probability, rank and top alternatives of ``tokens[i]`` under ``logits[i]``."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    ids = torch.tensor(tokens, device=logp.device).unsqueeze(1)
    chosen = logp.gather(1, ids)
    ranks = (logp > chosen).sum(1) + 1
    tops = top_logprobs(logp, top or 0)
    return [
        TokenLogprob(t, lp, r, tp)
        for t, lp, r, tp in zip(
            tokens, chosen.squeeze(1).tolist(), ranks.tolist(), tops, strict=True
        )
    ]


def default_stop_ids(tokenizer: Tokenizer) -> tuple[int, ...]:
    """End of text, end of turn and (Llama 3.1+) end of message, where the vocabulary has them
    (``<|eot_id|>``/``<|eom_id|>`` in Llama 3, ``<|eot|>``/``<|eom|>`` in Llama 4)."""
    eom = [tokenizer.special_tokens.get(name) for name in ("<|eom_id|>", "<|eom|>")]
    ids = [tokenizer.eos_id, tokenizer.eot_id, *eom]
    return tuple(dict.fromkeys(i for i in ids if i is not None))


class Engine:
    """Generation and scoring for one model and its tokenizer.

    - ``max_batch_size``: prompts decoded together; longer lists run in batches of this size.
    - ``max_seq_len``: the context (prompt + output), at most the model's.
    - ``compile``: compile the decode step (a one-off cost of seconds to a minute; worth it for
      long outputs and servers).
    - ``int8``: decode with int8 weight-only linear layers (a copy; ``model`` is unchanged):
      ``True``/"row" one fp32 scale per output row, "q8_0" llama.cpp's Q8_0 (one fp16 scale
      per block of 32 inputs; layers whose input size is not a multiple of 32 stay fp32).
    - ``stop_token_ids``: tokens that end every request (default: the tokenizer's end of text,
      end of turn and end of message).
    - ``cache_dtype``: the KV cache's dtype (default: the weights'); the dtype the model
      computes in when that differs from its weights' (autocast, FSDP2 mixed precision).
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        *,
        max_batch_size: int = 16,
        max_seq_len: int | None = None,
        compile: bool = False,
        int8: bool | str = False,
        stop_token_ids: Sequence[int] | None = None,
        cache_dtype: torch.dtype | None = None,
    ) -> None:
        config = model.config
        if tokenizer.vocab_size > config.vocab_size:
            raise RequestError(
                f"tokenizer {tokenizer.source} has {tokenizer.vocab_size} ids but the model's "
                f"vocabulary has {config.vocab_size}: they do not belong together"
            )
        if max_batch_size < 1:
            raise RequestError(f"invalid max_batch_size={max_batch_size}: must be >= 1")
        if max_seq_len is not None and max_seq_len < 2:
            raise RequestError(f"invalid max_seq_len={max_seq_len}: must be >= 2")
        try:
            form = int8_form(int8)
        except ValueError as e:
            raise RequestError(str(e)) from None
        model.eval()
        self.tokenizer = tokenizer
        self._vocab = tokenizer.vocab_size  # a plain int: read inside the compiled step
        self.config = config
        weight = model.tok_embeddings.weight
        self.device, self.dtype = weight.device, cache_dtype or weight.dtype
        self.max_seq_len = min(config.max_seq_len, max_seq_len or config.max_seq_len)
        self.max_batch_size = max_batch_size
        self.stop_token_ids = (
            default_stop_ids(tokenizer) if stop_token_ids is None else tuple(stop_token_ids)
        )
        self.compiled, self.int8 = compile, form
        self.weights_digest: str | None = None  # set by load_engine when it merged an adapter
        cpu = self.device.type == "cpu"
        # CPU: oneDNN's matmul (and, compiled, the row-dot form) on a copy sharing the weights;
        # a sharded or compiled model (the trainer's samples) keeps its own layers.
        if form or (cpu and copyable(model)):
            model = decode_copy(model, int8=form or False, row_dot=compile and cpu)
        self.model = model
        self._cache: KVCache | None = None
        self._step = self._decode_step
        if compile:
            cuda = self.device.type == "cuda"
            # An MoE layer's expert groups have data-dependent sizes: the graph breaks there.
            moe = getattr(getattr(model, "config", None), "is_moe", False)
            # CPU: no size/stride asserts around the step's external calls (the weight-product
            # ops of camelid.infer.kernels): ~230 checks a llama-125m step, ~0.4 ms a token.
            self._step = torch.compile(
                self._decode_step,
                fullgraph=not moe,
                dynamic=False,
                **({"mode": "reduce-overhead"} if cuda else {"options": {"size_asserts": False}}),
            )
            # One static graph per (batch, cache length) pair in use; let a server hold them all.
            limit = torch._dynamo.config.recompile_limit
            torch._dynamo.config.recompile_limit = max(limit, 64)

    # ---------------------------------------------------------------------------- public API
    def generate(
        self,
        prompt: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        **kwargs,
    ) -> Completion | list[Completion]:
        """Complete one prompt (text, or a list of token ids) or a list of prompts.

        Sampling settings come as a :class:`SamplingParams` and/or keywords of the same names
        (``max_new_tokens=64, temperature=0``); for a list of prompts ``params`` may also be a
        list, one per prompt (each row samples with its own settings and seed, so copies of a
        prompt can draw different samples in one batch). Text prompts get a BOS token; id
        lists are used as given. Returns a :class:`Completion`, or a list of them for a list
        of prompts.
        """
        if isinstance(prompt, torch.Tensor):
            prompt = prompt.tolist()
        single = isinstance(prompt, str) or (
            len(prompt) > 0 and all(isinstance(t, int) for t in prompt)
        )
        prompts = [prompt] if single else list(prompt)
        if isinstance(params, Sequence):
            if single or len(params) != len(prompts):
                raise RequestError(
                    f"{len(params)} sampling settings for {len(prompts)} prompt(s): give one "
                    "per prompt of a list, or a single SamplingParams"
                )
            p = [params_from(q, kwargs) for q in params]
        else:
            p = params_from(params, kwargs)
        seqs = self._sequences(prompts, p)
        for _ in self._run(seqs):
            pass
        results = [s.result() for s in seqs]
        return results[0] if single else results

    def stream(
        self, prompt: Prompt, params: SamplingParams | None = None, **kwargs
    ) -> Iterator[str]:
        """Generate for one prompt, yielding text as it becomes final. Pieces never split a
        character and never show a stop string; joined, they are the completion's text."""
        seqs = self._sequences([prompt], params_from(params, kwargs))  # bad input fails here
        return (piece for _, piece in self._run(seqs) if piece)

    def stream_batch(
        self, prompts: Sequence[Prompt], params: SamplingParams | None = None, **kwargs
    ) -> Iterator[tuple[int, str, Completion | None]]:
        """Generate for several prompts together, yielding ``(index, piece, completion)`` per
        new piece; ``completion`` is set on the last event of each prompt."""
        seqs = self._sequences(list(prompts), params_from(params, kwargs))  # bad input fails here

        def events() -> Iterator[tuple[int, str, Completion | None]]:
            for i, piece in self._run(seqs):
                done = seqs[i].finish_reason is not None
                if piece or done:
                    yield i, piece, seqs[i].result() if done else None

        return events()

    @torch.inference_mode()
    def score(self, prompt: Prompt, top_logprobs: int = 0) -> Score:
        """Log-probability of every token of ``prompt`` given the ones before it (one forward
        pass, no sampling), with ``top_logprobs`` alternatives per token."""
        ids = self._encode(prompt)
        if len(ids) > self.max_seq_len:
            raise RequestError(
                f"text of {len(ids)} tokens is longer than the context ({self.max_seq_len})"
            )
        if not 0 <= top_logprobs <= 20:
            raise RequestError(f"invalid top_logprobs={top_logprobs}: must be in [0, 20]")
        logits = self.logits(torch.tensor([ids], device=self.device))[0, :-1]
        scored = _token_logprobs(logits, ids[1:], top_logprobs) if len(ids) > 1 else []
        return Score(token_ids=ids, tokens=[None, *scored])

    @torch.inference_mode()
    def score_batch(
        self,
        sequences: Sequence[Sequence[int]],
        starts: Sequence[int],
        *,
        batch_tokens: int = 8192,
    ) -> list[list[TokenLogprob]]:
        """Log-probability and rank of tokens ``seq[start:]`` of each sequence given all before
        them, for many sequences at once (what likelihood evaluation needs).

        Sequences go through the model several per forward pass, longest first, right-padded
        (causal attention: padding never reaches a real position), at most ``batch_tokens``
        padded tokens a pass; only the scored positions are projected to the vocabulary. The
        results equal :meth:`score`'s within float rounding of batched products (~1e-6)."""
        if len(sequences) != len(starts):
            raise RequestError(f"{len(sequences)} sequences but {len(starts)} starts")
        for n, (seq, start) in enumerate(zip(sequences, starts, strict=True)):
            if not 1 <= start <= len(seq):
                raise RequestError(f"sequence {n}: start {start} outside 1..{len(seq)}")
            if len(seq) > self.max_seq_len + 1:  # the last token is only a target
                raise RequestError(
                    f"sequence {n} of {len(seq)} tokens does not fit the context "
                    f"({self.max_seq_len} inputs)"
                )
            if seq and not all(0 <= t < self._vocab for t in seq):
                raise RequestError(f"sequence {n}: token ids outside the vocabulary")
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
        out: list[list[TokenLogprob]] = [[] for _ in sequences]
        i = 0
        while i < len(order):
            width = len(sequences[order[i]])
            group = order[i : i + max(1, batch_tokens // max(width, 1))]
            i += len(group)
            group = [g for g in group if starts[g] < len(sequences[g])]  # nothing to score
            if not group:
                continue
            rows = [list(sequences[g]) + [0] * (width - len(sequences[g])) for g in group]
            tokens = torch.tensor(rows, device=self.device)[:, :-1]
            where = [
                (b, p)
                for b, g in enumerate(group)
                for p in range(starts[g] - 1, len(sequences[g]) - 1)
            ]
            select = torch.zeros(tokens.shape, dtype=torch.bool)
            for b, p in where:  # row-major, the order of ``where``
                select[b, p] = True
            logits = self.logits(tokens, select)  # only the scored positions are projected
            targets = [sequences[group[b]][p + 1] for b, p in where]
            scored = iter(_token_logprobs(logits, targets, 0))
            for g in group:
                out[g] = [next(scored) for _ in range(len(sequences[g]) - starts[g])]
        return out

    @torch.inference_mode()
    def score_continuations(
        self,
        groups: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]],
        *,
        batch_tokens: int = 8192,
    ) -> list[list[list[TokenLogprob]]]:
        """For each (context, continuations) group, the log-probability and rank of every
        token of every continuation given the context: :meth:`score_batch` of
        ``context + continuation`` with ``start = len(context)``, but the context is run once
        for all its continuations (the answer choices of one question share it).

        Contexts go through the model several at a time into a KV cache; then each
        continuation index runs as one batch over that cache, at each row's own positions.
        A continuation writes the cache slots after its context and reads only up to its own
        position, so the next one finds the context's keys and values untouched."""
        out: list[list[list[TokenLogprob]]] = [[] for _ in groups]
        for n, (ctx, conts) in enumerate(groups):
            if not ctx or not conts or any(not c for c in conts):
                raise RequestError(f"group {n}: empty context or continuation")
            longest = len(ctx) + max(len(c) for c in conts) - 1
            if longest > self.max_seq_len:
                raise RequestError(
                    f"group {n}: {longest} inputs do not fit the context ({self.max_seq_len})"
                )
            if not all(0 <= t < self._vocab for seq in (ctx, *conts) for t in seq):
                raise RequestError(f"group {n}: token ids outside the vocabulary")
        order = sorted(range(len(groups)), key=lambda i: -len(groups[i][0]))
        dev = self.device
        i = 0
        while i < len(order):
            width = len(groups[order[i]][0]) + max(len(c) for c in groups[order[i]][1])
            batch = order[i : i + max(1, batch_tokens // width)]
            i += len(batch)
            ctxs = [list(groups[g][0]) for g in batch]
            conts = [[list(c) for c in groups[g][1]] for g in batch]
            C = max(len(c) for c in ctxs)
            size = C + max(len(c) for cs in conts for c in cs)
            cache = KVCache(self.config, len(batch), size, dev, self.dtype)
            tokens = torch.tensor([c + [0] * (C - len(c)) for c in ctxs], device=dev)
            b_idx = torch.arange(len(batch), device=dev)
            last = torch.tensor([len(c) - 1 for c in ctxs], device=dev)
            first = self._project(tokens, torch.arange(C, device=dev), cache, C, b_idx, last)
            logp_first = torch.log_softmax(self._mask(first).float(), dim=-1)
            for b, g in enumerate(batch):
                out[g] = [[] for _ in conts[b]]
                for j, cont in enumerate(conts[b]):
                    out[g][j].append(_one_logprob(logp_first[b], cont[0]))
            for j in range(max(len(cs) for cs in conts)):
                rows = [b for b in range(len(batch)) if j < len(conts[b]) and len(conts[b][j]) > 1]
                if not rows:
                    continue
                T = max(len(conts[b][j]) for b in rows) - 1  # the last token is only a target
                toks = [[0] * T for _ in batch]
                pos = [[len(ctxs[b]) + t for t in range(T)] for b in range(len(batch))]
                where, targets = [], []
                for b in rows:
                    cont = conts[b][j]
                    toks[b][: len(cont) - 1] = cont[:-1]
                    where += [(b, t) for t in range(len(cont) - 1)]
                    targets += cont[1:]
                positions = torch.tensor(pos, device=dev)
                bi = torch.tensor([b for b, _ in where], device=dev)
                ti = torch.tensor([t for _, t in where], device=dev)
                kv_len = int(positions.max()) + 1
                logits = self._project(torch.tensor(toks, device=dev), positions, cache, kv_len,
                                       bi, ti)  # fmt: skip
                scored = iter(_token_logprobs(self._mask(logits), targets, 0))
                for b in rows:
                    out[batch[b]][j].extend(next(scored) for _ in range(len(conts[b][j]) - 1))
        return out

    def _project(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        kv_len: int,
        rows: torch.Tensor,
        cols: torch.Tensor,
    ) -> torch.Tensor:
        """Logits at (rows, cols) only, of a cached forward pass (as :meth:`logits` projects
        only its selected positions)."""
        output = self.model.output
        if isinstance(getattr(output, "weight", None), torch.Tensor):  # int8 layers have none
            return self.model(tokens, positions, cache=cache, kv_len=kv_len,
                              head=lambda h, _: output(h[rows, cols]))  # fmt: skip
        return self.model(tokens, positions, cache=cache, kv_len=kv_len)[rows, cols]

    @torch.inference_mode()
    def logits(self, tokens: torch.Tensor, select: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 logits (B, T, vocab) of a batch of rows ``tokens`` (B, T), all starting at
        position 0, in one forward pass without a cache: a row's logits at t depend on its
        tokens 0..t only, so rows of different lengths can be padded on the right. With
        ``select`` (bool, (B, T)) only those positions are projected to the vocabulary and
        returned, (N, vocab) in row-major order: a scorer of a few tokens per long row does not
        pay for (or hold) the logits of the rest. Ids past the tokenizer's are -inf."""
        tokens = tokens.to(self.device)
        if select is None:
            return self._mask(self.model(tokens))
        select = select.to(self.device)
        output = self.model.output
        if isinstance(getattr(output, "weight", None), torch.Tensor):  # int8 layers have none
            return self._mask(self.model(tokens, head=lambda h, _: output(h[select])))
        return self._mask(self.model(tokens)[select])

    # ------------------------------------------------------------------------------ internals
    def _encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, bos=True)
        ids = [int(t) for t in (prompt.tolist() if isinstance(prompt, torch.Tensor) else prompt)]
        if not ids:
            raise RequestError("empty prompt: give at least one token")
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise RequestError(
                f"prompt token id {bad[0]} is outside the vocabulary (0 .. "
                f"{self.config.vocab_size - 1})"
            )
        return ids

    def _sequences(
        self, prompts: list[Prompt], params: SamplingParams | list[SamplingParams]
    ) -> list[_Sequence]:
        if not prompts:
            raise RequestError("no prompts given")
        each = params if isinstance(params, list) else [params] * len(prompts)
        return [self._prepare(prompt, p) for prompt, p in zip(prompts, each, strict=True)]

    def _prepare(self, prompt: Prompt, params: SamplingParams) -> _Sequence:
        """One request's state, after the checks every request passes (the context rule)."""
        ids = self._encode(prompt)
        # A prompt leaves room for one new token (none when only scored). Truncation keeps room
        # for max_new_tokens, but at least half the context of prompt.
        room = max(self.max_seq_len - params.max_new_tokens, self.max_seq_len // 2)
        fits = len(ids) + min(params.max_new_tokens, 1) <= self.max_seq_len
        if not fits or (params.truncate_prompt and len(ids) > room):
            if not params.truncate_prompt:
                raise RequestError(
                    f"prompt of {len(ids)} tokens does not fit the context of "
                    f"{self.max_seq_len} tokens (shorten it, or set truncate_prompt to "
                    "keep its last tokens)"
                )
            ids = ids[-max(room, 1) :]
        return _Sequence(ids, params, self)

    def _prefill(self, cache: KVCache, seq: _Sequence, start: int, stop: int) -> torch.Tensor:
        """Feed prompt tokens ``start:stop`` (whose predecessors are cached) into the one-row
        ``cache``; return the fp32 logits after the last of them (vocab,). With
        ``prompt_logprobs``, score every prompt token these logits predict."""
        dev = self.device
        want = seq.params.prompt_logprobs is not None
        logits = self.model(
            torch.tensor([seq.prompt[start:stop]], device=dev),
            torch.arange(start, stop, device=dev),
            cache=cache,
            kv_len=stop,
            last_only=not want,
        )[0]
        logits = self._mask(logits)
        if want:
            if start == 0:
                seq.prompt_logprobs = [None]
            targets = seq.prompt[start + 1 : stop + 1]
            if targets:
                seq.prompt_logprobs += _token_logprobs(
                    logits[: len(targets)], targets, seq.params.prompt_logprobs
                )
        return logits[-1]

    def _cache_for(self, batch: int, length: int) -> KVCache:
        """The engine's cache, grown (to rounded sizes) if too small."""
        c = self._cache
        if c is None or c.batch_size < batch or c.max_len < length:
            if self.compiled:
                batch, size = _compiled_shape(batch, length, self.max_batch_size)
            else:
                size = math.ceil(length / CACHE_BLOCK) * CACHE_BLOCK
            size = min(self.max_seq_len, size)
            if c is not None:
                batch, size = max(batch, c.batch_size), max(size, c.max_len)
            self._cache = None  # free the old one first
            c = KVCache(self.config, batch, size, self.device, self.dtype)
            if self.compiled and self.device.type == "cuda":
                for t in c.k + c.v:  # fixed addresses: CUDA graphs may write into them
                    torch._dynamo.mark_static_address(t)
            self._cache = c
        return c

    def _decode_step(
        self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, kv_len: int | None
    ) -> torch.Tensor:
        return self._mask(self.model(tokens, positions, cache=cache, kv_len=kv_len)[:, -1])

    def _mask(self, logits: torch.Tensor) -> torch.Tensor:
        """fp32 logits; embedding rows past the tokenizer's ids (padding) can never be chosen."""
        logits = logits.float()
        if self._vocab < logits.shape[-1]:
            logits[..., self._vocab :] = -math.inf
        return logits

    @torch.inference_mode()
    def _run(self, seqs: list[_Sequence]) -> Iterator[tuple[int, str]]:
        """Decode ``seqs`` in batches of ``max_batch_size``; yield (index, new text) per token."""
        for start in range(0, len(seqs), self.max_batch_size):
            batch = seqs[start : start + self.max_batch_size]
            for i, piece in self._run_batch(batch):
                yield start + i, piece

    def _run_batch(self, seqs: list[_Sequence]) -> Iterator[tuple[int, str]]:
        B, dev = len(seqs), self.device
        need = max(len(s.prompt) + s.limit for s in seqs)
        # A compiled step runs at a power-of-two batch: the extra rows step on dummy tokens.
        rows = _compiled_shape(B, need, self.max_batch_size)[0] if self.compiled else B
        cache = self._cache_for(rows, need)
        pad = [[0]] * (rows - B)
        settings = SamplingRows([s.params for s in seqs], [s.seed for s in seqs], dev)
        penalties = Penalties.start(settings, [s.prompt for s in seqs], self.config.vocab_size, dev)
        last = []
        for b, s in enumerate(seqs):  # prefill, one prompt at a time
            last.append(self._prefill(cache.rows(b, b + 1), s, 0, len(s.prompt)))
            if s.limit == 0:  # score only: the prompt's logprobs are the result
                s.finish_reason = "length"
                yield b, ""
        if any(s.finish_reason is None for s in seqs):
            yield from self._choose(seqs, torch.stack(last), settings, penalties)
        while any(s.finish_reason is None for s in seqs):
            tokens = [[s.out[-1] if s.out else 0] for s in seqs] + pad
            positions = [[max(s.position, 0)] for s in seqs] + pad
            kv_len = None if self.compiled else max(s.position for s in seqs) + 1
            logits = self._step(
                torch.tensor(tokens, device=dev), torch.tensor(positions, device=dev), cache, kv_len
            )
            yield from self._choose(seqs, logits[:B], settings, penalties)

    def _choose(
        self,
        seqs: list[_Sequence],
        logits: torch.Tensor,
        settings: SamplingRows,
        penalties: Penalties | None,
    ) -> Iterator[tuple[int, str]]:
        """Sample every row's next token from fp32 logits (B, vocab) in one go, move them to
        the host at once, and hand each running sequence its token (and its logprobs)."""
        chosen = sample(logits, settings, [len(s.out) for s in seqs], penalties)
        if penalties is not None:
            penalties.update(chosen)
        tokens = chosen.tolist()
        asked = [
            b for b, s in enumerate(seqs) if s.logprobs is not None and s.finish_reason is None
        ]
        if asked:
            top = max(seqs[b].params.logprobs for b in asked)
            index = torch.tensor(asked, device=logits.device)
            scored = _token_logprobs(logits[index], [tokens[b] for b in asked], top)
            for b, t in zip(asked, scored, strict=True):
                n = seqs[b].params.logprobs
                t.top = dict(list(t.top.items())[:n]) if n < top else t.top
                seqs[b].logprobs.append(t)
        for b, s in enumerate(seqs):
            if s.finish_reason is None:
                yield b, s.accept(tokens[b])


def _one_logprob(logp: torch.Tensor, token: int) -> TokenLogprob:
    """Token ``token``'s log-probability and rank under one row of log-probabilities."""
    chosen = logp[token]
    return TokenLogprob(token, float(chosen), int((logp > chosen).sum()) + 1)
