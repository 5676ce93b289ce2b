"""`camelid generate` and `camelid chat` end to end on a tiny random model, and their bad input."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import camelid_main as main
from conftest import random_llama_dir

import camelid
from camelid.errors import CheckpointError, RequestError
from camelid.infer.engine import Engine
from camelid.infer.load import load_engine, resolve_model_dir
from camelid.tokenizer import train_tokenizer
from camelid.tokenizer.chat import fit_history

TEXTS = [
    "The quick brown fox jumps over the lazy dog. 你好，世界！🙂🎉 " * 3 + str(i)
    for i in range(200)
]
GREEDY = ["--device", "cpu", "--greedy", "--ignore-eos"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The model is tiny: one thread is fastest, and immune to other processes' load."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A 2-layer random Llama with a 518-token BPE tokenizer (chat tokens included)."""
    root = tmp_path_factory.mktemp("infer") / "model"
    tok = train_tokenizer(TEXTS, 600, num_special=16)
    random_llama_dir(root, vocab_size=tok.vocab_size)
    tok.save(root)
    return root


@pytest.fixture(scope="module")
def engine(model_dir) -> Engine:
    """The reference: the engine the CLI should be equivalent to."""
    return camelid.Engine(camelid.load(model_dir), camelid.Tokenizer.load(model_dir))


def run(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    assert "Traceback" not in out.err + out.out
    return code, out.out, out.err


def greedy(engine: Engine, prompt, n: int = 24, **kw) -> camelid.Completion:
    return engine.generate(prompt, max_new_tokens=n, temperature=0, ignore_eos=True, **kw)


# ----------------------------------------------------------------------------------- generate
def test_generate_greedy_matches_engine(capsys, model_dir, engine):
    code, out, err = run(capsys, "generate", model_dir, "-p", "The quick", "-n", 24, *GREEDY)
    assert code == 0
    assert out == greedy(engine, "The quick").text + "\n"
    assert "24 tokens generated" in err and "tokens/s" in err and "finish: length" in err
    assert "loaded" in err

    code, out_q, err_q = run(capsys, "generate", model_dir, "-p", "The quick", "-n", 24,
                             *GREEDY, "--quiet")  # fmt: skip
    assert (code, out_q, err_q) == (0, out, "")


def test_generate_several_prompts_in_order(capsys, model_dir, engine):
    prompts = ["The quick", "你好", "Once upon a time there was a fox"]
    args = [a for p in prompts for a in ("--prompt", p)]
    code, out, err = run(capsys, "generate", model_dir, *args, "-n", 16, *GREEDY, "--echo")
    assert code == 0
    expected = "\n".join(
        f"=== {i + 1}/3 {p!r} ===\n{p}{greedy(engine, p, 16).text}\n" for i, p in enumerate(prompts)
    )
    assert out == expected
    assert "48 tokens generated" in err and "3 length" in err


def test_generate_sampled_with_seed_is_repeatable(capsys, model_dir, engine):
    argv = ["generate", model_dir, "-p", "The quick", "-n", 16, "--device", "cpu", "--seed", 5,
            "--top-k", 50, "--min-p", 0.01, "--repetition-penalty", 1.2,
            "--frequency-penalty", 0.3, "--ignore-eos", "-q"]  # fmt: skip
    _, first, _ = run(capsys, *argv)
    _, second, _ = run(capsys, *argv)
    ref = engine.generate(
        "The quick", max_new_tokens=16, temperature=0.8, top_p=0.95, top_k=50, min_p=0.01,
        repetition_penalty=1.2, frequency_penalty=0.3, seed=5, ignore_eos=True,
    )  # fmt: skip
    assert first == second == ref.text + "\n"


def test_generate_defaults_are_the_library_defaults(capsys, model_dir, engine):
    """One set of sampling defaults: the command's are SamplingParams'."""
    _, out, _ = run(capsys, "generate", model_dir, "-p", "The quick", "-n", 16, "--device", "cpu",
                    "--seed", 9, "--ignore-eos", "-q")  # fmt: skip
    ref = engine.generate("The quick", max_new_tokens=16, seed=9, ignore_eos=True)
    assert out == ref.text + "\n"


def test_load_engine_takes_plain_arguments(model_dir, tmp_path):
    """What every consumer (CLI, server) loads a model with; a run directory resolves to hf/."""
    lines: list[str] = []
    shutil.copytree(model_dir, tmp_path / "run" / "hf")
    engine = load_engine(tmp_path / "run", device="cpu", max_seq_len=1000, max_batch_size=2,
                         log=lines.append)  # fmt: skip
    assert (engine.max_seq_len, engine.max_batch_size, engine.dtype) == (256, 2, torch.float32)
    assert (
        lines[0] == f"{tmp_path / 'run'}: training run; using its export {tmp_path / 'run' / 'hf'}"
    )
    assert lines[1] == "note: the model's context is 256 tokens; using that"
    assert lines[2].startswith(f"loaded {tmp_path / 'run' / 'hf'} (") and len(lines) == 3
    assert resolve_model_dir(tmp_path / "run") == tmp_path / "run" / "hf"
    with pytest.raises(CheckpointError, match="no such directory"):
        load_engine(tmp_path / "absent")
    with pytest.raises(RequestError, match="--dtype 'int4'"):
        load_engine(model_dir, dtype="int4")


def test_generate_json(capsys, model_dir, engine):
    code, out, _ = run(capsys, "generate", model_dir, "-p", "The quick", "-p", "你好", "-n", 8,
                       *GREEDY, "--json", "--logprobs", 3, "--prompt-logprobs", 1)  # fmt: skip
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["index"] for r in rows] == [0, 1]
    for row, prompt in zip(rows, ["The quick", "你好"], strict=True):
        ref = greedy(engine, prompt, 8)
        assert row["prompt"] == prompt
        assert row["text"] == ref.text and row["token_ids"] == ref.token_ids
        assert row["finish_reason"] == "length" and row["completion_tokens"] == 8
        assert row["prompt_tokens"] == len(ref.prompt_token_ids)
        assert len(row["logprobs"]) == 8
        first = row["logprobs"][0]
        assert first["rank"] == 1 and len(first["top"]) == 3  # greedy: the top choice
        assert first["top"][0]["token"] == first["token"] == ref.token_ids[0]
        assert row["prompt_logprobs"][0] is None and len(row["prompt_logprobs"]) == len(
            ref.prompt_token_ids
        )


def test_generate_stop_string_cuts(capsys, model_dir, engine):
    full = greedy(engine, "The quick", 40).text
    stop = next(full[i : i + 2] for i in range(3, len(full)) if "\ufffd" not in full[i : i + 2])
    code, out, err = run(capsys, "generate", model_dir, "-p", "The quick", "-n", 40, *GREEDY,
                         "--stop", stop)  # fmt: skip
    assert code == 0
    assert out == full[: full.index(stop)] + "\n"
    assert "finish: stop" in err


def test_generate_prompt_sources_and_chat(capsys, monkeypatch, tmp_path, model_dir, engine):
    file = tmp_path / "prompt.txt"
    file.write_text("Once upon a time\n")  # the final newline is dropped
    monkeypatch.setattr("sys.stdin", io.StringIO("The quick\n"))
    code, out, _ = run(capsys, "generate", model_dir, "--prompt", "-", "--prompt-file", file,
                       "-n", 8, *GREEDY, "-q")  # fmt: skip
    assert code == 0
    a, b = greedy(engine, "The quick", 8).text, greedy(engine, "Once upon a time", 8).text
    assert out == f"=== 1/2 'The quick' ===\n{a}\n\n=== 2/2 'Once upon a time' ===\n{b}\n"

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    ids = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    code, out, _ = run(capsys, "generate", model_dir, "-p", "Hi", "--chat", "--system",
                       "Be brief.", "-n", 8, *GREEDY, "-q")  # fmt: skip
    assert (code, out) == (0, greedy(engine, ids, 8).text + "\n")


def test_prompt_too_long_then_truncate(capsys, model_dir, engine):
    long = "The quick brown fox " * 80  # over 256 tokens: more than the context
    code, out, err = run(capsys, "generate", model_dir, "-p", long, "-n", 8, *GREEDY)
    assert code == 1 and out == ""
    assert "camelid: error: the prompt has" in err and "--truncate" in err

    code, out, err = run(capsys, "generate", model_dir, "-p", long, "-n", 8, *GREEDY, "--truncate")
    assert code == 0
    ids = engine.tokenizer.encode(long, bos=True)[-(256 - 8) :]
    assert out == greedy(engine, ids, 8).text + "\n"
    assert f"truncated from {len(engine.tokenizer.encode(long, bos=True))} to its last 248" in err

    # --max-seq-len shrinks the context the same way.
    code, _, err = run(capsys, "generate", model_dir, "-p", "The quick " * 10, "--max-seq-len",
                       16, *GREEDY)  # fmt: skip
    assert code == 1 and "context of 16 tokens" in err


@pytest.mark.parametrize(
    ("flag", "value", "field"),
    [
        ("--temperature", "-1", "temperature"),
        ("--top-p", "0", "top_p"),
        ("--min-p", "1.5", "min_p"),
        ("--top-k", "-3", "top_k"),
        ("--repetition-penalty", "0", "repetition_penalty"),
        ("--presence-penalty", "3", "presence_penalty"),
        ("--max-new-tokens", "0", "max_new_tokens"),
        ("--seed", "-1", "seed"),
        ("--stop", "", "stop"),
    ],
)
def test_bad_sampling_value(capsys, model_dir, flag, value, field):
    code, out, err = run(capsys, "generate", model_dir, "-p", "x", flag, value)
    assert code == 1 and out == ""
    assert err.startswith("camelid: error: ") and f"{field}=" in err
    assert "loaded" not in err  # refused before loading the model


def test_bad_value_is_one_line(capsys, model_dir):
    code, out, err = run(capsys, "generate", model_dir, "-p", "x", "--temperature", "-0.5")
    assert (code, out) == (1, "")
    assert err == "camelid: error: invalid temperature=-0.5: must be >= 0 (0 is greedy)\n"


def test_other_bad_input(capsys, model_dir):
    cases = [
        (["-p", "x", "--logprobs", "2"], "--logprobs needs --json"),
        (["-p", "x", "--system", "s"], "--system needs --chat"),
        ([], "no prompt"),
        (["-p", "x", "--device", "nonsense"], "not a device"),
        (["-p", "x", "--max-seq-len", "0"], "--max-seq-len must be at least 2"),
        (["--prompt-file", "/no/such/file"], "cannot read it"),
    ]
    for extra, message in cases:
        code, _, err = run(capsys, "generate", model_dir, *extra)
        assert code == 1 and message in err, (extra, err)
    with pytest.raises(SystemExit) as e:  # argparse: --greedy and --temperature exclude
        main(["generate", str(model_dir), "-p", "x", "--greedy", "--temperature", "0.5"])
    assert e.value.code == 2


def test_model_directory_errors(capsys, tmp_path, model_dir):
    no_tok = tmp_path / "no-tok"
    no_tok.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(model_dir / name, no_tok / name)
    for cmd in ("generate", "chat"):
        code, _, err = (
            run(capsys, cmd, no_tok, "-p", "x") if cmd == "generate" else run(capsys, cmd, no_tok)
        )
        assert code == 1
        assert f"camelid: error: {no_tok} has no tokenizer.json or tokenizer.model" in err

    code, _, err = run(capsys, "generate", tmp_path, "-p", "x")
    assert code == 1 and f"{tmp_path} is not a model directory: no config.json" in err
    code, _, err = run(capsys, "generate", tmp_path / "missing", "-p", "x")
    assert code == 1 and "no such directory" in err
    code, _, err = run(capsys, "generate", model_dir / "config.json", "-p", "x")
    assert code == 1 and "found a file" in err


def test_training_run_directory_resolves_to_hf(capsys, tmp_path, model_dir, engine):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    code, _, err = run(capsys, "generate", run_dir, "-p", "x")
    assert code == 1 and "has not exported weights" in err
    shutil.copytree(model_dir, run_dir / "hf")
    code, out, err = run(capsys, "generate", run_dir, "-p", "The quick", "-n", 8, *GREEDY)
    assert code == 0 and out == greedy(engine, "The quick", 8).text + "\n"
    assert f"loaded {run_dir / 'hf'}" in err


def test_tokenizer_without_chat_tokens(capsys, tmp_path, model_dir):
    plain = tmp_path / "plain"
    plain.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(model_dir / name, plain / name)
    spec = (model_dir / "tokenizer.json").read_text()  # rename the chat header tokens away
    spec = spec.replace("<|start_header_id|>", "<|reserved_special_token_90|>")
    (plain / "tokenizer.json").write_text(spec.replace("<|end_header_id|>", "<|reserved_91|>"))
    code, _, err = run(capsys, "generate", plain, "-p", "x", "--chat", "--device", "cpu")
    assert code == 1 and "no chat format" in err
    code, _, err = run(capsys, "chat", plain, "--device", "cpu")
    assert code == 1 and "no chat format" in err


def test_help_has_examples(capsys):
    for cmd in ("generate", "chat"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        out = capsys.readouterr().out
        assert f"usage: camelid {cmd}" in out and "examples:" in out and "--top-p" in out


# --------------------------------------------------------------------------------------- chat
def chat_ids(engine: Engine, messages: list[dict]) -> list[int]:
    return engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def test_chat_piped_stdin_reset(model_dir, engine):
    """A real process reading piped stdin: two answers, the second after /reset."""
    res = subprocess.run(
        [sys.executable, "-m", "camelid.cli", "chat", str(model_dir), "-n", "12", *GREEDY],
        input="hello\n/reset\nhi again\n/exit\nnever read\n", capture_output=True, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr and "conversation cleared" in res.stderr
    first = greedy(engine, chat_ids(engine, [user("hello")]), 12).text
    second = greedy(engine, chat_ids(engine, [user("hi again")]), 12).text  # no history
    assert res.stdout == f"{first}\n{second}\n"


def test_chat_keeps_history(capsys, monkeypatch, model_dir, engine):
    """The second turn's prompt is the whole conversation (spied on the engine)."""
    prompts: list[list[int]] = []
    real = Engine.stream_batch

    def spy(self, batch, params=None, **kw):
        prompts.append(list(batch[0]))
        return real(self, batch, params, **kw)

    monkeypatch.setattr(Engine, "stream_batch", spy)
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n\n/help\nhi again\n"))  # then EOF
    code, out, _ = run(capsys, "chat", model_dir, "--system", "Be kind.", "-n", 10, *GREEDY)
    assert code == 0 and "/reset" in out  # the /help text
    system = {"role": "system", "content": "Be kind."}
    first = greedy(engine, chat_ids(engine, [system, user("hello")]), 10).text
    history = [system, user("hello"), assistant(first), user("hi again")]
    assert prompts == [chat_ids(engine, [system, user("hello")]), chat_ids(engine, history)]
    second = greedy(engine, prompts[1], 10).text
    assert out.startswith(f"{first}\ncommands:") and out.endswith(f"history.\n{second}\n")


def test_chat_ctrl_c_keeps_the_shown_part(capsys, monkeypatch, model_dir, engine):
    prompts: list[list[int]] = []
    real = Engine.stream_batch

    def interrupted(self, batch, params=None, **kw):
        prompts.append(list(batch[0]))
        if len(prompts) > 1:
            yield from real(self, batch, params, **kw)
            return
        yield 0, "Half an ", None
        yield 0, "answer", None
        raise KeyboardInterrupt

    monkeypatch.setattr(Engine, "stream_batch", interrupted)
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\nmore\n/quit\n"))
    code, out, err = run(capsys, "chat", model_dir, "-n", 6, *GREEDY)
    assert code == 0
    assert out.startswith("Half an answer\n") and "answer stopped" in err
    history = [user("hello"), assistant("Half an answer"), user("more")]
    assert prompts[1] == chat_ids(engine, history)


def test_fit_history_drops_oldest_turns(engine):
    tok = engine.tokenizer
    system = {"role": "system", "content": "Be kind."}
    turns = [user("hello there"), assistant("hi, how can I help?"),
             user("tell me about foxes"), assistant("they are quick and brown"),
             user("and dogs?")]  # fmt: skip
    messages = [system, *turns]
    full = chat_ids(engine, messages)
    ids, dropped = fit_history(tok, list(messages), budget=len(full))
    assert (ids, dropped) == (full, 0)  # fits: nothing dropped

    kept = [system, *turns[2:]]
    messages = [system, *turns]
    ids, dropped = fit_history(tok, messages, budget=len(chat_ids(engine, kept)))
    assert (ids, dropped, messages) == (chat_ids(engine, kept), 2, kept)  # one turn, in place

    messages = [system, *turns]
    ids, dropped = fit_history(tok, messages, budget=1)  # never drops the system or new message
    assert (dropped, messages) == (4, [system, turns[-1]])
    assert ids == chat_ids(engine, [system, turns[-1]])


def test_chat_overflow_drops_turns_and_says_so(capsys, monkeypatch, model_dir):
    prompts: list[list[int]] = []
    real = Engine.stream_batch

    def spy(self, batch, params=None, **kw):
        prompts.append(list(batch[0]))
        return real(self, batch, params, **kw)

    monkeypatch.setattr(Engine, "stream_batch", spy)
    too_long = "fox " * 80
    monkeypatch.setattr("sys.stdin", io.StringIO(f"one\ntwo\n{too_long}\nthree\n"))
    # context 64, answers of 24 tokens: room for one earlier turn at most
    code, out, err = run(capsys, "chat", model_dir, "--max-seq-len", 64, "-n", 24, *GREEDY)
    assert code == 0 and len(out.splitlines()) >= 3
    assert "dropped the 2 oldest message(s) to fit the context, 64" in err
    assert "try a shorter one" in err  # the long message is refused, the chat goes on
    assert len(prompts) == 3 and all(len(p) <= 64 - 24 for p in prompts)
