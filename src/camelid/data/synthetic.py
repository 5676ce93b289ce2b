"""A synthetic chat task, generated from a seed: one-line questions with one exact answer.

``camelid quickstart --chat`` fine-tunes the quickstart's small base model on it and measures
held-out exact-match accuracy before and after, so the task must be one a ~7M-parameter model,
pre-trained on Python code for a few minutes, can learn in a few more on a CPU, and one whose
answers can be checked exactly. The default families ask about the lengths of short lists of
words, whose answers come from a handful of choices:

    How many words are in "file key mode"?                    -> 3
    Which is longer, "file key" or "path name size"?           -> the second
    Are there more than 2 words in "file key mode"?           -> yes
    Is the number of words in "file key mode" even?           -> no

Four more families ask to copy words (first, last, repeat, reverse: ``What is the last word in
"file key mode"?`` -> ``mode``): a harder task, one the quickstart's model does not learn in
minutes (see :data:`DEFAULT_FAMILIES`).

The held-out set is drawn first and the training set never asks one of its questions (the
question text decides), so held-out accuracy measures what was learned, not what was seen. The
preference pairs (for DPO) pose training questions with the right answer as ``chosen`` and a
plausible wrong one as ``rejected`` (a count off by one, the other list, yes for no, the other
end of the list, ...).

The same ``seed`` and sizes give the same files, byte for byte.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from camelid.errors import DataError
from camelid.io import write_text_atomic

# Twelve names common in Python code, each one token (alone and after a space) in a tokenizer
# trained on code. Lists of 2-5 distinct ones in order: 108,372 of them, so a held-out question
# is new and yet made of familiar tokens.
WORDS = (
    "file", "path", "name", "line", "code", "list", "text", "key", "mode", "size", "time",
    "data",
)  # fmt: skip
MIN_WORDS, MAX_WORDS = 2, 5

#: A family draws one question from ``rng``: (question, its answer, a plausible wrong answer).
Family = Callable[[random.Random], tuple[str, str, str]]


def _words(rng: random.Random, lo: int = MIN_WORDS, hi: int = MAX_WORDS) -> list[str]:
    return rng.sample(WORDS, rng.randint(lo, hi))


def _quoted(words: list[str]) -> str:
    return '"' + " ".join(words) + '"'


def _count(rng: random.Random) -> tuple[str, str, str]:
    w = _words(rng)
    n = len(w)
    return f"How many words are in {_quoted(w)}?", str(n), str(n + 1 if n < MAX_WORDS else n - 1)


def _longer(rng: random.Random) -> tuple[str, str, str]:
    a, b = _words(rng), _words(rng)
    while len(b) == len(a):
        b = _words(rng)
    first, second = "the first", "the second"
    right, wrong = (first, second) if len(a) > len(b) else (second, first)
    return f"Which is longer, {_quoted(a)} or {_quoted(b)}?", right, wrong


def _more(rng: random.Random) -> tuple[str, str, str]:
    w, k = _words(rng), rng.randint(MIN_WORDS, MAX_WORDS - 1)
    yes = len(w) > k
    q = f"Are there more than {k} words in {_quoted(w)}?"
    return q, "yes" if yes else "no", "no" if yes else "yes"


def _even(rng: random.Random) -> tuple[str, str, str]:
    w = _words(rng)
    yes = len(w) % 2 == 0
    q = f"Is the number of words in {_quoted(w)} even?"
    return q, "yes" if yes else "no", "no" if yes else "yes"


def _first(rng: random.Random) -> tuple[str, str, str]:
    w = _words(rng)
    return f"What is the first word in {_quoted(w)}?", w[0], w[-1]


def _last(rng: random.Random) -> tuple[str, str, str]:
    w = _words(rng)
    return f"What is the last word in {_quoted(w)}?", w[-1], w[0]


def _repeat(rng: random.Random) -> tuple[str, str, str]:
    w = _words(rng)
    return f"Repeat {_quoted(w)}.", " ".join(w), " ".join(w[:-1])


def _reverse(rng: random.Random) -> tuple[str, str, str]:
    w = _words(rng)
    return f"Reverse the words {_quoted(w)}.", " ".join(reversed(w)), " ".join(w)


FAMILIES: dict[str, Family] = {
    "count": _count,
    "longer": _longer,
    "more": _more,
    "even": _even,
    "first": _first,
    "last": _last,
    "repeat": _repeat,
    "reverse": _reverse,
}
#: The families a task has unless told otherwise: the ones about the lists' lengths, which the
#: quickstart's model learns in minutes. The copying ones (first, last, repeat, reverse) it did
#: not: after 120 steps of sft-cpu they stood at 0-17% held-out exact match while count rose
#: from 0% to 100% (measured); they stay here as a harder task.
DEFAULT_FAMILIES = ("count", "longer", "more", "even")


@dataclass(frozen=True)
class Example:
    """One question of the task: its family, the question, its one right answer, and a
    plausible wrong answer (the ``rejected`` completion of a preference pair)."""

    family: str
    prompt: str
    answer: str
    wrong: str


def _families(names: Iterable[str] | None) -> list[str]:
    chosen = list(DEFAULT_FAMILIES) if names is None else list(names)
    unknown = [n for n in chosen if n not in FAMILIES]
    if unknown or not chosen:
        raise DataError(
            f"unknown synthetic task famil{'y' if len(unknown) == 1 else 'ies'} "
            f"{', '.join(map(repr, unknown)) or '(none given)'}; known: {', '.join(FAMILIES)}"
        )
    return chosen


def draw(rng: random.Random, families: list[str]) -> Example:
    """One example: a family, then its question (lists of 2-5 distinct words), from ``rng``."""
    family = families[rng.randrange(len(families))]
    prompt, answer, wrong = FAMILIES[family](rng)
    return Example(family, prompt, answer, wrong)


@dataclass(frozen=True)
class ChatTask:
    """The three sets of one seed: ``heldout`` (distinct questions), ``train`` (none of them
    a held-out question) and ``preferences`` (pairs on training questions)."""

    train: list[Example]
    heldout: list[Example]
    preferences: list[Example]


def make_task(
    seed: int = 0,
    n_train: int = 20_000,
    n_heldout: int = 200,
    n_preferences: int = 1_000,
    families: Iterable[str] | None = None,
) -> ChatTask:
    """Draw the task's sets from ``seed``: the held-out questions first (all distinct), then
    training examples, skipping any whose question is held out."""
    names = _families(families)
    for name, n in (("n_train", n_train), ("n_heldout", n_heldout)):
        if n < 1:
            raise DataError(f"{name} must be at least 1, got {n}")
    if n_preferences < 0:
        raise DataError(f"n_preferences must be >= 0, got {n_preferences}")
    rng = random.Random(f"camelid-synthetic:{seed}")
    heldout: dict[str, Example] = {}
    tries = 0
    while len(heldout) < n_heldout:
        ex = draw(rng, names)
        heldout.setdefault(ex.prompt, ex)
        tries += 1
        if tries > 100 * n_heldout:  # only with a tiny family set: say so, never loop
            raise DataError(f"cannot draw {n_heldout} distinct held-out questions")
    train: list[Example] = []
    while len(train) < n_train:
        ex = draw(rng, names)
        if ex.prompt not in heldout:
            train.append(ex)
    return ChatTask(train, list(heldout.values()), train[:n_preferences])


# Training questions per record, in turn: a third of the questions come in conversations of
# two or three exchanges (a ``messages`` record), so the model also learns to answer the
# newest question of a chat that goes on, the rest as single prompt/completion pairs.
_TURNS = (1, 1, 1, 2, 1, 3)


def _train_records(examples: list[Example]) -> Iterator[dict]:
    i = k = 0
    while i < len(examples):
        group = examples[i : i + _TURNS[k % len(_TURNS)]]
        i, k = i + len(group), k + 1
        if len(group) == 1:
            yield {"prompt": group[0].prompt, "completion": group[0].answer}
        else:
            turns = [[{"role": "user", "content": e.prompt},
                      {"role": "assistant", "content": e.answer}] for e in group]  # fmt: skip
            yield {"messages": [m for pair in turns for m in pair]}


def write_task(task: ChatTask, out: str | Path) -> dict[str, Path]:
    """Write ``train.jsonl`` (chats and prompt/completion pairs, as ``camelid prepare --format
    chat`` reads them), ``val.jsonl`` (the held-out pairs, also a ``camelid eval --task``
    file, each with an ``id`` that starts with its family), ``preferences.jsonl``
    (``prompt``/``chosen``/``rejected``, as ``camelid.train.dpo.read_preferences`` reads
    them) and ``preferences-val.jsonl`` (the held-out questions as pairs: DPO's validation),
    each atomically."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    def lines(rows: Iterable[dict]) -> str:
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)

    names = ("train", "val", "preferences", "preferences-val")
    paths = {name: out / f"{name}.jsonl" for name in names}
    write_text_atomic(paths["train"], lines(_train_records(task.train)))
    write_text_atomic(
        paths["val"],
        lines(
            {"id": f"{e.family}-{i}", "prompt": e.prompt, "completion": e.answer}
            for i, e in enumerate(task.heldout)
        ),
    )
    write_text_atomic(
        paths["preferences"],
        lines({"prompt": e.prompt, "chosen": e.answer, "rejected": e.wrong}
              for e in task.preferences),
    )  # fmt: skip
    write_text_atomic(
        paths["preferences-val"],
        lines({"prompt": e.prompt, "chosen": e.answer, "rejected": e.wrong}
              for e in task.heldout),
    )  # fmt: skip
    return paths
