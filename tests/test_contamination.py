"""Contamination checks: task items planted in a prepared corpus are found by both methods,
disjoint ones are not; the report, dirty_ids, the CLI and its errors."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import camelid_main as main

from camelid.data import sources
from camelid.eval import contamination as c
from camelid.eval.tasks import EvalError, load_task
from camelid.tokenizer import train_tokenizer

VAL = 0.2
FILLER = "alpha beta gamma delta river stone light import return value class data".split()
PLANTED = (
    "Which ancient mariner charted the seven northern currents before winter, and who "
    "carried his silver compass across the frozen bay?",
    "Captain Orwell Brandt",
)
RECASED = (
    "The Orchard-Keeper, Counting Apples: Beneath Copper Lanterns; Until The Old Bell",
    "Rang Midnight!",
)
SPLIT = ("one two three four five six seven eight nine ten", "eleven twelve thirteen "
         "fourteen fifteen sixteen seventeen eighteen nineteen twenty")  # fmt: skip
HELD_OUT = ("Marble owls guard the quiet library where forgotten maps sleep under a thick "
            "blanket of", "dust")  # fmt: skip
DISJOINT = ("Purple walruses negotiate treaties with jazz trombones over a long and noisy",
            "breakfast")  # fmt: skip


def item(ident: str, context: str, gold: str) -> dict:
    return {"id": ident, "context": context, "choices": [gold, "something else"], "gold": 0}


ITEMS = [
    item("planted", *PLANTED),
    item("recased", *RECASED),
    item("short", "crimson lantern", "festival"),  # 3 words, 13 > 3
    item("short-clean", "violet harbor", "morning"),
    item("split", *SPLIT),
    item("held-out", *HELD_OUT),
    item("disjoint", *DISJOINT),
]


def _filler(rng: random.Random, lines: int = 12) -> str:
    return "\n".join(" ".join(rng.choices(FILLER, k=10)) for _ in range(lines))


def _names(prefix: str, count: int, validation: bool) -> list[str]:
    """File names whose keys fall on the wanted side of prepare's split."""
    out, i = [], 0
    while len(out) < count:
        name = f"{prefix}{i:03d}.txt"
        if sources.is_validation(name, VAL) == validation:
            out.append(name)
        i += 1
    return out


def _write_corpus(root: Path) -> None:
    rng = random.Random(0)
    for name in _names("doc", 20, validation=False):
        (root / name).write_text(_filler(rng) + "\n")
    text = lambda pair: f"{pair[0]} {pair[1]}"  # noqa: E731  ChoiceItem.text()
    a, b, c_, d = _names("plant", 4, validation=False)
    # verbatim in the middle of a line; lower-case and without punctuation; at a document's start
    (root / a).write_text(_filler(rng) + "\nsaid " + text(PLANTED) + " and then\n" + _filler(rng))
    recased = "the orchard keeper counting apples beneath copper lanterns until the old bell rang "
    recased += "midnight"
    (root / b).write_text(_filler(rng) + "\n" + recased + " again\n" + _filler(rng))
    (root / c_).write_text("crimson lantern festival\n" + _filler(rng))
    # an item cut across two documents, adjacent in the training stream: a file and the next
    first, second = _names("split", 2, validation=False)
    (root / first).write_text(_filler(rng) + "\n" + SPLIT[0])
    (root / second).write_text(SPLIT[1] + "\n" + _filler(rng))
    assert sorted([first, second]) == [first, second]
    (root / d).write_text(_filler(rng))
    (root / _names("held", 1, validation=True)[0]).write_text(
        _filler(rng) + "\n" + text(HELD_OUT) + "\n" + _filler(rng)
    )


def _tokenizer(corpus: Path, out: Path, vocab: int = 400) -> Path:
    texts = [p.read_text() for p in sorted(corpus.iterdir())]
    train_tokenizer(texts, vocab_size=vocab, num_special=16).save(out)
    return out


def _prepare(corpus: Path, tok: Path, out: Path, *extra: str) -> Path:
    argv = ["prepare", "--corpus", str(corpus), "--tokenizer", str(tok), "--out", str(out),
            "--workers", "1", "--val-fraction", str(VAL), *extra]  # fmt: skip
    assert main(argv) == 0
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("contam")
    corpus = root / "corpus"
    corpus.mkdir()
    _write_corpus(corpus)
    tok = _tokenizer(corpus, root / "tok")
    data = _prepare(corpus, tok, root / "data")
    task = root / "quiz.jsonl"
    task.write_text("".join(json.dumps(i) + "\n" for i in ITEMS))
    return {"root": root, "corpus": corpus, "tok": tok, "data": data, "task": task}


def by_id(report: dict) -> dict[str, dict]:
    (task,) = report["tasks"]
    return {i["id"]: i for i in task["items"]}


def test_words_are_normalised():
    assert c.normalize_words("The Quick,brown  FOX—jumps! (x+y) ÉCOLE ﬁne") == [
        "the", "quick", "brown", "fox", "jumps", "x", "y", "école", "fine"
    ]  # fmt: skip


def test_ngram_finds_the_planted_items_and_nothing_else(world):
    report = c.check_contamination(world["data"], [load_task(str(world["task"]))])
    items = by_id(report)
    dirty = {k for k, v in items.items() if v["dirty"]}
    # recased: planted lower-case without its punctuation; short: 3 words < n, as one n-gram;
    # split: its halves are in two documents, and no n-gram spans documents; held-out: in the
    # validation split only
    assert dirty == {"planted", "recased", "short"}
    p = items["planted"]
    assert p["matches"] == p["ngrams"] == p["length"] - 13 + 1 and p["share"] == 1.0
    assert items["short"]["length"] == 3 and items["short"]["ngrams"] == 1
    assert items["short-clean"]["matches"] == 0 and items["short-clean"]["ngrams"] == 1
    assert items["disjoint"]["matches"] == 0 and items["held-out"]["matches"] == 0
    assert items["split"]["matches"] == 0 and items["split"]["ngrams"] == 20 - 13 + 1
    assert report["method"] == "ngram" and report["n"] == 13 and report["dirty_share"] is None
    d = report["data"]
    manifest = json.loads((world["data"] / "manifest.json").read_text())
    assert d["recipe_digest"] == manifest["recipe_digest"] and d["split"] == "train"
    assert d["tokens"] == manifest["splits"]["train"]["tokens"]


def test_a_smaller_n_finds_the_split_item_in_each_half(world):
    items = by_id(c.check_contamination(world["data"], [load_task(str(world["task"]))], n=8))
    assert items["split"]["dirty"] and items["split"]["matches"] == 2 * (10 - 8 + 1)


def test_llama2_marks_the_tokens_of_planted_items(world):
    report = c.check_contamination(world["data"], [load_task(str(world["task"]))], method="llama2")
    items = by_id(report)
    assert report["n"] == 11 and report["dirty_share"] == 0.8
    assert items["planted"]["dirty"] and items["planted"]["share"] > 0.9
    assert items["short"]["dirty"] and items["short"]["share"] == 1.0
    # each half of the split item is a run of more than n tokens in training: its tokens are
    # contaminated though no one document holds the whole item
    assert items["split"]["dirty"] and items["split"]["share"] > 0.8
    # tokens are compared exactly: a recased copy shares no token run
    for ident in ("recased", "short-clean", "held-out", "disjoint"):
        assert not items[ident]["dirty"] and items[ident]["share"] == 0.0, ident
    # an item shorter than n tokens is looked up whole: found when planted, not otherwise
    n = max(items["short"]["length"], items["short-clean"]["length"]) + 1
    report = c.check_contamination(world["data"], [load_task(str(world["task"]))],
                                   method="llama2", n=n)  # fmt: skip
    short, clean = by_id(report)["short"], by_id(report)["short-clean"]
    assert short["ngrams"] == 1 and short["dirty"] and short["share"] == 1.0
    assert clean["ngrams"] == 1 and not clean["dirty"] and clean["share"] == 0.0


def test_results_do_not_depend_on_hashes_chunks_or_shards(world, monkeypatch):
    tasks = [load_task(str(world["task"]))]
    want = {m: by_id(c.check_contamination(world["data"], tasks, method=m)) for m in c.METHODS}
    # a 2-bit hash: every n-gram collides with others, and only exact comparison tells them apart
    real = c._window_hashes
    monkeypatch.setattr(c, "_window_hashes", lambda codes, n: real(codes, n) & np.uint64(3))
    monkeypatch.setattr(c, "CHUNK_TOKENS", 37)
    monkeypatch.setattr(c, "CHUNK_WORDS", 5)
    for m in c.METHODS:
        assert by_id(c.check_contamination(world["data"], tasks, method=m)) == want[m], m
    monkeypatch.undo()
    small = _prepare(world["corpus"], world["tok"], world["root"] / "small", "--shard-tokens", "50")
    assert len(json.loads((small / "manifest.json").read_text())["splits"]["train"]["shards"]) > 10
    for m in c.METHODS:
        assert by_id(c.check_contamination(small, tasks, method=m)) == want[m], m


def test_a_hash_hit_is_compared_symbol_by_symbol(monkeypatch):
    """With an 8-bit hash, training n-grams hit the task's hashes often; none may count."""
    real = c._window_hashes
    monkeypatch.setattr(c, "_window_hashes", lambda codes, n: real(codes, n) & np.uint64(0xFF))
    codes = c._codes(64)
    task = np.array([5, 6, 7, 8], dtype=np.int64)  # the n-grams (5, 6, 7) and (6, 7, 8)
    table = c._Table(task, codes[task + 2], np.arange(2), 3)
    assert len(table.hashes) == 2 and not table._collide  # two hashes: the vectorised path
    rng = np.random.default_rng(0)
    train = rng.choice(np.r_[0:5, 9:60], size=20_000)
    hashes = c._window_hashes(codes[train + 2], 3)
    assert np.isin(hashes, table.hashes).sum() > 20  # many false hits to reject
    table.scan(train, codes[train + 2])
    assert not table.found.any()
    train[1000:1003] = [6, 7, 8]
    table.scan(train, codes[train + 2])
    assert table.found.sum() == 1 and table.found[table.window_group[1]]  # (6, 7, 8) at 1


def test_the_index_agrees_with_brute_force():
    """Random symbols from a small alphabet (so matches are common), items of every length
    around n, training scanned in overlapping chunks: counts and shares as a set of tuples
    gives them."""
    rng = np.random.default_rng(1)
    train = rng.integers(0, 6, 3000)
    items = []
    for k in range(60):
        length = int(rng.integers(1, 12))
        if k % 2:  # a copy of some training text with one symbol changed
            start = int(rng.integers(0, len(train) - length))
            seq = train[start : start + length].copy()
            seq[rng.integers(0, length)] = rng.integers(0, 6)
        else:
            seq = rng.integers(0, 6, length)
        items.append((0, str(k), seq.tolist()))
    n = 5
    index = c._Index.build(items, n, c._codes(8))
    for a in range(0, len(train), 128):
        index.scan(train[max(a - n + 1, 0) : a + 128])
    seen = {tuple(train[i : i + w].tolist()) for w in range(1, n + 1) for i in range(len(train))}
    dirty = 0
    for e, (_, _, seq) in zip(index.entries, items, strict=True):
        w = min(n, len(seq))
        windows = [tuple(seq[i : i + w]) for i in range(len(seq) - w + 1)]
        covered = {i + k for i, g in enumerate(windows) if g in seen for k in range(w)}
        for method in c.METHODS:
            r = index.item_result(e, method, 0.8)
            assert r["ngrams"] == len(set(windows)) and r["length"] == len(seq)
            assert r["matches"] == len({g for g in windows if g in seen})
            if method == "llama2":
                assert r["share"] == round(len(covered) / len(seq), 6)
                assert r["dirty"] == (len(covered) / len(seq) >= 0.8)
                dirty += r["dirty"]
    assert 5 < dirty < 55  # both outcomes are well represented


def run(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    out = capsys.readouterr()
    assert "Traceback" not in out.err + out.out
    return code, out.out, out.err


def test_cli_writes_the_report_and_prints_the_table(world, capsys, tmp_path):
    out = tmp_path / "reports" / "contam.json"
    code, text, _ = run(capsys, "contamination", "--data", str(world["data"]), "--task",
                        str(world["task"]), "--out", str(out))  # fmt: skip
    assert code == 0
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("task "))
    assert lines[header].split() == ["task", "items", "dirty", "dirty", "%"]
    assert lines[header + 1].split() == ["quiz", "7", "3", "42.9%"]
    assert "planted" in text and "short-clean" not in text and str(out) in text
    report = c.read_report(out)
    task = load_task(str(world["task"]))
    assert report["tasks"][0]["sha256"] == task.sha256
    assert c.dirty_ids(out, task.sha256) == {"planted", "recased", "short"}
    assert c.dirty_ids(report, task.sha256) == {"planted", "recased", "short"}

    code, text, _ = run(capsys, "contamination", "--data", str(world["data"]), "--task",
                        str(world["task"]), "--method", "llama2", "--json")  # fmt: skip
    assert code == 0 and json.loads(text)["method"] == "llama2"
    dirty = {i["id"] for i in json.loads(text)["tasks"][0]["items"] if i["dirty"]}
    assert dirty == {"planted", "short", "split"}


def test_dirty_ids_refuses_a_report_on_other_data(world, tmp_path):
    report = c.check_contamination(world["data"], [load_task(str(world["task"]))])
    with pytest.raises(EvalError, match="covers no task with data sha256"):
        c.dirty_ids(report, "0" * 64)
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "something else"}')
    with pytest.raises(EvalError, match="format"):
        c.dirty_ids(bad, "0" * 64)
    with pytest.raises(EvalError, match="no such contamination report"):
        c.read_report(tmp_path / "none.json")


def test_clear_errors(world, capsys, tmp_path):
    base = ["contamination", "--task", str(world["task"])]
    code, _, err = run(capsys, *base, "--data", str(tmp_path / "nowhere"))
    assert code == 1 and "nowhere: no such dataset directory" in err

    moved = tmp_path / "moved"  # a copy of the dataset whose tokenizer is not where it was
    shutil.copytree(world["data"], moved)
    manifest = json.loads((moved / "manifest.json").read_text())
    manifest["tokenizer"]["path"] = str(tmp_path / "gone-tokenizer")
    (moved / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = run(capsys, *base, "--data", str(moved))
    assert code == 1 and "gone-tokenizer (tokenizer.path) is missing" in err
    assert "--tokenizer" in err
    code, _, _ = run(capsys, *base, "--data", str(moved), "--tokenizer", str(world["tok"]))
    assert code == 0

    other = _tokenizer(world["corpus"], tmp_path / "other-tok", vocab=300)
    code, _, err = run(capsys, *base, "--data", str(moved), "--tokenizer", str(other))
    assert code == 1 and "not the tokenizer" in err and "prepared with" in err

    code, _, err = run(capsys, *base, "--data", str(world["data"]), "--dirty-share", "0.5")
    assert code == 1 and "--dirty-share applies to --method llama2" in err
    code, _, err = run(capsys, *base, "--data", str(world["data"]), "--n", "0")
    assert code == 1 and "--n must be at least 1" in err
    code, _, err = run(capsys, "contamination", "--data", str(world["data"]), "--task",
                       str(world["data"]))  # fmt: skip
    assert code == 1 and "has no items to check" in err


def test_eval_marks_dirty_items_and_scores_the_clean_subset(world, capsys, tmp_path):
    from conftest import random_llama_dir

    from camelid.eval import results
    from camelid.tokenizer import Tokenizer

    tok = Tokenizer.load(world["tok"])
    model = random_llama_dir(tmp_path / "model", vocab_size=tok.vocab_size)
    tok.save(model)
    report = tmp_path / "contam.json"
    code, _, err = run(capsys, "contamination", "--data", str(world["data"]), "--task",
                       str(world["task"]), "--out", str(report))  # fmt: skip
    assert code == 0, err
    dirty = c.dirty_ids(report, load_task(str(world["task"])).sha256)
    assert dirty and len(dirty) < len(ITEMS)
    base = ["eval", str(model), "--task", str(world["task"]), "--contamination", str(report),
            "--ledger", str(tmp_path / "ledger.jsonl"), "-q", "--device", "cpu"]  # fmt: skip
    code, _, err = run(capsys, *base, "--out", str(tmp_path / "all.json"))
    assert code == 0, err
    r = results.read(tmp_path / "all.json")
    assert {i["id"] for i in r["items"] if i["dirty"]} == dirty
    assert r["metrics"]["clean"]["items"] == len(ITEMS) - len(dirty)
    assert r["task"]["contamination"]["dirty"] == len(dirty)
    code, _, err = run(capsys, *base, "--clean-only", "--shots", "1",
                       "--out", str(tmp_path / "clean.json"))  # fmt: skip
    assert code == 0, err
    r = results.read(tmp_path / "clean.json")
    assert r["task"]["scored"] == len(ITEMS) - len(dirty)
    assert not any(i["dirty"] for i in r["items"])
    code, _, err = run(capsys, "verify", str(tmp_path / "clean.json"), str(model),
                         "--sample", "-1")  # fmt: skip
    assert code == 0, err
