"""The batched sampler: a batch of rows with mixed settings gives each row what it gets alone,
a seeded row gives the same tokens wherever it sits, the draws follow the filtered softmax,
the noise is SplitMix64, and sampling a batch never moves data to the host row by row.

The engine-level counterparts (batched equals unbatched, seeds, penalties and logprobs against
transformers) are in test_infer.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import hf_model, save_hf

import camelid
from camelid import SamplingParams
from camelid.infer.engine import _Sequence
from camelid.infer.sampling import Penalties, SamplingRows, probabilities, sample, uniform
from camelid.tokenizer import train_tokenizer

VOCAB = 300


@pytest.fixture(scope="module")
def tok():
    texts = ["The quick brown fox jumps over the lazy dog. 你好，世界！"] * 50
    return train_tokenizer(texts, 400, num_special=16)


@pytest.fixture(scope="module")
def model(tok, tmp_path_factory):
    hf = hf_model(vocab_size=tok.vocab_size)
    return camelid.load(save_hf(hf, tmp_path_factory.mktemp("sampling") / "model"))


# One row of each kind; together they need every stage (penalties, sort, top-k window, ...).
MIXED = [
    SamplingParams(temperature=0),
    SamplingParams(temperature=0, repetition_penalty=1.5, frequency_penalty=0.5),
    SamplingParams(temperature=1.0, seed=1),
    SamplingParams(temperature=0.7, top_k=20, seed=2),
    SamplingParams(temperature=1.3, top_p=0.8, seed=3),
    SamplingParams(temperature=1.0, min_p=0.1, seed=4),
    SamplingParams(temperature=0.9, top_k=40, top_p=0.9, min_p=0.02, seed=5),
    SamplingParams(temperature=1.0, repetition_penalty=1.3, presence_penalty=0.7, seed=6),
    SamplingParams(temperature=0.5, frequency_penalty=-0.4, top_p=0.95, seed=7),
    SamplingParams(temperature=2.0, top_k=1, seed=8),
    SamplingParams(temperature=1.0, top_k=5, top_p=0.5, seed=9),
    SamplingParams(temperature=1.1, seed=10, repetition_penalty=0.8),
    SamplingParams(temperature=0, top_k=3, top_p=0.5, min_p=0.3),  # greedy: truncations unused
]


def _logits(batch: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, VOCAB, generator=g) * 3
    logits[:, -7:] = -math.inf  # padding rows of an embedding table, as the engine masks them
    return logits


def _decode(params, prompts, logits_of, steps=25):
    """A decode loop over the sampler alone: the logits of each step come from ``logits_of``,
    penalty state is kept on the device as the engine keeps it. Returns every row's tokens."""
    rows = SamplingRows(params)
    penalties = Penalties.start(rows, prompts, VOCAB)
    out = [[] for _ in params]
    for step in range(steps):
        tokens = sample(logits_of(step), rows, [step] * len(params), penalties)
        if penalties is not None:
            penalties.update(tokens)
        for row, t in zip(out, tokens.tolist(), strict=True):
            row.append(t)
    return out, penalties


def test_mixed_batch_rows_equal_each_row_alone():
    prompts = [list(range(b, 3 * b + 5)) for b in range(len(MIXED))]
    batch_logits = {step: _logits(len(MIXED), step) for step in range(25)}
    batched, state = _decode(MIXED, prompts, batch_logits.__getitem__)
    for b, p in enumerate(MIXED):
        alone, _ = _decode([p], prompts[b : b + 1], lambda step, b=b: batch_logits[step][b : b + 1])
        assert batched[b] == alone[0], (b, p)
    # The rows really differ in kind: the top_k=1 row and the unpenalised greedy rows take the
    # plain argmax, sampled rows vary.
    for b in (0, 9, 12):
        assert batched[b] == [int(batch_logits[s][b].argmax()) for s in range(25)]
    assert len(set(batched[2])) > 10
    # The device state is what the tokens say: prompt and output seen, output counted.
    for b, (prompt, tokens) in enumerate(zip(prompts, batched, strict=True)):
        assert state.seen[b].nonzero().flatten().tolist() == sorted({*prompt, *tokens})
        want = torch.bincount(torch.tensor(tokens), minlength=VOCAB).int()
        assert torch.equal(state.counts[b], want)
    # The distributions themselves, not only the draws, are the same bits alone and batched.
    logits = batch_logits[0]
    together = probabilities(logits, SamplingRows(MIXED))
    for b, p in enumerate(MIXED):
        assert torch.equal(together[b], probabilities(logits[b : b + 1], SamplingRows([p]))[0])


def test_seeded_row_same_tokens_anywhere_in_any_batch():
    p = SamplingParams(temperature=0.9, top_p=0.9, repetition_penalty=1.2, seed=1234)
    others = [
        SamplingParams(temperature=t, top_k=k, min_p=m, presence_penalty=pp)
        for t, k, m, pp in [(0, 0, 0, 0), (1.5, 7, 0, 0.3), (0.6, 0, 0.2, 0), (1, 100, 0, -1)]
    ] * 4
    batch = [*others[:5], p, *others[5:15]]
    assert len(batch) == 16 and batch[5] is p
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    prompts = [[b, b + 1] for b in range(16)]
    prompts[5] = prompt
    big = {s: _logits(16, 100 + s) for s in range(40)}
    alone, _ = _decode([p], [prompt], lambda s: big[s][5:6], steps=40)
    batched, _ = _decode(batch, prompts, big.__getitem__, steps=40)
    assert batched[5] == alone[0]
    assert len(set(alone[0])) > 10  # it did sample
    # Another seed gives other tokens; the unseeded rows got seeds of their own.
    other, _ = _decode([p.replace(seed=1235)], [prompt], lambda s: big[s][5:6], steps=40)
    assert other[0] != alone[0]
    rows = SamplingRows(batch)
    assert rows.seeds[5] == 1234 and len(set(rows.seeds)) == 16


def test_engine_mixed_rows_equal_each_request_alone(model, tok):
    """The engine's decode loop over requests with different settings (what a server batch
    holds): each gets the tokens and logprobs it gets alone."""
    engine = camelid.Engine(model, tok)
    texts = ["The quick", "你好，世界", "a b c", "Once upon a time", "dog dog dog"]
    params = [
        SamplingParams(temperature=0, logprobs=2),
        SamplingParams(temperature=0.8, top_p=0.9, seed=1, repetition_penalty=1.3),
        SamplingParams(temperature=1.0, top_k=30, seed=2, logprobs=0),
        SamplingParams(temperature=0.7, min_p=0.05, seed=3, frequency_penalty=0.8, logprobs=4),
        SamplingParams(temperature=0, presence_penalty=1.0),
    ]
    params = [p.replace(max_new_tokens=12, ignore_eos=True) for p in params]
    seqs = [
        _Sequence(tok.encode(t, bos=True), p, engine) for t, p in zip(texts, params, strict=True)
    ]
    for _ in engine._run(seqs):
        pass
    for s, text, p in zip(seqs, texts, params, strict=True):
        alone = engine.generate(text, p)
        assert s.out == alone.token_ids, p
        if p.logprobs is None:
            assert s.logprobs is None
            continue
        assert [(t.token, t.rank, list(t.top)) for t in s.logprobs] == [
            (t.token, t.rank, list(t.top)) for t in alone.logprobs
        ]
        assert all(len(t.top) == p.logprobs for t in s.logprobs)
        for a, b in zip(s.logprobs, alone.logprobs, strict=True):
            assert a.logprob == pytest.approx(b.logprob, abs=1e-5)


# 0.999 quantiles of the chi-square distribution with 1..6 degrees of freedom.
CHI2_999 = [10.83, 13.82, 16.27, 18.47, 20.52, 22.46]


def _reference(logits: torch.Tensor, p: SamplingParams) -> list[float]:
    """The filtered softmax written out plainly, one token at a time, in float64."""
    x = [v / p.temperature for v in logits.double().tolist()]
    if p.top_k:
        kth = sorted(x, reverse=True)[min(p.top_k, len(x)) - 1]
        x = [v if v >= kth else -math.inf for v in x]
    z = sum(math.exp(v) for v in x)
    probs = [math.exp(v) / z for v in x]
    if p.top_p < 1:
        order, mass, keep = sorted(range(len(x)), key=lambda i: -probs[i]), 0.0, set()
        for i in order:
            if mass < p.top_p:
                keep.add(i)
            mass += probs[i]
        probs = [q if i in keep else 0.0 for i, q in enumerate(probs)]
    best = max(probs)
    probs = [q if q >= p.min_p * best else 0.0 for q in probs]
    total = sum(probs)
    return [q / total for q in probs]


@pytest.mark.parametrize(
    "kw",
    [
        dict(temperature=1.0),
        dict(temperature=0.6),
        dict(temperature=1.4, top_k=4),
        dict(temperature=1.0, top_p=0.8),
        dict(temperature=0.8, min_p=0.15),
        dict(temperature=1.2, top_k=5, top_p=0.9, min_p=0.05),
    ],
)
@pytest.mark.parametrize("across", ["steps", "seeds"])
def test_draws_follow_the_filtered_softmax(kw, across):
    """40,000 draws from a vocabulary of 7: a chi-square test over the tokens the reference
    keeps, at the 0.999 quantile (a correct sampler fails it with probability 0.001 per case;
    the draws are fixed by their seeds, so the test is deterministic). With 40,000 draws it
    notices an error of about 0.01 in the probability of a token of probability 0.3. Tokens
    the reference drops must never be drawn. The draws run along one seed's steps, or across
    seeds at one step."""
    logits = torch.tensor([2.0, 1.5, 1.1, 0.3, 0.0, -0.7, -1.8])
    p = SamplingParams(**kw)
    n = 40_000
    if across == "steps":
        rows, steps = SamplingRows([p] * n, [2024] * n), list(range(n))
    else:
        rows, steps = SamplingRows([p] * n, list(range(n))), [7] * n
    draws = sample(logits.expand(n, -1), rows, steps)
    freq = torch.bincount(draws, minlength=len(logits)).double()
    want = _reference(logits, p)
    kept = [i for i, q in enumerate(want) if q > 0]
    assert all(freq[i] == 0 for i in range(len(want)) if want[i] == 0), freq
    chi2 = sum((freq[i] - n * want[i]) ** 2 / (n * want[i]) for i in kept)
    if len(kept) > 1:
        assert chi2 < CHI2_999[len(kept) - 2], (chi2, freq / n, want)


def test_uniform_is_splitmix64():
    """The noise is SplitMix64's published sequence for seed 1234567, scaled to (0, 1): pinned,
    so a seeded request keeps its tokens from one version to the next."""
    outputs = [6457827717110365317, 3203168211198807973, 9817491932198370423]
    for step, z in enumerate(outputs):
        assert uniform(1234567, step) == ((z >> 11) + 0.5) / 2**53
    values = [uniform(seed, step) for seed in (0, 1, 2**64 - 1) for step in (0, 1, 10**9)]
    assert all(0 < v < 1 for v in values) and len(set(values)) == len(values)


def test_greedy_and_truncations_to_one_token():
    logits = _logits(4, 0)
    top = logits.argmax(-1)
    for kw in (dict(temperature=0), dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0)):
        rows = SamplingRows([SamplingParams(**kw)] * 4, [0, 1, 2, 3])
        for step in range(5):
            assert torch.equal(sample(logits, rows, [step] * 4), top), kw


# ---------------------------------------------------------------------- no per-row host sync
SYNCS = ("item", "tolist", "numpy", "__int__", "__float__", "__bool__", "__index__", "__array__")


@pytest.fixture
def syncs(monkeypatch):
    """Counts every move of tensor data to a Python value (or NumPy) while the test runs."""
    calls: list[str] = []
    for name in SYNCS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return calls


def test_sampling_a_batch_never_syncs(syncs):
    rows = SamplingRows(MIXED)
    penalties = Penalties.start(rows, [[1, 2, 3]] * len(MIXED), VOCAB)
    assert syncs == []  # the wrappers count (checked below), setup needs none
    for step in range(3):
        tokens = sample(_logits(len(MIXED), step), rows, [step] * len(MIXED), penalties)
        penalties.update(tokens)
    assert syncs == []
    tokens.tolist()
    int(tokens[0])
    assert syncs == ["tolist", "__int__"]


def test_engine_syncs_per_step_not_per_row(model, tok, syncs):
    """The decode loop moves data to the host a fixed number of times per step, whatever the
    batch size: a sync per row would make the batch of 8 count more than the batch of 1."""
    engine = camelid.Engine(model, tok)
    kw = dict(max_new_tokens=6, ignore_eos=True, top_k=40, top_p=0.9, seed=3, logprobs=2,
              repetition_penalty=1.2, frequency_penalty=0.3)  # fmt: skip
    counts = []
    for batch in (1, 8):
        syncs.clear()
        engine.generate(["The quick brown"] * batch, **kw)
        counts.append(len(syncs))
    assert counts[0] == counts[1] and counts[0] > 0, counts


# Values a server passes straight through from JSON: each wrong type names its field, and
# nothing is coerced (int(1.5) or bool("no") would answer a different request).
BAD_TYPES = [
    ("stop", 5, "a string or a list"),
    ("stop", [5], "a string or a list"),
    ("stop", None, "a string or a list"),
    ("stop", {"a": 1}, "a string or a list"),
    ("stop_token_ids", ["a"], "integer token ids"),
    ("stop_token_ids", [1.5], "integer token ids"),
    ("stop_token_ids", [2.0], "integer token ids"),
    ("stop_token_ids", [True], "integer token ids"),
    ("stop_token_ids", 5, "integer token ids"),
    ("stop_token_ids", "12", "integer token ids"),
    ("ignore_eos", "no", "boolean"),
    ("ignore_eos", 1, "boolean"),
    ("ignore_eos", None, "boolean"),
    ("truncate_prompt", "yes", "boolean"),
    ("truncate_prompt", 0, "boolean"),
    ("max_new_tokens", True, "integer"),
    ("max_new_tokens", 8.0, "integer"),
    ("max_new_tokens", "8", "integer"),
    ("top_k", 2.5, "integer"),
    ("seed", 1.0, "integer"),
    ("seed", "7", "integer"),
    ("logprobs", True, "integer"),
    ("prompt_logprobs", 1.5, "integer"),
    ("temperature", "0.7", "number"),
    ("temperature", True, "number"),
    ("temperature", None, "number"),
    ("temperature", 10**400, "number"),  # an int no float can hold
    ("top_p", "1", "number"),
    ("min_p", float("nan"), "number"),
    ("repetition_penalty", float("inf"), "number"),
    ("presence_penalty", [0.5], "number"),
    ("frequency_penalty", False, "number"),
]


@pytest.mark.parametrize(
    ("field", "value", "want"), BAD_TYPES, ids=[f"{f}={v!r}"[:40] for f, v, _ in BAD_TYPES]
)
def test_sampling_types_are_checked_not_coerced(field, value, want):
    for make in (lambda: SamplingParams(**{field: value}),
                 lambda: SamplingParams().replace(**{field: value})):  # fmt: skip
        with pytest.raises(camelid.RequestError) as err:
            make()
        message = str(err.value)
        assert message.startswith(f"invalid {field}=") and want in message, message


def test_sampling_accepts_what_json_and_numpy_give():
    np = pytest.importorskip("numpy")
    p = SamplingParams(
        stop="###",
        stop_token_ids=[np.int64(7), 3],
        max_new_tokens=np.int32(5),
        temperature=1,
        top_p=np.float32(0.5),
        seed=np.uint64(2**63),
        ignore_eos=True,
    )
    assert p.stop == ("###",) and p.stop_token_ids == (7, 3)
    assert type(p.max_new_tokens) is int and p.max_new_tokens == 5
    assert type(p.temperature) is float and type(p.top_p) is float and p.top_p == 0.5
    assert type(p.seed) is int and p.seed == 2**63
    assert SamplingParams(stop=["a", "b"], stop_token_ids=(1,)).stop == ("a", "b")
    assert SamplingParams(stop_token_ids={4}).stop_token_ids == (4,)
    assert hash(p) == hash(p.replace())  # still hashable: the containers are tuples
