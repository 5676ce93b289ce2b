"""Ctrl-C ends every command the same way: status 130, one line ``camelid: interrupted``, no
traceback, and nothing half-done left behind (train and quickstart: a checkpoint, and the
command that resumes it).

Each command runs in a process of its own, in a session of its own, and gets SIGINT sent to
its whole process group, as a terminal sends Ctrl-C (prepare's worker processes get it too).
It is sent once the command is under way: its imports done (a marker line on stderr), and
then what shows it is mid-work (a shard written, the first text streamed, the prompt shown).
"""

from __future__ import annotations

import json
import os
import random
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import random_llama_dir

from camelid.tokenizer import train_tokenizer

READY = "camelid-test: imported"
# The installed `camelid` command, with a marker once its imports are done: a Ctrl-C during
# Python's own start-up is not the command's to handle.
LAUNCH = f"""
import importlib.metadata, sys
(ep,) = importlib.metadata.entry_points(group="console_scripts", name="camelid")
main = ep.load()
print({READY!r}, file=sys.stderr, flush=True)
sys.exit(main(sys.argv[1:]))
"""
WORDS = "alpha beta gamma delta river stone light import return value class data".split()


class Command:
    """A running ``camelid`` command whose output can be waited for, then interrupted."""

    def __init__(self, *argv: str, stdin: int | None = subprocess.DEVNULL) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", LAUNCH, *map(str, argv)],
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group, as a shell job has
            # A SIGINT ignored by whatever started pytest must not be inherited.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        self.out, self.err = b"", b""
        self.wait_for(lambda: READY in self.err.decode(errors="replace"), "its imports")

    def _read(self, timeout: float) -> None:
        streams = [s for s in (self.proc.stdout, self.proc.stderr) if not s.closed]
        ready, _, _ = select.select(streams, [], [], timeout)
        for s in ready:
            data = os.read(s.fileno(), 65536)
            if s is self.proc.stdout:
                self.out += data
            else:
                self.err += data

    def wait_for(self, condition, what: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None:
                self._read(0)
                pytest.fail(f"the command ended (status {self.proc.returncode}) before {what}:"
                            f"\n{self.err.decode(errors='replace')}")  # fmt: skip
            if time.monotonic() > deadline:
                self.proc.kill()
                pytest.fail(f"no sign of {what} within {timeout}s")
            self._read(0.01)

    def interrupt(self, timeout: float = 120) -> tuple[int, str, str]:
        """Ctrl-C; then its status, stdout and stderr (less the marker line)."""
        os.killpg(self.proc.pid, signal.SIGINT)
        out, err = self.proc.communicate(timeout=timeout)
        self.out, self.err = self.out + out, self.err + err
        err_text = self.err.decode().replace(READY + "\n", "")
        return self.proc.returncode, self.out.decode(errors="replace"), err_text


def assert_interrupted(code: int, err: str, last: str = "camelid: interrupted") -> None:
    assert code == 130, f"status {code}:\n{err}"
    assert "Traceback" not in err, err
    assert err.rstrip("\n").splitlines()[-1].startswith(last), err


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    rng = random.Random(0)
    texts = [" ".join(rng.choices(WORDS, k=200)) for _ in range(20)]
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(texts, 400, num_special=16).save(out)
    return out


def test_prepare_ctrl_c_mid_work_stops_its_workers_and_leaves_nothing(tmp_path, tok_dir):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = random.Random(1)
    for i in range(400):
        (corpus / f"f{i:04d}.txt").write_text(" ".join(rng.choices(WORDS, k=800)) + "\n")
    out = tmp_path / "data"
    cmd = Command("prepare", "--corpus", corpus, "--tokenizer", tok_dir, "--out", out,
                  "--workers", "2", "--shard-tokens", "2000", "--no-near-dedup")  # fmt: skip
    cmd.wait_for(lambda: any(out.glob("train-*.bin")), "a shard written")
    code, _, err = cmd.interrupt()
    assert_interrupted(code, err)  # no tracebacks from the worker processes either
    assert not out.exists()  # its shards and marker taken back, and the --out it created


def test_tokenizer_train_ctrl_c_during_the_rust_training(tmp_path):
    out = tmp_path / "tok"
    cmd = Command("tokenizer", "train", "--vocab-size", "8192", "--out", out)  # the stdlib
    time.sleep(1.0)  # resolving the corpus takes a moment; then the trainer reads it
    t0 = time.monotonic()
    code, out_text, err = cmd.interrupt()
    assert "trained" not in out_text, "the training finished before it could be interrupted"
    assert_interrupted(code, err)
    assert not out.exists()
    print(f"exited {time.monotonic() - t0:.1f}s after Ctrl-C")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama with a long context, so a generation runs until interrupted."""
    rng = random.Random(2)
    tok = train_tokenizer([" ".join(rng.choices(WORDS, k=300)) for _ in range(30)], 600,
                          num_special=16)  # fmt: skip
    root = tmp_path_factory.mktemp("model") / "m"
    random_llama_dir(root, vocab_size=tok.vocab_size, max_position_embeddings=8192)
    tok.save(root)
    return root


def test_generate_ctrl_c_while_streaming(model_dir):
    cmd = Command("generate", model_dir, "-p", "alpha beta", "-n", "8000", "--device", "cpu",
                  "--greedy", "--ignore-eos")  # fmt: skip
    cmd.wait_for(lambda: len(cmd.out) > 0, "the first streamed text")
    code, out, err = cmd.interrupt()
    assert_interrupted(code, err)
    assert out.endswith("\n")  # the line is ended before the message


def test_chat_ctrl_c_at_the_prompt(model_dir):
    cmd = Command("chat", model_dir, "--device", "cpu", stdin=subprocess.PIPE)
    # The whole note (its newline is a write of its own), then the prompt is read.
    cmd.wait_for(lambda: re.search(rb"type a message.*\n", cmd.err), "the prompt")
    code, _, err = cmd.interrupt()
    assert_interrupted(code, err)


def test_quickstart_ctrl_c_during_training_saves_a_checkpoint(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = random.Random(3)
    for i in range(30):
        (corpus / f"d{i}.txt").write_text(" ".join(rng.choices(WORDS, k=400)) + "\n")
    out = tmp_path / "qs"
    # run.peak_tflops: a known peak, so no matmul is timed to measure one.
    sets = ["train.steps=100000", "train.batch_size=2", "train.seq_len=32", "model.dim=64",
            "model.n_layers=2", "eval.interval=0", "eval.batches=1", "eval.sample_tokens=0",
            "checkpoint.interval=0", "checkpoint.export_hf=false", "log.interval=1",
            "run.peak_tflops=1"]  # fmt: skip
    argv = ["quickstart", "--out", out, "--corpus", corpus, "--vocab-size", "600"]
    cmd = Command(*argv, *(a for s in sets for a in ("--set", s)))
    metrics = out / "run" / "metrics.jsonl"

    def stepping() -> bool:
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        return any(json.loads(line).get("kind") == "step" for line in lines[:-1])

    cmd.wait_for(stepping, "a training step")
    code, _, err = cmd.interrupt()
    resume = f"resume with: camelid train {(out / 'run').resolve()}/recipe.toml --resume"
    assert_interrupted(code, err, "camelid: interrupted (SIGINT): checkpoint saved at step ")
    assert err.rstrip("\n").endswith(resume), err
    checkpoints = sorted((out / "run" / "checkpoints").glob("step-*"))
    assert checkpoints and checkpoints[-1].name != "step-00000000"  # the step it stopped at

    # `camelid train --resume` stopped by Ctrl-C in turn: the same status and line.
    before = len(metrics.read_text().splitlines())
    cmd = Command("train", out / "run" / "recipe.toml", "--resume")
    cmd.wait_for(lambda: len(metrics.read_text().splitlines()) > before + 3, "a resumed step")
    code, _, err = cmd.interrupt()
    assert_interrupted(code, err, "camelid: interrupted (SIGINT): checkpoint saved at step ")
    assert err.rstrip("\n").endswith(resume), err
