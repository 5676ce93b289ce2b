"""SFT data: chat conversations and prompt/completion pairs → token shards with a loss mask.

A record is one JSONL line, either ``{"messages": [{"role", "content"}, ...]}`` (system, user
and assistant turns, any number) or ``{"prompt": ..., "completion": ...}`` (one user turn and
one assistant turn). It is tokenized with the tokenizer's chat template
(:meth:`camelid.tokenizer.Tokenizer.apply_chat_template`), which decides the mask piece by
piece, i.e. by *position*: a token is learned exactly when it is part of an assistant turn's
content or that turn's end-of-turn token. Headers, system and user turns and the one BOS are
not learned. No id is ever compared to a pad id, so an end-of-turn token equal to the pad
token stays learned.

The shards are the pre-training format (``camelid-tokens/1``: flat token arrays, one
``manifest.json``) plus, for each token shard, a parallel ``.mask.bin`` of uint8 (1 = learned)
and ``"kind": "sft"`` in the manifest. Every conversation starts with its one BOS and lies
whole in one shard, so the BOS positions are the conversation boundaries.

Bad records stop the run with ``file:line`` and nothing written; a conversation longer than
``max_len`` tokens is skipped and counted, or with ``truncate`` cut back to its longest prefix
of whole messages that ends with an assistant turn and fits (never mid-turn: an assistant turn
cut before its end-of-turn token would teach the model not to stop). One that has no such
prefix is skipped and counted even then.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from camelid.data import sources
from camelid.data.pipeline import (
    FORMAT,
    IN_PROGRESS,
    MANIFEST,
    SPLITS,
    _check_out_dir,
    _digest,
    _sha256,
    _undo_on_failure,
)
from camelid.errors import DataError, TokenizerError
from camelid.io import atomic_path, write_text_atomic

KIND = "sft"
SFT_FORMATS = ("chat", "prompt-completion")
ROLES = ("system", "user", "assistant")
MASK_SUFFIX = ".mask.bin"
_MAX_REPORTED = 5


@dataclass(frozen=True)
class SFTConfig:
    """What ``prepare_sft`` makes of a set of JSONL files.

    ``format`` "chat" takes both record kinds (the fields decide, line by line);
    "prompt-completion" takes only pairs. ``max_len`` bounds a conversation's tokens, BOS and
    every end-of-turn included (a training row of ``seq_len`` inputs holds up to
    ``seq_len + 1`` tokens of one conversation).
    """

    corpus: tuple[str, ...] = ()
    globs: tuple[str, ...] = ()
    format: str = "chat"
    val_fraction: float = 0.02
    max_len: int = 2048
    truncate: bool = False
    shard_tokens: int = 2**26

    def __post_init__(self) -> None:
        if self.format not in SFT_FORMATS:
            raise DataError(f"format must be one of {', '.join(SFT_FORMATS)}, got {self.format!r}")
        if not 0 <= self.val_fraction < 1:
            raise DataError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.max_len < 2:
            raise DataError(f"max_len must be at least 2 tokens, got {self.max_len}")
        if self.shard_tokens <= 0:
            raise DataError(f"shard_tokens must be positive, got {self.shard_tokens}")
        if not self.corpus:
            raise DataError("no SFT data given (--corpus FILE.jsonl)")


# -------------------------------------------------------------------------- one record
def record_messages(record: Any, where: str, fmt: str = "chat") -> tuple[str, list[dict[str, str]]]:
    """The kind ("chat" or "prompt-completion") and checked conversation of one JSONL record;
    a DataError naming ``where`` (file:line) and the fault otherwise."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    if fmt == "chat" and "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: 'messages' must be a non-empty list of turns")
        kind = "chat"
    elif "prompt" in record or "completion" in record:
        for key in ("prompt", "completion"):
            if not isinstance(record.get(key), str):
                got = "missing" if key not in record else type(record[key]).__name__
                raise DataError(f"{where}: '{key}' must be a string ({got})")
        messages = [
            {"role": "user", "content": record["prompt"]},
            {"role": "assistant", "content": record["completion"]},
        ]
        kind = "prompt-completion"
    else:
        wanted = "'messages' or 'prompt'/'completion'" if fmt == "chat" else "'prompt'/'completion'"
        found = ", ".join(map(repr, record)) or "none"
        raise DataError(f"{where}: no {wanted} field (fields: {found})")
    for i, m in enumerate(messages):
        turn = f"{where}: message {i}"
        if not isinstance(m, dict):
            raise DataError(f"{turn}: must be an object with 'role' and 'content'")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise DataError(f"{turn}: unknown role {role!r} (known: {', '.join(ROLES)})")
        if not isinstance(content, str):
            got = "missing" if "content" not in m else type(content).__name__
            raise DataError(f"{turn} ({role}): 'content' must be a string ({got})")
        if not content.strip():
            raise DataError(f"{turn} ({role}): empty content")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant turn, so nothing to learn")
    return kind, [{"role": m["role"], "content": m["content"]} for m in messages]


def tokenize_chat(
    tokenizer: Any, messages: list[dict[str, str]], where: str = "chat"
) -> tuple[list[int], list[int]]:
    """Ids and the 0/1 loss mask of a conversation (one BOS, no generation prompt)."""
    try:
        ids, mask = tokenizer.apply_chat_template(messages, return_assistant_mask=True)
    except TokenizerError as e:
        raise DataError(f"{where}: {e}") from None
    return ids, mask


def fit_conversation(
    tokenizer: Any, messages: list[dict[str, str]], max_len: int, where: str = "chat"
) -> tuple[list[int], list[int]] | None:
    """The longest prefix of whole messages that ends with an assistant turn and has at most
    ``max_len`` tokens, tokenized; None when not even the first assistant turn fits."""
    for k in range(len(messages) - 1, 0, -1):
        if messages[k - 1]["role"] != "assistant":
            continue
        ids, mask = tokenize_chat(tokenizer, messages[:k], where)
        if len(ids) <= max_len:
            return ids, mask
    return None


def read_records(
    task: sources.FileTask, fmt: str
) -> Iterator[tuple[str, str, list[dict[str, str]]]]:
    """``(file:line, kind, messages)`` of each non-blank line of a JSONL file, checked."""
    if task.kind != "jsonl":
        raise DataError(
            f"{task.path}: SFT data must be JSONL (.jsonl or .jsonl.gz), one record a line"
        )
    for n, raw in sources.jsonl_lines(task, Path(task.path).read_bytes()):
        where = f"{task.path}:{n}"
        try:
            record = json.loads(raw)
        except UnicodeDecodeError:
            raise DataError(f"{where}: not UTF-8 text") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg}, column {e.colno})") from None
        yield (where, *record_messages(record, where, fmt))


# ---------------------------------------------------------------------------------- shards
class _SFTShardWriter:
    """One split's conversations into shards of at least ``shard_tokens`` tokens (the last
    may be shorter), cut only between conversations; each token shard has a mask twin."""

    def __init__(self, out: Path, split: str, shard_tokens: int, dtype: np.dtype) -> None:
        self.out, self.split, self.size, self.dtype = out, split, shard_tokens, dtype
        self.ids: list[np.ndarray] = []
        self.masks: list[np.ndarray] = []
        self.buffered = 0
        self.shards: list[dict[str, Any]] = []
        self.documents = self.tokens = self.learned = 0
        self._in_buffer = 0

    def add(self, ids: np.ndarray, mask: np.ndarray) -> None:
        self.ids.append(np.asarray(ids, dtype=self.dtype))
        self.masks.append(np.asarray(mask, dtype=np.uint8))
        self.buffered += len(ids)
        self._in_buffer += 1
        self.documents += 1
        self.tokens += len(ids)
        self.learned += int(mask.sum())
        if self.buffered >= self.size:
            self._flush()

    def close(self) -> None:
        if self.buffered:
            self._flush()

    def _flush(self) -> None:
        name = f"{self.split}-{len(self.shards):05d}"
        entry = {
            "file": name + ".bin",
            "tokens": self.buffered,
            "mask": name + MASK_SUFFIX,
            "documents": self._in_buffer,
        }
        self.shards.append(entry)  # listed before it is written, as pipeline._ShardWriter does
        with atomic_path(self.out / entry["file"]) as tmp:
            np.concatenate(self.ids).tofile(tmp)
        with atomic_path(self.out / entry["mask"]) as tmp:
            np.concatenate(self.masks).tofile(tmp)
        self.ids, self.masks, self.buffered, self._in_buffer = [], [], 0, 0


def sft_recipe(config: SFTConfig, tokenizer_digest: str) -> dict[str, Any]:
    """Everything that determines an SFT dataset (two equal recipes and files agree)."""
    r = {
        "format": FORMAT,
        "kind": KIND,
        "config": dataclasses.asdict(config),
        "tokenizer_digest": tokenizer_digest,
    }
    return json.loads(json.dumps(r))


def prepare_sft(
    config: SFTConfig,
    tokenizer_dir: str | Path,
    out: str | Path,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Build (or find already built) the SFT dataset in ``out``; return its manifest.

    All records are checked before anything is written, so a bad line leaves ``out`` as it
    was; an interrupted run leaves a marker and restarts cleanly, as ``prepare`` does.
    """
    from camelid.tokenizer import Tokenizer

    out = Path(out)
    tokenizer = Tokenizer.load(tokenizer_dir)
    try:
        tokenizer.render_chat([])
    except TokenizerError as e:
        raise DataError(
            f"{e}: this tokenizer has no chat format, so it cannot tokenize chats"
        ) from None
    wanted = sft_recipe(config, tokenizer.digest)
    tasks = [t for spec in config.corpus for t in sources.resolve(spec, list(config.globs) or None)]
    examples = _tokenize_all(tasks, tokenizer, config, progress)
    existing = _check_out_dir(out, wanted, tasks, overwrite)
    if existing is not None:
        return existing
    kept = examples["kept"]
    if examples["records"] == 0:
        raise DataError(f"{', '.join(config.corpus)}: no records (empty JSONL)")
    if not kept:
        raise DataError(
            f"no conversation kept: all {examples['records']} are longer than max_len "
            f"{config.max_len} (first: {', '.join(examples['too_long_first'])}); raise "
            "--max-len" + ("" if config.truncate else " or pass --truncate")
        )
    created = [d for d in (out, *out.parents) if not d.exists()]
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / IN_PROGRESS, json.dumps({"recipe_digest": _digest(wanted)}) + "\n")
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32)
    writers = {s: _SFTShardWriter(out, s, config.shard_tokens, dtype) for s in SPLITS}
    t0 = time.perf_counter()
    with _undo_on_failure(out, writers, created):  # type: ignore[arg-type]
        for split, ids, mask in kept:
            writers[split].add(ids, mask)
        for w in writers.values():
            w.close()
        manifest = {
            "format": FORMAT,
            "kind": KIND,
            "recipe": wanted,
            "recipe_digest": _digest(wanted),
            "tokenizer": {
                "path": str(Path(tokenizer_dir).resolve()),
                "digest": tokenizer.digest,
                "vocab_size": tokenizer.vocab_size,
                "bos_id": tokenizer.bos_id,
                "eos_id": tokenizer.eos_id,
                "eot_id": tokenizer.eot_id,
            },
            "dtype": dtype.name,
            "sources": [{"name": t.name, "sha256": _sha256(t.path)} for t in tasks],
            "sft": {
                "format": config.format,
                "max_len": config.max_len,
                "truncate": config.truncate,
                "mask": "uint8 per token, 1 = learned (assistant content and its end of turn)",
                "records": examples["records"],
                "by_kind": examples["by_kind"],
                "truncated": examples["truncated"],
                "skipped_too_long": examples["skipped"],
                "too_long_first": examples["too_long_first"],
            },
            "splits": {
                s: {
                    "documents": w.documents,
                    "tokens": w.tokens,
                    "learned_tokens": w.learned,
                    "shards": w.shards,
                }
                for s, w in writers.items()
            },
            "stats": {
                "files": len(tasks),
                "documents": examples["records"],
                "kept": len(kept),
                "removed": {"too_long": examples["skipped"]},
            },
            "seconds": round(examples["seconds"] + time.perf_counter() - t0, 3),
        }
    write_text_atomic(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    (out / IN_PROGRESS).unlink(missing_ok=True)
    return manifest


def _tokenize_all(
    tasks: list[sources.FileTask], tokenizer: Any, config: SFTConfig, progress: bool
) -> dict[str, Any]:
    """Every record checked and tokenized, in corpus order, before anything is written."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    kept: list[tuple[str, np.ndarray, np.ndarray]] = []
    by_kind = dict.fromkeys(SFT_FORMATS, 0)
    records = truncated = skipped = 0
    first: list[str] = []
    with tqdm(unit="conv", desc="prepare (sft)", disable=not progress, leave=False) as bar:
        for task in tasks:
            for where, kind, messages in read_records(task, config.format):
                records += 1
                by_kind[kind] += 1
                bar.update(1)
                ids, mask = tokenize_chat(tokenizer, messages, where)
                if len(ids) > config.max_len:
                    if len(first) < _MAX_REPORTED:
                        first.append(f"{where} ({len(ids)} tokens)")
                    fitted = (
                        fit_conversation(tokenizer, messages, config.max_len, where)
                        if config.truncate
                        else None
                    )
                    if fitted is None:
                        skipped += 1
                        continue
                    ids, mask = fitted
                    truncated += 1
                key = f"{task.name}:{where.rsplit(':', 1)[1]}"  # as prepare keys JSONL records
                split = "validation" if sources.is_validation(key, config.val_fraction) else "train"
                kept.append((split, np.asarray(ids, np.uint32), np.asarray(mask, np.uint8)))
    return {
        "kept": kept,
        "records": records,
        "by_kind": by_kind,
        "truncated": truncated,
        "skipped": skipped,
        "too_long_first": first,
        "seconds": time.perf_counter() - t0,
    }


# --------------------------------------------------------------------------------- inspect
DIM, RESET = "\x1b[2m", "\x1b[0m"


def show_example(tokenizer: Any, ids: Any, mask: Any, color: bool = False) -> str:
    """One conversation as text with what is *not* learned set apart: dimmed on a terminal
    (``color``), else in ``[[ ]]``; learned tokens (assistant content and its end of turn)
    plain. Runs of tokens are decoded together, special tokens by name."""
    ids, mask = [int(i) for i in ids], [int(m) for m in mask]
    parts, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or mask[i] != mask[start]:
            text = tokenizer.decode(ids[start:i])
            if mask[start]:
                parts.append(text)
            else:
                parts.append(f"{DIM}{text}{RESET}" if color else f"[[{text}]]")
            start = i
    learned = sum(mask)
    legend = "dim" if color else "[[ ]]"
    head = (
        f"{len(ids)} tokens, {learned} learned (plain); not learned in {legend}: "
        "BOS, headers, system and user turns"
    )
    return head + "\n" + "".join(parts)
