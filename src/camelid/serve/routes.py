"""``/v1/completions`` and ``/v1/chat/completions``: from a checked body to engine requests and
back to OpenAI's response and stream-chunk shapes.

A body is read with a size limit, parsed strictly (:mod:`camelid.serve.schemas`), checked
field by field (each refusal names its field), turned into one engine request per prompt and
choice (``n`` choices of a prompt are seeded ``derive_seed(seed, i)``), and answered whole or
as server-sent events. Logprobs with ``echo`` cover every prompt token, then every generated
token (a final stop token too), in the legacy ``{tokens, token_logprobs, top_logprobs,
text_offset}`` form that lm-evaluation-harness reads (it sums ``token_logprobs[ctxlen:-1]``).
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from camelid.errors import CamelidError, RequestError
from camelid.infer import Completion, Engine, SamplingParams, TokenLogprob, derive_seed
from camelid.serve import schemas
from camelid.serve.backend import Backend, Event, QueueFull, ShuttingDown
from camelid.serve.errors import APIError, error_body
from camelid.serve.metrics import ServerMetrics
from camelid.tokenizer.chat import chat_prompt_ids

MAX_LOGPROBS = 20


@dataclass(frozen=True)
class Limits:
    """What one request may ask for."""

    max_body_bytes: int = 4 << 20
    max_n: int = 16
    max_prompts: int = 64
    max_tokens: int | None = None  # default: the context


@dataclass
class ServeState:
    """Everything a handler needs, fixed when the app is made."""

    engine: Engine
    backend: Backend
    metrics: ServerMetrics
    model_name: str
    limits: Limits = field(default_factory=Limits)
    extra_stop_ids: tuple[int, ...] = ()
    digest: str | None = None  # the weights digest (camelid.weights.digest), when known

    @property
    def context(self) -> int:
        return self.engine.max_seq_len

    @property
    def system_fingerprint(self) -> str | None:
        """OpenAI's ``system_fingerprint``: which weights answered, "fp_" and the first 16 hex
        digits of the weights digest (None when the app was given no digest)."""
        return None if self.digest is None else f"fp_{self.digest[:16]}"

    def envelope(self, rid: str, kind: str, created: int) -> dict[str, Any]:
        """The fields every completion, chat completion and stream chunk starts with."""
        return {"id": rid, "object": kind, "created": created, "model": self.model_name,
                "system_fingerprint": self.system_fingerprint}  # fmt: skip


# ------------------------------------------------------------------------------- reading a body
async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with a 413 as soon as it passes ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(f"request body of {declared} bytes exceeds {limit} bytes", status=413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(f"request body exceeds {limit} bytes", status=413)
        chunks.append(chunk)
    return b"".join(chunks)


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def _loc(loc: Sequence[Any]) -> str:
    """A pydantic error location as a field path: ``messages[0].content``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _TYPE_TAGS or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(part)):
            continue  # a union member's name (str, list[int], ...), not a field
        else:
            out += f".{part}" if out else str(part)
    return out


def parse(model: type[BaseModel], body: bytes) -> Any:
    """A strict parse of a JSON body; the first problem as an APIError naming its field."""
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        first = errors[0]
        kind = first["type"]
        if kind == "json_invalid":
            raise APIError(f"malformed JSON body: {first.get('msg')}") from None
        if kind == "model_type" and not first["loc"]:
            raise APIError("the body must be a JSON object") from None
        # A union reports one error per member; report the field once.
        param = _loc(first["loc"])
        if kind == "extra_forbidden":
            raise APIError(f"unknown field {param!r}", param=param) from None
        if kind == "missing":
            raise APIError(f"{param!r} is required", param=param) from None
        raise APIError(f"invalid {param!r}: {first['msg']}", param=param) from None


# ------------------------------------------------------------------------------------- checks
def _range(name: str, value: float | None, low: float, high: float, low_open: bool = False):
    if value is None:
        return
    if value != value or value < low or value > high or (low_open and value == low):
        left = "(" if low_open else "["
        raise APIError(
            f"{name}={value} is out of range: must be in {left}{low}, {high}]", param=name
        )


def _check_common(state: ServeState, req: schemas._Sampling, rejected: frozenset[str]) -> None:
    if req.model != state.model_name:
        raise APIError(
            f"model {req.model!r} does not exist; this server serves {state.model_name!r}",
            param="model",
            status=404,
            code="model_not_found",
        )
    bad = schemas.rejected_field(req, rejected)
    if bad is not None:
        raise APIError(bad[1], param=bad[0], code="unsupported_field")
    if not 1 <= req.n <= state.limits.max_n:
        raise APIError(
            f"n={req.n} is out of range: must be in [1, {state.limits.max_n}]", param="n"
        )
    _range("temperature", req.temperature, 0, 2)
    _range("top_p", req.top_p, 0, 1, low_open=True)
    _range("presence_penalty", req.presence_penalty, -2, 2)
    _range("frequency_penalty", req.frequency_penalty, -2, 2)
    _range("min_p", req.min_p, 0, 1)
    if req.repetition_penalty is not None and not req.repetition_penalty > 0:
        raise APIError("repetition_penalty must be > 0", param="repetition_penalty")
    if req.top_k is not None and req.top_k < 0:
        raise APIError("top_k must be >= 0 (0 is off)", param="top_k")
    if req.seed is not None and not 0 <= req.seed < 2**64:
        raise APIError("seed must be an integer in [0, 2**64)", param="seed")
    if req.stream_options is not None and not req.stream:
        raise APIError("stream_options needs stream: true", param="stream_options")
    stop = [req.stop] if isinstance(req.stop, str) else req.stop or []
    if len(stop) > schemas.MAX_STOP or any(not s for s in stop):
        raise APIError(f"stop must be at most {schemas.MAX_STOP} non-empty strings", param="stop")
    if any(t < 0 for t in req.stop_token_ids or []):
        raise APIError("stop_token_ids must be non-negative token ids", param="stop_token_ids")


def _max_tokens(state: ServeState, name: str, value: int | None, allow_zero: bool) -> int | None:
    limit = state.limits.max_tokens or state.context
    if value is not None and not (0 if allow_zero else 1) <= value <= limit:
        low = 0 if allow_zero else 1
        raise APIError(f"{name}={value} is out of range: must be in [{low}, {limit}]", param=name)
    return value


def _fit(state: ServeState, ids: list[int], truncate: int | None, param: str) -> list[int]:
    """A prompt checked against the vocabulary and the context (or truncated, if asked)."""
    vocab = state.engine.config.vocab_size
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise APIError(f"token id {bad} is outside the vocabulary (0 .. {vocab - 1})", param=param)
    if not ids:
        raise APIError("the prompt is empty", param=param)
    if truncate is not None:
        if not 1 <= truncate < state.context:
            raise APIError(
                f"truncate_prompt_tokens={truncate}: must be in [1, {state.context - 1}]",
                param="truncate_prompt_tokens",
            )
        ids = ids[-truncate:]
    if len(ids) >= state.context:
        raise APIError(
            f"the prompt has {len(ids)} tokens but the context is {state.context} tokens "
            "(prompt and output together); shorten it or set truncate_prompt_tokens",
            param=param,
            code="context_length_exceeded",
        )
    return ids


def _params(state: ServeState, req: schemas._Sampling, **extra: Any) -> SamplingParams:
    """The engine's settings for one request (omitted fields keep camelid's defaults)."""
    given = {
        "temperature": req.temperature,
        "top_p": req.top_p,
        "presence_penalty": req.presence_penalty,
        "frequency_penalty": req.frequency_penalty,
        "top_k": req.top_k,
        "min_p": req.min_p,
        "repetition_penalty": req.repetition_penalty,
    }
    kw = {k: v for k, v in given.items() if v is not None}
    stop_ids = list(req.stop_token_ids or [])
    if not req.ignore_eos:
        stop_ids += state.extra_stop_ids
    kw.update(
        stop=req.stop or (),
        stop_token_ids=tuple(dict.fromkeys(stop_ids)),
        ignore_eos=req.ignore_eos,
        seed=req.seed,
    )
    kw.update(extra)
    try:
        return SamplingParams(**kw)
    except RequestError as e:
        m = re.match(r"invalid (\w+)=", str(e))
        name = m.group(1) if m else None
        name = {"max_new_tokens": "max_tokens", "logprobs": "logprobs"}.get(name, name)
        raise APIError(str(e), param=name) from None


def _choices(params: SamplingParams, n: int) -> list[SamplingParams]:
    if n == 1:
        return [params]
    return [params.replace(seed=derive_seed(params.seed, i)) for i in range(n)]


# ------------------------------------------------------------------------------- running them
@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    done: Completion | None = None
    last: float | None = None


class _Timing:
    """Feeds the latency histograms from a request's events."""

    def __init__(self, metrics: ServerMetrics, n: int) -> None:
        self.metrics, self.start = metrics, time.perf_counter()
        self.last: list[float | None] = [None] * n

    def saw(self, i: int, event: Event) -> None:
        now = time.perf_counter()
        if event.token_ids:
            if self.last[i] is None:
                self.metrics.ttft.observe(now - self.start)
            else:
                gap = (now - self.last[i]) / len(event.token_ids)
                for _ in event.token_ids:
                    self.metrics.itl.observe(gap)
            self.last[i] = now
            self.metrics.generation_tokens.inc(len(event.token_ids))
        if event.done is not None:
            self.metrics.e2e.observe(now - self.start)


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body has been read: only a disconnect is left)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _collect(
    state: ServeState, request: Request, jobs: list[tuple[list[int], SamplingParams]]
) -> list[_Choice]:
    """Run the jobs to the end; a client that leaves first aborts them."""
    choices = [_Choice() for _ in jobs]
    timing = _Timing(state.metrics, len(jobs))

    async def run() -> None:
        async for i, event in state.backend.run(jobs):
            timing.saw(i, event)
            c = choices[i]
            c.text.append(event.text)
            c.tokens += event.token_ids
            c.logprobs += event.logprobs or []
            c.done = event.done or c.done

    task = asyncio.ensure_future(_submitting(run()))
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()  # the client is gone: the backend aborts what still runs
    if not task.done() or task.cancelled():  # a cancel takes effect at the task's next step
        raise APIError("client disconnected", status=499)
    task.result()
    for c in choices:
        if c.done is not None and c.done.finish_reason == "error":
            raise RuntimeError("generation failed (see the server log)")
    return choices


async def _submitting(coro):
    """Turn the worker's refusals into API errors."""
    try:
        return await coro
    except ShuttingDown as e:
        raise APIError(str(e), status=503, code="shutting_down") from None
    except QueueFull as e:
        raise APIError(str(e), status=429, code="queue_full") from None
    except APIError:
        raise
    except CamelidError as e:
        raise APIError(str(e)) from None


def _usage(prompts: list[list[int]], choices: list[_Choice], n: int) -> dict[str, Any]:
    prompt_tokens = sum(len(p) for p in prompts)
    completion = sum(len(c.tokens) for c in choices)
    cached = sum(getattr(choices[k * n].done, "cached_tokens", 0) or 0 for k in range(len(prompts)))
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def _finish(done: Completion | None) -> str:
    reason = done.finish_reason if done is not None else "length"
    return reason if reason in ("stop", "length") else "stop"


def _sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


# ---------------------------------------------------------------------------------- logprobs
def _top(tok, lp: TokenLogprob, include_chosen: bool) -> dict[str, float]:
    out: dict[str, float] = {}
    for t, v in lp.top.items():
        out.setdefault(tok.decode([t]), v)
    if include_chosen:
        out.setdefault(tok.decode([lp.token]), lp.logprob)
    return out


def legacy_logprobs(
    tok,
    ids: list[int],
    lps: Sequence[TokenLogprob | None],
    start: int,
    skip: int = 0,
) -> dict[str, list]:
    """``{tokens, token_logprobs, top_logprobs, text_offset}`` for ``ids`` (their logprobs in
    ``lps``, None for a token without context). Offsets are character positions in the
    returned text, counted from ``start``; the first ``skip`` tokens (a BOS the server added to
    a text prompt) stand at ``start`` and take no room in it."""
    tokens, values, tops, offsets = [], [], [], []
    pos, base = start, 0
    for k, (t, lp) in enumerate(zip(ids, lps, strict=True)):
        piece = tok.decode([t])
        tokens.append(piece)
        values.append(None if lp is None else lp.logprob)
        tops.append(None if lp is None else _top(tok, lp, include_chosen=True))
        offsets.append(pos)
        if k < skip:
            base = k + 1
        elif "\ufffd" in piece:  # part of a character: count what the tokens so far make
            pos = start + len(tok.decode(ids[base : k + 1]).rstrip("\ufffd"))
        else:
            pos += len(piece)
    return {
        "tokens": tokens,
        "token_logprobs": values,
        "top_logprobs": tops,
        "text_offset": offsets,
    }


def chat_logprobs(tok, lps: Sequence[TokenLogprob], top: int) -> list[dict[str, Any]]:
    def entry(t: int, v: float) -> dict[str, Any]:
        text = tok.decode([t])
        return {"token": text, "logprob": v, "bytes": list(text.encode("utf-8"))}

    return [
        {
            **entry(lp.token, lp.logprob),
            "top_logprobs": [entry(t, v) for t, v in list(lp.top.items())[:top]],
        }
        for lp in lps
    ]


# -------------------------------------------------------------------------------- completions
def _prompts(
    state: ServeState, req: schemas.CompletionRequest
) -> tuple[list[list[int]], list[str], list[int]]:
    """Each prompt as ids, the text ``echo`` returns for it, and how many of its leading tokens
    the server added (the BOS of a text prompt, which the echoed text does not show)."""
    p = req.prompt
    tok = state.engine.tokenizer
    if isinstance(p, str):
        raw: list = [p]
    elif not p:
        raise APIError("the prompt list is empty", param="prompt")
    elif isinstance(p[0], int):
        raw = [p]
    else:
        raw = list(p)
    if len(raw) > state.limits.max_prompts:
        raise APIError(
            f"{len(raw)} prompts: at most {state.limits.max_prompts} per request", param="prompt"
        )
    ids, echoes, skips = [], [], []
    for k, item in enumerate(raw):
        param = "prompt" if len(raw) == 1 else f"prompt[{k}]"
        given = tok.encode(item, bos=True) if isinstance(item, str) else list(item)
        kept = _fit(state, given, req.truncate_prompt_tokens, param)
        whole_text = isinstance(item, str) and len(kept) == len(given)
        ids.append(kept)
        echoes.append(item if whole_text else tok.decode(kept))
        skips.append(1 if whole_text else 0)
    return ids, echoes, skips


async def completions(state: ServeState, request: Request) -> Response:
    body = await read_body(request, state.limits.max_body_bytes)
    req: schemas.CompletionRequest = parse(schemas.CompletionRequest, body)
    _check_common(state, req, schemas.COMPLETION_REJECTED)
    if req.logprobs is not None and not 0 <= req.logprobs <= MAX_LOGPROBS:
        raise APIError(f"logprobs must be in [0, {MAX_LOGPROBS}]", param="logprobs")
    max_tokens = _max_tokens(state, "max_tokens", req.max_tokens, allow_zero=True)
    max_tokens = 16 if max_tokens is None else max_tokens  # OpenAI's default
    if max_tokens == 0 and not req.echo:
        raise APIError(
            "max_tokens=0 scores the prompt only and needs echo: true", param="max_tokens"
        )
    if req.echo and req.stream and req.logprobs is not None:
        raise APIError("echo with logprobs cannot stream; set stream: false", param="echo")
    prompts, echoes, skips = _prompts(state, req)
    tok = state.engine.tokenizer
    base = _params(
        state,
        req,
        max_new_tokens=max(max_tokens, 1),
        logprobs=req.logprobs,
        prompt_logprobs=req.logprobs if req.echo else None,
    )
    if max_tokens == 0:  # echo with max_tokens 0: score the prompt only
        base = base.replace(max_new_tokens=0)
    jobs = [(p, c) for p in prompts for c in _choices(base, req.n)]
    state.metrics.prompt_tokens.inc(sum(len(p) for p in prompts))
    rid, created = f"cmpl-{secrets.token_hex(12)}", int(time.time())
    if req.stream:
        return _stream(
            state, request, jobs, req, rid, created, "text_completion", _completion_chunk, echoes
        )
    choices = await _collect(state, request, jobs)
    out = []
    for i, c in enumerate(choices):
        k = i // req.n
        prefix = echoes[k] if req.echo else ""
        lp = None
        if req.logprobs is not None:
            ids, lps = list(c.tokens), list(c.logprobs)
            stop = c.done.stop_logprob if c.done is not None else None
            if req.echo and stop is not None:
                # Scoring: one entry per prompt token and per sampled token, the stop token
                # too (not in the text), or lm-eval's token_logprobs[ctxlen:-1] would drop the
                # continuation's last token whenever the model would end the text after it.
                ids.append(stop.token)
                lps.append(stop)
            lp = legacy_logprobs(tok, ids, lps, len(prefix))
            if req.echo:
                given = c.done.prompt_logprobs if c.done is not None else None
                scored = list(given or [None] * len(prompts[k]))
                head = legacy_logprobs(tok, prompts[k], scored, 0, skips[k])
                lp = {key: head[key] + lp[key] for key in lp}
        out.append(
            {
                "index": i,
                "text": prefix + "".join(c.text),
                "logprobs": lp,
                "finish_reason": _finish(c.done),
            }
        )
    return JSONResponse(
        {
            **state.envelope(rid, "text_completion", created),
            "choices": out,
            "usage": _usage(prompts, choices, req.n),
        }
    )


def _completion_chunk(state, req, i: int, event: Event | None, first: bool, echoes) -> dict:
    text = event.text if event is not None else ""
    if first and req.echo:
        text = echoes[i // req.n] + text
    lp = None
    if req.logprobs is not None and event is not None and event.logprobs:
        lp = legacy_logprobs(state.engine.tokenizer, event.token_ids, event.logprobs, 0)
        lp.pop("text_offset")
    done = event.done if event is not None else None
    return {
        "index": i,
        "text": text,
        "logprobs": lp,
        "finish_reason": _finish(done) if done is not None else None,
    }


# ------------------------------------------------------------------------------------ chat
def chat_messages(req: schemas.ChatCompletionRequest) -> list[dict[str, str]]:
    out = []
    for i, m in enumerate(req.messages):
        where = f"messages[{i}]"
        if m.role not in schemas.ROLES:
            raise APIError(
                f"{where}.role {m.role!r} is not supported (one of {', '.join(schemas.ROLES)}; "
                "tool and function messages need tools, which are not supported)",
                param=f"{where}.role",
            )
        for name in ("name", "tool_calls", "tool_call_id", "function_call", "audio", "refusal"):
            if getattr(m, name) is not None:
                raise APIError(f"{where}.{name} is not supported", param=f"{where}.{name}")
        content = m.content
        if content is None:
            raise APIError(f"{where}.content is required", param=f"{where}.content")
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise APIError(
                        f"{where}.content[{j}]: only text parts are supported (got {part.type!r})",
                        param=f"{where}.content[{j}].type",
                    )
                parts.append(part.text)
            content = "".join(parts)
        out.append({"role": schemas.ROLE_OF.get(m.role, m.role), "content": content})
    return out


async def chat(state: ServeState, request: Request) -> Response:
    body = await read_body(request, state.limits.max_body_bytes)
    req: schemas.ChatCompletionRequest = parse(schemas.ChatCompletionRequest, body)
    _check_common(state, req, schemas.CHAT_REJECTED)
    if req.top_logprobs is not None:
        if not 0 <= req.top_logprobs <= MAX_LOGPROBS:
            raise APIError(f"top_logprobs must be in [0, {MAX_LOGPROBS}]", param="top_logprobs")
        if not req.logprobs:
            raise APIError("top_logprobs needs logprobs: true", param="top_logprobs")
    if req.max_tokens is not None and req.max_completion_tokens is not None:
        raise APIError(
            "give max_completion_tokens or max_tokens (its old name), not both",
            param="max_tokens",
        )
    name = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    asked = _max_tokens(state, name, getattr(req, name), False)
    tok = state.engine.tokenizer
    messages = chat_messages(req)
    try:
        ids = chat_prompt_ids(tok, messages)
    except CamelidError as e:
        raise APIError(str(e), param="messages") from None
    ids = _fit(state, ids, req.truncate_prompt_tokens, "messages")
    limit = state.limits.max_tokens or state.context
    max_tokens = asked if asked is not None else min(limit, state.context - len(ids))
    top = req.top_logprobs or 0
    base = _params(state, req, max_new_tokens=max_tokens, logprobs=top if req.logprobs else None)
    jobs = [(ids, c) for c in _choices(base, req.n)]
    state.metrics.prompt_tokens.inc(len(ids))
    rid, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
    if req.stream:
        return _stream(state, request, jobs, req, rid, created, "chat.completion.chunk",
                       _chat_chunk, None)  # fmt: skip
    choices = await _collect(state, request, jobs)
    out = []
    for i, c in enumerate(choices):
        lp = {"content": chat_logprobs(tok, c.logprobs, top)} if req.logprobs else None
        out.append(
            {
                "index": i,
                "message": {"role": "assistant", "content": "".join(c.text)},
                "logprobs": lp,
                "finish_reason": _finish(c.done),
            }
        )
    return JSONResponse(
        {
            **state.envelope(rid, "chat.completion", created),
            "choices": out,
            "usage": _usage([ids], choices, req.n),
        }
    )


def _chat_chunk(state, req, i: int, event: Event | None, first: bool, _echo) -> dict:
    delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
    if event is not None and event.text:
        delta["content"] = event.text
    lp = None
    if req.logprobs and event is not None and event.logprobs:
        lp = {
            "content": chat_logprobs(state.engine.tokenizer, event.logprobs, req.top_logprobs or 0)
        }
    done = event.done if event is not None else None
    return {
        "index": i,
        "delta": delta,
        "logprobs": lp,
        "finish_reason": _finish(done) if done is not None else None,
    }


# -------------------------------------------------------------------------------- streaming
def _stream(state, request, jobs, req, rid, created, kind, chunk, echo_of) -> Response:
    """Server-sent events: one chunk per step and choice, each choice's last one with its
    finish_reason, then (``stream_options.include_usage``) a usage chunk with no choices,
    then ``[DONE]``. A refusal before the first token is an ordinary error response."""
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    head = state.envelope(rid, kind, created)
    events = state.backend.run(jobs)
    timing = _Timing(state.metrics, len(jobs))

    async def first_event():
        try:
            return await _submitting(events.__anext__())
        except StopAsyncIteration:
            return None

    async def body(first: tuple[int, Event] | None) -> AsyncIterator[bytes]:
        seen: set[int] = set()
        tokens = [0] * len(jobs)
        cached = [0] * len(jobs)
        try:
            pending = [first] if first is not None else []
            while True:
                if pending:
                    i, event = pending.pop()
                else:
                    try:
                        i, event = await events.__anext__()
                    except StopAsyncIteration:
                        break
                timing.saw(i, event)
                if event.done is not None and event.done.finish_reason == "error":
                    yield _sse(error_body("generation failed (see the server log)", 500))
                    break
                tokens[i] += len(event.token_ids)
                if event.done is not None:
                    cached[i] = getattr(event.done, "cached_tokens", 0) or 0
                if not (event.text or event.done is not None or (i not in seen)):
                    continue
                c = chunk(state, req, i, event, i not in seen, echo_of)
                seen.add(i)
                yield _sse({**head, "choices": [c], **({"usage": None} if include_usage else {})})
            if include_usage:
                prompts = [p for k, (p, _) in enumerate(jobs) if k % req.n == 0]
                prompt_tokens = sum(len(p) for p in prompts)
                done_tokens = sum(tokens)
                usage = {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": done_tokens,
                    "total_tokens": prompt_tokens + done_tokens,
                    "prompt_tokens_details": {
                        "cached_tokens": sum(cached[k] for k in range(0, len(jobs), req.n))
                    },
                }
                yield _sse({**head, "choices": [], "usage": usage})
            yield b"data: [DONE]\n\n"
        finally:
            await events.aclose()

    async def respond() -> Response:
        first = await first_event()
        return StreamingResponse(
            body(first),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    return _Deferred(respond, events)


class _Deferred(Response):
    """A response decided once the first event is in: a queue-full refusal is still a 429."""

    def __init__(self, make, events) -> None:
        super().__init__()
        self._make, self._events = make, events

    async def __call__(self, scope, receive, send) -> None:
        try:
            response = await self._make()
        except APIError as e:
            await self._events.aclose()
            response = JSONResponse(e.body(), status_code=e.status)
        await response(scope, receive, send)
