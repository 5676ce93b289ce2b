"""Where documents come from: text/code trees, .txt, .jsonl(.gz), .parquet, and the built-in corpus.

A corpus is resolved into an ordered list of :class:`FileTask` (one per file); reading a task
yields its documents. The two halves are separate so that files can be read in worker processes
while the order of documents — and so every output — stays deterministic.
"""

from __future__ import annotations

import fnmatch
import gzip
import hashlib
import json
import os
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from camelid.errors import DataError

BUILTIN = "stdlib"
#: Files whose suffix marks them as records (one document per line / row) rather than one document.
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
PARQUET_SUFFIXES = (".parquet",)
_BINARY_PROBE = 8192
_MAX_REPORTED_LINES = 5
_MAX_REPORTED_FIELDS = 30


@dataclass(frozen=True)
class FileTask:
    """One file to read: ``kind`` is "text", "jsonl" or "parquet"; ``name`` is its stable name."""

    path: str
    name: str
    kind: str
    text_field: str = "text"


@dataclass(frozen=True)
class Document:
    text: str
    key: str  # stable identity within the corpus, used for the train/validation split


@dataclass
class ReadStats:
    """What reading skipped, so that the report can say so (nothing is dropped silently)."""

    binary_files: int = 0
    non_utf8_files: int = 0
    bad_json_lines: int = 0
    missing_field: int = 0
    first_bad_lines: list[str] = field(default_factory=list)
    #: The fields the records without the text field do have (sorted, at most a few dozen), so
    #: that a wrong ``--text-field`` is answered with the names to choose from.
    fields_found: list[str] = field(default_factory=list)

    def note_bad_line(self, where: str) -> None:
        if len(self.first_bad_lines) < _MAX_REPORTED_LINES:
            self.first_bad_lines.append(where)

    def note_fields(self, names: Iterable[str]) -> None:
        # The first few in sorted order: the same whichever worker read which file.
        self.fields_found = sorted(set(self.fields_found).union(names))[:_MAX_REPORTED_FIELDS]

    def merge(self, other: ReadStats) -> None:
        self.binary_files += other.binary_files
        self.non_utf8_files += other.non_utf8_files
        self.bad_json_lines += other.bad_json_lines
        self.missing_field += other.missing_field
        for where in other.first_bad_lines:
            self.note_bad_line(where)
        self.note_fields(other.fields_found)


def builtin_root() -> Path:
    """The running interpreter's standard library: code, which Llama 3 weighted heavily."""
    return Path(sysconfig.get_paths()["stdlib"])


def resolve(
    corpus: str, globs: list[str] | None = None, text_field: str = "text"
) -> list[FileTask]:
    """Turn a corpus spec (``stdlib``, a directory or a file) into file tasks, in a fixed order."""
    if corpus == BUILTIN:
        root = builtin_root()
        skip = {"site-packages", "dist-packages", "__pycache__"}
        tasks = [
            FileTask(str(root / rel), f"{BUILTIN}/{rel}", "text")
            for rel in _walk(root, skip)
            if rel.endswith(".py")
        ]
        return sorted(tasks, key=lambda t: t.name)
    path = Path(corpus)
    if not path.exists():
        raise DataError(f"{corpus}: no such file or directory (or use the built-in '{BUILTIN}')")
    if path.is_file():
        return [FileTask(str(path), path.name, _kind(path), text_field)]
    patterns = globs or ["*"]
    files = [
        FileTask(str(path / rel), rel, _kind(path / rel), text_field)
        for rel in sorted(_walk(path, skip=set()))
        if any(
            fnmatch.fnmatch(rel.rsplit("/", 1)[-1], g) or fnmatch.fnmatch(rel, g) for g in patterns
        )
    ]
    if not files:
        what = f"matching {', '.join(patterns)}" if globs else "at all"
        raise DataError(f"{corpus}: no files {what}")
    return files


def _walk(root: Path, skip: set[str]) -> Iterator[str]:
    """Relative POSIX paths of the files under ``root``; hidden files and directories (.git,
    editor state) and directories named in ``skip`` are never corpus."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in skip]
        rel_dir = os.path.relpath(dirpath, root)
        prefix = "" if rel_dir == "." else rel_dir.replace(os.sep, "/") + "/"
        for name in filenames:
            if not name.startswith("."):
                yield prefix + name


def _kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return "text"


def read(task: FileTask, stats: ReadStats) -> tuple[str, Iterator[Document]]:
    """The file's sha256 and an iterator over its documents; skips are counted in ``stats``."""
    data = Path(task.path).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if task.kind == "jsonl":
        return digest, _jsonl(task, data, stats)
    if task.kind == "parquet":
        return digest, _parquet(task, stats)
    return digest, _text(task, data, stats)


def _text(task: FileTask, data: bytes, stats: ReadStats) -> Iterator[Document]:
    if b"\0" in data[:_BINARY_PROBE]:
        stats.binary_files += 1
        return
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        stats.non_utf8_files += 1
        return
    yield Document(text, task.name)


def jsonl_lines(task: FileTask, data: bytes) -> Iterator[tuple[int, bytes]]:
    """``(line number, raw line)`` of each non-blank line of a JSONL file's bytes (gunzipped
    first for ``.gz``); a damaged gzip file is a :class:`DataError` naming it."""
    if task.path.lower().endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise DataError(f"{task.path}: not a readable gzip file ({e})") from None
    for n, raw in enumerate(data.splitlines(), start=1):
        if raw.strip():
            yield n, raw


def _jsonl(task: FileTask, data: bytes, stats: ReadStats) -> Iterator[Document]:
    for n, raw in jsonl_lines(task, data):
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            stats.bad_json_lines += 1
            stats.note_bad_line(f"{task.name}:{n} (not JSON)")
            continue
        text = record.get(task.text_field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            stats.missing_field += 1
            if isinstance(record, dict) and set(record) - set(stats.fields_found):
                stats.note_fields(str(k) for k in record)
            stats.note_bad_line(f"{task.name}:{n} (no string field {task.text_field!r})")
            continue
        yield Document(text, f"{task.name}:{n}")


def _parquet(task: FileTask, stats: ReadStats) -> Iterator[Document]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(
            f"{task.path}: reading .parquet needs pyarrow (pip install 'camelid[parquet]')"
        ) from None
    try:
        pf = pq.ParquetFile(task.path)
    except Exception as e:  # pyarrow raises several unrelated types for a bad file
        raise DataError(f"{task.path}: not a readable parquet file ({e})") from None
    columns = pf.schema_arrow.names
    if task.text_field not in columns:
        raise DataError(
            f"{task.path}: no column {task.text_field!r} (columns: {', '.join(columns)}); "
            "choose one with --text-field"
        )
    row = 0
    for batch in pf.iter_batches(columns=[task.text_field]):
        for value in batch.column(0).to_pylist():
            row += 1
            if not isinstance(value, str):
                stats.missing_field += 1
                stats.note_bad_line(f"{task.name}:row {row} (null or not a string)")
                continue
            yield Document(value, f"{task.name}:{row}")


def is_validation(key: str, fraction: float) -> bool:
    """Deterministic split by key: the same file (or record) always lands on the same side."""
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    return h < fraction * 2**64
