"""Conformance, not silence: every field of OpenAI's request schemas is honoured, ignored or
refused by name, and every bad input is a 4xx naming its field while the server keeps serving.

The field lists come from the ``openai`` package's own type definitions, so a field OpenAI adds
fails this test until it has a decision and a sample value here.
"""

from __future__ import annotations

import json
import threading
import typing

import pytest
from test_serve import KEY, MODEL, LiveServer, headers

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
from openai.types import completion_create_params as completion_types  # noqa: E402
from openai.types.chat import completion_create_params as chat_types  # noqa: E402

from camelid.serve import create_app, schemas  # noqa: E402

USER = [{"role": "user", "content": "hello"}]


def openai_fields(module) -> set[str]:
    names: set[str] = set()
    for kind in ("CompletionCreateParamsStreaming", "CompletionCreateParamsNonStreaming"):
        names |= set(typing.get_type_hints(getattr(module, kind)))
    return names


# A value that asks for something (not the neutral one) for every field of either schema.
SAMPLES = {
    "model": MODEL,
    "prompt": "hello",
    "messages": USER,
    "best_of": 2,
    "echo": True,
    "frequency_penalty": 0.5,
    "presence_penalty": 0.5,
    "logit_bias": {"1": 5},
    "logprobs": 2,
    "max_tokens": 3,
    "max_completion_tokens": 3,
    "n": 2,
    "seed": 3,
    "stop": ["\n"],
    "stream": True,
    "stream_options": {"include_usage": True},
    "suffix": "end",
    "temperature": 0.5,
    "top_p": 0.9,
    "user": "someone",
    "top_logprobs": 2,
    "audio": {"voice": "alloy", "format": "wav"},
    "function_call": "auto",
    "functions": [{"name": "f", "parameters": {}}],
    "metadata": {"k": "v"},
    "modalities": ["text", "audio"],
    "moderation": {"mode": "block"},
    "parallel_tool_calls": True,
    "prediction": {"type": "content", "content": "x"},
    "prompt_cache_key": "k",
    "prompt_cache_options": {"mode": "auto"},
    "prompt_cache_retention": "24h",
    "reasoning_effort": "low",
    "response_format": {"type": "json_object"},
    "safety_identifier": "someone",
    "service_tier": "auto",
    "store": True,
    "tool_choice": "auto",
    "tools": [{"type": "function", "function": {"name": "f"}}],
    "verbosity": "low",
    "web_search_options": {},
}

ENDPOINTS = {
    "/v1/completions": (
        completion_types,
        schemas.CompletionRequest,
        schemas.COMPLETION_HONOURED,
        schemas.COMPLETION_IGNORED,
        schemas.COMPLETION_REJECTED,
        {"model": MODEL, "prompt": "hello", "max_tokens": 2},
    ),
    "/v1/chat/completions": (
        chat_types,
        schemas.ChatCompletionRequest,
        schemas.CHAT_HONOURED,
        schemas.CHAT_IGNORED,
        schemas.CHAT_REJECTED,
        {"model": MODEL, "messages": USER, "max_tokens": 2},
    ),
}
CHAT_SAMPLES = {"logprobs": True}
TOKENS = {"max_tokens", "max_completion_tokens"}  # one or the other
# Fields that need a partner to make sense.
NEEDS = {"stream_options": {"stream": True}, "top_logprobs": {"logprobs": True}}


@pytest.fixture(scope="module")
def live(engine):
    server = LiveServer(create_app(engine, model_name=MODEL, api_key=KEY))
    yield server
    server.close()


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from conftest import random_llama_dir
    from test_serve import CORPUS

    import camelid
    from camelid.tokenizer import train_tokenizer

    tok = train_tokenizer(CORPUS, 600, num_special=16)
    path = random_llama_dir(tmp_path_factory.mktemp("conf") / "m", vocab_size=tok.vocab_size)
    return camelid.Engine(camelid.load(path), tok)


def post(live, path: str, body) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    h = {**headers(), "content-type": "application/json"}
    return httpx.post(f"{live.url}{path}", content=content, headers=h, timeout=60)


@pytest.mark.parametrize("path", list(ENDPOINTS))
def test_every_openai_field_has_a_decision(path):
    module, model, honoured, ignored, rejected, _ = ENDPOINTS[path]
    fields = openai_fields(module)
    assert fields, "no fields found in the openai package's types"
    undecided = fields - honoured - ignored - rejected
    assert not undecided, f"{path}: no decision for {sorted(undecided)}"
    assert fields <= schemas.fields_of(model), "an OpenAI field the schema would call unknown"
    assert not (honoured & ignored or honoured & rejected or ignored & rejected)
    assert fields <= SAMPLES.keys(), f"no sample for {sorted(fields - SAMPLES.keys())}"


@pytest.mark.parametrize(
    ("path", "name"),
    [(p, f) for p, spec in ENDPOINTS.items() for f in sorted(openai_fields(spec[0]))],
)
def test_field_is_honoured_ignored_or_refused_by_name(live, path, name):
    _, _, _, ignored, rejected, base = ENDPOINTS[path]
    sample = CHAT_SAMPLES.get(name, SAMPLES[name]) if path == CHAT else SAMPLES[name]
    base = {k: v for k, v in base.items() if k not in TOKENS or name not in TOKENS}
    body = {**base, **NEEDS.get(name, {}), name: sample}
    r = post(live, path, body)
    if name in rejected:
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == name and error["type"] == "invalid_request_error"
        neutral = schemas.REJECTED[name][0][-1]
        r = post(live, path, {**base, name: neutral})
        assert r.status_code == 200, f"{name}={neutral!r} asks for nothing: {r.text}"
    else:
        assert r.status_code == 200, f"{name} is {'ignored' if name in ignored else 'honoured'}"


# ---------------------------------------------------------------------------------- bad input
C, CHAT = "/v1/completions", "/v1/chat/completions"
COMPLETE = {"model": MODEL, "prompt": "hello", "max_tokens": 2}
TALK = {"model": MODEL, "messages": USER, "max_tokens": 2}
# fmt: off
BAD = [
    # (path, body, status, param)
    (C, b'{"model": "tiny", "prompt": ', 400, None),
    (C, b"[1, 2]", 400, None),
    (C, {**COMPLETE, "temperature": "hot"}, 400, "temperature"),
    (C, {**COMPLETE, "max_tokens": 2.5}, 400, "max_tokens"),
    (C, {**COMPLETE, "prompt": {"text": "x"}}, 400, "prompt"),
    (C, {**COMPLETE, "model": "gpt-4"}, 404, "model"),
    (C, {**COMPLETE, "frobnicate": 1}, 400, "frobnicate"),
    (C, {**COMPLETE, "best_of": 4}, 400, "best_of"),
    (C, {**COMPLETE, "prompt": "hello " * 400}, 400, "prompt"),
    (C, {**COMPLETE, "n": 0}, 400, "n"),
    (C, {**COMPLETE, "n": 1000}, 400, "n"),
    (C, {**COMPLETE, "max_tokens": -1}, 400, "max_tokens"),
    (C, {**COMPLETE, "max_tokens": 10**6}, 400, "max_tokens"),
    (C, {**COMPLETE, "max_tokens": 0}, 400, "max_tokens"),
    (C, {**COMPLETE, "top_p": 0}, 400, "top_p"),
    (C, {**COMPLETE, "top_p": 1.5}, 400, "top_p"),
    (C, {**COMPLETE, "temperature": -1}, 400, "temperature"),
    (C, {**COMPLETE, "temperature": 3}, 400, "temperature"),
    (C, {**COMPLETE, "prompt": [1, 2, 10**6]}, 400, "prompt"),
    (C, {**COMPLETE, "prompt": [[1], [-1]]}, 400, "prompt[1]"),
    (C, {**COMPLETE, "prompt": []}, 400, "prompt"),
    (C, {**COMPLETE, "logprobs": 50}, 400, "logprobs"),
    (C, {**COMPLETE, "stream_options": {"include_usage": True}}, 400, "stream_options"),
    (C, {**COMPLETE, "stop": [""]}, 400, "stop"),
    (C, {**COMPLETE, "seed": -3}, 400, "seed"),
    (CHAT, {**TALK, "messages": []}, 400, "messages"),
    (CHAT, {**TALK, "messages": [{"role": "user"}]}, 400, "messages[0].content"),
    (CHAT, {**TALK, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    (CHAT, {**TALK, "messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role"),
    (CHAT, {**TALK, "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    (
        CHAT,
        {**TALK, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        400,
        "messages[0].content[0].type",
    ),
    (
        CHAT,
        {**TALK, "messages": [{"role": "user", "content": "x", "name": "a"}]},
        400,
        "messages[0].name",
    ),
    (CHAT, {**TALK, "tools": [{"type": "function"}]}, 400, "tools"),
    (CHAT, {**TALK, "response_format": {"type": "json_schema"}}, 400, "response_format"),
    (CHAT, {**TALK, "top_logprobs": 3}, 400, "top_logprobs"),
    (CHAT, {"model": MODEL, "messages": USER, "max_completion_tokens": 0}, 400,
     "max_completion_tokens"),
    (CHAT, {**TALK, "max_completion_tokens": 2}, 400, "max_tokens"),
    (CHAT, {**TALK, "messages": [{"role": "user", "content": "hi " * 400}]}, 400, "messages"),
    (CHAT, {**TALK, "logit_bias": {"5": 100}}, 400, "logit_bias"),
    ("/detokenize", {"tokens": [10**7]}, 400, "tokens"),
    ("/tokenize", {"prompt": 3}, 400, "prompt"),
]
# fmt: on


def test_bad_inputs_interleaved_with_live_streams(live, engine):
    """Every bad input is a 4xx naming its field, fired while 16 streams run; every stream
    still completes with exactly the answer it gets alone."""
    prompts = [f"Stream {i} says" for i in range(16)]
    want = [
        engine.generate(p, max_new_tokens=6, temperature=0, ignore_eos=True).text for p in prompts
    ]
    got: list[str | None] = [None] * len(prompts)
    finish: list[str | None] = [None] * len(prompts)
    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key=KEY, max_retries=0, timeout=120)

    def stream(i: int) -> None:
        s = client.completions.create(
            model=MODEL, prompt=prompts[i], max_tokens=6, temperature=0, stream=True,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        pieces = []
        for chunk in s:
            pieces.append(chunk.choices[0].text)
            finish[i] = chunk.choices[0].finish_reason or finish[i]
        got[i] = "".join(pieces)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    problems = []
    for path, body, status, param in BAD:
        r = post(live, path, body)
        error = r.json().get("error", {}) if r.headers["content-type"].startswith("app") else {}
        if r.status_code != status or error.get("param") != param or not error.get("message"):
            problems.append(f"{path} {body!r:.80}: {r.status_code} {r.text[:200]}")
    for t in threads:
        t.join(120)
    assert not problems, "\n".join(problems)
    assert got == want
    assert finish == ["length"] * len(prompts)
    r = post(live, C, COMPLETE)  # and it keeps serving
    assert r.status_code == 200
