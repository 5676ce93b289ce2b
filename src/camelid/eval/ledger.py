"""An append-only, hash-chained ledger of every evaluation of a model's variants.

Each line of ``eval-ledger.jsonl`` is one evaluation: which weights (digest), which task
(name and data digest), how it was prompted (template digest), the headline scores, the result
file's seal, and two hashes: ``prev``, the previous entry's ``hash``, and ``hash``, the SHA-256
of this entry's canonical JSON without ``hash``. Editing or removing an entry breaks the chain
at that point; a result file records the sequence number and hash of its own entry, so a result
whose entry is missing (even the last one) fails :func:`camelid.eval.results.verify`. Publishing
the head hash (``camelid ledger`` prints it) pins the whole history: "N variants evaluated,
this one published" can then be checked by anyone holding the ledger.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from camelid.eval.tasks import EvalError

LEDGER_NAME = "eval-ledger.jsonl"
GENESIS = "0" * 64


def canonical(obj: Any) -> bytes:
    """The one JSON form every hash here is taken over."""
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()


def entry_hash(entry: dict[str, Any]) -> str:
    return hashlib.sha256(canonical({k: v for k, v in entry.items() if k != "hash"})).hexdigest()


@dataclass
class Check:
    """A ledger read back: its entries and what is wrong with the chain (empty when intact)."""

    path: Path
    entries: list[dict[str, Any]]
    problems: list[str]

    @property
    def head(self) -> str:
        return self.entries[-1]["hash"] if self.entries else GENESIS


def read(path: Path) -> Check:
    """Every entry of the ledger at ``path``, with the chain checked link by link."""
    entries: list[dict[str, Any]] = []
    problems: list[str] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise EvalError(f"{path}: no such ledger") from None
    prev = GENESIS
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"{path}:{number}: not JSON ({e.msg}): the ledger was edited")
            continue
        seq = len(entries)
        if entry.get("seq") != seq:
            problems.append(
                f"{path}:{number}: entry seq {entry.get('seq')} where {seq} was due: "
                "an entry was removed or inserted"
            )
        if entry.get("prev") != prev:
            problems.append(
                f"{path}:{number}: entry {entry.get('seq')} does not follow the one before it "
                "(its prev hash differs): an entry before it was removed or edited"
            )
        if entry.get("hash") != entry_hash(entry):
            problems.append(
                f"{path}:{number}: entry {entry.get('seq')} was edited (its hash differs)"
            )
        entries.append(entry)
        prev = entry.get("hash", "")
    return Check(path, entries, problems)


def append(path: Path, record: dict[str, Any]) -> dict[str, Any]:
    """Add ``record`` (the evaluation's fields) as the next entry; return it with seq/prev/hash.
    The file is locked while the head is read and the line written, so concurrent evaluations
    of one model chain correctly; the line is fsynced before this returns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    with contextlib.closing(os.fdopen(fd, "r+", encoding="utf-8")) as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            check = read(path)
            if check.problems:
                raise EvalError(
                    f"{path}: the ledger's chain is broken, refusing to extend it: "
                    + "; ".join(check.problems[:3])
                )
            entry = {
                "seq": len(check.entries),
                "prev": check.head,
                "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                **record,
            }
            entry["hash"] = entry_hash(entry)
            f.write(canonical(entry).decode() + "\n")
            f.flush()
            os.fsync(f.fileno())
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
    return entry


def variants(entries: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Entries grouped by weights digest, in order of first evaluation."""
    out: dict[str, list[dict[str, Any]]] = {}
    for e in entries:
        out.setdefault(e.get("weights_digest", "?"), []).append(e)
    return out


HEADLINE = ("acc", "acc_norm", "exact_match", "perplexity", "bits_per_byte")


def card_rows(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Model-card rows (task, metric, value, digest, date) of every entry's headline scores."""
    rows = []
    for e in entries:
        for metric, value in (e.get("metrics") or {}).items():
            if value is not None and (metric in HEADLINE or metric.startswith("pass@")):
                rows.append({"task": e.get("task"), "metric": metric, "value": value,
                             "digest": e.get("weights_digest"), "date": e.get("date")})  # fmt: skip
    return rows
