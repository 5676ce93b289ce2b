"""``camelid quickstart``: the whole pipeline on the built-in corpus, end to end.

Train a tokenizer on this Python's standard library, prepare deduplicated shards, pre-train a
small Llama on whatever device is present, evaluate it, show a completion, export Hugging Face
weights. Each stage reuses what an earlier run already made (the tokenizer, the data); the model
is trained afresh.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from camelid.data import PrepareConfig, prepare, sources
from camelid.data.pipeline import training_texts
from camelid.tokenizer import Tokenizer, train_tokenizer
from camelid.train.recipe import Recipe, load_recipe
from camelid.train.trainer import TrainSummary, train


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
) -> QuickstartSummary:
    """Run every stage into ``out`` (tokenizer/, data/, run/); return the training summary."""
    out = Path(out)
    t0 = time.perf_counter()
    tok_dir, data_dir, run_dir = out / "tokenizer", out / "data", out / "run"
    if (tok_dir / "tokenizer.json").exists():
        tok = Tokenizer.load(tok_dir)
        log(f"[1/4] tokenizer   reusing {tok_dir} ({tok.vocab_size} tokens)")
    else:
        tok = train_tokenizer(training_texts(PrepareConfig(corpus=(corpus,))), vocab_size)
        tok.save(tok_dir)
        log(f"[1/4] tokenizer   trained {tok.vocab_size} tokens -> {tok_dir}")

    manifest = prepare(PrepareConfig(corpus=(corpus,)), tok_dir, data_dir, progress=False)
    split = manifest["splits"]
    log(
        f"[2/4] data        {split['train']['tokens']:,} training and "
        f"{split['validation']['tokens']:,} validation tokens -> {data_dir}"
    )

    recipe: Recipe = load_recipe(default_recipe_path(), overrides)
    recipe.data.dir, recipe.data.tokenizer, recipe.run.out_dir = (
        str(data_dir),
        str(tok_dir),
        str(run_dir),
    )
    log(
        f"[3/4] training    {recipe.train.steps} steps of {recipe.train.batch_size} x "
        f"{recipe.train.seq_len} tokens -> {run_dir}"
    )
    summary = train(recipe, fresh=True)
    log("[4/4] done")
    return QuickstartSummary(**dataclasses.asdict(summary), total_s=time.perf_counter() - t0)
