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
from camelid.errors import CheckpointError, TokenizerError
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


# ---------------------------------------------------------------------------- --chat
#: The shipped recipe ``camelid quickstart --chat`` fine-tunes with (``--recipe`` picks another).
CHAT_RECIPE = "sft-cpu"
CHAT_SEED = 0
CHAT_SIZES = {"n_train": 20_000, "n_heldout": 200, "n_preferences": 1_000}
#: How the held-out questions are asked: greedy, in the chat template, one line, at most this
#: many tokens (an answer is one to three tokens and the end of the turn; a model that
#: rambles is cut here).
ANSWER_TOKENS = 16
ANSWER_STOP = ("\n",)
CHAT_SUMMARY_FORMAT = "camelid-quickstart-chat/1"


@dataclass
class ChatSummary:
    """What ``camelid quickstart --chat`` did: held-out exact match before and after, the
    fine-tuning run's summary, a sample conversation, and where everything is."""

    base: str
    recipe: str
    run_dir: str
    summary_path: str
    before: dict[str, Any]
    after: dict[str, Any] | None  # None when training was stopped
    train: TrainSummary
    conversation: list[dict[str, str]]
    total_s: float


def quickstart_chat(
    out: str | Path = "runs/quickstart",
    recipe: str | Path = CHAT_RECIPE,
    overrides: list[str] | None = None,
    log=print,
    overwrite: bool = False,
    corpus: str = sources.BUILTIN,
    vocab_size: int = 4096,
    sizes: dict[str, int] | None = None,
    families: tuple[str, ...] | None = None,
    progress: bool | None = None,
) -> ChatSummary:
    """Teach the quickstart's base model (``out``/run/hf) to answer the synthetic chat task:
    write the task into ``out``/chat, prepare it with the base's tokenizer, measure held-out
    exact match, fine-tune with ``recipe``, measure again, and hold a short conversation.

    Without a base model the base quickstart runs first (with ``corpus`` and ``vocab_size``).
    ``overrides`` apply to the fine-tuning recipe; ``overwrite`` re-prepares chat data made
    with another tokenizer (refused otherwise). ``sizes`` and ``families``: the task's (tests).
    """
    from camelid.data.sft import SFTConfig, prepare_sft
    from camelid.data.synthetic import make_task, write_task
    from camelid.train.recipe import find_recipe

    t0 = time.perf_counter()
    out = Path(out)
    base, chat_dir = out / "run" / "hf", out / "chat"
    recipe_path = find_recipe(recipe)
    name = recipe_path.stem
    run_dir = chat_dir / ("run" if name == CHAT_RECIPE else f"run-{name}")
    data_dir = chat_dir / "data"
    # Absolute paths: the run's recipe.toml then resumes from any directory.
    placed = [f"init.model='{base.resolve()}'", f"data.dir='{data_dir.resolve()}'",
              f"run.out_dir='{run_dir.resolve()}'"]  # fmt: skip
    # Recipe errors (a bad --set) are reported before any work starts.
    loaded: Recipe = load_recipe(recipe_path, [*placed, *(overrides or [])])
    if not _is_model_dir(base):
        log(f"[base] no base model at {base}: running `camelid quickstart` first")
        quickstart(out, corpus, vocab_size, None, log, overwrite)
        if not _is_model_dir(base):
            raise CheckpointError(
                f"{base}: the base quickstart stopped before exporting its model; run "
                "`camelid quickstart` to the end, then --chat again"
            )
    steps = 5

    task = make_task(CHAT_SEED, **{**CHAT_SIZES, **(sizes or {})}, families=families)
    paths = write_task(task, chat_dir)
    log(
        f"[1/{steps}] task        {len(task.train):,} training, {len(task.heldout):,} held-out "
        f"questions, {len(task.preferences):,} preference pairs -> {chat_dir}"
    )
    # A packed row of train.seq_len inputs holds conversations of up to seq_len + 1 tokens; a
    # longer chat (none at the shipped sizes) is cut back to its first whole exchanges.
    config = SFTConfig(corpus=(str(paths["train"]),), max_len=loaded.train.seq_len + 1,
                       val_fraction=0.02, truncate=True)  # fmt: skip
    manifest = prepare_sft(config, base, data_dir, overwrite=overwrite, progress=False)
    split, sft = manifest["splits"]["train"], manifest["sft"]
    cut = sft["truncated"] + sft["skipped_too_long"]
    log(
        f"[2/{steps}] data        {split['documents']:,} conversations, {split['tokens']:,} "
        f"tokens ({split['learned_tokens']:,} learned) -> {data_dir}"
        + (f" ({cut} longer than {config.max_len} tokens cut or skipped)" if cut else "")
    )

    val = paths["val"]
    before = _exact_match(base, val, chat_dir / "eval-base.json", progress)
    log(f"[3/{steps}] before      {_score_text(before)} (the base model {base})")
    t = loaded.train
    log(
        f"[4/{steps}] fine-tuning {t.steps} steps of {t.batch_size} x {t.seq_len} tokens "
        f"({name}) -> {run_dir}"
    )
    summary = train(loaded, fresh=True, progress=progress)
    after, conversation = None, []
    if summary.status == "finished" and summary.export is not None:
        model = run_dir / "hf"  # the export, named as the user's --out names it
        after = _exact_match(model, val, run_dir / "eval-heldout.json", progress)
        log(f"[5/{steps}] after       {_score_text(after)} (fine-tuned {model})")
        conversation = _conversation(model, task.heldout)
    else:
        log(f"[5/{steps}] {summary.status}: no measurement after")
    result = ChatSummary(
        base=str(base),
        recipe=str(recipe_path),
        run_dir=str(run_dir),
        summary_path=str(chat_dir / f"summary{'' if name == CHAT_RECIPE else '-' + name}.json"),
        before=before,
        after=after,
        train=summary,
        conversation=conversation,
        total_s=time.perf_counter() - t0,
    )
    record = {
        "format": CHAT_SUMMARY_FORMAT,
        "base": result.base,
        "recipe": result.recipe,
        "run": result.run_dir,
        "task": {
            "seed": CHAT_SEED,
            "families": sorted({e.family for e in task.heldout}),
            "train": len(task.train),
            "heldout": len(task.heldout),
            "preferences": len(task.preferences),
            "files": {k: str(v) for k, v in paths.items()},
        },
        "before": before,
        "after": after,
        "train": {k: getattr(summary, k) for k in _TRAIN_FIELDS},
        "conversation": conversation,
        "total_s": round(result.total_s, 1),
    }
    write_text_atomic(result.summary_path, json.dumps(record, indent=2) + "\n")
    return result


_TRAIN_FIELDS = ("status", "steps", "tokens", "wall_s", "final_val_loss", "export")


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def _exact_match(model: Path, task: Path, out: Path, progress: bool | None) -> dict[str, Any]:
    """Held-out exact match of ``model`` on ``task`` by ``camelid eval``'s generation task, each
    question a user turn of the chat template; the sealed result is written to ``out`` (and
    logged in the model's ledger, as ``camelid eval`` does). Also the share per family."""
    from camelid.eval.evaluate import evaluate_model
    from camelid.eval.runner import Options

    opts = Options(chat=True, max_new_tokens=ANSWER_TOKENS, until=ANSWER_STOP)
    result = evaluate_model(model, f"generate:{task}", opts, out=out, progress=progress)
    items = result["items"]
    by_family: dict[str, list[float]] = {}
    for item in items:
        by_family.setdefault(item["id"].rsplit("-", 1)[0], []).append(item["exact_match"])
    return {
        "exact_match": result["metrics"]["exact_match"],
        "correct": int(sum(i["exact_match"] for i in items)),
        "items": len(items),
        "by_family": {k: sum(v) / len(v) for k, v in sorted(by_family.items())},
        "weights_digest": result["model"]["weights_digest"],
        "result": str(out),
        "examples": [
            {"question": q, "answer": i["answers"][0], "output": i["output"]}
            for q, i in zip(_prompts(task), items[:5], strict=False)
        ],
    }


def _prompts(task: Path) -> list[str]:
    return [json.loads(line)["prompt"] for line in task.read_text().splitlines()[:5]]


def _score_text(m: dict[str, Any]) -> str:
    families = ", ".join(f"{k} {100 * v:.0f}%" for k, v in m["by_family"].items())
    return (
        f"held-out exact match {100 * m['exact_match']:.1f}% ({m['correct']}/{m['items']}; "
        f"{families})"
    )


def _conversation(model: Path, heldout: list[Any], turns: int = 3) -> list[dict[str, str]]:
    """A chat of ``turns`` held-out questions of different families, each answered greedily
    by ``model`` with the whole conversation so far in its context."""
    from camelid.infer import SamplingParams
    from camelid.infer.load import load_engine
    from camelid.tokenizer.chat import chat_prompt_ids

    engine = load_engine(model, max_batch_size=1, progress=False)
    seen, questions = set(), []
    for ex in heldout:
        if ex.family not in seen:
            seen.add(ex.family)
            questions.append(ex.prompt)
        if len(questions) == turns:
            break
    params = SamplingParams(max_new_tokens=ANSWER_TOKENS, temperature=0.0,
                            stop=list(ANSWER_STOP))  # fmt: skip
    messages: list[dict[str, str]] = []
    for q in questions:
        messages.append({"role": "user", "content": q})
        reply = engine.generate(chat_prompt_ids(engine.tokenizer, messages), params).text
        messages.append({"role": "assistant", "content": reply.strip() or "(nothing)"})
    return messages
