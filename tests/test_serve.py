"""The OpenAI-compatible server, live on a loopback port, through the official ``openai`` client.

Two tiny random models with a byte-level BPE tokenizer trained on English, Chinese and emoji:
``plain`` (random weights: its answers are gibberish but deterministic, which is all equality
needs) and ``cycle`` (its blocks add nothing and its head maps each token of CYCLE_TEXT to the
next, so it answers in valid Chinese and emoji whose characters span several tokens). Every
answer is compared with the engine's own in-process result.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import random_llama_dir

import camelid
from camelid.tokenizer import train_tokenizer
from camelid.tokenizer.chat import chat_prompt_ids

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
from camelid.serve import Limits, create_app  # noqa: E402
from camelid.serve.app import generation_stop_ids  # noqa: E402
from camelid.serve.backend import make_worker  # noqa: E402

CORPUS = [
    "The quick brown fox jumps over the lazy dog. 你好，世界！🙂🎉 "
    "今天天气很好，我们去公园散步吧。😀🚀 " * 3 + str(i)
    for i in range(200)
]
CYCLE_TEXT = "你好🙂世界。🎉天气"
KEY = "sekret-key"
MODEL = "tiny"


class LiveServer:
    """uvicorn serving ``app`` on a free loopback port, in a background thread."""

    def __init__(self, app) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]})
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CORPUS, 600, num_special=16)


@pytest.fixture(scope="module")
def model_dir(tok, tmp_path_factory):
    path = random_llama_dir(tmp_path_factory.mktemp("serve") / "model", vocab_size=tok.vocab_size)
    tok.save(path)
    return path


@pytest.fixture(scope="module")
def engine(model_dir, tok):
    return camelid.Engine(camelid.load(model_dir), tok)


@pytest.fixture(scope="module")
def cycle_engine(engine, tok):
    """See the module docstring: after the chat template's header (its last token is the "\\n\\n"
    after <|end_header_id|>) or any cycle token, the next token is the cycle's next one."""
    ids = tok.encode(CYCLE_TEXT)
    assert len(set(ids)) == len(ids)
    assert any("\ufffd" in tok.decode([t]) for t in ids), "no token holds a partial character"
    newline = sorted(set(tok.encode("\n\n")))  # "\n" twice in this vocabulary
    assert len(newline) == 1
    m = copy.deepcopy(engine.model)
    with torch.no_grad():
        for layer in m.layers:
            layer.attention.wo.weight.zero_()
            layer.feed_forward.w2.weight.zero_()
        hidden = m.norm(m.tok_embeddings.weight[ids + newline])
        head = torch.zeros_like(m.output.weight)
        head[[*ids[1:], ids[0], ids[0]]] = 40 * hidden / hidden.pow(2).sum(1, keepdim=True)
        m.output.weight.copy_(head)
    return camelid.Engine(m, tok), ids


@pytest.fixture(scope="module")
def live(engine):
    server = LiveServer(create_app(engine, model_name=MODEL, api_key=KEY))
    yield server
    server.close()


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def cycle_live(cycle_engine):
    engine, _ = cycle_engine
    server = LiveServer(create_app(engine, model_name=MODEL))
    yield server
    server.close()


@pytest.fixture(scope="module")
def cycle_client(cycle_live):
    return openai.OpenAI(base_url=f"{cycle_live.url}/v1", api_key="x", max_retries=0, timeout=60)


def headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


def greedy(engine, prompt, n: int, **kw):
    return engine.generate(prompt, max_new_tokens=n, temperature=0, **kw)


USER = [{"role": "user", "content": "Why is the sky blue? 你好🙂"}]


# ----------------------------------------------------------------------------------- chat
def test_chat_equals_engine(client, engine, tok):
    r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=12, temperature=0)
    want = greedy(engine, chat_prompt_ids(tok, USER), 12)
    (choice,) = r.choices
    assert choice.message.content == want.text
    assert choice.message.role == "assistant"
    assert choice.finish_reason == want.finish_reason
    assert r.usage.prompt_tokens == len(want.prompt_token_ids)
    assert r.usage.completion_tokens == len(want.token_ids)
    assert r.usage.prompt_tokens_details.cached_tokens == 0
    assert r.model == MODEL and r.id.startswith("chatcmpl-")


def test_streamed_chat_equals_non_streamed_in_chinese_and_emoji(cycle_client):
    kw = dict(model=MODEL, messages=USER, max_completion_tokens=20, temperature=0)
    whole = cycle_client.chat.completions.create(**kw)
    text = whole.choices[0].message.content
    assert text.startswith(CYCLE_TEXT[:4]) and "🎉" in text and "\ufffd" not in text
    chunks = list(
        cycle_client.chat.completions.create(
            **kw, stream=True, stream_options={"include_usage": True}
        )
    )
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces) and len([p for p in pieces if p]) > 3
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_logprobs_equal_engine(client, engine, tok):
    r = client.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
    )
    want = greedy(engine, chat_prompt_ids(tok, USER), 6, logprobs=3)
    got = r.choices[0].logprobs.content
    assert len(got) == len(want.logprobs)
    for g, w in zip(got, want.logprobs, strict=True):
        assert g.token == tok.decode([w.token])
        assert abs(g.logprob - w.logprob) < 1e-5
        assert [t.logprob for t in g.top_logprobs] == pytest.approx(list(w.top.values()), abs=1e-5)


def test_generation_config_ids_stop_chat(cycle_engine, tmp_path):
    """A model directory's generation_config.json eos_token_id (an id or a list) ends every
    request, as the chat template's end of turn does."""
    from fastapi.testclient import TestClient

    engine, ids = cycle_engine
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [ids[3], 1]}))
    stops = generation_stop_ids(tmp_path)
    assert stops == (ids[3], 1)
    assert generation_stop_ids(tmp_path / "nothing-here") == ()
    app = create_app(engine, model_name=MODEL, extra_stop_ids=stops)
    body = {"model": MODEL, "messages": USER, "max_tokens": 20, "temperature": 0}
    with TestClient(app) as c:
        r = c.post("/v1/chat/completions", json=body).json()
        assert r["choices"][0]["finish_reason"] == "stop"
        assert r["usage"]["completion_tokens"] == 3
        assert r["choices"][0]["message"]["content"] == tok_decode(engine, ids[:3])
        body["ignore_eos"] = True
        r = c.post("/v1/chat/completions", json=body).json()
        assert r["choices"][0]["finish_reason"] == "length"


def tok_decode(engine, ids):
    return engine.tokenizer.decode(ids)


# ---------------------------------------------------------------------------- completions
def test_echo_logprobs_equal_engine_scores(client, engine, tok):
    """What lm-evaluation-harness's local-completions sends and reads: every prompt token's
    logprob (None for the first), its top alternatives, the generated token's last."""
    ids = tok.encode("The quick brown fox 你好🙂 jumps", bos=True)
    score = engine.score(ids, top_logprobs=1)
    for max_tokens in (0, 1):
        r = client.completions.create(
            model=MODEL, prompt=ids, echo=True, logprobs=1, max_tokens=max_tokens, temperature=0
        )
        lp = r.choices[0].logprobs
        assert len(lp.token_logprobs) == len(ids) + max_tokens
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        for got, want in zip(lp.token_logprobs[1 : len(ids)], score.tokens[1:], strict=True):
            assert abs(got - want.logprob) < 1e-5
        for top, want in zip(lp.top_logprobs[1 : len(ids)], score.tokens[1:], strict=True):
            best = max(want.top.values())
            assert max(top.values()) == pytest.approx(best, abs=1e-5)
            assert (want.rank == 1) == (abs(best - want.logprob) < 1e-9)
        assert lp.tokens[: len(ids)] == [tok.decode([t]) for t in ids]
        assert r.choices[0].text.startswith(tok.decode(ids))
        assert lp.text_offset == sorted(lp.text_offset)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 1
    want = greedy(engine, ids, 1, logprobs=1)
    assert abs(lp.token_logprobs[-1] - want.logprobs[0].logprob) < 1e-5


def test_echo_lists_the_stop_token(client, engine, tok):
    """lm-eval reads token_logprobs[ctxlen:-1], assuming one entry per prompt token and one for
    the sampled token. When the model would end the text right after the prompt (its greedy
    next token is a stop token), that entry must still be there, or the continuation's last
    token is dropped from every such score. The stop token's text is not in ``text``."""
    ids = tok.encode("The quick brown fox 你好🙂 jumps", bos=True)
    score = engine.score([*ids, 0], top_logprobs=1)
    ((nxt, best),) = score.tokens[-1].top.items()  # the greedy next token, made a stop token
    kw = dict(model=MODEL, prompt=ids, logprobs=1, max_tokens=1, temperature=0)
    r = client.completions.create(echo=True, extra_body={"stop_token_ids": [nxt]}, **kw)
    (c,) = r.choices
    assert c.finish_reason == "stop" and c.text == tok.decode(ids)
    lp = c.logprobs
    assert len(lp.token_logprobs) == len(ids) + 1
    assert lp.tokens[-1] == tok.decode([nxt]) and lp.text_offset[-1] == len(c.text)
    assert abs(lp.token_logprobs[-1] - best) < 1e-5
    assert lp.token_logprobs[-1] == max(lp.top_logprobs[-1].values())  # lm-eval's is_greedy
    for got, want in zip(lp.token_logprobs[1:-1], score.tokens[1:-1], strict=True):
        assert abs(got - want.logprob) < 1e-5
    # Without echo the output is the generated tokens, which a stop token is not part of.
    r = client.completions.create(extra_body={"stop_token_ids": [nxt]}, **kw)
    assert r.choices[0].text == "" and r.choices[0].logprobs.tokens == []


def test_text_prompt_echo_offsets(client, tok):
    prompt = "The quick brown fox"
    r = client.completions.create(
        model=MODEL, prompt=prompt, echo=True, logprobs=0, max_tokens=3, temperature=0
    )
    c = r.choices[0]
    assert c.text.startswith(prompt)
    lp = c.logprobs
    assert lp.tokens[0] == "<|begin_of_text|>" and lp.text_offset[0] == 0
    n = len(tok.encode(prompt, bos=True))
    # each prompt token's text sits at its offset in the echoed text
    for piece, offset in zip(lp.tokens[1:n], lp.text_offset[1:n], strict=True):
        assert c.text[offset : offset + len(piece)] == piece
    assert lp.text_offset[n] == len(prompt)


def test_prompt_forms_and_n_indexing(client, engine, tok):
    texts = ["The quick", "你好，世界"]
    ids = [tok.encode(t, bos=True) for t in texts]
    r = client.completions.create(model=MODEL, prompt=texts, max_tokens=5, temperature=0)
    want = [greedy(engine, t, 5).text for t in texts]
    assert [c.text for c in r.choices] == want
    assert [c.index for c in r.choices] == [0, 1]
    r2 = client.completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=0, n=2)
    assert [c.index for c in r2.choices] == [0, 1, 2, 3]
    assert [c.text for c in r2.choices] == [want[0], want[0], want[1], want[1]]
    r3 = client.completions.create(model=MODEL, prompt=ids[1], max_tokens=5, temperature=0)
    assert r3.choices[0].text == want[1]


def test_n_seeded_samples_differ_and_repeat(client):
    kw = dict(model=MODEL, prompt="Once upon", max_tokens=12, temperature=1.0, n=3, seed=7)
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    texts = [c.text for c in a.choices]
    assert len(set(texts)) == 3, texts
    assert texts == [c.text for c in b.choices]
    other = client.completions.create(**{**kw, "seed": 8})
    assert [c.text for c in other.choices] != texts


def test_stop_strings_cut_the_text(cycle_client):
    chat = cycle_client.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=20, temperature=0, stop=["世界"]
    )
    assert chat.choices[0].message.content == "你好🙂"
    assert chat.choices[0].finish_reason == "stop"


def test_streamed_completion_equals_whole(client):
    kw = dict(model=MODEL, prompt="The lazy dog", max_tokens=10, temperature=0)
    whole = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(**kw, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole
    assert chunks[-1].choices[0].finish_reason == "length"


def test_concurrent_streams_each_equal_their_sequential_answer(client, engine):
    """32 streamed requests at once (the scheduler batches them, joining and leaving at every
    step), each the text the engine gives that prompt alone."""
    prompts = [f"Story {i}: the fox" * (1 + i % 3) for i in range(32)]
    want = [greedy(engine, p, 8).text for p in prompts]

    def stream(p: str) -> str:
        s = client.completions.create(
            model=MODEL, prompt=p, max_tokens=8, temperature=0, stream=True
        )
        return "".join(c.choices[0].text for c in s)

    with ThreadPoolExecutor(32) as pool:
        assert list(pool.map(stream, prompts)) == want


def test_seeded_samples_repeat_under_concurrency(client):
    """A seeded sampled request gives the same text alone and among 15 concurrent others."""
    kw = dict(model=MODEL, max_tokens=8, temperature=1.0, top_p=0.9)
    prompts = [f"Seed {i}: once" for i in range(16)]
    alone = [
        client.completions.create(prompt=p, seed=100 + i, **kw).choices[0].text
        for i, p in enumerate(prompts)
    ]

    def ask(i: int) -> str:
        return client.completions.create(prompt=prompts[i], seed=100 + i, **kw).choices[0].text

    with ThreadPoolExecutor(16) as pool:
        assert list(pool.map(ask, range(16))) == alone
    assert len(set(alone)) > 1  # the samples are not all one text


def test_a_shared_prefix_is_served_from_the_cache(engine):
    """The second request with the same long prefix reuses its blocks: usage says how many
    prompt tokens were cached, and the answer is the one computed without the cache."""
    from fastapi.testclient import TestClient

    app = create_app(engine, model_name=MODEL, scheduler={"prefill_chunk": 16})
    prefix = " ".join(f"w{i}" for i in range(40))
    with TestClient(app) as c:
        answers = []
        for suffix in (" first", " second"):
            body = {"model": MODEL, "prompt": prefix + suffix, "max_tokens": 6, "temperature": 0}
            r = c.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            answers.append(r.json())
    cached = [a["usage"]["prompt_tokens_details"]["cached_tokens"] for a in answers]
    assert cached[0] == 0 and cached[1] >= 16 and cached[1] % 16 == 0
    want = greedy(engine, prefix + " second", 6).text
    assert answers[1]["choices"][0]["text"] == want


# ------------------------------------------------------------------------- other routes
def test_models_health_tokenize(client, live, tok, engine):
    (m,) = client.models.list().data
    assert m.id == MODEL and m.model_extra["max_model_len"] == engine.max_seq_len
    assert client.models.retrieve(MODEL).id == MODEL
    assert httpx.get(f"{live.url}/health").json() == {"status": "ok"}  # no key needed
    text = "Hello 你好🙂"
    r = httpx.post(f"{live.url}/tokenize", json={"prompt": text}, headers=headers()).json()
    assert r["tokens"] == tok.encode(text, bos=True) and r["count"] == len(r["tokens"])
    back = httpx.post(
        f"{live.url}/detokenize", json={"tokens": r["tokens"][1:]}, headers=headers()
    ).json()
    assert back == {"prompt": text}
    chat = httpx.post(f"{live.url}/tokenize", json={"messages": USER}, headers=headers()).json()
    assert chat["tokens"] == chat_prompt_ids(tok, USER)


def test_the_weights_digest_is_on_every_answer(client, live, model_dir, engine, tok):
    """system_fingerprint on completions, chats and their stream chunks; the digest header on
    every response (errors too); both digests in /v1/models. Without a digest: null, absent."""
    from camelid.weights.digest import directory_digest

    digest, fp = directory_digest(model_dir), f"fp_{directory_digest(model_dir)[:16]}"
    kw = dict(model=MODEL, max_tokens=3, temperature=0)
    server = LiveServer(create_app(engine, model_name=MODEL, api_key=KEY, digest=digest))
    try:
        c = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)
        chat = c.chat.completions.with_raw_response.create(messages=USER, **kw)
        assert chat.headers["x-camelid-weights-digest"] == digest
        assert chat.parse().system_fingerprint == fp
        assert c.completions.create(prompt="The", **kw).system_fingerprint == fp
        streams = [
            c.chat.completions.create(messages=USER, stream=True, **kw),
            c.completions.create(prompt="The", stream=True, **kw,
                                 stream_options={"include_usage": True}),
        ]  # fmt: skip
        for stream in streams:
            chunks = list(stream)
            assert len(chunks) > 1 and {ch.system_fingerprint for ch in chunks} == {fp}
        (m,) = c.models.list().data
        assert m.model_extra["digest"] == digest and m.model_extra["tokenizer_digest"] == tok.digest
        for path, key, status in (("/v1/models", KEY, 200), ("/health", None, 200),
                                  ("/v1/models", None, 401), ("/nowhere", KEY, 404)):  # fmt: skip
            h = {"Authorization": f"Bearer {key}"} if key else {}
            r = httpx.get(f"{server.url}{path}", headers=h)
            assert r.status_code == status and r.headers["x-camelid-weights-digest"] == digest
    finally:
        server.close()
    r = client.completions.with_raw_response.create(prompt="The", **kw)  # given no digest
    assert r.parse().system_fingerprint is None and "x-camelid-weights-digest" not in r.headers
    (m,) = client.models.list().data
    assert m.model_extra["digest"] is None and m.model_extra["tokenizer_digest"] == tok.digest


def test_metrics_move(client, live):
    def scrape() -> dict[str, float]:
        text = httpx.get(f"{live.url}/metrics", headers=headers()).text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    ok = 'camelid_requests_total{route="/v1/completions",status="200"}'
    bad = 'camelid_requests_total{route="/v1/completions",status="400"}'
    before = scrape()
    client.completions.create(model=MODEL, prompt="The quick", max_tokens=4, temperature=0)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x", max_tokens=4, temperature=9)
    after = scrape()
    assert after[ok] == before.get(ok, 0) + 1
    assert after[bad] == before.get(bad, 0) + 1
    assert after["camelid_generation_tokens_total"] >= before["camelid_generation_tokens_total"] + 4
    assert after["camelid_prompt_tokens_total"] == before["camelid_prompt_tokens_total"] + 3
    assert after["camelid_time_to_first_token_seconds_count"] > 0
    assert after["camelid_engine_steps_total"] > before["camelid_engine_steps_total"]
    for name in ("camelid_num_requests_waiting", "camelid_prefix_cache_hits_total",
                 "camelid_aborted_requests_total", "camelid_inter_token_latency_seconds_count",
                 "camelid_e2e_request_latency_seconds_count"):  # fmt: skip
        assert name in after


# -------------------------------------------------------------------------- security
def test_api_key(live):
    bad_client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_client.models.list()
    for h in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.post(
            f"{live.url}/v1/completions", json={"model": MODEL, "prompt": "x"}, headers=h
        )
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key"
    for path in ("/metrics", "/v1/models", "/nowhere"):
        assert httpx.get(f"{live.url}{path}").status_code == 401
    assert httpx.get(f"{live.url}/nowhere", headers=headers()).status_code == 404


def test_body_size_limit(engine):
    from fastapi.testclient import TestClient

    app = create_app(engine, model_name=MODEL, limits=Limits(max_body_bytes=1000))
    with TestClient(app) as c:
        r = c.post("/v1/completions", json={"model": MODEL, "prompt": "x" * 2000})
        assert r.status_code == 413 and "1000 bytes" in r.json()["error"]["message"]


def test_full_queue_is_429(engine):
    from fastapi.testclient import TestClient

    app = create_app(engine, model_name=MODEL, worker=make_worker(engine, max_queue=0))
    body = {"model": MODEL, "prompt": "x", "max_tokens": 2}
    with TestClient(app) as c:
        for stream in (False, True):
            r = c.post("/v1/completions", json={**body, "stream": stream})
            assert r.status_code == 429, r.text
            assert r.json()["error"]["type"] == "rate_limit_error"


def test_a_bug_is_a_generic_500(engine, monkeypatch):
    from fastapi.testclient import TestClient

    app = create_app(engine, model_name=MODEL)
    state = app.state.serve

    def broken(*args, **kwargs):
        raise ZeroDivisionError("secret internals")

    monkeypatch.setattr(state.engine.tokenizer, "encode", broken)
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.post("/v1/completions", json={"model": MODEL, "prompt": "x"})
    assert r.status_code == 500
    assert r.json() == {"error": {"message": "internal server error", "type": "server_error",
                                  "param": None, "code": None}}  # fmt: skip
    assert "secret" not in r.text and "Traceback" not in r.text


# -------------------------------------------------------------------------- disconnects
def test_disconnected_stream_frees_its_slot(live, engine):
    state = _state(live)
    worker = state.backend.worker
    aborted = worker.stats.aborted
    body = {"model": MODEL, "prompt": "The", "max_tokens": 200, "temperature": 0,
            "ignore_eos": True, "stream": True}  # fmt: skip
    with (
        httpx.Client(timeout=30) as h,
        h.stream("POST", f"{live.url}/v1/completions", json=body, headers=headers()) as r,
    ):
        steps = worker.stats.steps
        next(r.iter_lines())
    deadline = time.monotonic() + 10
    while worker.stats.aborted == aborted or worker.stats.running:
        assert time.monotonic() < deadline, "the aborted request still holds its slot"
        time.sleep(0.01)
    assert worker.stats.steps - steps < 200  # it did not run to its end
    # and the server still serves
    r = httpx.post(f"{live.url}/v1/completions", json={**body, "stream": False, "max_tokens": 2},
                   headers=headers())  # fmt: skip
    assert r.status_code == 200


def test_disconnected_non_streaming_request_is_aborted(live):
    """A client that gives up on a whole (non-streamed) answer frees its slot too, and the
    request ends as a 499, not as an internal error (lm-eval drops its other connections when
    one request fails)."""
    worker = _state(live).backend.worker
    aborted = worker.stats.aborted
    gone, bug = _requests_counted(live, 499), _requests_counted(live, 500)
    body = json.dumps({"model": MODEL, "prompt": "The", "max_tokens": 200, "temperature": 0,
                       "ignore_eos": True}).encode()  # fmt: skip
    request = (
        f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    with socket.create_connection(("127.0.0.1", live.port)) as s:
        s.sendall(request)
        deadline = time.monotonic() + 10
        while not worker.stats.running:
            assert time.monotonic() < deadline
            time.sleep(0.005)
    deadline = time.monotonic() + 10
    while worker.stats.aborted == aborted or worker.stats.running:
        assert time.monotonic() < deadline, "the abandoned request still holds its slot"
        time.sleep(0.01)
    while _requests_counted(live, 499) == gone:
        assert time.monotonic() < deadline, "the abandoned request was not counted a 499"
        time.sleep(0.01)
    assert _requests_counted(live, 500) == bug


def _requests_counted(live, status: int) -> float:
    text = httpx.get(f"{live.url}/metrics", headers=headers()).text
    key = f'camelid_requests_total{{route="/v1/completions",status="{status}"}} '
    return next((float(x.split()[-1]) for x in text.splitlines() if x.startswith(key)), 0.0)


def _state(live):
    app = live.server.config.app
    while not hasattr(app, "state") or not hasattr(app.state, "serve"):
        app = app.app
    return app.state.serve


# ------------------------------------------------------------------------ camelid serve
def test_serve_command_drains_on_sigterm(model_dir, tmp_path):
    """The real command: its startup line, a streamed answer that SIGTERM lets finish, exit 0."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, "CAMELID_API_KEY": KEY, "PYTHONUNBUFFERED": "1"}
    src = str(Path(camelid.__file__).parents[1])
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen(
        [sys.executable, "-m", "camelid", "serve", str(model_dir), "--port", str(port),
         "--served-model-name", MODEL],
        stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        line = ""
        deadline = time.monotonic() + 120
        while f"127.0.0.1:{port}" not in line:
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()
            line = proc.stderr.readline()
        assert MODEL in line
        from camelid.weights.digest import directory_digest

        assert f"weights {directory_digest(model_dir)[:16]})" in line
        body = {"model": MODEL, "prompt": "The", "max_tokens": 64, "temperature": 0,
                "ignore_eos": True, "stream": True}  # fmt: skip
        url = f"http://127.0.0.1:{port}/v1/completions"
        with (
            httpx.Client(timeout=60) as h,
            h.stream("POST", url, json=body, headers=headers()) as r,
        ):
            lines = r.iter_lines()
            first = next(line for line in lines if line)
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        events = [first, *rest]
        assert events[-1] == "data: [DONE]"
        chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
