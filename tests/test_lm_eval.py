"""lm-evaluation-harness scores a multiple-choice task against a live camelid server.

lm-eval (``local-completions``, 4 concurrent connections, 2 prompts per request) scores a
10-item task from a local JSONL through ``/v1/completions`` on a free loopback port, fully
offline: the tokenizer is the model directory (``tokenizer_backend=huggingface``), the data
a task YAML with ``dataset_path: json``, and the Hub is off (``HF_HUB_OFFLINE``,
``HF_DATASETS_OFFLINE``, an empty ``HF_HOME``, a dead proxy for anything not on loopback).

lm-eval tokenizes each (context, continuation) pair itself (``transformers.AutoTokenizer`` on
the model directory, BOS first with ``add_bos_token=True``), sends the token ids with
``echo: true, logprobs: 1, max_tokens: 1`` and sums ``token_logprobs[ctxlen:-1]``. Its
per-choice log-likelihoods (and is_greedy flags) from the logged samples must equal camelid's
in-process ``Engine.score`` of the same ids within 1e-5, and its accuracy must be exactly the
one recomputed from those scores. The gold labels are chosen from the in-process scores so that
the expected accuracy is 7/10 (neither 0, 1 nor chance), and a few of the tokens the model
picks after a continuation are made stop tokens (as a generation_config.json
``eos_token_id`` list makes them): a server that then drops the sampled token from the
logprobs would lose the continuation's last token. One item is longer than the context, so
lm-eval's left truncation at ``max_length`` (the server's context) is covered too.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import random_llama_dir
from lm_eval_tasks import mc_pairs, offline_env, write_mc_task
from test_serve import CORPUS, LiveServer

import camelid
from camelid.serve import create_app
from camelid.tokenizer import train_tokenizer

MISSING = [m for m in ("lm_eval", "aiohttp", "tenacity") if importlib.util.find_spec(m) is None]
pytestmark = pytest.mark.skipif(
    bool(MISSING),
    reason=f"lm-evaluation-harness is not installed ({', '.join(MISSING)} missing): "
    "pip install 'lm-eval[api]==0.4.13' (the test extra)",
)

MODEL, KEY, TASK = "tiny", "lm-eval-key", "camelid_tiny_mc"
CONTEXT = 64  # the served context; lm-eval's max_length
CONCURRENT, BATCH = 4, 2
LONG = "The quick brown fox jumps over the lazy dog. " * 8  # longer than the context
ITEMS = [  # question, choices
    ("What colour is the sky?", ["blue", "green", "red"]),
    ("你好 means", ["hello", "goodbye"]),
    ("The fox is", ["quick", "lazy", "brown", "slow"]),
    ("今天天气很好，我们去", ["公园", "学校", "商店"]),
    ("Which one smiles?", ["🙂", "🎉", "🚀"]),
    ("The dog is", ["lazy", "quick"]),
    ("世界", ["你好", "天气", "散步", "🙂"]),
    (LONG + "Who jumps?", ["the fox", "the dog", "nobody"]),
    ("Pick a number:", ["one", "two", "three", "four"]),
    ("We go to the park to", ["walk", "swim"]),
]
WRONG = {2, 5, 9}  # items whose gold label is not the model's pick: accuracy 7/10
STOP_AFTER = {1, 6}  # the tokens picked after these items' choices become stop tokens

# lm-eval in a fresh interpreter (the offline switches are read when the Hub libraries are
# imported), with only this test's task indexed (TaskManager would otherwise index all of its
# built-in tasks, ~10 s; `lm_eval run --include_path` does). The same model_args as the CLI.
DRIVER = """
import json, sys
import lm_eval
from lm_eval.tasks import TaskManager
a = json.loads(sys.argv[1])
r = lm_eval.simple_evaluate(
    model="local-completions", model_args=a["model_args"], tasks=[a["task"]],
    batch_size=a["batch_size"], log_samples=True,
    task_manager=TaskManager(include_path=a["include_path"], include_defaults=False),
)
keep = ("doc_id", "resps", "filtered_resps", "acc", "acc_norm")
samples = [{k: s[k] for k in keep} for s in r["samples"][a["task"]]]
with open(a["out"], "w") as f:
    json.dump({"results": r["results"][a["task"]], "samples": samples}, f)
"""


class Recorder:
    """ASGI middleware before the app: keeps each /v1/completions request and answer, and holds
    the first requests until ``width`` are in flight together (so the test sees lm-eval's
    concurrent connections rather than hoping they overlap; 10 s at most)."""

    def __init__(self, app, width: int) -> None:
        self.app, self.width = app, width
        self.exchanges: list[tuple[dict, dict]] = []
        self.inflight = self.peak = 0
        self.clients: set[tuple] = set()
        self._together: asyncio.Event | None = None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] != "/v1/completions":
            await self.app(scope, receive, send)
            return
        if self._together is None:
            self._together = asyncio.Event()
        body, answer = [], []

        async def receive_():
            message = await receive()
            body.append(message.get("body", b""))
            return message

        async def send_(message) -> None:
            if message["type"] == "http.response.body":
                answer.append(message.get("body", b""))
            await send(message)

        self.inflight += 1
        self.peak = max(self.peak, self.inflight)
        self.clients.add(tuple(scope["client"]))
        if self.inflight >= self.width:
            self._together.set()
        try:
            try:
                await asyncio.wait_for(self._together.wait(), 10)
            except TimeoutError:  # not concurrent: the peak check fails, without more waits
                self._together.set()
            await self.app(scope, receive_, send_)
        finally:
            self.inflight -= 1
        self.exchanges.append((json.loads(b"".join(body)), json.loads(b"".join(answer))))


def sent_ids(tok, context: str, continuation: str) -> tuple[list[int], int]:
    """The ids lm-eval sends for a pair and its ctxlen (``TemplateLM._encode_pair`` and
    ``batch_loglikelihood_requests``): the whole text encoded, split where the context's own
    encoding ends, left-truncated to ``max_length - 1``."""
    whole = tok.encode(context + continuation, bos=True)
    n_cont = len(whole) - len(tok.encode(context, bos=True))
    ids = whole[-(CONTEXT - 1) :]
    return ids, len(ids) - n_cont


def test_lm_eval_scores_equal_engine(tmp_path):
    tok = train_tokenizer(CORPUS, 600, num_special=16)
    model_dir = random_llama_dir(tmp_path / "model", vocab_size=tok.vocab_size)
    tok.save(model_dir)
    engine = camelid.Engine(camelid.load(model_dir), tok, max_seq_len=CONTEXT)

    # In process: every choice's log-likelihood, is_greedy and the token picked after it.
    want, greedy, picked, sent = [], [], [], []
    for question, choices in ITEMS:
        lls, flags, nexts = [], [], []
        for context, continuation in mc_pairs(question, choices):
            ids, ctxlen = sent_ids(tok, context, continuation)
            assert 1 <= ctxlen < len(ids)
            score = engine.score([*ids, 0], top_logprobs=1)
            cont = score.tokens[ctxlen:-1]
            lls.append(sum(t.logprob for t in cont))
            flags.append(all(t.rank == 1 for t in cont))
            nexts.append(next(iter(score.tokens[-1].top)))
            sent.append(ids)
        want.append(lls)
        greedy.append(flags)
        picked.append(nexts)
    assert max(len(ids) for ids in sent) == CONTEXT - 1  # the long item was truncated
    labels = []
    for i, lls in enumerate(want):
        best = int(np.argmax(lls))
        labels.append((best + 1) % len(lls) if i in WRONG else best)
    acc = [float(int(np.argmax(lls)) == g) for lls, g in zip(want, labels, strict=True)]
    lengths = [np.array([float(len(c)) for c in choices]) for _, choices in ITEMS]
    acc_norm = [
        float(int(np.argmax(np.array(lls) / n)) == g)
        for lls, n, g in zip(want, lengths, labels, strict=True)
    ]
    assert sum(acc) / len(acc) == 0.7
    stops = sorted({t for i in STOP_AFTER for t in picked[i]})
    ends = [t in stops for nexts in picked for t in nexts]  # per request, in ``sent`` order
    assert any(ends) and not all(ends)

    task_dir = write_mc_task(tmp_path / "tasks", TASK, ITEMS, labels).parent

    app = create_app(engine, model_name=MODEL, api_key=KEY, extra_stop_ids=stops)
    recorder = Recorder(app, CONCURRENT)
    server = LiveServer(recorder)
    try:
        model_args = (
            f"model={MODEL},base_url={server.url}/v1/completions,tokenizer={model_dir},"
            f"tokenizer_backend=huggingface,add_bos_token=True,max_length={CONTEXT},"
            f"num_concurrent={CONCURRENT},max_retries=1,timeout=120"
        )
        out = tmp_path / "lm_eval.json"
        args = dict(model_args=model_args, task=TASK, include_path=str(task_dir),
                    batch_size=BATCH, out=str(out))  # fmt: skip
        # local-completions sends OPENAI_API_KEY as the bearer token
        env = {**offline_env(tmp_path), "OPENAI_API_KEY": KEY}
        run = subprocess.run(
            [sys.executable, "-c", DRIVER, json.dumps(args)],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    finally:
        server.close()
    assert run.returncode == 0, run.stderr[-4000:]
    got = json.loads(out.read_text())

    # What went over the wire: lm-eval's own tokenization (transformers on the model directory)
    # is camelid's, byte for byte, sent as ids, 2 prompts a request, 4 requests at once.
    assert recorder.peak == CONCURRENT and len(recorder.clients) >= CONCURRENT
    prompts, answers = [], {}
    for body, answer in recorder.exchanges:
        assert {k: body[k] for k in ("echo", "logprobs", "max_tokens", "temperature")} == {
            "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0,
        }  # fmt: skip
        assert 1 <= len(body["prompt"]) <= BATCH
        for ids, choice in zip(body["prompt"], answer["choices"], strict=True):
            # every prompt token, then the sampled one, even when it is a stop token
            assert len(choice["logprobs"]["token_logprobs"]) == len(ids) + 1
            prompts.append(ids)
            answers[tuple(ids)] = choice
    assert sorted(prompts) == sorted(sent)
    finished = [answers[tuple(ids)]["finish_reason"] for ids in sent]
    assert finished == ["stop" if e else "length" for e in ends]

    # What lm-eval made of it: the same scores, the same accuracy.
    samples = sorted(got["samples"], key=lambda s: s["doc_id"])
    assert [s["doc_id"] for s in samples] == list(range(len(ITEMS)))
    for s, lls, flags in zip(samples, want, greedy, strict=True):
        assert [r[0] for r in s["resps"]] == [list(r) for r in s["filtered_resps"]]
        scores = [ll for ll, _ in s["filtered_resps"]]
        assert scores == pytest.approx(lls, abs=1e-5, rel=0)
        assert [bool(g) for _, g in s["filtered_resps"]] == flags
    assert [s["acc"] for s in samples] == acc
    assert [s["acc_norm"] for s in samples] == acc_norm
    assert got["results"]["acc,none"] == sum(acc) / len(acc) == 0.7
    assert got["results"]["acc_norm,none"] == sum(acc_norm) / len(acc_norm)
