"""The inference engine: parity with transformers, batching, seeds, stop strings and stop tokens,
streaming of multi-byte text, logprobs, sampling transforms, bad requests, int8 and the KV cache.

Everything runs on a random 2-layer model (conftest's ``hf_model``) with a small byte-level BPE
tokenizer trained here on English, Chinese and emoji, so that many characters span several
tokens. A random model's output is gibberish but deterministic, which is all parity needs.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import hf_model, random_llama_dir
from torch import nn

import camelid
from camelid import RequestError, SamplingParams
from camelid.infer import linear as decode_linear
from camelid.infer.detok import TextStream
from camelid.infer.linear import (
    DecodeLinear,
    Int8Linear,
    RowDotLinear,
    decode_copy,
    quantize_int8,
)
from camelid.infer.sampling import apply_penalties, sample_row
from camelid.model import KVCache
from camelid.tokenizer import train_tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog. 你好，世界！🙂🎉 "
    "今天天气很好，我们去公园散步吧。😀🚀 " * 3 + str(i)
    for i in range(200)
]
PROMPTS = [
    "The quick",
    "你好，世界",
    "Once upon a time there was a lazy dog who liked 天气. " * 2
    + "In 1842 the brown fox met 世界 and 🚀 friends; they walked far. ",  # ~130 tokens
]
N_NEW = 32
CYCLE_TEXT = "你好🙂世界。🎉天气"  # its tokens are all different; the emoji are split into bytes


# --------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CORPUS, 600, num_special=16)


@pytest.fixture(scope="module")
def hf(tok):
    return hf_model(vocab_size=tok.vocab_size)


@pytest.fixture(scope="module")
def model(tok, tmp_path_factory):
    """``hf``'s weights (the same seed and shape), loaded by camelid."""
    path = random_llama_dir(tmp_path_factory.mktemp("infer") / "model", vocab_size=tok.vocab_size)
    return camelid.load(path)


@pytest.fixture(scope="module")
def engine(model, tok):
    return camelid.Engine(model, tok)


@pytest.fixture(scope="module")
def hf_greedy_refs(hf, tok):
    """transformers' greedy continuation of every prompt (no end-of-text stop)."""
    refs = []
    for prompt in PROMPTS:
        ids = tok.encode(prompt, bos=True)
        x = torch.tensor([ids])
        out = hf.generate(
            x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=N_NEW,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
        refs.append(out[0, len(ids) :].tolist())
    return refs


@pytest.fixture(scope="module")
def cycle(model, tok):
    """An engine whose model repeats CYCLE_TEXT forever: its blocks add nothing to the residual
    stream, so the logits depend on the current token only, and the head maps each token of
    the cycle to the next one with a margin of ~30 logits. Its output is valid Chinese and
    emoji text whose characters are split over several tokens. After BOS it says end of text,
    and after that it goes into the cycle."""
    ids = tok.encode(CYCLE_TEXT)
    assert len(set(ids)) == len(ids), "the cycle's tokens must all differ"
    assert any("\ufffd" in tok.decode([t]) for t in ids), "no token holds a partial character"
    m = copy.deepcopy(model)
    with torch.no_grad():
        for layer in m.layers:
            layer.attention.wo.weight.zero_()
            layer.feed_forward.w2.weight.zero_()
        hidden = m.norm(m.tok_embeddings.weight[ids])
        head = torch.zeros_like(m.output.weight)
        head[ids[1:] + ids[:1]] = 40 * hidden / hidden.pow(2).sum(1, keepdim=True)
        specials = m.norm(m.tok_embeddings.weight[[tok.bos_id, tok.eos_id]])
        head[[tok.eos_id, ids[0]]] += 40 * specials / specials.pow(2).sum(1, keepdim=True)
        m.output.weight.copy_(head)
    return camelid.Engine(m, tok), ids


def hf_logprobs(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)


def greedy(engine, prompt, n=N_NEW, **kw):
    return engine.generate(prompt, max_new_tokens=n, temperature=0, ignore_eos=True, **kw)


# ---------------------------------------------------------------- 1. parity with transformers
def test_greedy_matches_transformers(engine, tok, hf_greedy_refs):
    assert len(tok.encode(PROMPTS[-1], bos=True)) > 120
    for prompt, ref in zip(PROMPTS, hf_greedy_refs, strict=True):
        c = greedy(engine, prompt)
        assert c.token_ids == ref, prompt
        assert c.finish_reason == "length"
        assert c.text == tok.decode(ref)
        assert c.prompt_token_ids == tok.encode(prompt, bos=True)
        # A prompt given as ids is used as is (it already holds the BOS).
        assert greedy(engine, c.prompt_token_ids).token_ids == ref
    batched = greedy(engine, PROMPTS)
    assert [c.token_ids for c in batched] == hf_greedy_refs


def test_compiled_engine_matches_transformers(model, hf, tok, hf_greedy_refs):
    compiled = camelid.Engine(model, tok, compile=True)  # one batch: one compilation (~5 s)
    results = greedy(compiled, PROMPTS)
    assert [c.token_ids for c in results] == hf_greedy_refs
    assert [c.text for c in results] == [tok.decode(ref) for ref in hf_greedy_refs]
    # Sampled, with logprobs: the same batch shape, so no recompilation.
    kw = dict(max_new_tokens=20, temperature=1.0, seed=2, logprobs=3, ignore_eos=True)
    results = compiled.generate(PROMPTS, **kw)
    eager = camelid.Engine(model, tok).generate(PROMPTS, **kw)
    assert [c.token_ids for c in results] == [c.token_ids for c in eager]
    for c in results:
        _check_logprobs(hf, c, 3)


# ---------------------------------------------------------------------------- 2. batching
def _same(a, b):
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    assert [c.text for c in a] == [c.text for c in b]
    assert [c.finish_reason for c in a] == [c.finish_reason for c in b]


@pytest.mark.parametrize(
    "kw",
    [
        dict(temperature=0),
        dict(temperature=1.0, top_k=50, seed=7),
        dict(temperature=0.9, top_p=0.95, seed=3, repetition_penalty=1.2, presence_penalty=0.5),
        dict(temperature=0, frequency_penalty=0.5, logprobs=2),
    ],
)
def test_batched_equals_unbatched(engine, model, tok, kw):
    prompts = [*PROMPTS, "A", "dog dog dog"]  # different lengths
    kw = dict(max_new_tokens=20, ignore_eos=True, **kw)
    singles = [engine.generate(p, **kw) for p in prompts]
    batched = engine.generate(prompts, **kw)
    chunked = camelid.Engine(model, tok, max_batch_size=2).generate(prompts, **kw)
    _same(singles, batched)
    _same(singles, chunked)
    if "logprobs" in kw:
        for s, b in zip(singles, batched, strict=True):
            assert [t.token for t in s.logprobs] == [t.token for t in b.logprobs]
            for ts, tb in zip(s.logprobs, b.logprobs, strict=True):
                assert ts.logprob == pytest.approx(tb.logprob, abs=1e-5)


def test_batch_rows_finishing_early(engine):
    """A row that stops early keeps stepping with the batch without disturbing the others."""
    base = [greedy(engine, p).token_ids for p in PROMPTS]
    k, stop = next((k, t) for k, t in enumerate(base[0]) if k >= 3 and t not in base[0][:k])
    kw = dict(max_new_tokens=N_NEW, temperature=0, ignore_eos=True, stop_token_ids=[stop])
    singles = [engine.generate(p, **kw) for p in PROMPTS]
    assert singles[0].token_ids == base[0][:k] and singles[0].finish_reason == "stop"
    _same(singles, engine.generate(PROMPTS, **kw))


# ------------------------------------------------------------------------------- 3. seeds
def test_seed_reproduces_samples(engine):
    kw = dict(max_new_tokens=30, temperature=1.0, ignore_eos=True)
    a = engine.generate(PROMPTS[0], seed=123, **kw).token_ids
    assert engine.generate(PROMPTS[0], seed=123, **kw).token_ids == a
    assert engine.generate(PROMPTS[0], seed=124, **kw).token_ids != a
    assert a != greedy(engine, PROMPTS[0], 30).token_ids
    # Unseeded requests draw fresh randomness each time.
    u1 = engine.generate(PROMPTS[0], **kw).token_ids
    u2 = engine.generate(PROMPTS[0], **kw).token_ids
    assert u1 != u2
    # A seeded request gives the same tokens next to other prompts (see also test 2).
    batch = engine.generate([PROMPTS[1], PROMPTS[0]], seed=123, **kw)
    assert batch[1].token_ids == a


# -------------------------------------------------------------------- 4. stops (engine level)
def _stop_candidate(text: str, start: int, n: int = 3) -> str:
    for i in range(start, len(text) - n):
        s = text[i : i + n]
        if "\ufffd" not in s:
            return s
    raise AssertionError(f"no stop-string candidate in {text!r}")


def test_stop_strings_cut_exactly(engine, tok):
    prompt = PROMPTS[0]
    base = greedy(engine, prompt, 40)
    text = base.text
    for stop in (_stop_candidate(text, len(text) // 2), _stop_candidate(text, 0, 2)):
        cut = text.find(stop)
        c = greedy(engine, prompt, 40, stop=[stop])
        assert c.text == text[:cut], stop
        assert c.finish_reason == "stop"
        # Generation ended on the token that completed the stop string.
        assert c.token_ids == base.token_ids[: len(c.token_ids)]
        assert stop in tok.decode(c.token_ids)
        assert stop not in tok.decode(c.token_ids[:-1])
        # Streaming shows the same text and never any part of the stop string past the cut.
        pieces = list(engine.stream(prompt, max_new_tokens=40, temperature=0, ignore_eos=True,
                                    stop=stop))  # fmt: skip
        assert "".join(pieces) == text[:cut]
    # Several stop strings: the text is cut at whichever appears first.
    late, early = _stop_candidate(text, 2 * len(text) // 3), _stop_candidate(text, 1)
    c = greedy(engine, prompt, 40, stop=[late, early])
    assert c.text == text[: min(text.find(late), text.find(early))]
    # A stop string that never appears changes nothing.
    c = greedy(engine, prompt, 40, stop=["\x00never\x00"])
    assert (c.text, c.token_ids, c.finish_reason) == (text, base.token_ids, "length")


def test_stop_token_ids(engine, model, tok):
    prompt = PROMPTS[0]
    base = greedy(engine, prompt).token_ids
    k, stop = next((k, t) for k, t in enumerate(base) if k >= 3 and t not in base[:k])
    c = greedy(engine, prompt, stop_token_ids=[stop], logprobs=1)
    assert c.token_ids == base[:k]
    assert c.finish_reason == "stop"
    assert c.text == tok.decode(base[:k])
    assert [t.token for t in c.logprobs] == base[:k]  # the stop token's logprob is dropped
    # The engine-wide setting does the same (and replaces the default end-of-text stops).
    e = camelid.Engine(model, tok, stop_token_ids=[stop])
    c2 = e.generate(prompt, max_new_tokens=N_NEW, temperature=0)
    assert (c2.token_ids, c2.finish_reason) == (base[:k], "stop")
    c2 = e.generate(prompt, max_new_tokens=N_NEW, temperature=0, ignore_eos=True)
    assert (c2.token_ids, c2.finish_reason) == (base, "length")
    # By default the tokenizer's end-of-text / end-of-turn tokens stop, unless ignore_eos.
    defaults = {tok.eos_id, tok.special_tokens["<|eot_id|>"], tok.special_tokens["<|eom_id|>"]}
    assert set(engine.stop_token_ids) == defaults
    for p in PROMPTS:
        full = greedy(engine, p).token_ids
        c = engine.generate(p, max_new_tokens=N_NEW, temperature=0)
        first = next((i for i, t in enumerate(full) if t in defaults), None)
        assert c.token_ids == full[:first]
        assert c.finish_reason == ("length" if first is None else "stop")


# ----------------------------------------------------------- 5. streaming multi-byte text
def test_stream_chinese_and_emoji(cycle, tok):
    eng, ids = cycle
    n = 3 * len(ids) + 2
    full = eng.generate(CYCLE_TEXT, max_new_tokens=n, temperature=0)
    assert full.token_ids == (ids * 4)[:n]  # the construction works
    assert full.text == tok.decode(full.token_ids)
    assert full.text.startswith(CYCLE_TEXT * 3)
    assert any("\ufffd" in tok.decode([t]) for t in full.token_ids)  # partial characters
    for kw in (dict(temperature=0), dict(temperature=1.0, seed=5)):
        pieces = list(eng.stream(CYCLE_TEXT, max_new_tokens=3 * len(ids), **kw))
        assert "".join(pieces) == CYCLE_TEXT * 3
        assert len(pieces) > 5
        assert not any("\ufffd" in p for p in pieces), pieces
    # Output ending inside a character: the incomplete tail is released at the end, as is.
    tail = ids.index(next(t for t in ids if "\ufffd" in tok.decode([t]))) + 1
    c = eng.generate(CYCLE_TEXT, max_new_tokens=tail, temperature=0)
    pieces = list(eng.stream(CYCLE_TEXT, max_new_tokens=tail, temperature=0))
    assert "".join(pieces) == c.text == tok.decode(ids[:tail])
    assert c.text.endswith("\ufffd") and not any("\ufffd" in p for p in pieces[:-1])
    # Stop strings made of multi-byte characters, spanning several tokens.
    for stop, want in (("🎉", "你好🙂世界。"), ("界。🎉天", "你好🙂世"), ("🙂", "你好")):
        c = eng.generate(CYCLE_TEXT, max_new_tokens=3 * len(ids), temperature=0, stop=stop)
        assert (c.text, c.finish_reason) == (want, "stop")
        assert "".join(eng.stream(CYCLE_TEXT, max_new_tokens=30, temperature=0, stop=stop)) == want


def test_stream_batch(cycle, tok):
    eng, ids = cycle
    prompts = [CYCLE_TEXT, "你好", CYCLE_TEXT[:3]]
    pieces = {i: [] for i in range(len(prompts))}
    done = {}
    for i, piece, completion in eng.stream_batch(prompts, max_new_tokens=20, temperature=0):
        assert i not in done, "an event after the prompt's completion"
        pieces[i].append(piece)
        if completion is not None:
            done[i] = completion
    assert sorted(done) == [0, 1, 2]
    assert done[0].token_ids == (ids * 3)[:20]
    for i, c in done.items():
        assert "".join(pieces[i]) == c.text
        assert len(c.token_ids) == 20
        assert not any("\ufffd" in p for p in pieces[i][:-1])
        assert c.text == tok.decode(c.token_ids)


def test_end_of_text_stops(cycle, tok):
    eng, ids = cycle
    c = eng.generate([tok.bos_id], max_new_tokens=5, temperature=0, logprobs=1)
    assert (c.token_ids, c.text, c.finish_reason, c.logprobs) == ([], "", "stop", [])
    assert list(eng.stream([tok.bos_id], max_new_tokens=5, temperature=0)) == []
    c = eng.generate([tok.bos_id], max_new_tokens=5, temperature=0, ignore_eos=True)
    assert (c.token_ids, c.finish_reason) == ([tok.eos_id, *ids[:4]], "length")
    assert c.text == tok.decode(c.token_ids)
    # A batch where one row stops on its first token and the other runs on.
    cs = eng.generate([[tok.bos_id], CYCLE_TEXT], max_new_tokens=5, temperature=0)
    assert [c.token_ids for c in cs] == [[], ids[:5]]
    assert [c.finish_reason for c in cs] == ["stop", "length"]


def _chunks_decoder(chunks: list[bytes | str]):
    raw = [c.encode() if isinstance(c, str) else c for c in chunks]
    return lambda ids: b"".join(raw[i] for i in ids).decode("utf-8", errors="replace")


def _run_stream(chunks, stop=()):
    ts = TextStream(_chunks_decoder(chunks), stop)
    pieces = [ts.push(i) for i in range(len(chunks))]
    return ts, pieces, ts.finish()


def test_text_stream_multibyte():
    ni, smile = "你".encode(), "🙂".encode()
    chunks = ["a", ni[:1], ni[1:2], ni[2:] + b"b", smile[:2], smile[2:], "c"]
    ts, pieces, last = _run_stream(chunks)
    assert pieces == ["a", "", "", "你b", "", "🙂", "c"]
    assert last == "" and ts.text == "a你b🙂c" and not ts.stopped
    # An incomplete character at the very end is released by finish() as the decoder shows it.
    ts, pieces, last = _run_stream(["a", smile[:3]])
    assert pieces == ["a", ""] and last == "\ufffd" and ts.text == "a\ufffd"
    # Bytes that can never form a character (lead bytes one after another) are released
    # after at most four tokens, not held to the end; a character split over four tokens
    # still comes out whole.
    ts, pieces, last = _run_stream(["a"] + [b"\xc3"] * 9)
    assert pieces[:4] == ["a", "", "", ""] and pieces[4] == "\ufffd" * 4
    assert "".join([*pieces, last]) == ts.text == "a" + "\ufffd" * 9
    ts, pieces, last = _run_stream(["a", smile[:1], smile[1:2], smile[2:3], smile[3:]])
    assert pieces == ["a", "", "", "", "🙂"]


def test_text_stream_stop_strings():
    # Spanning several tokens: text before the stop is released, the stop is never shown.
    ts, pieces, last = _run_stream(["Hel", "lo", " wor", "ld"], stop=["lo wo"])
    assert pieces == ["He", "l", "", ""] and last == ""
    assert ts.text == "Hel" and ts.stopped
    # At the very start.
    ts, pieces, last = _run_stream(["ST", "OP", " more"], stop=["STOP"])
    assert pieces == ["", "", ""] and last == "" and ts.text == "" and ts.stopped
    # Inside one token, with text on both sides, cut at the first of two occurrences.
    ts, pieces, last = _run_stream(["abSTOPcdSTOP"], stop="STOP")
    assert pieces == ["ab"] and ts.text == "ab"
    # Stop strings that are prefixes of each other: whichever completes first ends the text.
    for stops in (["ab", "abc"], ["abc", "ab"]):
        ts, pieces, last = _run_stream(["x", "a", "bc", "d"], stop=stops)
        assert "".join([*pieces, last]) == ts.text == "x" and ts.stopped
    ts, pieces, last = _run_stream(["za", "b", "c", "d"], stop=["bc", "abcd"])
    assert ts.text == "za" and "".join([*pieces, last]) == "za"
    # A partial match is held back, then released when the stop string does not complete.
    ts, pieces, last = _run_stream(["ab", "x", "y", "q"], stop=["xyz"])
    assert pieces == ["ab", "", "", "xyq"] and last == "" and not ts.stopped
    ts, pieces, last = _run_stream(["ab", "xy"], stop=["xyz"])
    assert pieces == ["ab", ""] and last == "xy" and ts.text == "abxy"
    # Held back across two candidate stops, then one of them completes.
    ts, pieces, last = _run_stream(["q", "x", "y", "w"], stop=["xyz", "xyw"])
    assert pieces == ["q", "", "", ""] and ts.text == "q" and ts.stopped
    # A stop string ending inside a multi-byte character.
    ni = "你".encode()
    ts, pieces, last = _run_stream(["a", ni[:1], ni[1:2], ni[2:], "b"], stop=["你"])
    assert "".join([*pieces, last]) == ts.text == "a" and ts.stopped
    # Nothing comes out after a stop.
    assert ts.push(0) == "" and ts.finish() == "" and ts.text == "a"


def test_text_stream_sentencepiece_style_decoder():
    """A decoder that drops the leading space of its input (SentencePiece) still streams the
    same text as one decode of all the ids."""
    words = ["▁Hello", "▁world", "!", "▁你", "好"]

    def decode(ids):
        return "".join(words[i] for i in ids).replace("▁", " ").removeprefix(" ")

    ts = TextStream(decode)
    pieces = [ts.push(i) for i in range(len(words))] + [ts.finish()]
    assert "".join(pieces) == ts.text == decode(range(len(words))) == "Hello world! 你好"


def test_text_stream_real_tokenizer(tok):
    text = "Hi 你好🙂世界🦜鹦鹉 and 😀🚀 天气很好!"
    ids = tok.encode(text)
    assert sum("\ufffd" in tok.decode([t]) for t in ids) >= 4
    ts = TextStream(tok.decode, stop=["鹉 a"])
    pieces = [ts.push(t) for t in ids] + [ts.finish()]
    assert "".join(pieces) == ts.text == "Hi 你好🙂世界🦜鹦"
    assert not any("\ufffd" in p for p in pieces)
    ts = TextStream(tok.decode)
    pieces = [ts.push(t) for t in ids] + [ts.finish()]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


# ------------------------------------------------------------------------------ 6. logprobs
def test_score_matches_log_softmax(engine, hf, tok):
    text = "The quick brown fox jumps over 你好🙂 the lazy dog"
    s = engine.score(text, top_logprobs=3)
    ids = tok.encode(text, bos=True)
    assert s.token_ids == ids and s.tokens[0] is None and len(s.tokens) == len(ids)
    ref = hf_logprobs(hf, ids)
    for i, t in enumerate(s.tokens[1:]):
        row, tid = ref[i], ids[i + 1]
        assert t.token == tid
        assert t.logprob == pytest.approx(row[tid].item(), abs=1e-4)
        assert t.rank == int((row > row[tid]).sum()) + 1
        values, top_ids = row.topk(3)
        assert list(t.top) == top_ids.tolist()
        assert list(t.top.values()) == pytest.approx(values.tolist(), abs=1e-4)
        assert (t.rank == 1) == (tid == top_ids[0].item())
    assert s.logprob == pytest.approx(sum(ref[i, ids[i + 1]].item() for i in range(len(ids) - 1)))
    total, is_greedy = s.logprob_of(5)
    assert total == pytest.approx(sum(t.logprob for t in s.tokens[5:]))
    assert is_greedy == all(t.rank == 1 for t in s.tokens[5:])
    # generate(prompt_logprobs=...) scores the prompt the same way.
    c = engine.generate(text, max_new_tokens=1, prompt_logprobs=2)
    assert c.prompt_logprobs[0] is None and len(c.prompt_logprobs) == len(ids)
    for a, b in zip(c.prompt_logprobs[1:], s.tokens[1:], strict=True):
        assert (a.token, a.rank) == (b.token, b.rank)
        assert a.logprob == pytest.approx(b.logprob, abs=1e-5)
        assert list(a.top) == list(b.top)[:2]
    # A token id prompt is scored as given; a one-token prompt has nothing to score.
    assert engine.score(ids).token_ids == ids
    assert engine.score([tok.bos_id]).tokens == [None]
    c = engine.generate([tok.bos_id], max_new_tokens=1, prompt_logprobs=1)
    assert c.prompt_logprobs == [None]


def _check_logprobs(hf, c: camelid.Completion, n_top: int) -> None:
    """``c.logprobs`` are the log-softmax of a forward pass over prompt + output."""
    assert [t.token for t in c.logprobs] == c.token_ids
    ref = hf_logprobs(hf, c.prompt_token_ids + c.token_ids)
    start = len(c.prompt_token_ids) - 1
    for i, t in enumerate(c.logprobs):
        row = ref[start + i]
        assert t.logprob == pytest.approx(row[t.token].item(), abs=1e-4)
        assert t.rank == int((row > row[t.token]).sum()) + 1
        assert list(t.top) == row.topk(n_top).indices.tolist()


@pytest.mark.parametrize(
    ("prompt", "kw"),
    [
        (PROMPTS[1], dict(temperature=0.8, seed=5)),
        (PROMPTS[1], dict(temperature=0)),
        (PROMPTS[2], dict(temperature=1.0, seed=2)),  # long context, varied tokens
    ],
    ids=["short-sampled", "short-greedy", "long-sampled"],
)
def test_generated_logprobs_match_forward(engine, hf, prompt, kw):
    c = engine.generate(prompt, max_new_tokens=20, logprobs=3, ignore_eos=True, **kw)
    _check_logprobs(hf, c, 3)
    if kw["temperature"] == 0:
        assert all(t.rank == 1 for t in c.logprobs)
    else:
        assert any(t.rank > 1 for t in c.logprobs)


# ---------------------------------------------------------------------- 7. sampling transforms
def test_truncations_that_leave_one_token_are_greedy(engine):
    prompt = PROMPTS[0]
    want = greedy(engine, prompt, 30).token_ids
    for kw in (dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0)):
        for seed in (0, 1):
            c = engine.generate(prompt, max_new_tokens=30, temperature=1.0, seed=seed,
                                ignore_eos=True, **kw)  # fmt: skip
            assert c.token_ids == want, kw


def test_truncations_limit_the_choice(engine):
    kw = dict(max_new_tokens=30, temperature=1.5, ignore_eos=True, seed=11)
    c = engine.generate(PROMPTS[0], top_k=3, logprobs=1, **kw)
    assert all(t.rank <= 3 for t in c.logprobs) and any(t.rank > 1 for t in c.logprobs)
    # min_p compares probabilities after temperature: p_t**(1/T) >= min_p * p_max**(1/T).
    c = engine.generate(PROMPTS[0], min_p=0.95, logprobs=1, **kw)
    for t in c.logprobs:
        best = max(t.top.values())
        assert (t.logprob - best) / 1.5 >= math.log(0.95) - 1e-5


def _reference_penalised_greedy(hf, ids, n, rep=1.0, presence=0.0, frequency=0.0):
    """Greedy decoding with penalties written out plainly over full forward passes."""
    seq, out = list(ids), []
    for _ in range(n):
        with torch.no_grad():
            logits = hf(torch.tensor([seq])).logits[0, -1].float()
        for t in set(seq):
            logits[t] = logits[t] / rep if logits[t] > 0 else logits[t] * rep
        for t in set(out):
            logits[t] -= presence + frequency * out.count(t)
        out.append(int(logits.argmax()))
        seq.append(out[-1])
    return out


def test_penalties(engine, hf, tok):
    prompt = PROMPTS[0]
    ids = tok.encode(prompt, bos=True)
    plain = greedy(engine, prompt, 30).token_ids
    assert len(set(plain)) < len(plain), "plain greedy output should repeat itself"
    # A huge repetition penalty never picks a token seen in the prompt or the output.
    c = greedy(engine, prompt, 30, repetition_penalty=1e4)
    assert len(set(c.token_ids)) == len(c.token_ids)
    assert not set(c.token_ids) & set(ids)
    # Presence and frequency penalties each change the output.
    assert greedy(engine, prompt, 30, presence_penalty=2.0).token_ids != plain
    assert greedy(engine, prompt, 30, frequency_penalty=2.0).token_ids != plain
    # All three together equal a plain reference, and greedy stays deterministic.
    kw = dict(repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.6)
    c = greedy(engine, prompt, 30, **kw)
    assert c.token_ids == _reference_penalised_greedy(
        hf, ids, 30, rep=1.3, presence=0.4, frequency=0.6
    )
    assert c.token_ids != plain
    assert greedy(engine, prompt, 30, **kw).token_ids == c.token_ids
    assert greedy(engine, PROMPTS, 30, **kw)[0].token_ids == c.token_ids


def test_apply_penalties_numbers():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0, -2.0])
    seen = torch.tensor([True, True, False, False, True])
    counts = torch.tensor([0, 2, 1, 0, 3], dtype=torch.int32)
    out = apply_penalties(logits.clone(), SamplingParams(repetition_penalty=2.0), seen, None)
    assert out.tolist() == [1.0, -2.0, 0.5, 3.0, -4.0]
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    out = apply_penalties(logits.clone(), p, None, counts)
    assert out.tolist() == pytest.approx([2.0, -2.0, -0.25, 3.0, -3.25])
    p = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    out = apply_penalties(logits.clone(), p, seen, counts)
    assert out.tolist() == pytest.approx([1.0, -3.0, -0.25, 3.0, -5.25])
    # Off by default: nothing changes.
    assert apply_penalties(logits.clone(), SamplingParams(), seen, counts).tolist() == (
        logits.tolist()
    )


def _frequencies(logits, n=2000, **kw) -> torch.Tensor:
    """Draw frequencies under ``kw``, starting from the model's own distribution (temperature 1,
    no top-p), not from SamplingParams' defaults."""
    kw = {"temperature": 1.0, "top_p": 1.0, **kw}
    params, g = SamplingParams(**kw), torch.Generator().manual_seed(0)
    draws = torch.tensor([sample_row(logits, params, g) for _ in range(n)])
    return torch.bincount(draws, minlength=len(logits)).float() / n


def test_sample_row_numbers():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()
    assert sample_row(logits, SamplingParams(temperature=0), None) == 0
    assert sample_row(-logits, SamplingParams(temperature=0), None) == 3

    def close(freq, want):
        assert freq.tolist() == pytest.approx(want, abs=0.04), freq

    close(_frequencies(logits, temperature=1.0), probs.tolist())
    sq = probs**2 / (probs**2).sum()  # temperature 0.5 squares the probabilities
    close(_frequencies(logits, temperature=0.5), sq.tolist())
    close(_frequencies(logits, top_k=2), [0.625, 0.375, 0, 0])
    close(_frequencies(logits, top_p=0.7), [0.625, 0.375, 0, 0])
    close(_frequencies(logits, top_p=0.9), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0])
    close(_frequencies(logits, min_p=0.5), [0.625, 0.375, 0, 0])  # keeps p >= 0.25
    close(_frequencies(logits, min_p=0.2), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0])
    f = _frequencies(logits, top_k=3, top_p=0.7, min_p=0.9)
    close(f, [1, 0, 0, 0])
    # A seeded generator repeats its draws.
    a = _frequencies(logits, n=50, temperature=1.0)
    assert torch.equal(a, _frequencies(logits, n=50, temperature=1.0))


# ---------------------------------------------------------------------------- 8. bad input
BAD = [
    (dict(top_p=0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_p=float("nan")), "top_p"),
    (dict(temperature=-0.1), "temperature"),
    (dict(top_k=-1), "top_k"),
    (dict(min_p=2), "min_p"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(presence_penalty=3), "presence_penalty"),
    (dict(frequency_penalty=-3), "frequency_penalty"),
    (dict(logprobs=50), "logprobs"),
    (dict(prompt_logprobs=-1), "prompt_logprobs"),
    (dict(seed=-1), "seed"),
    (dict(seed=2**64), "seed"),  # more than torch.Generator takes
    (dict(stop=[""]), "stop"),
    (dict(stop_token_ids=[-3]), "stop_token_ids"),
]


@pytest.mark.parametrize(("kw", "field"), BAD, ids=[f"{f}={kw[f]}" for kw, f in BAD])
def test_bad_sampling_values(engine, kw, field):
    with pytest.raises(RequestError, match=field):
        SamplingParams(**kw)
    with pytest.raises(RequestError, match=field):
        SamplingParams().replace(**kw)
    with pytest.raises(RequestError, match=field):
        engine.generate("hi", **kw)
    with pytest.raises(RequestError, match=field):
        list(engine.stream("hi", **kw))


def test_bad_requests(engine, model, tok):
    with pytest.raises(RequestError, match="temprature"):
        engine.generate("hi", temprature=0.5)
    with pytest.raises(RequestError, match="no prompts"):
        engine.generate([])
    with pytest.raises(RequestError, match="empty prompt"):
        engine.generate([[]])
    for bad in ([tok.bos_id, 99999], [-1]):
        with pytest.raises(RequestError, match="vocabulary"):
            engine.generate(bad, max_new_tokens=2)
    with pytest.raises(RequestError, match="vocabulary"):
        engine.score([tok.bos_id, model.config.vocab_size])
    with pytest.raises(RequestError, match="top_logprobs"):
        engine.score("hi", top_logprobs=21)
    with pytest.raises(RequestError, match="max_batch_size"):
        camelid.Engine(model, tok, max_batch_size=0)
    # params and keywords combine; keywords win.
    c = engine.generate(PROMPTS[0], SamplingParams(max_new_tokens=5, temperature=0),
                        max_new_tokens=8, ignore_eos=True)  # fmt: skip
    assert len(c.token_ids) == 8 and c.token_ids == greedy(engine, PROMPTS[0], 8).token_ids


def test_context_limits(engine, model, tok):
    small = camelid.Engine(model, tok, max_seq_len=64)
    ids = tok.encode(PROMPTS[2], bos=True)[:80]
    with pytest.raises(RequestError, match="context") as err:
        small.generate(ids, max_new_tokens=4)
    assert "truncate_prompt" in str(err.value) and "80" in str(err.value)
    with pytest.raises(RequestError, match="context"):
        small.generate(ids[:64], max_new_tokens=1)
    with pytest.raises(RequestError, match="context"):
        small.score(ids)
    # truncate_prompt keeps the last tokens, leaving room for max_new_tokens.
    c = greedy(small, ids, 10, truncate_prompt=True)
    assert c.prompt_token_ids == ids[-54:]
    assert (len(c.token_ids), c.finish_reason) == (10, "length")
    assert c.token_ids == greedy(engine, ids[-54:], 10).token_ids
    # ... but keeps at least half the context of prompt, and then stops at the context's end.
    c = greedy(small, ids, 100, truncate_prompt=True)
    assert c.prompt_token_ids == ids[-32:]
    assert (len(c.token_ids), c.finish_reason) == (32, "length")
    # max_new_tokens past the context: generation stops, "length", at the context's end.
    c = greedy(small, ids[:50], 100)
    assert (len(c.token_ids), c.finish_reason) == (14, "length")
    assert c.token_ids == greedy(engine, ids[:50], 14).token_ids
    c = greedy(small, ids[:63], 5)
    assert (len(c.token_ids), c.finish_reason) == (1, "length")
    # Mixed lengths in one batch each stop at their own limit.
    cs = greedy(small, [ids[:10], ids[:60]], 20)
    assert [len(c.token_ids) for c in cs] == [20, 4]


# -------------------------------------------------------------------------------- 9. int8
def test_quantize_int8(model, tok):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = quantize_int8(model)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(isinstance(m, Int8Linear) for m in model.modules())
    n_linear = sum(type(m) is nn.Linear for m in model.modules())
    assert sum(isinstance(m, Int8Linear) for m in q.modules()) == n_linear
    assert not any(type(m) is nn.Linear for m in q.modules())
    long = tok.encode(PROMPTS[2], bos=True)
    ids = torch.tensor([long[:40], long[40:80]])
    with torch.no_grad():
        ref, got = model(ids), q(ids)
    rel = ((got - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.03, rel
    # The int8 engine decodes with the quantized layers: greedy, it matches a plain loop over
    # full forward passes of the quantized model, and its logprobs are the quantized model's
    # (measurably different from the fp32 model's).
    e8 = camelid.Engine(model, tok, int8=True)
    c = greedy(e8, PROMPTS[1], 16, logprobs=0)
    seq = tok.encode(PROMPTS[1], bos=True)
    with torch.no_grad():
        for _ in range(16):
            seq.append(int(q(torch.tensor([seq]))[0, -1].argmax()))
        start = len(seq) - 17
        q_logp = torch.log_softmax(q(torch.tensor([seq]))[0, start:-1], -1)
        f_logp = torch.log_softmax(model(torch.tensor([seq]))[0, start:-1], -1)
    out = torch.tensor(seq[-16:])
    assert c.token_ids == out.tolist()
    got = torch.tensor([t.logprob for t in c.logprobs])
    assert torch.allclose(got, q_logp[torch.arange(16), out], atol=1e-4)
    assert not torch.allclose(got, f_logp[torch.arange(16), out], atol=1e-4)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_int8_linear_rows():
    torch.manual_seed(0)
    lin = nn.Linear(40, 24, bias=True)
    layer = Int8Linear(lin)
    assert layer.q.dtype == torch.int8
    assert (layer.q.abs().amax(1) == 127).all()
    deq = layer.q.float() * layer.scale[:, None]
    assert ((deq - lin.weight).abs() <= layer.scale[:, None] / 2 + 1e-7).all()
    x = torch.randn(5, 40)
    with torch.no_grad():
        many = layer(x)
        ones = torch.cat([layer(x[i : i + 1]) for i in range(5)])
        assert torch.allclose(many, ones, atol=1e-5)
        assert torch.allclose(many, F.linear(x, deq, lin.bias), atol=1e-5)
        assert torch.allclose(layer(x[None, :1]), many[None, :1], atol=1e-5)  # (1, 1, in)
        assert layer(x[None]).shape == (1, 5, 24)


def test_row_dot_copy_shares_parameters(model, tok):
    rd = decode_copy(model, row_dot=True)
    assert sum(isinstance(m, RowDotLinear) for m in rd.modules()) > 0
    assert not any(isinstance(m, RowDotLinear) for m in model.modules())
    for (name, a), (_, b) in zip(model.named_parameters(), rd.named_parameters(), strict=True):
        assert a.data_ptr() == b.data_ptr(), name
    x = torch.tensor([tok.encode(PROMPTS[0], bos=True)])
    with torch.no_grad():
        assert torch.allclose(rd(x[:, :1]), model(x[:, :1]), atol=1e-5)  # single row
        assert torch.allclose(rd(x), model(x), atol=1e-5)


@pytest.mark.skipif(not decode_linear.ONEDNN, reason="this torch build has no oneDNN")
def test_onednn_linear_matches_f_linear():
    torch.manual_seed(0)
    w, b = torch.randn(300, 64), torch.randn(300)
    cases = {
        "rows": torch.randn(7, 64),
        "batch, time": torch.randn(2, 5, 64),
        "strided": torch.randn(2, 5, 128)[..., ::2],
        "last position": torch.randn(3, 4, 64)[:, -1:],
        "one row": torch.randn(1, 1, 64),
        "no rows": torch.randn(0, 64),
    }
    compiled = torch.compile(decode_linear.linear, fullgraph=True, dynamic=False)
    with torch.no_grad():
        for name, x in cases.items():
            assert decode_linear.takes_onednn(x, w), name
            want = F.linear(x, w, b)
            for got in (decode_linear.linear(x, w, b), decode_linear.linear(x, w)):
                assert got.shape == want.shape, name
            assert torch.allclose(decode_linear.linear(x, w, b), want, atol=1e-4), name
            assert torch.allclose(decode_linear.linear(x, w), F.linear(x, w), atol=1e-4), name
        x = cases["batch, time"]
        assert torch.allclose(compiled(x, w, b), F.linear(x, w, b), atol=1e-4)


def test_linear_falls_back_where_onednn_cannot_go():
    x, w = torch.randn(3, 8), torch.randn(5, 8, requires_grad=True)
    assert not decode_linear.takes_onednn(x, w)  # autograd: oneDNN's op has no backward
    y = decode_linear.linear(x, w)
    y.sum().backward()
    assert w.grad is not None and torch.allclose(y, F.linear(x, w))
    xb, wb = x.bfloat16(), w.detach().bfloat16()
    assert not decode_linear.takes_onednn(xb, wb)
    assert torch.equal(decode_linear.linear(xb, wb), F.linear(xb, wb))


def test_cpu_engine_decodes_with_shared_decode_linears(model, tok):
    engine = camelid.Engine(model, tok)
    layers = [m for m in engine.model.modules() if isinstance(m, nn.Linear)]
    assert layers and all(type(m) is DecodeLinear for m in layers)
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))
    ours = dict(engine.model.named_parameters())
    assert all(p.data_ptr() == ours[n].data_ptr() for n, p in model.named_parameters())
    ids = tok.encode(PROMPTS[0], bos=True)
    with torch.no_grad():
        want = torch.log_softmax(model(torch.tensor([ids]))[0, :-1].float(), -1)
    got = [t.logprob for t in engine.score(ids).tokens[1:]]
    assert torch.allclose(torch.tensor(got), want.gather(1, torch.tensor(ids[1:])[:, None])[:, 0],
                          atol=1e-5)  # fmt: skip


# ----------------------------------------------------------------------------- 10. KV cache
def test_kv_cache_matches_full_forward(model):
    torch.manual_seed(0)
    V, T = model.config.vocab_size, 12
    seqs = torch.randint(0, V, (2, T))
    prompt_lens = [4, 7]  # two rows at different positions
    with torch.no_grad():
        full = model(seqs)
        cache = KVCache(model.config, 2, 32, "cpu", torch.float32)
        for t in cache.k + cache.v:  # stale contents must never be read
            t.normal_()
        for b, p in enumerate(prompt_lens):
            pos = torch.arange(p)
            logits = model(seqs[b : b + 1, :p], pos, cache=cache.rows(b, b + 1), kv_len=p)
            assert torch.allclose(logits[0], full[b, :p], atol=1e-5)
            last = model(seqs[b : b + 1, :p], pos, cache=cache.rows(b, b + 1), last_only=True)
            assert last.shape == (1, 1, V)
            assert torch.allclose(last[0, 0], full[b, p - 1], atol=1e-5)
        for step in range(T - max(prompt_lens)):
            pos = torch.tensor([[p + step] for p in prompt_lens])
            tokens = seqs.gather(1, pos)
            kv_len = None if step % 2 else int(pos.max()) + 1  # None: attend over the whole cache
            logits = model(tokens, pos, cache=cache, kv_len=kv_len)
            assert logits.shape == (2, 1, V)
            for b in range(2):
                assert torch.allclose(logits[b, 0], full[b, pos[b, 0]], atol=1e-5), (step, b)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_compiled_decode_matches_eager(tmp_path_factory, hf, tok):
    """The CUDA-graph decode step (static cache addresses) gives the eager engine's tokens."""
    path = tmp_path_factory.mktemp("cuda") / "m"
    hf.save_pretrained(path)
    model = camelid.load(path, device="cuda")
    prompts = ["The quick", "你好🙂", "a b c d e f"]
    eager = camelid.Engine(model, tok).generate(prompts, max_new_tokens=24, temperature=0)
    compiled = camelid.Engine(model, tok, compile=True)
    for _ in range(2):  # the second call replays the recorded graphs
        again = compiled.generate(prompts, max_new_tokens=24, temperature=0)
        assert [c.token_ids for c in again] == [c.token_ids for c in eager]
    bf16 = camelid.Engine(model.to(torch.bfloat16), tok, compile=True)
    assert all(c.token_ids for c in bf16.generate(prompts, max_new_tokens=8, temperature=0))


# ------------------------------------------------- batched logits, per-prompt sampling settings
def test_batched_logits_on_right_padded_rows(engine, model, tok):
    """Engine.logits: rows of different lengths padded on the right give each row's own
    logits; ``select`` projects only the chosen positions (an int8 engine, whose output layer
    has no float weight, selects after the projection)."""
    rows = [tok.encode(p, bos=True)[:40] for p in PROMPTS]
    tokens = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
    select = torch.zeros_like(tokens, dtype=torch.bool)
    for b, ids in enumerate(rows):
        tokens[b, : len(ids)] = torch.tensor(ids)
        select[b, len(ids) // 2 : len(ids)] = True
    full = engine.logits(tokens)
    picked = engine.logits(tokens, select)
    assert picked.shape == (int(select.sum()), full.shape[-1])
    torch.testing.assert_close(picked, full[select], atol=1e-5, rtol=1e-5)
    for b, ids in enumerate(rows):
        alone = engine.logits(torch.tensor([ids]))[0]
        torch.testing.assert_close(full[b, : len(ids)], alone, atol=1e-5, rtol=1e-5)
    int8 = camelid.Engine(model, tok, int8=True)
    assert (int8.logits(tokens, select) - picked).abs().max() < 0.05  # the same model, int8


def test_generate_with_settings_per_prompt(engine):
    """A list of SamplingParams, one per prompt: copies of one prompt sample with their own
    seeds in one batch, each as it would alone; greedy rows next to them stay greedy."""
    kw = dict(max_new_tokens=12, temperature=1.0, ignore_eos=True)
    params = [SamplingParams(seed=s, **kw) for s in (1, 2, 3)] + [
        SamplingParams(max_new_tokens=12, temperature=0)
    ]
    prompts = [PROMPTS[0]] * 3 + [PROMPTS[1]]
    batch = engine.generate(prompts, params)
    assert len({c.text for c in batch[:3]}) == 3
    for prompt, p, c in zip(prompts, params, batch, strict=True):
        assert engine.generate(prompt, p).token_ids == c.token_ids
    with pytest.raises(RequestError, match="2 sampling settings for 4 prompt"):
        engine.generate(prompts, params[:2])
    with pytest.raises(RequestError, match="sampling settings for 1 prompt"):
        engine.generate(PROMPTS[0], params[:1])
