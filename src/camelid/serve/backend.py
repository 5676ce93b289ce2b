"""What the server runs generation on, and the bridge from its worker thread to asyncio.

The server talks to a :class:`camelid.infer.scheduler.Worker`: the continuous-batching
scheduler stepping on its own thread. ``submit(prompt, params, on_event, request_id)``,
``abort(id)``, ``start()``, ``stop(drain, timeout)`` and ``stats``; ``on_event`` is called on the
worker's thread, in order, with an :class:`Event` per step that has news for the request, the
last one carrying ``done`` (the :class:`camelid.Completion`). :class:`Backend` turns those calls
into an async iterator per HTTP request, and aborts the request when its consumer goes away (a
client that disconnects frees its row by the next step).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator, Sequence

from camelid.infer import Engine, SamplingParams
from camelid.infer.scheduler import Event, QueueFull, Scheduler, ShuttingDown, Worker

__all__ = ["Backend", "Event", "QueueFull", "ShuttingDown", "make_worker"]

log = logging.getLogger("camelid.serve")


def make_worker(
    engine: Engine, *, max_batch: int = 16, max_queue: int = 256, **scheduler: object
) -> Worker:
    """The continuous-batching worker the server runs on (``scheduler``: the other
    :class:`Scheduler` settings, e.g. ``prefix_cache_bytes``, ``batch_invariant``)."""
    return Worker(Scheduler(engine, max_batch=max_batch, max_queue=max_queue, **scheduler))


class Backend:
    """Async access to a worker: :meth:`run` submits several requests (the ``n`` choices or
    prompts of one HTTP request) and yields ``(index, Event)`` as they arrive. Leaving the
    iterator early (a client that went away, an error) aborts whatever is still running."""

    def __init__(self, worker: Worker) -> None:
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
