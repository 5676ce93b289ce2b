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
