"""One evaluation, start to finish: score a task, assemble the result (digests, template,
provenance, items), append it to the ledger, write the file.

    result = evaluate_model("runs/x", "task.jsonl", Options(shots=5), out=Path("res.json"))
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from camelid.eval import ledger as ledger_mod
from camelid.eval import results, runner
from camelid.eval.runner import Options
from camelid.eval.tasks import EvalError, Task, load_task
from camelid.infer.load import ModelSource, resolve_model


def model_section(source: ModelSource, engine: Any, weights_digest: str) -> dict[str, Any]:
    c = engine.config
    return {
        "given": str(source.given),
        "path": str(source.path),
        "kind": source.kind,
        "step": source.step,
        "weights_digest": weights_digest,
        "tokenizer_digest": engine.tokenizer.digest,
        "config": {
            "dim": c.dim,
            "n_layers": c.n_layers,
            "n_heads": c.n_heads,
            "n_kv_heads": c.n_kv_heads,
            "vocab_size": c.vocab_size,
            "max_seq_len": c.max_seq_len,
            "params": c.num_params(),
        },
    }


def default_ledger(source: ModelSource) -> Path:
    """A run's ledger lives in the run (also when MODEL was read through the run's export);
    a model directory's beside its weights."""
    from camelid.infer.load import is_run

    if source.given.is_dir() and is_run(source.given):
        root = source.given
    else:
        root = source.run if source.run is not None else source.path
    if not root.is_dir():
        root = root.parent
    return root / ledger_mod.LEDGER_NAME


def score(
    engine: Any,
    task: Task,
    opts: Options,
    *,
    progress: bool | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(metrics, item records) of ``task`` on ``engine`` (or a server's scorer)."""
    total = len(task.items) if opts.limit is None else min(opts.limit, len(task.items))
    if task.prepared is not None:
        total = opts.limit or 0
    if task.kind == "code":  # HumanEval shows its own bars (generating, then running)
        return runner.run_code(engine, task, opts, progress=None if progress is False else _noop)
    bar = tqdm(total=total or None, desc=task.name, unit="item", disable=progress is False,
               leave=False, dynamic_ncols=True)  # fmt: skip
    try:
        return runner.RUNNERS[task.kind](engine, task, opts, progress=bar.update)
    finally:
        bar.close()


def _noop(_: int) -> None:
    pass


def evaluate_model(
    model: str | Path,
    task_spec: str,
    opts: Options,
    *,
    engine: Any = None,
    scorer: Any = None,
    source: ModelSource | None = None,
    weights_digest: str | None = None,
    out: Path | None = None,
    ledger: Path | bool | None = None,
    private_key: Path | None = None,
    scoring: dict[str, Any] | None = None,
    skip_bad: bool = False,
    contamination: Path | None = None,
    clean_only: bool = False,
    progress: bool | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Score ``task_spec`` on ``model`` and return the sealed result (written to ``out`` when
    given). ``scorer``: what scores it instead of ``engine`` (a server's); ``ledger``: a path,
    None for the default one, False for none; ``contamination``: a ``camelid contamination``
    report on this task's data: items are marked dirty or clean and the metrics of the clean
    ones added (``metrics.clean``), or with ``clean_only`` only the clean ones are scored."""
    from camelid.infer.load import load_engine
    from camelid.weights.digest import source_digest

    say = log or (lambda _: None)
    task = load_task(task_spec, skip_bad=skip_bad)
    if task.skipped:
        say(
            f"{task.source}: skipped {len(task.skipped)} malformed lines "
            f"(first: line {task.skipped[0][0]}: {task.skipped[0][1]})"
        )
    source = source or resolve_model(model)
    if engine is None:
        engine = load_engine(model, progress=progress, log=say)
    if weights_digest is None:
        say(f"digesting the weights of {source.path}")
        weights_digest = source_digest(source)
    dirty: set[str] | None = None
    if contamination is not None:
        from camelid.eval.contamination import dirty_ids

        dirty = dirty_ids(contamination, task.sha256)
        if clean_only:
            kept = [item for item in task.items if item.id not in dirty]
            say(f"{task.name}: scoring the {len(kept)} clean items of {len(task.items)}")
            task.items = kept
            if not kept:
                raise EvalError(f"{task.source}: every item is dirty in {contamination}")
    elif clean_only:
        raise EvalError("--clean-only needs --contamination REPORT")
    template = opts.template(task.kind)
    metrics, items = score(scorer or engine, task, opts, progress=progress)
    if dirty is not None:
        for record in items:
            record["dirty"] = record["id"] in dirty
        clean = [r for r in items if not r["dirty"]]
        if not clean_only and clean:
            metrics["clean"] = runner.metrics_from_items(task.kind, clean, template)
    result: dict[str, Any] = {
        "created": results.now(),
        "task": {
            "name": task.name,
            "kind": task.kind,
            "source": task.source,
            "sha256": task.sha256,
            "items": len(task.items),
            "scored": len(items),
            "limit": opts.limit,
            "skipped_lines": [[n, why] for n, why in task.skipped],
            "contamination": None
            if contamination is None
            else {
                "report": str(contamination),
                "report_sha256": _sha256(contamination),
                "dirty": len(dirty or ()),
                "clean_only": clean_only,
                "dirty_ids": sorted(dirty or ()),
            },
        },
        "template": template,
        "template_sha256": results.template_hash(template),
        "model": model_section(source, engine, weights_digest),
        "scoring": {
            "mode": "in-process",
            "server": None,
            "device": str(getattr(engine, "device", "")),
            "dtype": str(getattr(engine, "dtype", "")).removeprefix("torch."),
            "camelid_version": _version(),
            "git_commit": results.git_commit(),
            "torch_version": _torch_version(),
            "python": platform.python_version(),
            **(scoring or {}),
        },
        "metrics": metrics,
        "items": items,
        "ledger": None,
    }
    if ledger is not False:
        path = Path(ledger) if ledger else default_ledger(source)
        entry = ledger_mod.append(path, _ledger_record(result))
        where = path if out is None else _relative(path, out.parent)
        result["ledger"] = {"path": str(where), "seq": entry["seq"], "hash": entry["hash"]}
        say(f"ledger: entry {entry['seq']} in {path}")
    if out is not None:
        result = results.write(out, result, private_key)
    else:
        result = {"format": results.FORMAT, **result}
        result["seal"] = results.seal(result)
        if private_key is not None:
            result["signature"] = results.sign(result, private_key)
    return result


def _ledger_record(result: dict[str, Any]) -> dict[str, Any]:
    m = result["model"]
    headline = {k: v for k, v in result["metrics"].items() if not k.endswith("_stderr")}
    return {
        "weights_digest": m["weights_digest"],
        "tokenizer_digest": m["tokenizer_digest"],
        "model": m["given"],
        "config": m["config"],
        "task": result["task"]["name"],
        "task_sha256": result["task"]["sha256"],
        "template_sha256": result["template_sha256"],
        "scored": result["task"]["scored"],
        "metrics": headline,
        "content_sha256": results.seal(result)["result"],
    }


def _relative(path: Path, base: Path) -> Path:
    try:
        return path.resolve().relative_to(base.resolve())
    except ValueError:
        return path.resolve()


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("camelid")
    except PackageNotFoundError:
        return "unknown"


def _torch_version() -> str:
    import torch

    return torch.__version__


def server_scorer(url: str, engine: Any, weights_digest: str, api_key: str | None = None):
    """A scorer for the server at ``url``, checked to serve ``weights_digest`` with the same
    tokenizer as the local ``engine``."""
    from camelid.eval.remote import ServerScorer

    scorer = ServerScorer(url, engine.tokenizer, api_key=api_key)
    if scorer.digest is None:
        raise EvalError(f"{url}: the server reports no weights digest, so it cannot be matched")
    if scorer.digest != weights_digest:
        raise EvalError(
            f"{url} serves weights {scorer.digest}, but MODEL has {weights_digest}: "
            "not the same model"
        )
    if scorer.tokenizer_digest and scorer.tokenizer_digest != engine.tokenizer.digest:
        raise EvalError(f"{url} uses another tokenizer than MODEL")
    if scorer.max_seq_len != engine.max_seq_len:
        raise EvalError(
            f"{url} has a context of {scorer.max_seq_len} tokens, MODEL here "
            f"{engine.max_seq_len}: give --max-seq-len {scorer.max_seq_len}"
        )
    return scorer


def compare(
    engine: Any,
    scorer: Any,
    task: Task,
    opts: Options,
    *,
    tolerance: float = 1e-4,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Score ``task`` on both (in process, through a server) and list every item whose scores
    differ beyond ``tolerance`` per token (log-probabilities) or at all (outputs)."""
    if task.kind == "code":
        raise EvalError("--compare covers likelihood, generation and perplexity tasks")
    ours, mine = score(engine, task, opts, progress=progress)
    theirs, served = score(scorer, task, opts, progress=progress)
    diffs = []
    for a, b in zip(mine, served, strict=True):
        found = runner.differences(task.kind, a, b, tolerance)
        if found:
            diffs.append({"id": a["id"], "differences": found})
    return {"task": task.name, "items": len(mine), "in_process": ours, "server": theirs,
            "tolerance": tolerance, "differing": diffs}  # fmt: skip
