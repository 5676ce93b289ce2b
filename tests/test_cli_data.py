"""`camelid tokenizer train` and `camelid prepare` end to end, and their bad input."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from conftest import camelid_main as main

from camelid.data import TokenLoader
from camelid.tokenizer import Tokenizer


def run(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    out = capsys.readouterr()
    assert "Traceback" not in out.err + out.out
    return code, out.out, out.err


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    words = "alpha beta gamma delta river stone light import return value class data".split()
    for i in range(30):
        text = "\n".join(" ".join(rng.choices(words, k=10)) for _ in range(30))
        (root / f"doc{i}.py").write_text(text + "\n")
    records = [json.dumps({"text": " ".join(rng.choices(words, k=60))}) for _ in range(20)]
    (root / "more.jsonl").write_text("\n".join([*records, "{broken", '{"other": 1}']) + "\n")
    return root


def test_train_then_prepare_then_load(capsys, tmp_path, corpus):
    tok_dir, data_dir = tmp_path / "tok", tmp_path / "data"
    code, out, _ = run(
        capsys,
        "tokenizer",
        "train",
        "--corpus",
        str(corpus),
        "--vocab-size",
        "400",
        "--num-special",
        "16",
        "--out",
        str(tok_dir),
    )
    assert code == 0 and "BPE tokenizer" in out
    assert Tokenizer.load(tok_dir).vocab_size <= 400
    assert (tok_dir / "tokenizer_config.json").exists()

    code, out, _ = run(
        capsys,
        "prepare",
        "--corpus",
        str(corpus),
        "--tokenizer",
        str(tok_dir),
        "--out",
        str(data_dir),
        "--workers",
        "2",
        "--val-fraction",
        "0.2",
    )
    assert code == 0, out
    assert "skipped 1 non-JSON lines, 1 records without 'text'" in out
    assert "more.jsonl:21 (not JSON)" in out and "more.jsonl:22" in out
    assert "they hold  other (choose with --text-field)" in out
    assert "train" in out and "validation" in out
    x, _ = next(TokenLoader(data_dir, batch_size=2, seq_len=16))
    assert x.shape == (2, 16)

    code, out, _ = run(
        capsys,
        "prepare",
        "--corpus",
        str(corpus),
        "--tokenizer",
        str(tok_dir),
        "--out",
        str(data_dir),
        "--val-fraction",
        "0.2",
    )
    assert code == 0 and "already prepared" in out

    code, _, err = run(
        capsys,
        "prepare",
        "--corpus",
        str(corpus),
        "--tokenizer",
        str(tok_dir),
        "--out",
        str(data_dir),
        "--val-fraction",
        "0.3",
    )
    assert code == 1 and "different dataset" in err and "--overwrite" in err


def test_prepare_only_globbed_files(capsys, tmp_path, corpus):
    tok_dir = tmp_path / "tok"
    assert run(capsys, "tokenizer", "train", "--corpus", str(corpus), "--vocab-size", "300",
               "--num-special", "16", "--out", str(tok_dir))[0] == 0  # fmt: skip
    code, out, _ = run(
        capsys,
        "prepare",
        "--corpus",
        str(corpus),
        "--glob",
        "*.jsonl",
        "--tokenizer",
        str(tok_dir),
        "--out",
        str(tmp_path / "d"),
    )
    assert code == 0 and "files        1 " in out


@pytest.mark.parametrize(
    "argv,needle",
    [
        (
            [
                "tokenizer",
                "train",
                "--corpus",
                "{corpus}",
                "--vocab-size",
                "100",
                "--out",
                "{tmp}/t",
            ],
            "too small: the minimum is 513",
        ),
        (
            [
                "tokenizer",
                "train",
                "--corpus",
                "{tmp}/nowhere",
                "--vocab-size",
                "500",
                "--out",
                "x",
            ],
            "no such file or directory",
        ),
        (
            [
                "tokenizer",
                "train",
                "--corpus",
                "{corpus}",
                "--glob",
                "*.md",
                "--vocab-size",
                "500",
                "--out",
                "{tmp}/t",
            ],
            "no files matching *.md",
        ),
        (
            ["prepare", "--corpus", "{corpus}", "--tokenizer", "{tmp}/none", "--out", "{tmp}/d"],
            "none",
        ),
        (
            ["prepare", "--corpus", "{empty}", "--tokenizer", "{tok}", "--out", "{tmp}/d"],
            "holds no documents; skipped 1 binary file",
        ),
    ],
)
def test_bad_input(capsys, tmp_path, corpus, argv, needle):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "x.bin").write_bytes(b"\0\1\2")
    tok = tmp_path / "tok"
    if "{tok}" in argv:
        run(
            capsys,
            "tokenizer",
            "train",
            "--corpus",
            str(corpus),
            "--vocab-size",
            "300",
            "--num-special",
            "16",
            "--out",
            str(tok),
        )
    argv = [a.format(corpus=corpus, tmp=tmp_path, empty=empty, tok=tok) for a in argv]
    code, _, err = run(capsys, *argv)
    assert code == 1, err
    assert err.startswith("camelid: error: ") and err.count("\n") == 1
    assert needle in err


def test_failed_prepare_does_not_block_the_corrected_rerun(capsys, tmp_path, corpus):
    tok = tmp_path / "tok"
    assert run(capsys, "tokenizer", "train", "--corpus", str(corpus), "--vocab-size", "300",
               "--num-special", "16", "--out", str(tok))[0] == 0  # fmt: skip
    records = tmp_path / "records"
    records.mkdir()
    rows = [{"body": f"record {i} " + " ".join(["river stone"] * 20), "url": i} for i in range(8)]
    (records / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "data"
    argv = ["prepare", "--corpus", str(records), "--tokenizer", str(tok), "--out", str(out)]
    code, _, err = run(capsys, *argv)  # the field is 'body', not the default 'text'
    assert code == 1 and err.startswith("camelid: error: ") and err.count("\n") == 1
    assert "has a string field 'text'; fields found: body, url" in err
    assert not out.exists()
    code, out_text, _ = run(capsys, *argv, "--text-field", "body")
    assert code == 0 and "documents    8 read, 8 kept" in out_text

    blobs = tmp_path / "blobs"
    blobs.mkdir()
    (blobs / "a.bin").write_bytes(b"\0" * 64)
    argv = [
        "prepare",
        "--corpus",
        str(blobs),
        "--tokenizer",
        str(tok),
        "--out",
        str(tmp_path / "d2"),
    ]
    code, _, err = run(capsys, *argv)
    assert code == 1 and "skipped 1 binary file" in err and not (tmp_path / "d2").exists()
    argv[2] = str(corpus)
    assert run(capsys, *argv)[0] == 0


def test_quickstart_reuses_only_a_tokenizer_of_its_own_inputs(
    capsys, monkeypatch, tmp_path, corpus
):
    import shutil

    import camelid.quickstart as qs
    from camelid.errors import CamelidError

    recipes = []

    def no_training(recipe, **kw):  # the stages before training are what is tested here
        recipes.append(recipe)
        raise CamelidError("training skipped by the test")

    monkeypatch.setattr(qs, "train", no_training)
    src = tmp_path / "corpus"
    shutil.copytree(corpus, src)
    out = tmp_path / "qs"
    argv = ["quickstart", "--out", str(out), "--corpus", str(src)]
    code, text, err = run(capsys, *argv, "--vocab-size", "600")
    assert code == 1 and "training skipped" in err
    assert "[1/4] tokenizer   trained" in text and "[2/4] data" in text
    assert recipes[-1].data.dir == str((out / "data").resolve())  # resumable from anywhere
    digest = Tokenizer.load(out / "tokenizer").digest

    code, text, _ = run(capsys, *argv, "--vocab-size", "600")
    assert "[1/4] tokenizer   reusing" in text and "[2/4] data" in text

    def refused(*extra: str) -> str:
        code, text, err = run(capsys, *argv, *extra)
        assert code == 1 and err.startswith("camelid: error: ") and err.count("\n") == 1
        assert "[1/4]" not in text and "--overwrite" in err
        assert Tokenizer.load(out / "tokenizer").digest == digest  # untouched
        return err

    assert "trained for --vocab-size 600, not 700" in refused("--vocab-size", "700")
    other = tmp_path / "other"
    shutil.copytree(corpus, other)
    (other / "doc0.py").write_text("something else entirely\n" * 40)
    assert "trained on another corpus" in refused("--corpus", str(other), "--vocab-size", "600")
    (src / "doc0.py").write_text("something else entirely\n" * 40)
    assert "other contents of" in refused("--vocab-size", "600")

    code, text, err = run(capsys, *argv, "--vocab-size", "700", "--overwrite")
    assert code == 1 and "training skipped" in err  # the tokenizer retrained, the data redone
    assert "[1/4] tokenizer   trained" in text and "[2/4] data" in text
    assert Tokenizer.load(out / "tokenizer").digest != digest
    assert json.loads((out / "tokenizer" / "trained-with.json").read_text())["vocab_size"] == 700

    # A tokenizer quickstart did not train (no record of its inputs) is not reused either.
    foreign = tmp_path / "foreign"
    assert run(capsys, "tokenizer", "train", "--corpus", str(src), "--vocab-size", "600",
               "--out", str(foreign / "tokenizer"))[0] == 0  # fmt: skip
    code, _, err = run(capsys, "quickstart", "--out", str(foreign), "--corpus", str(src),
                       "--vocab-size", "600")  # fmt: skip
    assert code == 1 and "that quickstart did not train" in err and "--overwrite" in err


def test_tokenizer_train_refuses_an_out_it_must_not_write_before_training(capsys, tmp_path, corpus):
    tok = tmp_path / "tok"
    argv = ["tokenizer", "train", "--corpus", str(corpus), "--vocab-size", "300",
            "--num-special", "16"]  # fmt: skip
    assert run(capsys, *argv, "--out", str(tok))[0] == 0
    before = (tok / "tokenizer.json").read_bytes()
    (tok / "tokenizer.model").write_text("an older tokenizer\n")

    def refused(*args: str) -> str:
        code, out, err = run(capsys, *args)
        assert code == 1 and not out and err.startswith("camelid: error: --out ")
        assert err.count("\n") == 1
        return err

    # Refused before anything else: even before the corpus is looked at (here: none exists).
    nowhere = ["--corpus", str(tmp_path / "nowhere"), "--vocab-size", "300", "--num-special", "16"]
    err = refused("tokenizer", "train", *nowhere, "--out", str(tok))
    assert "already holds a tokenizer (tokenizer.json, tokenizer.model)" in err
    assert "--overwrite" in err and (tok / "tokenizer.json").read_bytes() == before
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine\n")
    assert "is an existing file" in refused("tokenizer", "train", *nowhere, "--out", str(a_file))
    assert "is an existing file" in refused(*argv, "--out", str(a_file), "--overwrite")
    assert a_file.read_text() == "mine\n"

    code, _, _ = run(capsys, *argv[:-4], "--vocab-size", "320", "--num-special", "16",
                     "--out", str(tok), "--overwrite")  # fmt: skip
    assert code == 0 and (tok / "tokenizer.json").read_bytes() != before
    assert not (tok / "tokenizer.model").exists()  # the replaced tokenizer's file is gone


def test_tokenizer_train_says_when_the_corpus_cannot_fill_the_vocabulary(capsys, tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("abc abd abe " * 50)
    # One file is one document: --val-fraction 0 keeps it in training whatever its name.
    code, out, err = run(capsys, "tokenizer", "train", "--corpus", str(small), "--vocab-size",
                         "8192", "--num-special", "16", "--val-fraction", "0",
                         "--out", str(tmp_path / "t"))  # fmt: skip
    got = Tokenizer.load(tmp_path / "t").vocab_size
    assert code == 0 and got < 8192
    assert err == f"camelid: note: the corpus filled only {got:,} of 8,192 tokens; " \
                  f"the tokenizer has {got:,}\n"  # fmt: skip
    assert f"trained a {got:,}-token BPE tokenizer (of 8,192 asked" in out
    code, out, err = run(capsys, "tokenizer", "train", "--corpus", str(small),
                         "--vocab-size", str(got), "--num-special", "16", "--val-fraction", "0",
                         "--out", str(tmp_path / "t2"))  # fmt: skip
    assert code == 0 and not err and "asked" not in out  # a size the corpus fills: no note


def test_prepare_warns_when_no_document_is_held_out(capsys, tmp_path, corpus):
    """A few files at a small --val-fraction may all land in training: say so, don't let the
    run find out later that it measures no validation loss."""
    tok_dir = tmp_path / "tok"
    assert run(capsys, "tokenizer", "train", "--corpus", str(corpus), "--vocab-size", "300",
               "--num-special", "16", "--out", str(tok_dir))[0] == 0  # fmt: skip
    base = ["prepare", "--corpus", str(corpus), "--tokenizer", str(tok_dir), "--glob", "doc1*.py"]
    code, out, err = run(capsys, *base, "--val-fraction", "0.01", "--out", str(tmp_path / "a"))
    assert code == 0 and "validation   0 documents" in out
    assert "no document fell into the validation split" in err and "--val-fraction" in err
    code, out, err = run(capsys, *base, "--val-fraction", "0.5", "--out", str(tmp_path / "b"))
    assert code == 0 and "validation   0 documents" not in out and "warning" not in err
