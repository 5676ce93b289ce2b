"""Continuous batching with chunked prefill and a prefix cache, for a server.

    scheduler = Scheduler(engine, max_batch=16)
    rid = scheduler.submit(prompt_ids, SamplingParams(max_new_tokens=64, temperature=0))
    while scheduler.has_work():
        for event in scheduler.step():       # what this step released, per request
            print(event.request_id, event.text, event.done)

The scheduler owns a pool of ``max_batch`` KV-cache rows. A request waits in a bounded queue
until a row is free, is prefilled into its row in chunks, then decodes one token per step with
every other decoding row; it leaves as soon as it finishes, and its row takes the next waiting
request. Each :meth:`Scheduler.step` does at most ``prefill_chunk`` tokens of prefill plus
one decode step of every decoding row, so a long prompt never stalls running streams.

Decoding rows are kept packed at rows ``0..D-1`` of the pool (a leaving row is filled with the
last one's cache slots), so the batched decode step reads a contiguous block of the cache, as
the Engine's does. Prefill chunks are aligned to absolute multiples of ``prefill_chunk`` (a
prompt is cut at the same places whatever the load); one step's budget is shared by several
requests, and equal-length pieces in adjacent rows run as one batched call. Each
``prefix_block``-token block of a prompt is kept in the prefix cache under a hash of every
token up to its end; a later prompt that starts with the same blocks copies their keys and
values instead of computing them.

:class:`Worker` runs ``step()`` on a background thread for a server: thread-safe submit and
abort, events delivered through a callback on that thread.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import uuid
from array import array
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from camelid.errors import RequestError
from camelid.infer.engine import CACHE_BLOCK, Completion, Engine, TokenLogprob, _Sequence
from camelid.infer.sampling import Penalties, SamplingParams, SamplingRows
from camelid.model import KVCache

log = logging.getLogger(__name__)


class QueueFull(RequestError):
    """Too many requests are waiting (a server answers 429)."""


class ShuttingDown(QueueFull):
    """The worker is draining and accepts no new requests (a server answers 503)."""


@dataclass
class Event:
    """What one step released for one request."""

    request_id: str
    text: str  # new text ("" is possible: a partial UTF-8 character is held back)
    token_ids: list[int]  # tokens accepted this step (stop tokens excluded)
    logprobs: list[TokenLogprob] | None  # for those tokens, when params.logprobs is set
    done: Completion | None = None  # on the request's last event only


@dataclass
class SchedulerStats:
    """Counters a server exports as metrics and tests read to see what a step computed."""

    running: int = 0  # requests holding a cache row (prefilling or decoding)
    waiting: int = 0  # requests in the queue
    steps: int = 0
    decode_rows: int = 0  # rows the last step decoded
    prefill_tokens: int = 0  # prompt tokens the last step prefilled
    model_calls: int = 0  # forward passes, all steps together
    prefix_queries: int = 0  # requests that looked in the prefix cache
    prefix_hits: int = 0  # ... and found at least one block
    prefix_cached_tokens: int = 0  # prompt tokens served from the cache, all requests
    prefix_blocks: int = 0  # blocks held now
    prefix_bytes: int = 0  # their keys and values
    prefix_evictions: int = 0
    finished: int = 0  # requests ended, aborted and failed ones included
    aborted: int = 0
    errors: int = 0


class _Request:
    """A request inside the scheduler: its sequence, its cache row and how far it got."""

    def __init__(self, request_id: str, seq: _Sequence, keys: list[bytes]) -> None:
        self.id, self.seq, self.keys = request_id, seq, keys
        self.row: int | None = None
        self.filled = 0  # prompt tokens whose keys and values are in the row
        self.cached = 0  # ... of which came from the prefix cache
        self.started = False  # prefill begun (the prefix cache was consulted)
        self.decoding = False
        # batch_invariant: the request's own (batch of one) sampling state
        self.rows: SamplingRows | None = None
        self.penalties: Penalties | None = None

    def slots(self) -> int:
        """Cache slots of its row that hold its keys and values."""
        return self.filled + max(len(self.seq.out) - 1, 0)


class Scheduler:
    """Continuous batching over one :class:`Engine` (single-threaded: see :class:`Worker`).

    - ``max_batch``: cache rows, i.e. requests prefilling or decoding at once.
    - ``max_queue``: requests waiting for a row; one more raises :class:`QueueFull`.
    - ``prefill_chunk``: prompt tokens prefilled per step (shared by several requests).
    - ``prefix_block``: the prefix cache's block size in tokens (default 16): a hit reuses
      every full block the prompt shares. With ``batch_invariant`` it is ``prefill_chunk``
      (the argument is ignored): a hit then ends where a cold prefill's chunk ends, so the
      rest is computed in the same pieces and stays bitwise the same.
    - ``prefix_cache_bytes``: memory for cached prompt blocks (keys and values); default half
      of what the full pool of rows takes (``max_batch × max_seq_len`` slots); 0 turns the
      cache off.
    - ``batch_invariant``: every row is decoded and sampled on its own (batch-1 matmuls), so a
      request's tokens and logprobs are bitwise the same alone, in any batch and after a
      prefix-cache hit; slower than the batched decode.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        max_batch: int = 16,
        max_queue: int = 256,
        prefill_chunk: int = 256,
        prefix_block: int = 16,
        prefix_cache_bytes: int | None = None,
        batch_invariant: bool = False,
    ) -> None:
        for name, value, low in (
            ("max_batch", max_batch, 1),
            ("max_queue", max_queue, 0),
            ("prefill_chunk", prefill_chunk, 1),
            ("prefix_block", prefix_block, 1),
        ):
            if not isinstance(value, int) or value < low:
                raise RequestError(f"invalid {name}={value!r}: must be an integer >= {low}")
        if prefix_cache_bytes is not None and prefix_cache_bytes < 0:
            raise RequestError(f"invalid prefix_cache_bytes={prefix_cache_bytes}: must be >= 0")
        self.engine = engine
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.batch_invariant = batch_invariant
        # Batch-invariant: a hit must end where a cold prefill's chunk ends, so that the rest
        # of the prompt is computed in the same pieces (bitwise the same keys and values).
        self.prefix_block = prefill_chunk if batch_invariant else prefix_block
        c = engine.config
        itemsize = torch.empty((), dtype=engine.dtype).element_size()
        self._slot_bytes = 2 * c.n_layers * c.n_kv_heads * c.head_dim * itemsize
        if prefix_cache_bytes is None:
            prefix_cache_bytes = max_batch * engine.max_seq_len * self._slot_bytes // 2
        self.prefix_cache_bytes = prefix_cache_bytes
        self.stats = SchedulerStats()
        self._pool: KVCache | None = None
        self._rows: list[_Request | None] = [None] * max_batch
        self._decoding = 0  # decoding requests hold rows 0 .. _decoding - 1
        self._waiting: deque[_Request] = deque()
        self._prefilling: list[_Request] = []  # holding a row, in arrival order
        self._live: dict[str, _Request] = {}
        self._aborts: list[str] = []
        self._blocks: OrderedDict[bytes, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._batch: tuple[tuple[_Request, ...], SamplingRows, Penalties | None] | None = None

    # ---------------------------------------------------------------------------- public API
    def submit(
        self, prompt: Sequence[int], params: SamplingParams, request_id: str | None = None
    ) -> str:
        """Queue a request (token ids); return its id. Raises :class:`QueueFull` when
        ``max_queue`` requests wait, :class:`RequestError` for a bad request (ids outside the
        vocabulary, a prompt that does not fit the context, a duplicate ``request_id``)."""
        req = self._check(prompt, params, request_id)
        if len(self._waiting) >= self.max_queue:
            raise QueueFull(
                f"the queue is full ({self.max_queue} requests waiting): try again later"
            )
        self._add(req)
        return req.id

    def abort(self, request_id: str) -> None:
        """Cancel a request: the next step frees its row without computing it and releases its
        last event (``finish_reason="abort"``). Unknown or finished ids are ignored."""
        if request_id in self._live and request_id not in self._aborts:
            self._aborts.append(request_id)

    def has_work(self) -> bool:
        return bool(self._live)

    @torch.inference_mode()
    def step(self) -> list[Event]:
        """One engine step: aborts, admissions, at most one chunk budget of prefill and one
        decode step of every decoding row; returns every request's news."""
        self.stats.steps += 1
        events = [self._abort(rid) for rid in self._aborts if rid in self._live]
        self._aborts.clear()
        self._admit()
        decoding = [self._rows[r] for r in range(self._decoding)]
        logits = self._decode(decoding)
        ready = self._prefill()
        seqs: list[_Request] = decoding
        if ready:
            seqs = decoding + [r for r, _ in ready if r.seq.limit > 0]
            for req, _ in ready:
                if req.seq.limit == 0:  # score only: the prompt logprobs are the result
                    req.seq.finish_reason = "length"
                    events.append(self._event(req, 0, 0, ""))
            last = [lg for r, lg in ready if r.seq.limit > 0]
            if last:
                last = torch.stack(last)
                logits = last if logits is None else torch.cat([logits, last])
        if seqs:
            events += self._sample(seqs, logits)
        self._settle(ready)
        self.stats.running = sum(r is not None for r in self._rows)
        self.stats.waiting = len(self._waiting)
        return events

    # ------------------------------------------------------------------------------ requests
    def _check(self, prompt: Sequence[int], params: SamplingParams, request_id: str | None):
        """Everything about a request that can be refused, before it is queued (no state is
        touched: a Worker calls this on the submitting thread)."""
        if not isinstance(params, SamplingParams):
            raise RequestError("params must be a SamplingParams")
        seq = self.engine._prepare(list(prompt), params)
        rid = request_id if request_id is not None else uuid.uuid4().hex
        if not isinstance(rid, str) or not rid:
            raise RequestError(f"invalid request_id={rid!r}: must be a non-empty string")
        if rid in self._live:
            raise RequestError(f"request_id {rid!r} is already in use")
        return _Request(rid, seq, self._block_keys(seq.prompt))

    def _add(self, req: _Request) -> None:
        if req.id in self._live:
            raise RequestError(f"request_id {req.id!r} is already in use")
        self._waiting.append(req)
        self._live[req.id] = req
        self.stats.waiting = len(self._waiting)

    def _event(self, req: _Request, n_out: int, n_lp: int, text: str) -> Event:
        """The news of ``req`` since it had ``n_out`` tokens and ``n_lp`` logprobs; the last
        one (with its Completion) once it finished."""
        s = req.seq
        done = None
        if s.finish_reason is not None:
            done = s.result()
            done.cached_tokens = req.cached
            self._live.pop(req.id, None)
            self.stats.finished += 1
        lps = None if s.logprobs is None else s.logprobs[n_lp:]
        return Event(req.id, text, s.out[n_out:], lps, done)

    def _abort(self, rid: str) -> Event:
        req = self._live[rid]
        if req.row is None:
            self._waiting.remove(req)
        else:
            self._free(req)
        req.seq.finish_reason = "abort"
        self.stats.aborted += 1
        return self._event(req, len(req.seq.out), len(req.seq.logprobs or []), "")

    def _fail(self, message: str) -> list[Event]:
        """End every request holding a row with ``finish_reason="error"`` (after a step
        raised: their cache rows and sampling state can no longer be trusted)."""
        events = []
        for req in [r for r in self._rows if r is not None and r.id in self._live]:
            req.seq.finish_reason = "error"
            ev = self._event(req, len(req.seq.out), len(req.seq.logprobs or []), "")
            ev.done.error = message
            events.append(ev)
            self.stats.errors += 1
        self._rows = [None] * self.max_batch
        self._decoding, self._prefilling, self._batch = 0, [], None
        self.stats.running = 0
        return events

    # -------------------------------------------------------------------------- cache rows
    def _admit(self) -> None:
        """Give free rows to waiting requests, first come first served."""
        while self._waiting and None in self._rows[self._decoding :]:
            req = self._waiting.popleft()
            self._ensure_pool(len(req.seq.prompt) + req.seq.limit)
            # The lowest free row above the decoding block: often where it will decode.
            req.row = self._rows.index(None, self._decoding)
            self._rows[req.row] = req
            self._prefilling.append(req)

    def _ensure_pool(self, length: int) -> None:
        """A pool of ``max_batch`` rows at least ``length`` slots long (rounded up to a power
        of two of at least CACHE_BLOCK slots, at most the context), grown by copying."""
        old = self._pool
        if old is not None and old.max_len >= length:
            return
        size = min(self.engine.max_seq_len, max(CACHE_BLOCK, 1 << (length - 1).bit_length()))
        e = self.engine
        pool = KVCache(e.config, self.max_batch, size, e.device, e.dtype)
        if old is not None:
            for new, cur in zip(pool.k + pool.v, old.k + old.v, strict=True):
                new[:, :, : old.max_len] = cur
        if e.compiled and e.device.type == "cuda":
            for t in pool.k + pool.v:  # fixed addresses: CUDA graphs may write into them
                torch._dynamo.mark_static_address(t)
        self._pool = pool

    def _copy_row(self, src: int, dst: int, n: int) -> None:
        pool = self._pool
        for t in pool.k + pool.v:
            t[dst, :, :n] = t[src, :, :n]

    def _move(self, req: _Request, row: int) -> None:
        """Put ``req`` in ``row``, swapping with whoever holds it."""
        src, other = req.row, self._rows[row]
        if src == row:
            return
        if other is None:
            self._copy_row(src, row, req.slots())
        else:
            pool, n, m = self._pool, req.slots(), other.slots()
            for t in pool.k + pool.v:
                held = t[row, :, :m].clone()
                t[row, :, :n] = t[src, :, :n]
                t[src, :, :m] = held
            other.row = src
        self._rows[src], self._rows[row] = other, req
        req.row = row

    def _free(self, req: _Request) -> None:
        """Release ``req``'s row; a decoding row is filled with the last decoding row, so the
        decoding rows stay packed at the start of the pool."""
        if req.decoding:
            last = self._decoding - 1
            tail = self._rows[last]
            if tail is not req:
                self._copy_row(last, req.row, tail.slots())
                self._rows[req.row], tail.row = tail, req.row
            self._rows[last] = None
            self._decoding -= 1
            req.decoding = False
        else:
            self._rows[req.row] = None
            if req in self._prefilling:
                self._prefilling.remove(req)
        req.row = None
        self._batch = None

    def _settle(self, ready: list[tuple[_Request, torch.Tensor]]) -> None:
        """After sampling: finished requests leave (highest row first, so each leaving row is
        filled by one that stays), prefilled ones that go on join the decoding block."""
        done = [r for r in self._rows if r is not None and r.seq.finish_reason is not None]
        for req in sorted(done, key=lambda r: -r.row):
            self._free(req)
        for req, _ in ready:
            if req.seq.finish_reason is None:
                self._move(req, self._decoding)
                req.decoding = True
                self._decoding += 1
                self._batch = None

    # --------------------------------------------------------------------------- compute
    def _prefill(self) -> list[tuple[_Request, torch.Tensor]]:
        """Prefill up to ``prefill_chunk`` prompt tokens, oldest request first, in pieces that
        never cross a multiple of ``prefill_chunk``; return the requests whose prompt is now
        complete, with the logits after their last prompt token.

        The step's pieces are planned first (several requests share the budget), then run in
        rounds (a request's second piece after its first): within a round, pieces of the same
        length in adjacent rows go through one batched model call (except in batch-invariant
        mode and for requests that score their prompt, which run alone)."""
        chunk, budget = self.prefill_chunk, self.prefill_chunk
        self.stats.prefill_tokens = 0
        plan: list[tuple[_Request, list[tuple[int, int]]]] = []
        for req in self._prefilling:
            if not req.started:
                req.started = True
                self._lookup(req)
            pieces, at, n = [], req.filled, len(req.seq.prompt)
            while at < n:
                stop = min(n, (at // chunk + 1) * chunk)
                if stop - at > budget:
                    break
                pieces.append((at, stop))
                budget -= stop - at
                at = stop
            if pieces:
                plan.append((req, pieces))
            if budget == 0 or at < n:
                break
        last: dict[_Request, torch.Tensor] = {}
        for k in range(max((len(p) for _, p in plan), default=0)):
            work = sorted(
                ((req, pieces[k]) for req, pieces in plan if k < len(pieces)),
                key=lambda w: w[0].row,
            )
            i = 0
            while i < len(work):
                req, (start, stop) = work[i]
                j = i + 1
                if not self.batch_invariant and req.seq.params.prompt_logprobs is None:
                    while (
                        j < len(work)
                        and work[j][0].row == req.row + (j - i)
                        and work[j][0].seq.params.prompt_logprobs is None
                        and work[j][1][1] - work[j][1][0] == stop - start
                    ):
                        j += 1
                group = work[i:j]
                if len(group) == 1:
                    last[req] = self.engine._prefill(
                        self._pool.rows(req.row, req.row + 1), req.seq, start, stop
                    )
                else:
                    logits = self._prefill_batch(group)
                    for b, (r, _) in enumerate(group):
                        last[r] = logits[b]
                self.stats.model_calls += 1
                for r, (a, z) in group:
                    self.stats.prefill_tokens += z - a
                    r.filled = z
                    self._store(r, a, z)
                i = j
        ready = []
        for req, _ in plan:
            if req.filled == len(req.seq.prompt):
                self._prefilling.remove(req)
                ready.append((req, last[req]))
        return ready

    def _prefill_batch(self, group: list[tuple[_Request, tuple[int, int]]]) -> torch.Tensor:
        """One model call for pieces of equal length in adjacent rows; fp32 logits after each
        piece's last token (len(group), vocab)."""
        e, dev = self.engine, self.engine.device
        first = group[0][0].row
        tokens = [r.seq.prompt[a:z] for r, (a, z) in group]
        positions = [list(range(a, z)) for _, (a, z) in group]
        logits = e.model(
            torch.tensor(tokens, device=dev),
            torch.tensor(positions, device=dev),
            cache=self._pool.rows(first, first + len(group)),
            kv_len=max(z for _, (_, z) in group),
            last_only=True,
        )[:, -1]
        return e._mask(logits)

    def _decode(self, reqs: list[_Request]) -> torch.Tensor | None:
        """Feed every decoding row its last token; fp32 logits (D, vocab)."""
        self.stats.decode_rows = len(reqs)
        if not reqs:
            return None
        e, dev = self.engine, self.engine.device
        if self.batch_invariant:  # each row on its own: nothing depends on the batch
            out = []
            for req in reqs:
                p = req.seq.position
                logits = e.model(
                    torch.tensor([[req.seq.out[-1]]], device=dev),
                    torch.tensor([[p]], device=dev),
                    cache=self._pool.rows(req.row, req.row + 1),
                    kv_len=p + 1,
                )[:, -1]
                out.append(e._mask(logits))
                self.stats.model_calls += 1
            return torch.cat(out)
        tokens = [[r.seq.out[-1]] for r in reqs]
        positions = [[r.seq.position] for r in reqs]
        kv_len = max(p for (p,) in positions) + 1
        if e.compiled:  # static shapes: a power-of-two batch (extra rows write a slot no one
            # reads, the pool's last) and cache length, a handful of graphs in all
            rows = min(1 << (len(reqs) - 1).bit_length(), self.max_batch)
            tokens += [[0]] * (rows - len(reqs))
            positions += [[self._pool.max_len - 1]] * (rows - len(reqs))
            kv_len = min(self._pool.max_len, max(CACHE_BLOCK, 1 << (kv_len - 1).bit_length()))
        logits = e._step(
            torch.tensor(tokens, device=dev),
            torch.tensor(positions, device=dev),
            self._pool,
            kv_len,
        )
        self.stats.model_calls += 1
        return logits[: len(reqs)]

    def _sample(self, reqs: list[_Request], logits: torch.Tensor) -> list[Event]:
        """Choose every row's next token (the Engine's sampling step) and collect the news."""
        e = self.engine
        before = [(len(r.seq.out), len(r.seq.logprobs or [])) for r in reqs]
        pieces: dict[int, str] = {}
        if self.batch_invariant:
            for b, req in enumerate(reqs):
                if req.rows is None:
                    req.rows = SamplingRows([req.seq.params], [req.seq.seed], e.device)
                    req.penalties = Penalties.start(
                        req.rows, [req.seq.prompt], e.config.vocab_size, e.device
                    )
                for _, piece in e._choose([req.seq], logits[b : b + 1], req.rows, req.penalties):
                    pieces[b] = piece
        else:
            rows, penalties = self._batch_state(reqs)
            pieces = dict(e._choose([r.seq for r in reqs], logits, rows, penalties))
        return [
            self._event(req, n_out, n_lp, pieces.get(b, ""))
            for b, (req, (n_out, n_lp)) in enumerate(zip(reqs, before, strict=True))
        ]

    def _batch_state(self, reqs: list[_Request]) -> tuple[SamplingRows, Penalties | None]:
        """The batch's sampling settings and penalty state, rebuilt only when its rows change
        (penalties from each request's prompt and output so far)."""
        key = tuple(reqs)
        if self._batch is None or self._batch[0] != key:
            e, seqs = self.engine, [r.seq for r in reqs]
            rows = SamplingRows([s.params for s in seqs], [s.seed for s in seqs], e.device)
            penalties = Penalties.start(
                rows,
                [s.prompt for s in seqs],
                e.config.vocab_size,
                e.device,
                outputs=[s.out for s in seqs],
            )
            self._batch = (key, rows, penalties)
        return self._batch[1], self._batch[2]

    # ------------------------------------------------------------------------ prefix cache
    def _block_keys(self, prompt: list[int]) -> list[bytes]:
        """One key per full ``prefix_block`` of the prompt: a hash of every token up to the
        block's end (chained, so a block is only found after the same beginning)."""
        keys, h, size = [], b"", self.prefix_block
        if self.prefix_cache_bytes == 0:
            return keys
        for i in range(len(prompt) // size):
            data = h + array("q", prompt[i * size : (i + 1) * size]).tobytes()
            h = hashlib.blake2b(data, digest_size=16).digest()
            keys.append(h)
        return keys

    def _lookup(self, req: _Request) -> None:
        """Copy the longest run of cached blocks the prompt starts with into its row (leaving
        at least its last token to compute: its logits choose the first new token). A request
        for prompt logprobs skips this: the cache keeps keys and values, not logprobs."""
        if self.prefix_cache_bytes == 0 or req.seq.params.prompt_logprobs is not None:
            return
        self.stats.prefix_queries += 1
        usable = min(len(req.keys), (len(req.seq.prompt) - 1) // self.prefix_block)
        hits = []
        for key in req.keys[:usable]:
            if key not in self._blocks:
                break
            hits.append(key)
        if not hits:
            return
        n, pool = len(hits) * self.prefix_block, self._pool
        k = torch.cat([self._blocks[key][0] for key in hits], dim=2)  # (layers, heads, n, dim)
        v = torch.cat([self._blocks[key][1] for key in hits], dim=2)
        for layer in range(len(pool.k)):
            pool.k[layer][req.row, :, :n] = k[layer]
            pool.v[layer][req.row, :, :n] = v[layer]
        self._touch(hits)
        req.filled = req.cached = n
        self.stats.prefix_hits += 1
        self.stats.prefix_cached_tokens += req.cached

    def _touch(self, keys: list[bytes]) -> None:
        """Mark a chain of blocks as just used, its first block last: eviction (least recently
        used first) then takes the ends of chains before the blocks they depend on."""
        for key in reversed(keys):
            if key in self._blocks:
                self._blocks.move_to_end(key)

    def _store(self, req: _Request, start: int, stop: int) -> None:
        """Keep the blocks of ``req``'s prompt that end within ``start+1..stop`` (just computed
        in its row), evicting the least recently used blocks to stay within
        ``prefix_cache_bytes``."""
        size = self.prefix_block
        first, end = start // size, min(stop // size, len(req.keys))
        if first >= end:
            return
        nbytes, r = size * self._slot_bytes, req.row
        for index in range(first, end):
            key = req.keys[index]
            if key in self._blocks or nbytes > self.prefix_cache_bytes:
                continue
            while self.stats.prefix_bytes + nbytes > self.prefix_cache_bytes:
                self._blocks.popitem(last=False)
                self.stats.prefix_bytes -= nbytes
                self.stats.prefix_evictions += 1
            span = slice(index * size, (index + 1) * size)
            k = torch.stack([t[r, :, span] for t in self._pool.k])
            v = torch.stack([t[r, :, span] for t in self._pool.v])
            self._blocks[key] = (k, v)
            self.stats.prefix_bytes += nbytes
        self._touch(req.keys[:end])
        self.stats.prefix_blocks = len(self._blocks)


class Worker:
    """Runs a :class:`Scheduler`'s steps on one background thread (for a server).

    ``submit`` and ``abort`` may be called from any thread: requests are checked on the caller's
    thread (a bad one raises there) and handed to the worker thread, which alone touches the
    scheduler and its cache. ``on_event`` is called on the worker thread, in order, once per
    step with news for that request; the last call carries ``done``. When a step raises, the
    requests that held a cache row end with ``done.finish_reason == "error"`` and
    ``done.error`` set to the exception's message; the thread keeps serving the rest. A callback
    that raises has its request aborted.
    """

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self._cond = threading.Condition()
        self._inbox: list[tuple[str, object]] = []
        self._callbacks: dict[str, Callable[[Event], None]] = {}
        self._queued = 0  # submissions in the inbox
        self._stopping = False
        self._drain = True
        self._thread: threading.Thread | None = None

    @property
    def stats(self) -> SchedulerStats:
        """The scheduler's counters (read from another thread: a snapshot for metrics, not a
        synchronised view)."""
        return self.scheduler.stats

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the worker is already started")
        self._thread = threading.Thread(target=self._loop, name="camelid-scheduler", daemon=True)
        self._thread.start()

    def submit(
        self,
        prompt: Sequence[int],
        params: SamplingParams,
        on_event: Callable[[Event], None],
        request_id: str | None = None,
    ) -> str:
        """Queue a request; raises :class:`QueueFull` (or :class:`ShuttingDown` once ``stop``
        was called) and :class:`RequestError` as :meth:`Scheduler.submit` does."""
        s = self.scheduler
        with self._cond:
            if self._stopping:
                raise ShuttingDown("the server is shutting down: not accepting requests")
            if request_id is not None and request_id in self._callbacks:
                raise RequestError(f"request_id {request_id!r} is already in use")
            req = s._check(prompt, params, request_id)
            if s.stats.waiting + self._queued >= s.max_queue:
                raise QueueFull(
                    f"the queue is full ({s.max_queue} requests waiting): try again later"
                )
            self._callbacks[req.id] = on_event
            self._inbox.append(("submit", req))
            self._queued += 1
            self._cond.notify()
        return req.id

    def abort(self, request_id: str) -> None:
        """Cancel a request; its row is free by the next step (its last event says "abort")."""
        with self._cond:
            self._inbox.append(("abort", request_id))
            self._cond.notify()

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop accepting requests and end the thread: after every accepted request finished
        (``drain``; those still running after ``timeout`` seconds are aborted), or at once,
        aborting them all."""
        with self._cond:
            self._stopping, self._drain = True, drain
            self._cond.notify()
        if self._thread is None:
            return
        self._thread.join(timeout)
        if self._thread.is_alive():
            with self._cond:
                self._drain = False
                self._cond.notify()
            self._thread.join()

    # ------------------------------------------------------------------------------ thread
    def _loop(self) -> None:
        s = self.scheduler
        while True:
            with self._cond:
                while not self._inbox and not s.has_work() and not self._stopping:
                    self._cond.wait()
                inbox, self._inbox = self._inbox, []
                self._queued = 0
                if self._stopping and not self._drain:
                    inbox += [("abort", rid) for rid in self._callbacks]
                if self._stopping and not inbox and not s.has_work():
                    return
            for kind, item in inbox:
                if kind == "submit":
                    s._add(item)
                else:
                    s.abort(item)
            if not s.has_work():
                continue
            try:
                events = s.step()
            except Exception as exc:  # a failed step ends its requests, not us
                log.exception("scheduler step failed")
                events = s._fail(f"{type(exc).__name__}: {exc}") + self._orphans(str(exc))
            self._dispatch(events)

    def _orphans(self, message: str) -> list[Event]:
        """Error events for requests the failed step had already finished (their events were
        lost with it), so that every caller hears the end of its request."""
        with self._cond:
            queued = {item.id for kind, item in self._inbox if kind == "submit"}
            lost = set(self._callbacks) - set(self.scheduler._live) - queued
        return [
            Event(rid, "", [], None, Completion("", [], "error", [], error=message))
            for rid in sorted(lost)
        ]

    def _dispatch(self, events: list[Event]) -> None:
        for ev in events:
            with self._cond:
                cb = (self._callbacks.pop if ev.done else self._callbacks.get)(ev.request_id, None)
            if cb is None:
                continue
            try:
                cb(ev)
            except Exception:  # a broken consumer must not stop the others
                log.exception("event callback of request %s failed; aborting it", ev.request_id)
                with self._cond:
                    self._callbacks.pop(ev.request_id, None)
                if ev.done is None:
                    self.scheduler.abort(ev.request_id)
