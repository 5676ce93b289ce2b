"""Sources, cleaning, dedup, prepare (shards, manifest, resume/refuse) and the loader."""

from __future__ import annotations

import gzip
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from camelid.data import CleanConfig, PrepareConfig, TokenLoader, prepare, read_manifest, sources
from camelid.data.clean import clean
from camelid.data.dedup import LSHIndex, MinHasher
from camelid.errors import DataError
from camelid.tokenizer import Tokenizer, train_tokenizer

WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "for",
    "on",
    "that",
    "with",
    "as",
    "by",
    "at",
    "from",
    "his",
    "her",
    "are",
    "were",
    "which",
    "this",
    "be",
    "river",
    "mountain",
    "history",
    "science",
    "music",
    "language",
    "system",
    "number",
    "energy",
    "city",
    "water",
    "light",
    "market",
    "model",
    "data",
    "train",
    "value",
    "function",
    "return",
    "class",
    "import",
    "print",
    "while",
    "define",
    "result",
]


def _doc(rng: random.Random, n_words: int = 300) -> str:
    lines, line = [], []
    for _ in range(n_words):
        line.append(rng.choice(WORDS))
        if len(line) >= rng.randint(6, 14):
            lines.append(" ".join(line))
            line = []
    return "\n".join(lines) + "\n"


def _near_copy(text: str, rng: random.Random) -> str:
    """Change ~2% of the words: a near duplicate (Jaccard of 5-grams well above 0.8)."""
    words = text.split(" ")
    for i in rng.sample(range(len(words)), max(1, len(words) // 50)):
        words[i] = rng.choice(WORDS)
    return " ".join(words)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """40 distinct documents, plus 5 exact and 5 near copies of some of them."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    docs = [_doc(rng) for _ in range(40)]
    for i, d in enumerate(docs):
        (root / f"doc{i:03d}.txt").write_text(d)
    for i in range(5):
        (root / f"exact{i}.txt").write_text(docs[i])
        (root / f"near{i}.txt").write_text(_near_copy(docs[10 + i], rng))
    return root


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, corpus) -> Path:
    texts = [p.read_text() for p in sorted(corpus.iterdir())] + ["日本語 中文 😀 é ü 123"]
    tok = train_tokenizer(texts, vocab_size=600, num_special=16)
    out = tmp_path_factory.mktemp("tok")
    tok.save(out)
    return out


def _config(corpus: Path, **kw) -> PrepareConfig:
    return PrepareConfig(corpus=(str(corpus),), val_fraction=0.1, **kw)


# --------------------------------------------------------------------------------- sources
def test_directory_sources_skip_and_count(tmp_path):
    (tmp_path / "a.py").write_text("print('hello world')\n" * 10)
    (tmp_path / "b.bin").write_bytes(b"\x00\x01\x02" * 100)
    (tmp_path / "c.txt").write_bytes("caf\xe9 latin-1".encode("latin-1"))
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "config").write_text("ignored")
    tasks = sources.resolve(str(tmp_path))
    assert [t.name for t in tasks] == ["a.py", "b.bin", "c.txt"]
    stats = sources.ReadStats()
    docs = [d for t in tasks for d in sources.read(t, stats)[1]]
    assert [d.key for d in docs] == ["a.py"]
    assert (stats.binary_files, stats.non_utf8_files) == (1, 1)
    assert [t.name for t in sources.resolve(str(tmp_path), ["*.py"])] == ["a.py"]
    with pytest.raises(DataError, match=r"no files matching \*\.md"):
        sources.resolve(str(tmp_path), ["*.md"])
    with pytest.raises(DataError, match="no such file or directory"):
        sources.resolve(str(tmp_path / "missing"))


def test_jsonl_bad_lines_are_counted_with_line_numbers(tmp_path):
    lines = ['{"text": "one"}', "not json", '{"body": "x"}', "", '{"text": "two"}', "[1, 2]"]
    path = tmp_path / "d.jsonl.gz"
    path.write_bytes(gzip.compress("\n".join(lines).encode()))
    stats = sources.ReadStats()
    (task,) = sources.resolve(str(path))
    docs = list(sources.read(task, stats)[1])
    assert [d.text for d in docs] == ["one", "two"]
    assert (stats.bad_json_lines, stats.missing_field) == (1, 2)
    assert stats.first_bad_lines[0].startswith("d.jsonl.gz:2 (not JSON)")
    assert "d.jsonl.gz:3" in stats.first_bad_lines[1]
    assert stats.fields_found == ["body"]  # what the records without 'text' do have


def test_fields_found_merge_the_same_whatever_the_order():
    a, b = sources.ReadStats(), sources.ReadStats()
    a.note_fields(["id", "content"])
    b.note_fields(["url", "content"])
    ab, ba = sources.ReadStats(), sources.ReadStats()
    ab.merge(a), ab.merge(b), ba.merge(b), ba.merge(a)
    assert ab.fields_found == ba.fields_found == ["content", "id", "url"]


def test_parquet_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["alpha", None, "gamma"], "id": [1, 2, 3]}),
                   tmp_path / "t.parquet")  # fmt: skip
    (task,) = sources.resolve(str(tmp_path / "t.parquet"), text_field="content")
    stats = sources.ReadStats()
    assert [d.text for d in sources.read(task, stats)[1]] == ["alpha", "gamma"]
    assert stats.missing_field == 1
    (task,) = sources.resolve(str(tmp_path / "t.parquet"))
    with pytest.raises(DataError, match=r"no column 'text' .*content, id"):
        list(sources.read(task, sources.ReadStats())[1])


def test_builtin_corpus_is_the_stdlib_split_by_file():
    tasks = sources.resolve(sources.BUILTIN)
    names = [t.name for t in tasks]
    assert len(tasks) > 500 and names == sorted(names)
    assert "stdlib/os.py" in names and not any("site-packages" in n for n in names)
    val = [n for n in names if sources.is_validation(n, 0.02)]
    assert 0 < len(val) < 0.05 * len(names)
    assert val == [n for n in names if sources.is_validation(n, 0.02)]  # deterministic


# -------------------------------------------------------------------------------- cleaning
def test_filters_and_normalisation():
    cfg = CleanConfig(min_chars=10, max_chars=1000, max_line_chars=100)
    assert clean("short", cfg)[1] == "too_short"
    assert clean("x" * 2000, cfg)[1] == "too_long"
    assert clean("#$%^&*()!@" * 5, cfg)[1] == "low_alnum"
    assert clean("same line\n" * 20 + "other\n", cfg)[1] == "repeated_lines"
    assert clean("a" * 150 + "\nfine", cfg)[1] == "long_line"
    text, rejected = clean("cafe\u0301 is a fine place to sit", cfg)  # decomposed é
    assert rejected is None and "caf\u00e9" in text


# ----------------------------------------------------------------------------------- dedup
def test_minhash_estimates_jaccard():
    mh = MinHasher(num_perm=256)
    rng = np.random.default_rng(0)
    a = rng.integers(0, 1000, 3000)
    b = a.copy()
    b[1500:] = rng.integers(0, 1000, 1500)
    sa, sb = (
        set(map(bytes, np.lib.stride_tricks.sliding_window_view(a, 5))),
        set(map(bytes, np.lib.stride_tricks.sliding_window_view(b, 5))),
    )
    true = len(sa & sb) / len(sa | sb)
    est = np.mean(mh.signature(a) == mh.signature(b))
    assert abs(est - true) < 0.08


def test_lsh_flags_near_duplicates_only():
    mh, lsh = MinHasher(), LSHIndex(threshold=0.8)
    rng = np.random.default_rng(1)
    base = [rng.integers(0, 500, 800) for _ in range(20)]
    assert all(lsh.add_if_new(mh.signature(x)) for x in base)
    near = base[3].copy()
    near[::100] = 7  # ~1% of positions changed
    assert not lsh.add_if_new(mh.signature(near))
    assert lsh.add_if_new(mh.signature(rng.integers(0, 500, 800)))


# --------------------------------------------------------------------------------- prepare
def test_prepare_removes_planted_duplicates(tmp_path, corpus, tokenizer_dir):
    m = prepare(_config(corpus), tokenizer_dir, tmp_path / "ds", workers=1, progress=False)
    assert m["stats"]["documents"] == 50
    assert m["stats"]["removed"]["exact_duplicates"] == 5
    assert m["stats"]["removed"]["near_duplicates"] == 5
    assert m["stats"]["kept"] == 40
    splits = m["splits"]
    assert splits["train"]["documents"] + splits["validation"]["documents"] == 40
    assert splits["validation"]["documents"] > 0
    # Shards hold BOS doc EOS for every kept document, and decode back to the documents.
    tok = Tokenizer.load(tokenizer_dir)
    data = np.fromfile(tmp_path / "ds" / splits["train"]["shards"][0]["file"], dtype=m["dtype"])
    assert data[0] == tok.bos_id and data[-1] == tok.eos_id
    assert (data == tok.bos_id).sum() == splits["train"]["documents"]
    first = data[1 : int(np.argmax(data == tok.eos_id))]
    assert tok.decode(first.tolist()) in {p.read_text() for p in corpus.iterdir()}
    assert [s["name"] for s in m["sources"]][:2] == ["doc000.txt", "doc001.txt"]
    assert m["tokenizer"]["digest"] == tok.digest and m["dtype"] == "uint16"


def test_prepare_is_independent_of_workers_and_shard_cut(tmp_path, corpus, tokenizer_dir):
    cfg = _config(corpus, shard_tokens=5000)
    a = prepare(cfg, tokenizer_dir, tmp_path / "a", workers=1, progress=False)
    b = prepare(cfg, tokenizer_dir, tmp_path / "b", workers=2, progress=False)
    assert a["splits"] == b["splits"] and len(a["splits"]["train"]["shards"]) > 1
    for shard in a["splits"]["train"]["shards"]:
        assert (tmp_path / "a" / shard["file"]).read_bytes() == (
            tmp_path / "b" / shard["file"]
        ).read_bytes()


def test_rerun_reuses_and_other_dataset_is_refused(tmp_path, corpus, tokenizer_dir):
    out = tmp_path / "ds"
    first = prepare(_config(corpus), tokenizer_dir, out, workers=1, progress=False)
    mtime = (out / "manifest.json").stat().st_mtime_ns
    again = prepare(_config(corpus), tokenizer_dir, out, workers=1, progress=False)
    assert again == first and (out / "manifest.json").stat().st_mtime_ns == mtime
    other = _config(corpus, near_dedup=False)
    with pytest.raises(DataError, match=r"different dataset.*--overwrite"):
        prepare(other, tokenizer_dir, out, workers=1, progress=False)
    m = prepare(other, tokenizer_dir, out, workers=1, progress=False, overwrite=True)
    assert m["stats"]["removed"]["near_duplicates"] == 0
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty"):
        prepare(other, tokenizer_dir, stranger, workers=1, progress=False)


def test_empty_or_all_filtered_corpus(tmp_path, tokenizer_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blob.dat").write_bytes(b"\0" * 10)
    with pytest.raises(DataError, match="holds no documents; skipped 1 binary"):
        prepare(_config(empty), tokenizer_dir, tmp_path / "o1", workers=1, progress=False)
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    (tiny / "a.txt").write_text("hi")
    with pytest.raises(DataError, match="all 1 documents were removed: too_short 1"):
        prepare(_config(tiny), tokenizer_dir, tmp_path / "o2", workers=1, progress=False)


def test_missing_text_field_lists_the_fields_and_leaves_nothing(tmp_path, tokenizer_dir):
    src = tmp_path / "records"
    src.mkdir()
    rows = [{"content": _doc(random.Random(i)), "id": i} for i in range(6)]
    (src / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "new" / "ds"  # neither directory exists yet
    with pytest.raises(DataError) as err:
        prepare(_config(src), tokenizer_dir, out, workers=1, progress=False)
    assert "none of its 6 record(s) has a string field 'text'" in str(err.value)
    assert "fields found: content, id" in str(err.value) and "--text-field" in str(err.value)
    assert not (tmp_path / "new").exists()  # what it created, it removed
    m = prepare(_config(src, text_field="content"), tokenizer_dir, out, workers=1, progress=False)
    assert m["stats"]["kept"] == 6


def test_failed_run_takes_back_its_shards_and_nothing_else(tmp_path, corpus, tokenizer_dir):
    src = tmp_path / "src"
    src.mkdir()
    for p in sorted(corpus.iterdir()):
        (src / p.name).write_bytes(p.read_bytes())
    (src / "zz.jsonl.gz").write_bytes(b"not gzip at all")  # read last, after shards are cut
    out = tmp_path / "ds"
    out.mkdir()
    (out / "notes.txt").write_text("the user's own")
    # An earlier dataset beside a file of the user's: --overwrite replaces the dataset's files
    # only, and the failed run then removes only what it wrote.
    first = prepare(_config(corpus), tokenizer_dir, tmp_path / "ok", workers=1, progress=False)
    for name in os.listdir(tmp_path / "ok"):
        (out / name).write_bytes((tmp_path / "ok" / name).read_bytes())
    cfg = _config(src, shard_tokens=500)
    with pytest.raises(DataError, match=r"zz\.jsonl\.gz: not a readable gzip file"):
        prepare(cfg, tokenizer_dir, out, workers=2, progress=False, overwrite=True)
    assert sorted(os.listdir(out)) == ["notes.txt"]  # its shards and marker gone, notes kept
    (src / "zz.jsonl.gz").unlink()  # the corrected re-run: the same command
    m = prepare(cfg, tokenizer_dir, out, workers=1, progress=False, overwrite=True)
    assert m["stats"]["kept"] == first["stats"]["kept"]
    assert len(m["splits"]["train"]["shards"]) > 1


def test_binary_corpus_then_the_right_one(tmp_path, corpus, tokenizer_dir):
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    for i in range(3):
        (blobs / f"b{i}.dat").write_bytes(b"\0\1" * 50)
    out = tmp_path / "ds"
    out.mkdir()  # an empty directory of the user's: kept, and still empty
    with pytest.raises(DataError, match="skipped 3 binary file"):
        prepare(_config(blobs), tokenizer_dir, out, workers=1, progress=False)
    assert out.is_dir() and not any(out.iterdir())
    assert prepare(_config(corpus), tokenizer_dir, out, workers=1, progress=False)["stats"]["kept"]


SCRIPT = """
import sys
from camelid.data import PrepareConfig, prepare
cfg = PrepareConfig(corpus=(sys.argv[1],), val_fraction=0.1, shard_tokens=4000)
prepare(cfg, sys.argv[2], sys.argv[3], workers=1, progress=False)
"""


def test_sigkill_then_rerun_gives_identical_shards(tmp_path, tokenizer_dir):
    big = tmp_path / "big"
    big.mkdir()
    rng = random.Random(5)
    for i in range(300):
        (big / f"f{i:04d}.txt").write_text(_doc(rng, 600))
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(big), str(tokenizer_dir), killed])
    deadline = time.time() + 60
    while time.time() < deadline and len(list(killed.glob("train-*.bin"))) < 3:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "prepare finished before it could be killed"
    assert not (killed / "manifest.json").exists()
    subprocess.run([sys.executable, "-c", SCRIPT, str(big), str(tokenizer_dir), killed], check=True)
    clean_run = tmp_path / "clean"
    subprocess.run(
        [sys.executable, "-c", SCRIPT, str(big), str(tokenizer_dir), clean_run], check=True
    )
    names = sorted(p.name for p in clean_run.iterdir())
    assert names == sorted(p.name for p in killed.iterdir())
    for name in names:
        if name.endswith(".bin"):
            assert (killed / name).read_bytes() == (clean_run / name).read_bytes(), name
    assert read_manifest(killed)["splits"] == read_manifest(clean_run)["splits"]


# ---------------------------------------------------------------------------------- loader
@pytest.fixture(scope="module")
def dataset(tmp_path_factory, corpus, tokenizer_dir) -> Path:
    out = tmp_path_factory.mktemp("ds")
    prepare(_config(corpus, shard_tokens=3000), tokenizer_dir, out, workers=1, progress=False)
    return out


def test_loader_batches_and_determinism(dataset):
    a = TokenLoader(dataset, batch_size=4, seq_len=32, seed=7)
    b = TokenLoader(dataset, batch_size=4, seq_len=32, seed=7)
    x, y = next(a)
    assert x.shape == y.shape == (4, 32) and str(x.dtype) == "torch.int64"
    assert (x[:, 1:] == y[:, :-1]).all()
    xb, _ = next(b)
    assert (x == xb).all()
    c = TokenLoader(dataset, batch_size=4, seq_len=32, seed=8)
    assert not (next(c)[0] == x).all()


def test_loader_resumes_with_the_identical_next_batch(dataset):
    a = TokenLoader(dataset, batch_size=3, seq_len=16, seed=1)
    n = a.batches_per_epoch + 5  # cross an epoch boundary
    for _ in range(n):
        next(a)
    state = a.state_dict()
    expected = [next(a) for _ in range(3)]
    b = TokenLoader(dataset, batch_size=3, seq_len=16, seed=1)
    b.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON round trip
    for (x, y), (xe, ye) in zip((next(b) for _ in range(3)), expected, strict=True):
        assert (x == xe).all() and (y == ye).all()
    wrong = TokenLoader(dataset, batch_size=3, seq_len=8, seed=1)
    with pytest.raises(DataError, match="seq_len"):
        wrong.load_state_dict(state)


def test_two_ranks_see_disjoint_data(dataset):
    def windows(rank: int) -> set:
        loader = TokenLoader(dataset, batch_size=2, seq_len=16, seed=3, rank=rank, world_size=2)
        return {tuple(row.tolist()) for _ in range(len(loader)) for row in next(loader)[0]}

    r0, r1 = windows(0), windows(1)
    assert r0 and r1 and not (r0 & r1)
    whole = TokenLoader(dataset, batch_size=2, seq_len=16, seed=3)
    assert len(r0) + len(r1) >= 0.9 * whole.num_windows


def test_loader_rejects_a_truncated_shard(tmp_path, dataset):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)
    shard = sorted(copy.glob("train-*.bin"))[0]
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(DataError, match=r"expected .* bytes"):
        TokenLoader(copy)
    with pytest.raises(DataError, match="never prepared"):
        TokenLoader(tmp_path)


def test_validation_split_in_order(dataset):
    val = TokenLoader(dataset, split="validation", batch_size=1, seq_len=16, shuffle=False)
    first = next(val)[0]
    data = np.fromfile(dataset / "validation-00000.bin", dtype=read_manifest(dataset)["dtype"])
    assert first[0].tolist() == data[:16].tolist()
    assert os.path.exists(dataset / "manifest.json")
