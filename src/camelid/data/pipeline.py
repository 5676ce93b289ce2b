"""``camelid prepare``: corpus → clean → dedup → tokenize → token shards + manifest.json.

Files are read, cleaned, tokenized and MinHashed in worker processes; the main process takes
their results in corpus order, so deduplication ("first occurrence wins") and the shards are
the same for any number of workers. Each document is written as ``BOS ids EOS``. A shard is a
flat array of token ids (uint16 when the vocabulary fits, else uint32) written under a
temporary name and renamed when complete; ``manifest.json`` is written last, so a directory
without one is never mistaken for a finished dataset.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from camelid.data import sources
from camelid.data.clean import FILTERS, CleanConfig, clean
from camelid.data.dedup import LSHIndex, MinHasher, exact_key
from camelid.errors import DataError
from camelid.io import atomic_path, write_text_atomic

FORMAT = "camelid-tokens/1"
MANIFEST = "manifest.json"
IN_PROGRESS = ".prepare-in-progress.json"
SPLITS = ("train", "validation")


@dataclass(frozen=True)
class PrepareConfig:
    corpus: tuple[str, ...] = (sources.BUILTIN,)
    globs: tuple[str, ...] = ()
    text_field: str = "text"
    val_fraction: float = 0.02
    clean: CleanConfig = field(default_factory=CleanConfig)
    exact_dedup: bool = True
    near_dedup: bool = True
    near_dup_threshold: float = 0.8
    num_perm: int = 128
    lsh_bands: int = 16
    ngram: int = 5
    shard_tokens: int = 2**26  # 64M tokens: 128 MiB as uint16

    def __post_init__(self) -> None:
        if not 0 <= self.val_fraction < 1:
            raise DataError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.shard_tokens <= 0:
            raise DataError(f"shard_tokens must be positive, got {self.shard_tokens}")
        if not self.corpus:
            raise DataError("no corpus given")


@dataclass
class _Doc:
    """What a worker returns for one document."""

    key: str
    split: str
    rejected: str | None = None
    exact: bytes = b""
    tokens: np.ndarray | None = None
    sig: np.ndarray | None = None


@dataclass
class _FileResult:
    name: str
    sha256: str
    nbytes: int
    stats: sources.ReadStats
    docs: list[_Doc]


# ------------------------------------------------------------------------------- workers
_worker: dict[str, Any] = {}


def _init_worker(tokenizer_dir: str, config: PrepareConfig, parallel: bool) -> None:
    from camelid.tokenizer import Tokenizer

    if parallel:  # the processes are the parallelism: no thread pool inside each
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        # Ctrl-C reaches the whole process group: only the main process acts on it (it stops
        # the pool), so the workers print no tracebacks of their own.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker["tokenizer"] = Tokenizer.load(tokenizer_dir)
    _worker["config"] = config
    _worker["minhash"] = MinHasher(config.num_perm, config.ngram) if config.near_dedup else None


def _process(task: sources.FileTask) -> _FileResult:
    tok, config, minhash = _worker["tokenizer"], _worker["config"], _worker["minhash"]
    stats = sources.ReadStats()
    digest, docs = sources.read(task, stats)
    out, texts = [], []
    for doc in docs:
        split = "validation" if sources.is_validation(doc.key, config.val_fraction) else "train"
        text, rejected = clean(doc.text, config.clean)
        out.append(_Doc(doc.key, split, rejected))
        if not rejected:
            out[-1].exact = exact_key(text)
            texts.append(text)
    kept = [d for d in out if not d.rejected]
    for d, ids in zip(kept, tok.encode_batch(texts), strict=True):
        d.tokens = np.asarray(ids, dtype=np.uint32)
        d.sig = minhash.signature(d.tokens) if minhash is not None else None
    return _FileResult(task.name, digest, os.path.getsize(task.path), stats, out)


# ---------------------------------------------------------------------------------- shards
class _ShardWriter:
    """Cuts one split's token stream into shards of exactly ``shard_tokens`` (the last shorter)."""

    def __init__(self, out: Path, split: str, shard_tokens: int, dtype: np.dtype) -> None:
        self.out, self.split, self.size, self.dtype = out, split, shard_tokens, dtype
        self.buffer: list[np.ndarray] = []
        self.buffered = 0
        self.shards: list[dict[str, Any]] = []
        self.documents = 0
        self.tokens = 0

    def add(self, ids: np.ndarray) -> None:
        self.buffer.append(ids.astype(self.dtype, copy=False))
        self.buffered += len(ids)
        self.documents += 1
        self.tokens += len(ids)
        while self.buffered >= self.size:
            self._flush(self.size)

    def close(self) -> None:
        if self.buffered:
            self._flush(self.buffered)

    def _flush(self, n: int) -> None:
        data = np.concatenate(self.buffer)
        self.buffer = [data[n:]] if len(data) > n else []
        self.buffered = len(data) - n
        name = f"{self.split}-{len(self.shards):05d}.bin"
        # Listed before it is written: a Ctrl-C just after the rename must still find it to
        # take it back (the undo tolerates a listed shard that never came to exist).
        self.shards.append({"file": name, "tokens": int(n)})
        with atomic_path(self.out / name) as tmp:
            data[:n].tofile(tmp)


def training_texts(config: PrepareConfig) -> Iterator[str]:
    """The cleaned texts of the training split, as prepare sees them (before dedup): what a
    tokenizer should learn from, never the held-out documents. The corpus is resolved at
    once, so a bad path or glob is reported before any work starts."""
    tasks = [
        t
        for spec in config.corpus
        for t in sources.resolve(spec, list(config.globs) or None, config.text_field)
    ]

    def texts() -> Iterator[str]:
        stats = sources.ReadStats()
        for task in tasks:
            for doc in sources.read(task, stats)[1]:
                if sources.is_validation(doc.key, config.val_fraction):
                    continue
                text, rejected = clean(doc.text, config.clean)
                if rejected is None:
                    yield text

    return texts()


# ------------------------------------------------------------------------------------ main
def recipe(config: PrepareConfig, tokenizer_digest: str) -> dict[str, Any]:
    """Everything that determines the output; two runs with equal recipes (and files) agree."""
    r = {
        "format": FORMAT,
        "config": dataclasses.asdict(config),
        "tokenizer_digest": tokenizer_digest,
    }
    return json.loads(json.dumps(r))  # as it reads back from manifest.json (lists, not tuples)


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def prepare(
    config: PrepareConfig,
    tokenizer_dir: str | Path,
    out: str | Path,
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Build (or find already built) the dataset in ``out``; return its manifest."""
    from camelid.tokenizer import Tokenizer

    out = Path(out)
    tokenizer = Tokenizer.load(tokenizer_dir)
    wanted = recipe(config, tokenizer.digest)
    tasks = [
        t
        for spec in config.corpus
        for t in sources.resolve(spec, list(config.globs) or None, config.text_field)
    ]
    existing = _check_out_dir(out, wanted, tasks, overwrite)
    if existing is not None:
        return existing
    created = [d for d in (out, *out.parents) if not d.exists()]  # deepest first
    out.mkdir(parents=True, exist_ok=True)
    # The marker goes first: a run killed past here is recognised and restarted cleanly.
    write_text_atomic(out / IN_PROGRESS, json.dumps({"recipe_digest": _digest(wanted)}) + "\n")

    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32)
    writers = {s: _ShardWriter(out, s, config.shard_tokens, dtype) for s in SPLITS}
    # What it wrote is taken back if the run stops with an error (a wrong --text-field, a
    # binary corpus, nothing kept) or on Ctrl-C, so the corrected re-run starts from scratch.
    with _undo_on_failure(out, writers, created):
        bos, eos = np.array([tokenizer.bos_id], np.uint32), np.array([tokenizer.eos_id], np.uint32)
        read_stats = sources.ReadStats()
        counts = dict.fromkeys(FILTERS, 0) | {"exact_duplicates": 0, "near_duplicates": 0}
        seen: set[bytes] = set()
        lsh = LSHIndex(config.num_perm, config.lsh_bands, config.near_dup_threshold)
        files, documents = [], 0
        t0 = time.perf_counter()
        with _bar(len(tasks), progress) as bar:
            for result in _results(tasks, str(tokenizer_dir), config, workers):
                files.append({"name": result.name, "sha256": result.sha256, "bytes": result.nbytes})
                read_stats.merge(result.stats)
                for doc in result.docs:
                    documents += 1
                    if doc.rejected:
                        counts[doc.rejected] += 1
                        continue
                    if config.exact_dedup:
                        if doc.exact in seen:
                            counts["exact_duplicates"] += 1
                            continue
                        seen.add(doc.exact)
                    if config.near_dedup and not lsh.add_if_new(doc.sig):
                        counts["near_duplicates"] += 1
                        continue
                    writers[doc.split].add(np.concatenate([bos, doc.tokens, eos]))
                tokens = sum(w.tokens for w in writers.values())
                bar.update(1)
                bar.set_postfix_str(
                    f"{tokens / (time.perf_counter() - t0):,.0f} tok/s", refresh=False
                )
        for w in writers.values():
            w.close()
        kept = sum(w.documents for w in writers.values())
        if documents == 0:
            raise DataError(_nothing_read(config, read_stats))
        if kept == 0:
            raise DataError(f"all {documents} documents were removed: {_removed(counts)}")

        manifest = {
            "format": FORMAT,
            "recipe": wanted,
            "recipe_digest": _digest(wanted),
            "tokenizer": {
                "path": str(Path(tokenizer_dir).resolve()),
                "digest": tokenizer.digest,
                "vocab_size": tokenizer.vocab_size,
                "bos_id": tokenizer.bos_id,
                "eos_id": tokenizer.eos_id,
            },
            "dtype": dtype.name,
            "sources": files,
            "splits": {
                s: {"documents": w.documents, "tokens": w.tokens, "shards": w.shards}
                for s, w in writers.items()
            },
            "stats": {
                "files": len(files),
                "documents": documents,
                "kept": kept,
                "removed": counts,
                "read": dataclasses.asdict(read_stats),
            },
            "seconds": round(time.perf_counter() - t0, 3),
        }
    # Last: from here on the shards are a dataset (a failure now leaves the marker: restart).
    write_text_atomic(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    (out / IN_PROGRESS).unlink(missing_ok=True)
    return manifest


def _results(
    tasks: list[sources.FileTask], tokenizer_dir: str, config: PrepareConfig, workers: int | None
) -> Iterator[_FileResult]:
    workers = workers or os.cpu_count() or 1
    if workers == 1 or len(tasks) == 1:
        _init_worker(tokenizer_dir, config, parallel=False)
        yield from map(_process, tasks)
        return
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    with ctx.Pool(workers, _init_worker, (tokenizer_dir, config, True)) as pool:
        yield from pool.imap(_process, tasks, chunksize=4)


def _check_out_dir(
    out: Path, wanted: dict[str, Any], tasks: list[sources.FileTask], overwrite: bool
) -> dict[str, Any] | None:
    """Return the existing manifest if ``out`` already holds this dataset; clear or refuse else."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise DataError(f"{out}: exists and is not a directory")
    manifest_path = out / MANIFEST
    if manifest_path.exists():
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError:
            manifest = {}
        if not overwrite and manifest.get("recipe_digest") == _digest(wanted):
            stored = {f["name"]: f["sha256"] for f in manifest.get("sources", [])}
            current = {t.name: _sha256(t.path) for t in tasks}
            if stored == current:
                return manifest  # already prepared from the same files: reuse
            raise DataError(
                f"{out}: holds a dataset prepared from other versions of these files; "
                "pass --overwrite to rebuild it"
            )
        if not overwrite:
            raise DataError(
                f"{out}: holds a different dataset (other corpus, options or tokenizer); "
                "pass --overwrite to replace it, or choose another --out"
            )
    elif (out / IN_PROGRESS).exists():
        try:
            marker = json.loads((out / IN_PROGRESS).read_text())
        except json.JSONDecodeError:
            marker = {}  # killed while writing the marker itself
        if marker.get("recipe_digest") != _digest(wanted) and not overwrite:
            raise DataError(
                f"{out}: holds an unfinished run of a different dataset; "
                "pass --overwrite to replace it"
            )
        overwrite = True  # an interrupted run of this recipe: start it again cleanly
    elif any(out.iterdir()) and not overwrite:
        raise DataError(f"{out}: is not empty and holds no camelid dataset; choose another --out")
    if overwrite:
        _remove_dataset_files(out)
    return None


@contextlib.contextmanager
def _undo_on_failure(
    out: Path, writers: dict[str, _ShardWriter], created: list[Path]
) -> Iterator[None]:
    """On any exception, remove what the run wrote (its shards and its marker; a shard cut short
    was never renamed) and the directories it created if they are empty; nothing else."""
    try:
        yield
    except BaseException:
        _undo(out, writers, created)
        raise


def _undo(out: Path, writers: dict[str, _ShardWriter], created: list[Path]) -> None:
    for w in writers.values():
        for shard in w.shards:
            for key in ("file", "mask"):  # an SFT shard has a mask twin (camelid.data.sft)
                if key in shard:
                    (out / shard[key]).unlink(missing_ok=True)
    (out / IN_PROGRESS).unlink(missing_ok=True)
    for d in created:
        try:
            d.rmdir()
        except OSError:  # not empty (something else lives there now) or already gone
            break


def _remove_dataset_files(out: Path) -> None:
    for p in out.iterdir():
        is_shard = p.suffix == ".bin" and p.name.startswith(SPLITS)
        if is_shard or p.name in (MANIFEST, IN_PROGRESS) or ".tmp" in p.name:
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _nothing_read(config: PrepareConfig, stats: sources.ReadStats) -> str:
    corpus, field = ", ".join(config.corpus), repr(config.text_field)
    fields = ""
    if stats.missing_field:
        found = ", ".join(stats.fields_found) or "none"
        fields = f"; fields found: {found} (choose one with --text-field)"
    skipped = []
    if stats.binary_files:
        skipped.append(f"{stats.binary_files} binary file(s)")
    if stats.non_utf8_files:
        skipped.append(f"{stats.non_utf8_files} non-UTF-8 file(s)")
    if stats.bad_json_lines:
        skipped.append(f"{stats.bad_json_lines} line(s) that are not JSON")
    if skipped == [] and stats.missing_field:  # records, but none with the text field
        return (
            f"the corpus {corpus} holds no documents: none of its {stats.missing_field} "
            f"record(s) has a string field {field}{fields}"
        )
    if stats.missing_field:
        skipped.append(f"{stats.missing_field} record(s) without a string field {field}")
    detail = f"; skipped {', '.join(skipped)}" if skipped else ""
    first = f" (first: {', '.join(stats.first_bad_lines)})" if stats.first_bad_lines else ""
    return f"the corpus {corpus} holds no documents{detail}{first}{fields}"


def _removed(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items() if v) or "nothing"


def _bar(total: int, show: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="file", desc="prepare", disable=not show, leave=False)
