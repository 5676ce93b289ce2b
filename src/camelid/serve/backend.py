"""What the server runs generation on, and the bridge from its worker thread to asyncio.

The server talks to a *worker* with the interface of ``camelid.infer.scheduler.Worker``:
``submit(prompt, params, on_event, request_id) -> id``, ``abort(id)``, ``start()``,
``stop(drain, timeout)`` and ``stats``. ``on_event`` is called on the worker's thread, in
order, with an :class:`Event` per step that has news for the request; the last one carries
``done`` (the :class:`camelid.Completion`). :class:`Backend` turns those calls into an async
iterator per HTTP request, and aborts the request when its consumer goes away (a client that
disconnects frees its slot).

:class:`SerialWorker` is INTERIM: it runs one request at a time on one thread with the
engine's own loop (real tokens, no batching across requests), so the server is usable and
tested before the continuous-batching scheduler lands; ``camelid.infer.scheduler.Worker``
replaces it then (:func:`make_worker` picks that one when it exists).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import secrets
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace

from camelid.errors import RequestError
from camelid.infer import Completion, Engine, SamplingParams, TokenLogprob

log = logging.getLogger("camelid.serve")

try:  # the scheduler's own types, once it lands
    from camelid.infer.scheduler import Event, QueueFull  # type: ignore[attr-defined]
except ImportError:

    class QueueFull(RequestError):  # type: ignore[no-redef]
        """The waiting queue is full (the server answers 429)."""

    @dataclass
    class Event:  # type: ignore[no-redef]
        """What one step released for one request (the scheduler's ``Event``)."""

        request_id: str
        text: str
        token_ids: list[int]
        logprobs: list[TokenLogprob] | None
        done: Completion | None = None


def derive_seed(seed: int | None, i: int) -> int | None:
    """The seed of choice ``i`` of a request with ``n`` choices: distinct and reproducible per
    (seed, i). INTERIM: ``camelid.infer.sampling.derive_seed`` when it lands; until then
    ``seed + i`` (mod 2**64), and None (a fresh random seed each) for an unseeded request."""
    try:
        from camelid.infer.sampling import derive_seed as real  # type: ignore[attr-defined]
    except ImportError:
        return None if seed is None else (seed + i) % 2**64
    return real(seed, i)


def score_only(params: SamplingParams) -> SamplingParams:
    """``params`` asking to score the prompt only (OpenAI ``max_tokens=0`` with ``echo``).
    INTERIM: once SamplingParams accepts ``max_new_tokens=0`` this is a plain replace; until
    then the checked value 1 is overwritten after the check."""
    try:
        return params.replace(max_new_tokens=0)
    except RequestError:
        p = replace(params, max_new_tokens=1)
        object.__setattr__(p, "max_new_tokens", 0)
        return p


@dataclass
class WorkerStats:
    """The counters the server exports (the scheduler's ``SchedulerStats`` has these and more)."""

    running: int = 0
    waiting: int = 0
    steps: int = 0
    prefix_queries: int = 0
    prefix_hits: int = 0
    prefix_cached_tokens: int = 0
    aborted: int = 0


@dataclass
class _Job:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    on_event: Callable[[Event], None]
    aborted: threading.Event = field(default_factory=threading.Event)


_STOP = object()


class SerialWorker:
    """INTERIM stand-in for ``camelid.infer.scheduler.Worker``: one request at a time, on one
    background thread, through :class:`camelid.Engine`'s own decode loop. ``abort`` takes
    effect at the next token. Errors a request causes end it with ``finish_reason="error"``
    (logged here); nothing escapes the thread."""

    def __init__(self, engine: Engine, *, max_queue: int = 256) -> None:
        self.engine = engine
        self.stats = WorkerStats()
        self._queue: queue.Queue = queue.Queue()
        self._max_queue = max_queue
        self._jobs: dict[str, _Job] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._ids = itertools.count()
        self._draining = False

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="camelid-worker", daemon=True)
            self._thread.start()

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Finish (``drain``) or abort what is queued and running, then end the thread."""
        self._draining = True
        if not drain:
            with self._lock:
                jobs = list(self._jobs.values())
            for job in jobs:
                job.aborted.set()
        self._queue.put(_STOP)
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(
        self,
        prompt: list[int],
        params: SamplingParams,
        on_event: Callable[[Event], None],
        request_id: str | None = None,
    ) -> str:
        if self._draining:
            raise QueueFull("the server is shutting down")
        with self._lock:
            if self.stats.waiting >= self._max_queue:
                raise QueueFull(f"the queue is full ({self._max_queue} requests waiting)")
            rid = request_id or f"req-{next(self._ids)}"
            job = _Job(rid, list(prompt), params, on_event)
            self._jobs[rid] = job
            self.stats.waiting += 1
        self._queue.put(job)
        return rid

    def abort(self, request_id: str) -> None:
        with self._lock:
            job = self._jobs.get(request_id)
        if job is not None:
            job.aborted.set()

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is _STOP:
                return
            with self._lock:
                self.stats.waiting -= 1
                self.stats.running = 1
            try:
                self._run(job)
            except Exception:
                log.exception("request %s failed", job.request_id)
                done = Completion("", [], "error", job.prompt)
                job.on_event(Event(job.request_id, "", [], None, done))
            finally:
                with self._lock:
                    self._jobs.pop(job.request_id, None)
                    self.stats.running = 0

    def _run(self, job: _Job) -> None:
        engine, p, rid = self.engine, job.params, job.request_id
        if job.aborted.is_set():
            self.stats.aborted += 1
            job.on_event(Event(rid, "", [], None, Completion("", [], "abort", job.prompt)))
            return
        if p.max_new_tokens == 0:  # score the prompt only
            score = engine.score(job.prompt, top_logprobs=p.prompt_logprobs or 0)
            self.stats.steps += 1
            done = Completion("", [], "length", job.prompt, prompt_logprobs=score.tokens)
            job.on_event(Event(rid, "", [], [] if p.logprobs is not None else None, done))
            return
        # Engine internals, on purpose: one event per token with its ids and logprobs.
        (seq,) = engine._sequences([job.prompt], p)
        seen = 0
        runner = engine._run([seq])
        try:
            for _, piece in runner:
                self.stats.steps += 1
                new = seq.out[seen:]
                lps = seq.logprobs[seen : len(seq.out)] if seq.logprobs is not None else None
                seen = len(seq.out)
                if job.aborted.is_set() and seq.finish_reason is None:
                    self.stats.aborted += 1
                    result = replace(seq.result(), finish_reason="abort")
                    job.on_event(Event(rid, piece, new, lps, result))
                    return
                done = seq.result() if seq.finish_reason is not None else None
                job.on_event(Event(rid, piece, new, lps, done))
                if done is not None:
                    return
        finally:
            runner.close()


def make_worker(
    engine: Engine, *, max_batch: int = 16, max_queue: int = 256, **scheduler: object
) -> SerialWorker:
    """The real continuous-batching worker when ``camelid.infer.scheduler`` exists, else the
    interim :class:`SerialWorker`."""
    try:
        from camelid.infer.scheduler import Scheduler, Worker  # type: ignore[attr-defined]
    except ImportError:
        return SerialWorker(engine, max_queue=max_queue)
    sched = Scheduler(engine, max_batch=max_batch, max_queue=max_queue, **scheduler)
    return Worker(sched)


class Backend:
    """Async access to a worker: :meth:`run` submits several requests (the ``n`` choices or
    prompts of one HTTP request) and yields ``(index, Event)`` as they arrive. Leaving the
    iterator early (a client that went away, an error) aborts whatever is still running."""

    def __init__(self, worker: SerialWorker) -> None:
        self.worker = worker

    async def run(
        self, jobs: Sequence[tuple[list[int], SamplingParams]]
    ) -> AsyncIterator[tuple[int, Event]]:
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        ids: list[str] = []
        open_ = set(range(len(jobs)))
        tag = secrets.token_hex(6)
        try:
            for i, (prompt, params) in enumerate(jobs):

                def on_event(event: Event, i: int = i) -> None:
                    loop.call_soon_threadsafe(inbox.put_nowait, (i, event))

                ids.append(self.worker.submit(prompt, params, on_event, f"{tag}-{i}"))
            while open_:
                i, event = await inbox.get()
                if event.done is not None:
                    open_.discard(i)
                yield i, event
        finally:
            for i in open_:
                if i < len(ids):
                    self.worker.abort(ids[i])
