"""``camelid quickstart``: the whole pipeline on the built-in corpus, end to end.

Train a tokenizer on this Python's standard library, prepare deduplicated shards, pre-train a
small Llama on whatever device is present, evaluate it, show a completion, export Hugging Face
weights. Each stage reuses what an earlier run already made from the same inputs (the
tokenizer, the data) and refuses, naming ``overwrite``, what was made from other inputs; the
model is trained afresh.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from camelid.data import PrepareConfig, prepare, sources
from camelid.data.pipeline import training_texts
from camelid.errors import TokenizerError
from camelid.io import write_text_atomic
from camelid.tokenizer import Tokenizer, train_tokenizer
from camelid.tokenizer.tokenizer import JSON_NAME, MODEL_NAME
from camelid.tokenizer.train import check_out_dir, save_replacing, shortfall
from camelid.train.recipe import Recipe, load_recipe
from camelid.train.trainer import TrainSummary, train

#: Written beside the tokenizer quickstart trains: what it was trained with, so that a re-run
#: reuses it only for the same corpus and vocabulary size.
TRAINED_WITH = "trained-with.json"
_FORMAT = "camelid-quickstart-tokenizer/1"
NUM_SPECIAL = 256


@dataclass
class QuickstartSummary(TrainSummary):
    """The training summary, plus the whole pipeline's time."""

    total_s: float = 0.0


def default_recipe_path() -> Path:
    return Path(str(resources.files("camelid") / "configs" / "quickstart.toml"))


def quickstart(
    out: str | Path = "runs/quickstart",
    corpus: str = sources.BUILTIN,
    vocab_size: int = 4096,
    overrides: list[str] | None = None,
    log=print,
    overwrite: bool = False,
) -> QuickstartSummary:
    """Run every stage into ``out`` (tokenizer/, data/, run/); return the training summary.

    ``overwrite`` retrains the tokenizer and re-prepares the data even where ``out`` holds
    ones made from another corpus or vocabulary size (which are refused otherwise).
    """
    out = Path(out)
    t0 = time.perf_counter()
    tok_dir, data_dir, run_dir = out / "tokenizer", out / "data", out / "run"
    config = PrepareConfig(corpus=(corpus,))
    # Recipe errors (a bad --set) are reported before any work starts.
    recipe: Recipe = load_recipe(default_recipe_path(), overrides)
    _tokenizer_stage(config, vocab_size, tok_dir, overwrite, log)

    manifest = prepare(config, tok_dir, data_dir, overwrite=overwrite, progress=False)
    split = manifest["splits"]
    log(
        f"[2/4] data        {split['train']['tokens']:,} training and "
        f"{split['validation']['tokens']:,} validation tokens -> {data_dir}"
    )

    # Absolute paths: the run's recipe.toml then resumes from any directory.
    recipe.data.dir, recipe.data.tokenizer, recipe.run.out_dir = (
        str(data_dir.resolve()),
        str(tok_dir.resolve()),
        str(run_dir.resolve()),
    )
    log(
        f"[3/4] training    {recipe.train.steps} steps of {recipe.train.batch_size} x "
        f"{recipe.train.seq_len} tokens -> {run_dir}"
    )
    summary = train(recipe, fresh=True)
    log("[4/4] done" if summary.status == "finished" else f"[4/4] {summary.status}")
    return QuickstartSummary(**dataclasses.asdict(summary), total_s=time.perf_counter() - t0)


def _tokenizer_stage(
    config: PrepareConfig, vocab_size: int, tok_dir: Path, overwrite: bool, log
) -> Tokenizer:
    """Reuse the tokenizer in ``tok_dir`` if it was trained with exactly these inputs; train
    it if there is none (or ``overwrite``); refuse one of other inputs, or of unknown ones."""
    # The corpus counts by its contents (where it lies does not matter), the rest of the
    # corpus settings (split, cleaning) as they are.
    settings = json.loads(json.dumps(dataclasses.asdict(config)))
    wanted = {
        "format": _FORMAT,
        "vocab_size": vocab_size,
        "num_special": NUM_SPECIAL,
        "corpus": settings.pop("corpus"),
        "corpus_sha256": corpus_digest(config),
        "settings": settings,
    }
    held = [n for n in (JSON_NAME, MODEL_NAME) if (tok_dir / n).exists()]
    if held and not overwrite:
        tok = Tokenizer.load(tok_dir)
        recorded = _read_record(tok_dir / TRAINED_WITH)
        problem = _mismatch(recorded, wanted, tok)
        if problem:
            raise TokenizerError(
                f"{tok_dir}: holds a tokenizer {problem}; pass --overwrite to retrain it (and "
                "re-prepare the data), or choose another --out"
            )
        log(f"[1/4] tokenizer   reusing {tok_dir} ({tok.vocab_size:,} tokens)")
        return tok
    check_out_dir(tok_dir, overwrite=True)  # a file in its place is still refused
    texts = training_texts(config)
    tok = train_tokenizer(texts, vocab_size, num_special=NUM_SPECIAL)
    save_replacing(tok, tok_dir)
    # After the tokenizer: a record never vouches for files that were not written.
    record = {**wanted, "tokenizer_digest": tok.digest}
    write_text_atomic(tok_dir / TRAINED_WITH, json.dumps(record, indent=2) + "\n")
    note = shortfall(tok, vocab_size)
    log(f"[1/4] tokenizer   trained {tok.vocab_size:,} tokens -> {tok_dir}" +
        (f" (note: {note})" if note else ""))  # fmt: skip
    return tok


def corpus_digest(config: PrepareConfig) -> str:
    """sha256 over the corpus files' names and contents: the same corpus, wherever it lies."""
    h = hashlib.sha256()
    for spec in config.corpus:
        for task in sources.resolve(spec, list(config.globs) or None, config.text_field):
            with open(task.path, "rb") as f:
                file_hash = hashlib.file_digest(f, "sha256").hexdigest()
            h.update(f"{task.name}\0{file_hash}\n".encode())
    return h.hexdigest()


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


def _mismatch(recorded: dict[str, Any] | None, wanted: dict[str, Any], tok: Tokenizer) -> str:
    """Why the tokenizer may not be reused ("" if it may), in words for the error message."""
    if recorded is None or recorded.get("format") != _FORMAT:
        return f"that quickstart did not train (no readable {TRAINED_WITH})"
    if recorded.get("tokenizer_digest") != tok.digest:
        return f"other than the one its {TRAINED_WITH} records (its files were replaced)"
    if recorded.get("vocab_size") != wanted["vocab_size"]:
        return f"trained for --vocab-size {recorded.get('vocab_size')}, not {wanted['vocab_size']}"
    if recorded.get("corpus_sha256") != wanted["corpus_sha256"]:
        was = ", ".join(map(str, recorded.get("corpus") or ["?"]))
        if recorded.get("corpus") == wanted["corpus"]:
            return f"trained on other contents of {was} (its files changed since)"
        return f"trained on another corpus ({was})"
    if (recorded.get("num_special"), recorded.get("settings")) != (
        wanted["num_special"],
        wanted["settings"],
    ):
        return "trained with other corpus settings or special tokens"
    return ""
