"""camelid's lm-evaluation-harness adapter (``--model camelid``) against camelid's own engine.

A tiny random model and a tokenizer trained here; tasks written as local JSONL (see
lm_eval_tasks.py). The expected values come from the plain one-prompt ``Engine.score`` and
``Engine.generate`` of a second engine on the same weights with a longer context, with the
tokenisation written out by hand as lm-eval's hf model does it: the adapter's batching (sorted,
padded, shared rows), truncation and windows must not change a number. lm-eval's own hf model
on the same directory (transformers) checks the tokenisation and chat format directly.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import numpy as np
import pytest
from conftest import camelid_main, random_llama_dir, transformers
from lm_eval_tasks import (
    GENERATE_YAML,
    ROLLING_YAML,
    mc_pairs,
    offline_env,
    write_mc_task,
    write_task,
)
from test_serve import CORPUS

import camelid
from camelid.errors import RequestError
from camelid.tokenizer import train_tokenizer

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("lm_eval") is None,
    reason="lm-evaluation-harness is not installed: pip install 'lm-eval==0.4.13' (test extra)",
)

CONTEXT = 64  # the adapter's max_length
BATCH = 4
LONG = "The quick brown fox jumps over the lazy dog. " * 8  # longer than the context
ITEMS = [  # question, choices
    ("What colour is the sky?", ["blue", "green", "red"]),
    ("你好 means", ["hello", "goodbye"]),
    ("Pick a letter:", ["a", "b", "c", "d"]),  # " a" is " " + "a": one shared input row
    ("今天天气很好，我们去", ["公园", "学校", "商店"]),
    ("Which one smiles?", ["🙂", "🎉", "🚀"]),
    (LONG + "Who jumps?", ["the fox", "the dog", "nobody"]),  # left-truncated
    ("The fox is", ["quick", "lazy", "brown", "slow"]),
    ("世界", ["你好", "天气 ", "散步"]),
]
TEXTS = [  # loglikelihood_rolling: one window, then several
    "The fox jumps. 你好🙂",
    (
        "今天天气很好，我们去公园散步吧。😀 The quick brown fox jumps over the lazy dog. " * 4
    ).strip(),
]
ROLL_CONTEXT = 16  # windows of this many tokens for TEXTS[1]
PROMPTS = ["The quick brown", "你好，世界", LONG + LONG, "🙂🎉"]  # one left-truncated
MAX_GEN = 8


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(model directory, tokenizer, reference engine with the model's whole context)."""
    tok = train_tokenizer(CORPUS, 600, num_special=16)
    model_dir = random_llama_dir(
        tmp_path_factory.mktemp("harness") / "model", vocab_size=tok.vocab_size
    )
    tok.save(model_dir)
    return model_dir, tok, camelid.Engine(camelid.load(model_dir), tok)


@pytest.fixture(scope="module")
def lm(model):
    from camelid.eval.harness import CamelidLM

    model_dir, _, _ = model
    return CamelidLM.create_from_arg_string(
        f"pretrained={model_dir},device=cpu,dtype=float32,batch_size={BATCH},max_length={CONTEXT}"
    )


def expected_ll(tok, ref, context: str, continuation: str, max_length: int = CONTEXT):
    """(log-likelihood, is_greedy) of one pair as lm-eval's hf model asks for it, from the
    one-prompt Engine.score; also the model input the adapter feeds for it."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if context:  # BOS first, unless the text already starts with it (a chat prompt)
        bos = not context.startswith("<|begin_of_text|>")
        whole = tok.encode(context + continuation, bos=bos, allow_special=True)
        n = len(whole) - len(tok.encode(context, bos=bos, allow_special=True))
    else:
        whole = [tok.bos_id, *tok.encode(continuation, allow_special=True)]
        n = len(whole) - 1
    whole = whole[-(max_length + 1) :]
    ll, greedy = ref.score(whole).logprob_of(len(whole) - n)
    return ll, greedy, tuple(whole[:-1])


def instances(kind: str, args: list[tuple]):
    from lm_eval.api.instance import Instance

    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def test_simple_evaluate_multiple_choice(model, lm, tmp_path, monkeypatch):
    """lm_eval.simple_evaluate(model=CamelidLM) on a local task: every choice's score equals
    Engine.score's, acc and acc_norm are the argmax by hand, requests sharing an input share a
    row, and the batched forward ran fewer rows than there were requests."""
    import datasets
    import huggingface_hub
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    _, tok, ref = model
    want, greedy, inputs = [], [], set()
    for question, choices in ITEMS:
        scored = [expected_ll(tok, ref, c, x) for c, x in mc_pairs(question, choices)]
        want.append([s[0] for s in scored])
        greedy.append([s[1] for s in scored])
        inputs |= {s[2] for s in scored}
    n_requests = sum(len(c) for _, c in ITEMS)
    assert max(len(i) for i in inputs) == CONTEXT  # the long item was truncated
    assert len(inputs) < n_requests  # the one-letter choices share one input
    labels = [int(np.argmax(w)) if i % 2 else (int(np.argmax(w)) + 1) % len(w)
              for i, w in enumerate(want)]  # fmt: skip
    acc = [float(int(np.argmax(w)) == g) for w, g in zip(want, labels, strict=True)]
    acc_norm = [
        float(int(np.argmax(np.array(w) / [len(c) for c in choices])) == g)
        for w, (_, choices), g in zip(want, ITEMS, labels, strict=True)
    ]
    assert 0 < sum(acc) < len(acc)
    task_dir = write_mc_task(tmp_path / "tasks", "camelid_mc", ITEMS, labels).parent

    rows = []
    logits = lm.engine.logits
    monkeypatch.setattr(lm.engine, "logits", lambda t, s=None: rows.append(len(t)) or logits(t, s))
    r = lm_eval.simple_evaluate(
        model=lm, tasks=["camelid_mc"], log_samples=True,
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
    )  # fmt: skip
    assert sum(rows) == len(inputs) and max(rows) == BATCH  # one row per distinct input
    samples = sorted(r["samples"]["camelid_mc"], key=lambda s: s["doc_id"])
    assert [s["doc_id"] for s in samples] == list(range(len(ITEMS)))
    for s, w, g in zip(samples, want, greedy, strict=True):
        assert [ll for ll, _ in s["filtered_resps"]] == pytest.approx(w, abs=1e-5, rel=0)
        assert [bool(x) for _, x in s["filtered_resps"]] == g
    assert [s["acc"] for s in samples] == acc
    assert [s["acc_norm"] for s in samples] == acc_norm
    assert r["results"]["camelid_mc"]["acc,none"] == pytest.approx(sum(acc) / len(acc))
    assert r["config"]["max_length"] == CONTEXT
    assert r["config"]["tokenizer_digest"] == tok.digest


def test_empty_context_and_direct_requests(model, lm):
    """An empty context conditions on BOS; repeated and single requests score the same."""
    _, tok, ref = model
    pairs = [("", " fox"), ("", "The lazy dog"), ("The quick ", "brown"), ("The quick ", "brown")]
    got = lm.loglikelihood(instances("loglikelihood", pairs))
    for (context, continuation), (ll, g) in zip(pairs, got, strict=True):
        want, want_g, _ = expected_ll(tok, ref, context, continuation)
        assert ll == pytest.approx(want, abs=1e-5, rel=0) and g == want_g
    assert got[2] == got[3]


def test_loglikelihood_rolling(model):
    """Every token of a text once: a text shorter than max_length is Engine.score of the text;
    a longer one the sum over lm-eval's disjoint windows, each fed the max_length tokens before
    its last prediction (the first: BOS and the text's start)."""
    from camelid.eval.harness import CamelidLM

    _, tok, ref = model
    lm = CamelidLM(engine=ref, max_length=ROLL_CONTEXT, batch_size=2)
    short, long = (tok.encode(t) for t in TEXTS)
    assert len(short) < ROLL_CONTEXT and len(long) > 3 * ROLL_CONTEXT
    seq, total, done = [tok.bos_id, *long], 0.0, 0
    while done < len(long):
        n = min(ROLL_CONTEXT, len(long) - done)  # tokens this window predicts
        window = seq[max(0, done + n - ROLL_CONTEXT) : done + n + 1]
        total += ref.score(window).logprob_of(len(window) - n)[0]
        done += n
    got = lm.loglikelihood_rolling(instances("loglikelihood_rolling", [(t,) for t in TEXTS]))
    assert got[0] == pytest.approx(ref.score(TEXTS[0]).logprob, abs=1e-4, rel=0)
    assert got[1] == pytest.approx(total, abs=1e-4, rel=0)
    assert abs(got[1] - ref.score(TEXTS[1]).logprob) > 1e-2  # the windows had less context


def test_generate_until(model, lm):
    """Greedy generation equals Engine.generate with the same stop strings (each cut where its
    stop string appears), in request order; sampled requests repeat run to run, and copies of
    one request draw different samples."""
    _, tok, ref = model
    budget = CONTEXT - MAX_GEN
    ids = [tok.encode(p, bos=True)[-budget:] for p in PROMPTS]
    free = [c.text for c in ref.generate(ids, max_new_tokens=MAX_GEN, temperature=0)]
    stops = [text[len(text) // 2 : len(text) // 2 + 1] or "x" for text in free]
    want = [
        ref.generate(i, max_new_tokens=MAX_GEN, temperature=0, stop=(s,)).text
        for i, s in zip(ids, stops, strict=True)
    ]
    assert sum(w != f for w, f in zip(want, free, strict=True)) >= 2  # stops were hit
    reqs = [
        (p, {"until": [s], "max_gen_toks": MAX_GEN, "do_sample": False})
        for p, s in zip(PROMPTS, stops, strict=True)
    ]
    assert lm.generate_until(instances("generate_until", reqs)) == want

    sampled = [(PROMPTS[0], {"until": ["\n"], "max_new_tokens": MAX_GEN, "do_sample": True})] * 3
    first = lm.generate_until(instances("generate_until", sampled))
    assert lm.generate_until(instances("generate_until", sampled)) == first
    assert len(set(first)) == 3


def test_bad_arguments(model, lm):
    from camelid.eval.harness import CamelidLM

    model_dir, _, _ = model
    with pytest.raises(RequestError, match="num_beams"):
        lm.generate_until(instances("generate_until", [("hi", {"num_beams": 2})]))
    with pytest.raises(RequestError, match="max_gen_toks=64"):
        lm.generate_until(instances("generate_until", [("hi", {"max_gen_toks": CONTEXT})]))
    with pytest.raises(RequestError, match="unknown camelid model_args: bogus"):
        CamelidLM.create_from_arg_string(f"pretrained={model_dir},bogus=1")
    with pytest.raises(camelid.CamelidError, match="no such directory"):
        CamelidLM(str(model_dir / "missing"))


def test_command_help_and_missing_lm_eval(capsys, monkeypatch):
    """``camelid lm-eval --help``: camelid's model_args, then lm-eval's own options; without
    lm-eval installed, one line saying how to install it."""
    assert camelid_main(["lm-eval", "--help"]) == 0
    out = capsys.readouterr().out
    assert "pretrained=MODEL" in out and "python -m camelid.eval.harness" in out
    assert "--model_args" in out and "--include_path" in out  # lm-eval's run --help
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "lm_eval" else find_spec(name, *a),
    )
    assert camelid_main(["lm-eval", "--model", "camelid", "--tasks", "x"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("camelid: error: lm-evaluation-harness is not installed: pip install")


def test_cuda_without_cuda_falls_back(monkeypatch, capsys):
    """lm-eval's command line passes cuda:0 unless told --device: as its hf model, the CPU."""
    import torch

    from camelid.eval.harness import _device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _device("cuda:0") == "cpu" and _device(None) == "auto" and _device("cpu") == "cpu"
    assert "cuda:0 (lm-eval's default without --device) has no CUDA" in capsys.readouterr().err


def test_matches_lm_eval_hf_model(model, lm):
    """lm-eval's own hf model (transformers) on the same directory: the same ids for each text,
    the same chat prompts, the same scores and greedy text. Its rolling score is not a text's
    log-likelihood given BOS: it puts the tokenizer's BOS before the text's ids, then BOS before
    that as the window's prefix, and scores the second BOS too; camelid scores the text's
    tokens only, after one BOS."""
    if transformers is None or importlib.util.find_spec("accelerate") is None:
        pytest.skip("needs transformers and accelerate (lm-eval's hf model)")
    from lm_eval.models.huggingface import HFLM

    model_dir, tok, ref = model
    hf = HFLM(pretrained=str(model_dir), device="cpu", dtype="float32", batch_size=3,
              max_length=CONTEXT)  # fmt: skip
    chat = [{"role": "system", "content": "Be brief. "}, {"role": "user", "content": "Hi?"}]
    answer = [*chat, {"role": "assistant", "content": "Answer:"}]
    for generation, messages in ((True, chat), (False, answer)):
        assert lm.apply_chat_template(messages, generation) == hf.apply_chat_template(
            messages, generation
        )
    prompt = lm.apply_chat_template(answer, False)
    texts = ["The fox", prompt, "a<|eot_id|>b", "", " 你好 🙂 "]
    for text in texts:
        for special in (None, False, True):
            assert lm.tok_encode(text, special) == hf.tok_encode(text, special), (text, special)
    pairs = [("", " fox"), ("The quick ", "brown"), (prompt, " Yes"), ("a<|eot_id|>", "b"),
             (LONG + "Who?", " the dog"), *mc_pairs(*ITEMS[2])]  # fmt: skip
    got = lm.loglikelihood(instances("loglikelihood", pairs))
    for (ll, g), (hf_ll, hf_g) in zip(got, hf.loglikelihood(instances("loglikelihood", pairs)),
                                      strict=True):  # fmt: skip
        assert ll == pytest.approx(hf_ll, abs=1e-4, rel=0) and g == hf_g
    reqs = [(p, {"until": ["。", "."], "max_gen_toks": MAX_GEN}) for p in PROMPTS[:2]]
    assert lm.generate_until(instances("generate_until", reqs)) == hf.generate_until(
        instances("generate_until", reqs)
    )
    rolled = instances("loglikelihood_rolling", [(TEXTS[0],)])
    assert lm.loglikelihood_rolling(rolled)[0] == pytest.approx(
        ref.score(TEXTS[0]).logprob, abs=1e-4, rel=0
    )
    twice = ref.score([tok.bos_id, *tok.encode(TEXTS[0], bos=True)]).logprob
    assert hf.loglikelihood_rolling(rolled)[0] == pytest.approx(twice, abs=1e-4, rel=0)


def test_command_line(model, tmp_path):
    """``camelid lm-eval`` (lm-eval's own command line, arguments unchanged) runs three kinds of
    task offline in a subprocess and writes their results; ``python -m camelid.eval.harness``
    ends a bad model argument in one line and exit status 1."""
    model_dir, tok, ref = model
    labels = [0] * len(ITEMS)
    task_dir = write_mc_task(tmp_path / "tasks", "cli_mc", ITEMS, labels).parent
    write_task(task_dir, "cli_roll", ROLLING_YAML, [{"text": t} for t in TEXTS])
    prompts = PROMPTS[:2]
    write_task(task_dir, "cli_gen", GENERATE_YAML,
               [{"prompt": p, "answer": "x"} for p in prompts], max_gen_toks=MAX_GEN)  # fmt: skip
    out = tmp_path / "out"
    args = ["--model", "camelid", "--model_args",
            f"pretrained={model_dir},max_length={CONTEXT},dtype=float32",
            "--tasks", "cli_mc,cli_roll,cli_gen", "--include_path", str(task_dir),
            "--device", "cpu", "--batch_size", str(BATCH), "--output_path", str(out),
            "--log_samples"]  # fmt: skip
    env = offline_env(tmp_path)
    bad = [*args[:3], f"pretrained={model_dir},bogus=1", *args[4:10]]
    failing = subprocess.Popen(  # alongside: each first indexes lm-eval's own tasks (~10 s)
        [sys.executable, "-m", "camelid.eval.harness", *bad], cwd=tmp_path, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    run = subprocess.run([sys.executable, "-m", "camelid", "lm-eval", *args], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    (results_file,) = out.rglob("results_*.json")
    results = json.loads(results_file.read_text())["results"]

    acc = [
        float(int(np.argmax([expected_ll(tok, ref, c, x)[0] for c, x in mc_pairs(q, ch)])) == 0)
        for q, ch in ITEMS
    ]
    assert results["cli_mc"]["acc,none"] == pytest.approx(sum(acc) / len(acc))
    lls = [ref.score(TEXTS[0]).logprob]  # TEXTS[1] is over several windows of 64 tokens
    assert len(tok.encode(TEXTS[1])) > CONTEXT and len(tok.encode(TEXTS[0])) < CONTEXT
    (roll_samples,) = out.rglob("samples_cli_roll_*.jsonl")
    rows = sorted((json.loads(line) for line in roll_samples.open()), key=lambda s: s["doc_id"])
    assert float(rows[0]["resps"][0][0]) == pytest.approx(lls[0], abs=1e-4, rel=0)
    total = sum(float(s["resps"][0][0]) for s in rows)
    nbytes = sum(len(t.encode()) for t in TEXTS)
    assert results["cli_roll"]["bits_per_byte,none"] == pytest.approx(
        -total / nbytes / math.log(2), rel=1e-6
    )
    budget = CONTEXT - MAX_GEN
    want = [
        ref.generate(tok.encode(p, bos=True)[-budget:], max_new_tokens=MAX_GEN, temperature=0,
                     stop=("\n",)).text
        for p in prompts
    ]  # fmt: skip
    (gen_samples,) = out.rglob("samples_cli_gen_*.jsonl")
    rows = sorted((json.loads(line) for line in gen_samples.open()), key=lambda s: s["doc_id"])
    assert [s["resps"][0][0] for s in rows] == want
    assert "exact_match,none" in results["cli_gen"]

    _, stderr = failing.communicate(timeout=300)
    assert failing.returncode == 1, stderr[-4000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("camelid: error: unknown camelid model_args: bogus"), last
    assert "Traceback" not in stderr


def test_apply_chat_template(model, lm, tmp_path, monkeypatch):
    """simple_evaluate(..., apply_chat_template=True): lm-eval renders each question in the
    model's chat format (through the adapter) and the scores stay Engine.score's."""
    import datasets
    import huggingface_hub
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    model_dir, tok, ref = model
    items = ITEMS[:2]
    task_dir = write_mc_task(tmp_path / "tasks", "camelid_chat", items, [0, 1]).parent
    r = lm_eval.simple_evaluate(
        model=lm, tasks=["camelid_chat"], log_samples=True, apply_chat_template=True,
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
    )  # fmt: skip
    samples = sorted(r["samples"]["camelid_chat"], key=lambda s: s["doc_id"])
    for s, (question, choices) in zip(samples, items, strict=True):
        user = [{"role": "user", "content": f"Question: {question}\nAnswer:"}]
        prompt = tok.render_chat(user, add_generation_prompt=True)
        assert [tuple(a) for a in s["arguments"]] == [(prompt, c) for c in choices]
        want = [expected_ll(tok, ref, prompt, c)[0] for c in choices]  # "\n\n" moves over
        assert [ll for ll, _ in s["filtered_resps"]] == pytest.approx(want, abs=1e-5, rel=0)
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert lm.chat_template(True) == config["chat_template"]
    assert lm.tokenizer_name == f"camelid-{tok.digest[:16]}"


def test_adapter_equals_camelid_eval(model, lm, tmp_path, monkeypatch):
    """The same local multiple-choice items through lm-eval with the adapter and through
    `camelid eval`'s runner: every choice's log-likelihood within 1e-5, acc and acc_norm
    exactly (one item longer than the context: both truncate it the same way)."""
    import datasets
    import huggingface_hub
    import lm_eval
    from lm_eval.tasks import TaskManager

    from camelid.eval import runner
    from camelid.eval.tasks import load_task

    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    labels = [i % len(choices) for i, (_, choices) in enumerate(ITEMS)]
    task_dir = write_mc_task(tmp_path / "tasks", "camelid_same", ITEMS, labels).parent
    ours = tmp_path / "ours.jsonl"
    ours.write_text("".join(
        json.dumps({"context": f"Question: {q}\nAnswer:", "choices": c, "gold": g}) + "\n"
        for (q, c), g in zip(ITEMS, labels, strict=True)
    ))  # fmt: skip
    r = lm_eval.simple_evaluate(
        model=lm, tasks=["camelid_same"], log_samples=True,
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
    )  # fmt: skip
    samples = sorted(r["samples"]["camelid_same"], key=lambda s: s["doc_id"])
    metrics, items = runner.run_choice(lm.engine, load_task(str(ours)), runner.Options())
    assert lm.engine.max_seq_len == CONTEXT
    for s, item in zip(samples, items, strict=True):
        assert item["logprobs"] == pytest.approx([ll for ll, _ in s["filtered_resps"]], abs=1e-5)
        assert item["greedy"] == [bool(x) for _, x in s["filtered_resps"]]
        assert (item["acc"], item["acc_norm"]) == (s["acc"], s["acc_norm"])
    res = r["results"]["camelid_same"]
    assert (metrics["acc"], metrics["acc_norm"]) == (res["acc,none"], res["acc_norm,none"])
