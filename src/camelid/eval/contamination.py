"""Contamination: which task items already appear in a prepared dataset's training tokens.

Two methods, both exact (no sampling, no approximate sketch):

- ``ngram`` (GPT-3 style): the item and every training document are normalised to words
  (:func:`normalize_words`); an item is dirty when any of its n-word n-grams (default 13) occurs
  inside one training document. An item shorter than n words is one n-gram of all its words.
- ``llama2`` (the Llama 2 paper's token-level measure, exact-match variant): the item is
  tokenised with the dataset's tokenizer; a token is contaminated when it lies inside a token
  n-gram (default 11, "more than 10 tokens") that also occurs in the training tokens; the
  item's share is its contaminated tokens over its tokens, and it is dirty at a share of
  ``dirty_share`` (0.8) or more. The paper also allows up to four mismatched tokens inside a
  match; this does not. An item shorter than n tokens is one n-gram of all its tokens.

Memory is bounded by the tasks, not the corpus: the distinct n-grams of every item are hashed
(64-bit polynomial hashes of random per-symbol codes) and sorted once; the training shards are
then streamed chunk by chunk (``np.memmap``), every training n-gram of a chunk is hashed with
the same vectorised rolling hash and looked up with ``np.searchsorted``, and each hash hit is
compared with the task n-gram it names, symbol by symbol, so a hash collision can never mark
an item. The report is a JSON file (:func:`write_report`); :func:`dirty_ids` reads back which
items of a task (named by its data's SHA-256) were found, so an evaluation can leave them out.
"""

from __future__ import annotations

import functools
import hashlib
import json
import string
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from camelid.data.loader import read_manifest
from camelid.data.pipeline import MANIFEST
from camelid.errors import DataError, TokenizerError
from camelid.eval.tasks import EvalError, Task
from camelid.io import write_text_atomic

FORMAT = "camelid-contamination/1"
METHODS = ("ngram", "llama2")
DEFAULT_N = {"ngram": 13, "llama2": 11}
DIRTY_SHARE = 0.8
SPLIT = "train"  # what a model was trained on; the validation split is held out

CHUNK_TOKENS = 1 << 22  # training tokens read (and hashed) at a time
CHUNK_WORDS = 1 << 21  # training words hashed at a time (ngram)
MAX_DOCUMENT_TOKENS = 1 << 24  # a run longer than this without BOS/EOS is cut (never in prepare)
_VERIFY_BLOCK = 1 << 16  # hash hits compared symbol by symbol at a time
_BASE = np.uint64(0x9E3779B97F4A7C15)  # odd multiplier of the polynomial hash (wraps mod 2^64)
_UNKNOWN = -1  # a training word no task item has, and the separator between documents


# ----------------------------------------------------------------------------- normalising
_ASCII_PUNCTUATION = str.maketrans(string.punctuation, " " * len(string.punctuation))


@functools.cache
def _is_punctuation(char: str) -> bool:
    return char in string.punctuation or unicodedata.category(char).startswith("P")


def normalize_words(text: str) -> list[str]:
    """The words the ``ngram`` method compares: NFKC, lower-case, every punctuation character
    (Unicode category P*, and ASCII ``string.punctuation``, which also holds the symbols
    $+<=>^`|~) replaced by a space, split on whitespace. A space, not nothing: "a,b", "a, b"
    and "a - b" agree (while "don't" is "don t", not "dont")."""
    text = unicodedata.normalize("NFKC", text).lower()
    if text.isascii():  # str.translate's fast path
        return text.translate(_ASCII_PUNCTUATION).split()
    for char in [c for c in set(text) if _is_punctuation(c)]:
        text = text.replace(char, " ")
    return text.split()


# -------------------------------------------------------------------------------- hashing
def _codes(size: int) -> np.ndarray:
    """Random 64-bit codes for the symbols ``-2 .. size-3`` (indexed by symbol + 2), the same
    in every run. Only speed depends on them: every hit is verified exactly."""
    rng = np.random.default_rng(0x636F6E74)
    return np.frombuffer(rng.bytes(8 * size), dtype=np.uint64).copy()


def _window_hashes(codes: np.ndarray, length: int) -> np.ndarray:
    """The hash of every window of ``length`` consecutive codes: sum of code[i+k]·B^(L-1-k)
    mod 2^64, computed by Horner's rule across the window offsets (L vectorised passes)."""
    m = len(codes) - length + 1
    if m <= 0:
        return np.empty(0, dtype=np.uint64)
    h = codes[:m].copy()
    for k in range(1, length):
        np.multiply(h, _BASE, out=h)
        np.add(h, codes[k : k + m], out=h)
    return h


def _equal(a: np.ndarray, at: np.ndarray, b: np.ndarray, bt: np.ndarray, length: int) -> np.ndarray:
    """Whether the window of ``a`` at each ``at`` equals the window of ``b`` at ``bt``."""
    offsets = np.arange(length)
    return (a[at[:, None] + offsets] == b[bt[:, None] + offsets]).all(axis=1)


# ------------------------------------------------------------------------------ the index
class _Table:
    """The distinct n-grams of one length over all task items: their hashes (sorted), a
    representative start in the task sequence for exact comparison, and whether each was found
    in the training data. Distinct n-grams that share a hash are kept apart in ``_collide``."""

    def __init__(self, seq: np.ndarray, codes: np.ndarray, starts: np.ndarray, length: int):
        self.seq, self.length = seq, length
        h = _window_hashes(codes, length)[starts]
        order = np.argsort(h, kind="stable")
        hs, st = h[order], starts[order]
        new = np.ones(len(hs), dtype=bool)
        new[1:] = hs[1:] != hs[:-1]
        first = np.maximum.accumulate(np.where(new, np.arange(len(hs)), 0))
        same = np.ones(len(hs), dtype=bool)
        for a in range(0, len(hs), _VERIFY_BLOCK):
            b = slice(a, a + _VERIFY_BLOCK)
            same[b] = _equal(seq, st[b], seq, st[first[b]], length)
        group = np.cumsum(new) - 1
        self.hashes, self.rep = hs[new], st[new]
        self._collide: dict[int, dict[tuple[int, ...], int]] = {}
        groups = len(self.hashes)
        for g in np.unique(group[~same]):  # a 64-bit collision among the task's n-grams: rare
            by_gram: dict[tuple[int, ...], int] = {}
            for j in np.flatnonzero(group == g):
                gram = tuple(seq[st[j] : st[j] + length].tolist())
                if gram not in by_gram:  # the first is the group's own; others get new ids
                    by_gram[gram] = int(g) if not by_gram else groups
                    groups += len(by_gram) > 1
                group[j] = by_gram[gram]
            self._collide[int(self.hashes[g])] = by_gram
        self.window_group = np.empty(len(starts), dtype=np.int64)
        self.window_group[order] = group
        self.found = np.zeros(groups, dtype=bool)
        self._collide_keys = np.array(sorted(self._collide), dtype=np.uint64)
        # A filter on the hashes' top bits (about 64 slots per n-gram) spares the binary search
        # for nearly every training window: it can only let a non-member through, never stop one.
        bits = int(min(max(np.ceil(np.log2(64 * len(self.hashes))), 16), 27))
        self._shift = np.uint64(64 - bits)
        self._filter = np.zeros(1 << bits, dtype=bool)
        self._filter[self.hashes >> self._shift] = True

    def scan(self, seq: np.ndarray, codes: np.ndarray) -> None:
        """Mark the n-grams of ``seq`` (training symbols; ``codes`` their codes) found."""
        h = _window_hashes(codes, self.length)
        if not len(h):
            return
        maybe = np.flatnonzero(self._filter[h >> self._shift])
        idx = np.searchsorted(self.hashes, h[maybe])
        np.minimum(idx, len(self.hashes) - 1, out=idx)
        keep = self.hashes[idx] == h[maybe]
        hit, idx = maybe[keep], idx[keep]
        if not len(hit):
            return
        if len(self._collide_keys):
            odd = np.isin(h[hit], self._collide_keys)
            for j in hit[odd]:
                gram = tuple(seq[j : j + self.length].tolist())
                g = self._collide[int(h[j])].get(gram)
                if g is not None:
                    self.found[g] = True
            hit, idx = hit[~odd], idx[~odd]
        for a in range(0, len(hit), _VERIFY_BLOCK):
            pos, g = hit[a : a + _VERIFY_BLOCK], idx[a : a + _VERIFY_BLOCK]
            ok = _equal(seq, pos, self.seq, self.rep[g], self.length)
            self.found[g[ok]] = True


@dataclass
class _Entry:
    """One item: its symbols' place in the task sequence and its windows in its table."""

    task: int
    item_id: str
    offset: int
    length: int  # words (ngram) or tokens (llama2)
    window: int = 0  # the n-gram length used: n, or the whole item when shorter
    first: int = 0  # index of its first window among its table's windows


@dataclass
class _Index:
    """Every task item as symbols in one sequence, with a :class:`_Table` per n-gram length."""

    n: int
    seq: np.ndarray
    entries: list[_Entry]
    codes: np.ndarray
    tables: dict[int, _Table] = field(default_factory=dict)

    @classmethod
    def build(cls, items: Sequence[tuple[int, str, Sequence[int]]], n: int, codes: np.ndarray):
        entries, parts, offset = [], [], 0
        starts: dict[int, list[np.ndarray]] = {}
        counts: dict[int, int] = {}
        for task, item_id, symbols in items:
            e = _Entry(task, item_id, offset, len(symbols))
            if len(symbols):
                e.window = min(n, len(symbols))
                windows = len(symbols) - e.window + 1
                e.first = counts.get(e.window, 0)
                counts[e.window] = e.first + windows
                starts.setdefault(e.window, []).append(offset + np.arange(windows))
                parts.append(np.asarray(symbols, dtype=np.int64))
                offset += len(symbols)
            entries.append(e)
        seq = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
        index = cls(n, seq, entries, codes)
        task_codes = codes[seq + 2]
        for length, s in starts.items():
            index.tables[length] = _Table(seq, task_codes, np.concatenate(s), length)
        return index

    def scan(self, seq: np.ndarray) -> None:
        codes = self.codes[seq + 2]
        for table in self.tables.values():
            table.scan(seq, codes)

    def item_result(self, e: _Entry, method: str, dirty_share: float) -> dict[str, Any]:
        if not e.window:
            return {"id": e.item_id, "dirty": False, "matches": 0, "share": 0.0, "ngrams": 0,
                    "length": 0}  # fmt: skip
        table = self.tables[e.window]
        windows = e.length - e.window + 1
        groups = table.window_group[e.first : e.first + windows]
        hit = table.found[groups]
        distinct = len(np.unique(groups))
        matches = len(np.unique(groups[hit]))
        if method == "ngram":
            share = matches / distinct
            dirty = matches > 0
        else:  # tokens inside a found window: +1 where one starts, -1 past where it ends
            cover = np.zeros(e.length + 1, dtype=np.int64)
            at = np.flatnonzero(hit)
            np.add.at(cover, at, 1)
            np.add.at(cover, at + e.window, -1)
            share = float(np.count_nonzero(np.cumsum(cover[:-1]))) / e.length
            dirty = share >= dirty_share
        return {"id": e.item_id, "dirty": bool(dirty), "matches": int(matches),
                "share": round(float(share), 6), "ngrams": int(distinct),
                "length": int(e.length)}  # fmt: skip


# -------------------------------------------------------------------------- training data
@dataclass
class _Data:
    path: Path
    manifest: dict[str, Any]
    tokenizer: Any  # camelid.tokenizer.Tokenizer
    shards: list[tuple[Path, int]]  # (file, tokens) of the training split
    dtype: np.dtype

    @property
    def tokens(self) -> int:
        return sum(t for _, t in self.shards)


def _open_data(data_dir: str | Path, tokenizer: str | Path | None) -> _Data:
    from camelid.tokenizer import Tokenizer

    path = Path(data_dir)
    manifest = read_manifest(path)
    where = path / MANIFEST
    try:
        info = manifest["tokenizer"]
        recorded, digest = info["path"], info["digest"]
        dtype = np.dtype(manifest["dtype"])
        shards = manifest["splits"][SPLIT]["shards"]
    except (KeyError, TypeError) as e:
        raise DataError(f"{where}: no field {e} (not written by camelid prepare?)") from None
    source = Path(tokenizer) if tokenizer is not None else Path(recorded)
    if not source.exists():
        if tokenizer is not None:
            raise TokenizerError(f"--tokenizer {tokenizer}: no such file or directory")
        raise TokenizerError(
            f"{where}: the dataset's tokenizer {recorded} (tokenizer.path) is missing; pass "
            "--tokenizer with the tokenizer it was prepared with"
        )
    tok = Tokenizer.load(source)
    if tok.digest != digest:
        raise TokenizerError(
            f"{source}: not the tokenizer {where} was prepared with (digest "
            f"{tok.digest[:12]}…, the dataset's is {str(digest)[:12]}…)"
        )
    files = []
    for shard in shards:
        file = path / shard["file"]
        expected = int(shard["tokens"]) * dtype.itemsize
        if not file.exists() or file.stat().st_size != expected:
            found = f"{file.stat().st_size} bytes" if file.exists() else "no file"
            raise DataError(f"{file}: expected {expected} bytes ({where}), found {found}")
        files.append((file, int(shard["tokens"])))
    if not files:
        raise DataError(f"{where}: the {SPLIT} split has no shards")
    return _Data(path, manifest, tok, files, dtype)


def _chunks(data: _Data, bar: Any) -> Iterator[np.ndarray]:
    """The training tokens in order, ``CHUNK_TOKENS`` at a time, each checked against the
    vocabulary (a shard that does not fit the tokenizer is an error, not a silent miss)."""
    vocab = data.tokenizer.vocab_size
    for file, tokens in data.shards:
        if tokens == 0:
            continue
        shard = np.memmap(file, dtype=data.dtype, mode="r")
        for a in range(0, tokens, CHUNK_TOKENS):
            chunk = np.asarray(shard[a : a + CHUNK_TOKENS], dtype=np.int64)
            top = int(chunk.max())
            if top >= vocab:
                raise DataError(
                    f"{file}: token id {top} is outside the tokenizer's vocabulary ({vocab} ids)"
                )
            yield chunk
            bar.update(len(chunk))


def _documents(chunks: Iterator[np.ndarray], bos: int, eos: int) -> Iterator[np.ndarray]:
    """Split the token stream into documents: prepare writes each one as ``BOS ids EOS`` and a
    document may continue into the next shard; BOS and EOS themselves are dropped."""
    pending: list[np.ndarray] = []
    held = 0
    for chunk in chunks:
        prev = 0
        for cut in np.flatnonzero((chunk == bos) | (chunk == eos)).tolist():
            if cut > prev:
                pending.append(chunk[prev:cut])
            if pending:
                yield np.concatenate(pending)
                pending, held = [], 0
            prev = cut + 1
        if prev < len(chunk):
            pending.append(chunk[prev:])
            held += len(chunk) - prev
            if held >= MAX_DOCUMENT_TOKENS:  # no delimiters: bound the memory
                yield np.concatenate(pending)
                pending, held = [], 0
    if pending:
        yield np.concatenate(pending)


# ----------------------------------------------------------------------------------- main
def check_contamination(
    data_dir: str | Path,
    tasks: Sequence[Task],
    *,
    method: str = "ngram",
    n: int | None = None,
    dirty_share: float = DIRTY_SHARE,
    tokenizer: str | Path | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Check every item of ``tasks`` against the training split of the prepared dataset in
    ``data_dir``; return the report (see :func:`write_report`). ``tokenizer`` overrides the
    tokenizer path the manifest records (it must have the same digest)."""
    if method not in METHODS:
        raise EvalError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    n = DEFAULT_N[method] if n is None else n
    if n < 1:
        raise EvalError(f"--n must be at least 1, got {n}")
    if not 0 < dirty_share <= 1:
        raise EvalError(f"--dirty-share must be in (0, 1], got {dirty_share}")
    for task in tasks:
        if not task.items:
            raise EvalError(
                f"--task {task.source}: has no items to check (a prepared dataset as a task is "
                "scored on its tokens; it has no items)"
            )
    data = _open_data(data_dir, tokenizer)
    tok = data.tokenizer
    from tqdm import tqdm

    bar = tqdm(total=data.tokens, unit="tok", unit_scale=True, desc=f"contamination {method}",
               disable=not progress, leave=False)  # fmt: skip
    with bar:
        if method == "ngram":
            vocab: dict[str, int] = {}  # every word of every item, numbered

            def word_ids(text: str) -> list[int]:
                return [vocab.setdefault(w, len(vocab)) for w in normalize_words(text)]

            items = [
                (t, item.id, word_ids(item.text()))
                for t, task in enumerate(tasks)
                for item in task.items
            ]
            index = _Index.build(items, n, _codes(len(vocab) + 2))
            _scan_words(index, data, vocab, bar)
        else:
            form = data.manifest.get("recipe", {}).get("config", {}).get("clean", {})
            form = form.get("normalize", "none")
            items = [
                (t, item.id, tok.encode(_as_prepared(item.text(), form)))
                for t, task in enumerate(tasks)
                for item in task.items
            ]
            index = _Index.build(items, n, _codes(tok.vocab_size + 2))
            for chunk in _overlapping(_chunks(data, bar), max(index.tables, default=1)):
                index.scan(chunk)
    results: list[list[dict[str, Any]]] = [[] for _ in tasks]
    for e in index.entries:
        results[e.task].append(index.item_result(e, method, dirty_share))
    return {
        "format": FORMAT,
        "data": {
            "path": str(data.path.resolve()),
            "manifest_sha256": hashlib.sha256((data.path / MANIFEST).read_bytes()).hexdigest(),
            "recipe_digest": data.manifest.get("recipe_digest"),
            "tokenizer_digest": tok.digest,
            "split": SPLIT,
            "tokens": data.tokens,
            "documents": data.manifest["splits"][SPLIT].get("documents"),
        },
        "method": method,
        "n": n,
        "dirty_share": dirty_share if method == "llama2" else None,
        "tasks": [
            {
                "name": task.name,
                "kind": task.kind,
                "source": task.source,
                "sha256": task.sha256,
                "total": len(res),
                "dirty": sum(r["dirty"] for r in res),
                "items": res,
            }
            for task, res in zip(tasks, results, strict=True)
        ],
    }


def _as_prepared(text: str, form: str) -> str:
    """The item as prepare would have stored it: the dataset's Unicode normalisation."""
    return text if form == "none" else unicodedata.normalize(form, text)


def _overlapping(chunks: Iterator[np.ndarray], longest: int) -> Iterator[np.ndarray]:
    """Chunks that each begin with the previous one's last ``longest - 1`` tokens, so a window
    across a chunk (or shard) boundary is seen; a window seen twice only sets a flag twice."""
    tail = np.empty(0, dtype=np.int64)
    for chunk in chunks:
        x = np.concatenate([tail, chunk]) if len(tail) else chunk
        yield x
        tail = x[max(len(x) - (longest - 1), 0) :] if longest > 1 else tail


def _scan_words(index: _Index, data: _Data, vocab: dict[str, int], bar: Any) -> None:
    """Decode each training document, normalise it to words, map the words to the task's word
    ids (a word no item has can be in no match: ``_UNKNOWN``) and scan them in chunks, with
    ``_UNKNOWN`` between documents so no n-gram spans two."""
    tok = data.tokenizer
    get = vocab.get
    buf: list[int] = []
    for doc in _documents(_chunks(data, bar), tok.bos_id, tok.eos_id):
        buf += [get(w, _UNKNOWN) for w in normalize_words(tok.decode(doc.tolist()))]
        buf.append(_UNKNOWN)
        if len(buf) >= CHUNK_WORDS:
            index.scan(np.array(buf, dtype=np.int64))
            buf = []
    if buf:
        index.scan(np.array(buf, dtype=np.int64))


# -------------------------------------------------------------------------------- reports
def write_report(report: dict[str, Any], path: str | Path) -> None:
    """Write ``report`` as JSON, atomically (a killed run never leaves half a report)."""
    path = Path(path)
    if path.parent != Path("."):
        path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(report, indent=1, ensure_ascii=False) + "\n")


def read_report(path: str | Path) -> dict[str, Any]:
    """Read a report written by :func:`write_report`, checking its shape."""
    path = Path(path)
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EvalError(f"{path}: no such contamination report") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EvalError(f"{path}: not a JSON contamination report ({e})") from None
    _check_report(report, str(path))
    return report


def _check_report(report: Any, where: str) -> None:
    if not isinstance(report, dict) or report.get("format") != FORMAT:
        found = report.get("format") if isinstance(report, dict) else type(report).__name__
        raise EvalError(f"{where}: format {found!r}, expected {FORMAT!r}")
    tasks = report.get("tasks")
    if not isinstance(tasks, list):
        raise EvalError(f"{where}: no list of tasks")
    for i, task in enumerate(tasks):
        items = task.get("items") if isinstance(task, dict) else None
        if not isinstance(task, dict) or not isinstance(task.get("sha256"), str):
            raise EvalError(f"{where}: tasks[{i}] has no sha256")
        if not isinstance(items, list) or not all(
            isinstance(it, dict) and isinstance(it.get("dirty"), bool) and "id" in it
            for it in items
        ):
            raise EvalError(f"{where}: tasks[{i}].items must be objects with an id and dirty")


def dirty_ids(report: dict[str, Any] | str | Path, task_sha256: str) -> set[str]:
    """The ids of the items found in the training data, of the task whose data has SHA-256
    ``task_sha256`` (``Task.sha256``). A report that does not cover that exact data is an error,
    never an empty set: a report on other data says nothing about this task."""
    where = "the contamination report"
    if not isinstance(report, dict):
        where = str(report)
        report = read_report(report)
    else:
        _check_report(report, where)
    tasks = [t for t in report["tasks"] if t["sha256"] == task_sha256]
    if not tasks:
        covered = ", ".join(f"{t.get('name')} ({t['sha256'][:12]}…)" for t in report["tasks"])
        raise EvalError(
            f"{where}: covers no task with data sha256 {task_sha256[:12]}… (it covers "
            f"{covered or 'nothing'}); run camelid contamination on this task's data"
        )
    return {str(it["id"]) for t in tasks for it in t["items"] if it["dirty"]}


def summary(report: dict[str, Any]) -> list[tuple[str, int, int, float]]:
    """(task, items, dirty, dirty %) per task of ``report``."""
    return [
        (t["name"], len(t["items"]), sum(i["dirty"] for i in t["items"]),
         100.0 * sum(i["dirty"] for i in t["items"]) / max(len(t["items"]), 1))
        for t in report["tasks"]
    ]  # fmt: skip
