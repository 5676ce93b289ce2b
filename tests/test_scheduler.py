"""The continuous-batching scheduler (no HTTP): requests join and leave at every step and get
what ``Engine.generate`` gives them alone; chunked prefill keeps streams flowing; aborts free
rows at once; the prefix cache is hit, counted and bounded; the batch-invariant mode is
bitwise; score-only requests; the background Worker.

A random 2-layer model and a small tokenizer (as in test_infer.py); prefill chunks of 16
tokens so that short prompts span several prefix-cache blocks.
"""

from __future__ import annotations

import threading

import pytest
from conftest import random_llama_dir

import camelid
from camelid import RequestError, SamplingParams
from camelid.infer.engine import Completion
from camelid.infer.sampling import derive_seed
from camelid.infer.scheduler import Event, QueueFull, Scheduler, ShuttingDown, Worker
from camelid.tokenizer import train_tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog. 你好，世界！🙂🎉 "
    "今天天气很好，我们去公园散步吧。😀🚀 " * 3 + str(i)
    for i in range(200)
]
CHUNK = 16
GREEDY = SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True, logprobs=2)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CORPUS, 600, num_special=16)


@pytest.fixture(scope="module")
def engine(tok, tmp_path_factory):
    path = random_llama_dir(tmp_path_factory.mktemp("sched") / "model", vocab_size=tok.vocab_size)
    return camelid.Engine(camelid.load(path), tok)


def prompts(tok, n: int, prefix: str = "") -> list[list[int]]:
    """``n`` different prompts of different lengths (4 to ~60 tokens)."""
    words = "the quick brown fox 你好 世界 🙂 jumps over lazy dog 天气 🚀".split()
    return [
        tok.encode(
            prefix + " ".join(words[(i + j) % len(words)] for j in range(2 + 3 * (i % 7))), bos=True
        )
        for i in range(n)
    ]


def run(sched: Scheduler, arrivals: dict[int, list[tuple[list[int], SamplingParams]]]):
    """Step until idle, submitting ``arrivals[k]`` before step k; every request's events."""
    events: dict[str, list[Event]] = {}
    ids: list[str] = []
    k = 0
    while sched.has_work() or any(step >= k for step in arrivals):
        for prompt, params in arrivals.get(k, []):
            ids.append(sched.submit(prompt, params))
            events[ids[-1]] = []
        for ev in sched.step():
            events[ev.request_id].append(ev)
        k += 1
    return [events[i] for i in ids]


def done(evs: list[Event]):
    assert [e.done is not None for e in evs] == [False] * (len(evs) - 1) + [True]
    c = evs[-1].done
    # The events add up to the completion.
    assert "".join(e.text for e in evs) == c.text
    assert [t for e in evs for t in e.token_ids] == c.token_ids
    if c.logprobs is not None:
        assert [lp for e in evs for lp in e.logprobs] == c.logprobs
    return c


def assert_close(c, ref, tol=1e-5):
    assert c.token_ids == ref.token_ids
    assert c.text == ref.text and c.finish_reason == ref.finish_reason
    for a, b in zip(c.logprobs, ref.logprobs, strict=True):
        assert a.token == b.token and a.rank == b.rank
        assert abs(a.logprob - b.logprob) < tol
        assert a.top.keys() == b.top.keys()


def bitwise(c, ref):
    assert c.token_ids == ref.token_ids and c.text == ref.text
    assert [(t.token, t.logprob, t.rank, t.top) for t in c.logprobs] == [
        (t.token, t.logprob, t.rank, t.top) for t in ref.logprobs
    ]


# ---------------------------------------------------------------- continuous batching
def test_greedy_alone_equals_engine(engine, tok):
    sched = Scheduler(engine, max_batch=4, prefill_chunk=CHUNK)
    for p in prompts(tok, 3):
        (evs,) = run(sched, {0: [(p, GREEDY)]})
        assert_close(done(evs), engine.generate(p, GREEDY))


def test_32_concurrent_staggered_equal_engine(engine, tok):
    """32 requests arriving over 20 steps, 8 rows: each gets its own greedy answer."""
    ps = prompts(tok, 32)
    sched = Scheduler(engine, max_batch=8, prefill_chunk=CHUNK)
    arrivals: dict[int, list] = {}
    for i, p in enumerate(ps):
        params = GREEDY.replace(max_new_tokens=4 + i % 9)
        arrivals.setdefault(i * 2 // 3, []).append((p, params))
    results = run(sched, arrivals)
    assert sched.stats.running == sched.stats.waiting == 0 and not sched.has_work()
    for p, evs in zip(ps, results, strict=True):
        c = done(evs)
        assert_close(c, engine.generate(p, GREEDY.replace(max_new_tokens=len(c.token_ids))))


def test_sampled_seeded_and_penalised_at_any_concurrency(engine, tok):
    ps = prompts(tok, 12)
    kinds = [
        SamplingParams(max_new_tokens=8, temperature=1.0, seed=7, ignore_eos=True),
        SamplingParams(max_new_tokens=8, temperature=0.8, top_k=20, seed=3, ignore_eos=True),
        SamplingParams(
            max_new_tokens=8,
            temperature=0,
            repetition_penalty=1.4,
            frequency_penalty=0.5,
            ignore_eos=True,
        ),
    ]
    alone = [[done(run(Scheduler(engine), {0: [(p, k)]})[0]) for k in kinds] for p in ps[:2]]
    sched = Scheduler(engine, max_batch=6, prefill_chunk=CHUNK)
    crowd = {j: [(p, kinds[(i + j) % 3]) for i, p in enumerate(ps)] for j in range(3)}
    crowd[1][:0] = [(ps[0], k) for k in kinds] + [(ps[1], k) for k in kinds]
    results = run(sched, crowd)
    together = [done(evs) for evs in results[12:18]]  # the six at step 1, after 12 others
    assert [c.token_ids for c in together] == [c.token_ids for row in alone for c in row]
    # ... and what the engine gives them (the penalties are rebuilt as the batch changes).
    for row, p in zip(alone, ps, strict=False):
        assert [c.token_ids for c in row] == [engine.generate(p, k).token_ids for k in kinds]


def test_stop_strings_and_stop_tokens(engine, tok):
    p = prompts(tok, 1)[0]
    full = engine.generate(p, GREEDY.replace(max_new_tokens=12))
    stop_tok = full.token_ids[5]
    stop_str = full.text[len(full.text) // 2 :][:2]
    cases = [
        GREEDY.replace(max_new_tokens=12, stop_token_ids=(stop_tok,)),
        GREEDY.replace(max_new_tokens=12, stop=(stop_str,)),
    ]
    sched = Scheduler(engine, prefill_chunk=CHUNK)
    for params, evs in zip(cases, run(sched, {0: [(p, k) for k in cases]}), strict=True):
        c = done(evs)
        ref = engine.generate(p, params)
        assert (c.text, c.token_ids, c.finish_reason) == (ref.text, ref.token_ids, "stop")


def test_chunked_prefill_keeps_streams_flowing(engine, tok):
    """A 200-token prompt is prefilled 16 tokens a step while two streams get a token every
    step; the long one then answers as the engine does."""
    short = prompts(tok, 2)
    long_prompt = tok.encode(" ".join(["the quick brown fox 你好"] * 40), bos=True)[:200]
    sched = Scheduler(engine, max_batch=4, prefill_chunk=CHUNK)
    params = GREEDY.replace(max_new_tokens=40)
    ids = [sched.submit(p, params) for p in short]
    for _ in range(3):
        sched.step()
    rid = sched.submit(long_prompt, GREEDY)
    steps, got = 0, []
    while True:
        evs = {e.request_id: e for e in sched.step()}
        steps += 1
        assert sched.stats.prefill_tokens <= CHUNK
        assert all(len(evs[i].token_ids) == 1 for i in ids)  # every stream moved
        if rid in evs:
            got.append(evs[rid])
            break
    assert steps == -(-len(long_prompt) // CHUNK)  # one chunk per step
    while sched.has_work():
        got += [e for e in sched.step() if e.request_id == rid]
    assert_close(done(got), engine.generate(long_prompt, GREEDY))


def test_abort_frees_the_row_within_one_step(engine, tok):
    sched = Scheduler(engine, max_batch=4, prefill_chunk=64)
    params = GREEDY.replace(max_new_tokens=50)
    ps = prompts(tok, 5)
    ids = [sched.submit(p, params) for p in ps]
    got: dict[str, list[Event]] = {i: [] for i in ids}

    def step() -> dict[str, Event]:
        evs = sched.step()
        for e in evs:
            got[e.request_id].append(e)
        return {e.request_id: e for e in evs}

    for _ in range(4):
        step()
    assert sched.stats.decode_rows == 4 and sched.stats.waiting == 1
    calls = sched.stats.model_calls
    sched.abort(ids[1])
    sched.abort(ids[4])  # still waiting
    sched.abort("no-such-request")
    evs = step()
    assert sched.stats.decode_rows == 3 and sched.stats.model_calls == calls + 1
    assert evs[ids[1]].done.finish_reason == "abort" and evs[ids[4]].done.finish_reason == "abort"
    assert len(evs[ids[1]].done.token_ids) == 4 and evs[ids[4]].done.token_ids == []
    assert sched.stats.aborted == 2 and sched.stats.waiting == 0 and sched.stats.running == 3
    while sched.has_work():
        step()
    # The rows that stayed (the last one was moved into the freed row) answer as before.
    for i in (ids[0], ids[2], ids[3]):
        assert_close(done(got[i]), engine.generate(ps[ids.index(i)], params))
    assert done(got[ids[1]]).token_ids == engine.generate(ps[1], params).token_ids[:4]


def test_queue_full_and_bad_requests(engine, tok):
    sched = Scheduler(engine, max_batch=1, max_queue=2)
    p = prompts(tok, 1)[0]
    sched.submit(p, GREEDY, request_id="a")
    sched.submit(p, GREEDY)
    with pytest.raises(QueueFull, match="queue is full"):
        sched.submit(p, GREEDY)
    sched.step()  # "a" takes the row: one place in the queue again
    with pytest.raises(RequestError, match="already in use"):
        sched.submit(p, GREEDY, request_id="a")
    sched.submit(p, GREEDY)
    small = Scheduler(camelid.Engine(engine.model, tok, max_seq_len=64))
    with pytest.raises(RequestError, match=r"80 tokens .* context of 64"):
        small.submit(list(range(3, 83)), GREEDY)
    rid = small.submit(list(range(3, 83)), GREEDY.replace(truncate_prompt=True))
    while small.has_work():
        for ev in small.step():
            assert ev.request_id == rid
    assert ev.done.prompt_token_ids == list(range(3, 83))[-54:]
    with pytest.raises(RequestError, match="vocabulary"):
        sched.submit([1, 99999], GREEDY)
    with pytest.raises(RequestError, match="empty prompt"):
        sched.submit([], GREEDY)
    with pytest.raises(RequestError, match="max_batch"):
        Scheduler(engine, max_batch=0)


# ------------------------------------------------------------------------ prefix cache
@pytest.mark.parametrize("block", [CHUNK, 5])  # the prefix block: the chunk, or finer
def test_prefix_cache_hit(engine, tok, block):
    system = "You are a helpful assistant who likes 天气 and 🚀. " * 4
    a, b = prompts(tok, 2, prefix=system)
    shared = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
    assert shared >= 3 * CHUNK
    sched = Scheduler(engine, prefill_chunk=CHUNK, prefix_block=block)
    (first,) = run(sched, {0: [(a, GREEDY)]})
    assert done(first).cached_tokens == 0 and sched.stats.prefix_hits == 0
    assert sched.stats.prefix_blocks == len(a) // block
    (second,) = run(sched, {0: [(b, GREEDY)]})
    c = done(second)
    assert c.cached_tokens == shared // block * block
    s = sched.stats
    assert (s.prefix_queries, s.prefix_hits, s.prefix_cached_tokens) == (2, 1, c.cached_tokens)
    assert_close(c, engine.generate(b, GREEDY))
    # The same prompt again: all but the block holding its last token come from the cache.
    (third,) = run(sched, {0: [(a, GREEDY)]})
    assert done(third).cached_tokens == (len(a) - 1) // block * block
    assert_close(done(third), engine.generate(a, GREEDY))


def test_prefix_cache_eviction_and_off(engine, tok):
    block = Scheduler(engine, prefill_chunk=CHUNK)._slot_bytes * CHUNK
    sched = Scheduler(engine, prefill_chunk=CHUNK, prefix_cache_bytes=2 * block)
    ps = prompts(tok, 8, prefix="The lazy dog 世界 ")
    run(sched, {0: [(p, GREEDY) for p in ps]})
    s = sched.stats
    assert s.prefix_blocks <= 2 and s.prefix_bytes <= 2 * block and s.prefix_evictions > 0
    off = Scheduler(engine, prefill_chunk=CHUNK, prefix_cache_bytes=0)
    (evs,) = run(off, {0: [(ps[0], GREEDY)]})
    (evs,) = run(off, {0: [(ps[0], GREEDY)]})
    assert done(evs).cached_tokens == 0 and off.stats.prefix_queries == 0
    assert off.stats.prefix_blocks == 0


def test_score_only(engine, tok):
    p = prompts(tok, 1, prefix="Score this: 你好🙂 ")[0]
    params = SamplingParams(max_new_tokens=0, prompt_logprobs=3)
    ref = engine.score(p, top_logprobs=3)
    sched = Scheduler(engine, prefill_chunk=CHUNK)
    (evs,) = run(sched, {0: [(p, params), (p, GREEDY)]})[:1]
    c = done(evs)
    assert len(evs) == 1 and (c.token_ids, c.text, c.finish_reason) == ([], "", "length")
    assert c.prompt_logprobs[0] is None and len(c.prompt_logprobs) == len(p)
    assert sched.stats.prefix_queries == 1  # the scoring request skips the lookup
    for a, b in zip(c.prompt_logprobs[1:], ref.tokens[1:], strict=True):
        assert a.token == b.token and abs(a.logprob - b.logprob) < 1e-5 and a.rank == b.rank
    whole = engine.generate(p, params)  # the engine honours it too
    assert whole.token_ids == [] and len(whole.prompt_logprobs) == len(p)
    # A score-only prompt may fill the whole context.
    small = Scheduler(camelid.Engine(engine.model, tok, max_seq_len=len(p)))
    (evs,) = run(small, {0: [(p, params)]})
    assert len(done(evs).prompt_logprobs) == len(p)
    with pytest.raises(RequestError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)


# ------------------------------------------------------------------ batch-invariant mode
def test_batch_invariant_is_bitwise(engine, tok):
    system = "Always answer in the style of a lazy dog 天气 🙂. " * 3
    target = prompts(tok, 1, prefix=system)[0]
    others = prompts(tok, 31, prefix="Other 世界 ")
    sampled = SamplingParams(
        max_new_tokens=8, temperature=1.0, seed=11, logprobs=3, ignore_eos=True
    )

    def sched():
        return Scheduler(engine, max_batch=32, prefill_chunk=CHUNK, batch_invariant=True)

    for params in (GREEDY, sampled):
        alone = done(run(sched(), {0: [(target, params)]})[0])
        s = sched()
        results = run(
            s,
            {
                0: [(p, GREEDY) for p in others[:15]],
                2: [(target, params)] + [(p, GREEDY) for p in others[15:]],
            },
        )
        among = done(results[15])
        run(s, {0: [(target, params)]})
        (hit,) = run(s, {0: [(target, params)]})
        hit = done(hit)
        assert hit.cached_tokens > 0
        bitwise(among, alone)
        bitwise(hit, alone)
        if params is GREEDY:
            assert_close(alone, engine.generate(target, GREEDY))


# ----------------------------------------------------------------------- n and seeds
def test_derive_seed():
    seeds = [derive_seed(5, i) for i in range(64)]
    assert (
        seeds[0] == 5 and len(set(seeds)) == 64 and seeds == [derive_seed(5, i) for i in range(64)]
    )
    assert all(0 <= s < 2**64 for s in seeds) and derive_seed(6, 1) != derive_seed(5, 1)
    assert derive_seed(None, 0) != derive_seed(None, 0)


def test_n_copies_are_different_and_reproducible(engine, tok):
    p = prompts(tok, 1)[0]
    base = SamplingParams(max_new_tokens=8, temperature=1.0, ignore_eos=True)
    copies = [(p, base.replace(seed=derive_seed(42, i))) for i in range(4)]
    first = [done(e).token_ids for e in run(Scheduler(engine), {0: copies})]
    assert len({tuple(t) for t in first}) == 4
    again = [done(e).token_ids for e in run(Scheduler(engine, max_batch=2), {0: copies[::-1]})]
    assert again[::-1] == first


# ------------------------------------------------------------------------------ Worker
def test_worker_threads_errors_and_drain(engine, tok, monkeypatch):
    ps = prompts(tok, 12)
    params = GREEDY.replace(max_new_tokens=6)
    worker = Worker(Scheduler(engine, max_batch=4, prefill_chunk=CHUNK))
    worker.start()
    got: dict[str, list[Event]] = {}
    finished = threading.Event()
    lock = threading.Lock()

    def on_event(ev: Event) -> None:
        with lock:
            got.setdefault(ev.request_id, []).append(ev)
            if sum(e[-1].done is not None for e in got.values()) == len(ps):
                finished.set()

    owners: dict[str, int] = {}

    def client(k: int) -> None:
        for i in range(k, len(ps), 4):
            owners[worker.submit(ps[i], params, on_event)] = i

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert finished.wait(60)
    for rid, i in owners.items():
        assert_close(done(got[rid]), engine.generate(ps[i], params))
    with pytest.raises(RequestError, match="vocabulary"):
        worker.submit([1, 99999], params, on_event)

    # A failing step ends the requests that held a row with an error; the worker goes on.
    real, calls = engine._prefill, []

    def broken(*args):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("out of memory")
        return real(*args)

    monkeypatch.setattr(engine, "_prefill", broken)
    ends: dict[str, Event] = {}
    ended = threading.Condition()

    def on_done(ev: Event) -> None:
        with ended:
            if ev.done is not None:
                ends[ev.request_id] = ev
                ended.notify_all()

    failed = worker.submit(ps[0], params, on_done)
    with ended:
        assert ended.wait_for(lambda: failed in ends, 30)
    assert ends[failed].done.finish_reason == "error" and "out of memory" in ends[failed].done.error
    assert worker.scheduler.stats.errors == 1
    later = worker.submit(ps[1], params, on_done)
    with ended:
        assert ended.wait_for(lambda: later in ends, 30)
    assert ends[later].done.token_ids == engine.generate(ps[1], params).token_ids

    # stop(drain=True) finishes what runs; nothing new is accepted afterwards.
    drained = threading.Event()
    worker.submit(ps[2], GREEDY.replace(max_new_tokens=20), lambda ev: ev.done and drained.set())
    worker.stop(drain=True, timeout=60)
    assert drained.is_set()
    with pytest.raises(ShuttingDown):
        worker.submit(ps[0], params, on_event)


def test_worker_ends_requests_a_failed_step_had_finished(engine, tok, monkeypatch):
    """The step raises after a request finished (its last event is lost with the step): the
    Worker still ends it, with an error, and serves the next request."""
    sched = Scheduler(engine, prefill_chunk=CHUNK)
    real = sched._settle

    def settle(ready):
        monkeypatch.setattr(sched, "_settle", real)
        raise RuntimeError("device lost")

    monkeypatch.setattr(sched, "_settle", settle)
    worker = Worker(sched)
    worker.start()
    ends: dict[str, Completion] = {}
    cond = threading.Condition()

    def on_event(ev: Event) -> None:
        with cond:
            if ev.done is not None:
                ends[ev.request_id] = ev.done
                cond.notify_all()

    ps = prompts(tok, 2)
    a = worker.submit(ps[0], GREEDY.replace(max_new_tokens=1), on_event)
    with cond:
        assert cond.wait_for(lambda: a in ends, 30)
    assert ends[a].finish_reason == "error" and "device lost" in ends[a].error
    b = worker.submit(ps[1], GREEDY.replace(max_new_tokens=3), on_event)
    with cond:
        assert cond.wait_for(lambda: b in ends, 30)
    assert ends[b].token_ids == engine.generate(ps[1], GREEDY.replace(max_new_tokens=3)).token_ids
    worker.stop()
    assert sched.stats.running == 0 and not sched.has_work()


def test_worker_abort_and_stop_without_drain(engine, tok):
    worker = Worker(Scheduler(engine, max_batch=2, prefill_chunk=CHUNK))
    worker.start()
    ends: dict[str, str] = {}
    gate = threading.Event()

    def on_event(ev: Event) -> None:
        if ev.done is not None:
            ends[ev.request_id] = ev.done.finish_reason
        gate.set()

    long = SamplingParams(max_new_tokens=200, temperature=0, ignore_eos=True)
    a = worker.submit(prompts(tok, 1)[0], long, on_event)
    assert gate.wait(30)
    worker.abort(a)
    b = worker.submit(prompts(tok, 2)[1], long, on_event)
    worker.stop(drain=False)
    assert ends == {a: "abort", b: "abort"}
    assert worker.scheduler.stats.running == 0 and not worker.scheduler.has_work()


def test_compiled_decode_equals_eager(engine, tok):
    """With a compiled engine the batch is padded to a power of two (the padding rows write a
    slot nobody reads) and the cache length rounded: the answers stay the engine's."""
    compiled = camelid.Engine(engine.model, tok, compile=True)
    # The long prompt is prefilled in row 3 over several steps while three rows decode padded
    # to four: its cache row must survive the padding row's writes.
    ps = [*prompts(tok, 3), tok.encode(" ".join(["the lazy dog 世界"] * 20), bos=True)[:70]]
    params = GREEDY.replace(max_new_tokens=8)
    sched = Scheduler(compiled, max_batch=4, prefill_chunk=CHUNK)
    results = run(sched, {0: [(p, params) for p in ps[:3]], 4: [(ps[3], params)]})
    for p, evs in zip(ps, results, strict=True):
        assert_close(done(evs), engine.generate(p, params), tol=1e-4)
