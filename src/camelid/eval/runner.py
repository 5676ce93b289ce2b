"""Scoring a task on the engine: one function per task kind, each returning the task's metrics
and one record per item (what was asked, what the model said, how it was scored).

Likelihoods are batched through :meth:`camelid.Engine.score_batch` (several sequences per
forward pass, only the scored positions projected); generation through ``Engine.generate``
(batches of the engine's ``max_batch_size``). Text is tokenised with BOS first, as Llama models
are trained and as Meta evaluates them, and a context/continuation pair is split the way
lm-evaluation-harness splits it: trailing whitespace of the context moves to the continuation,
the pair is encoded whole and the continuation is what follows the context's own encoding.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from camelid.eval.tasks import (
    ChoiceItem,
    EvalError,
    GenerateItem,
    Task,
    few_shot_context,
    few_shot_turns,
)
from camelid.infer import Engine, SamplingParams

Progress = Callable[[int], None]  # called with how many items (or tokens) were just finished


@dataclass
class Options:
    """How a task is scored; all of it goes into the result file (and its prompt hash)."""

    shots: int = 0
    seed: int = 1234
    delimiter: str = " "
    max_new_tokens: int = 64
    until: tuple[str, ...] = ("\n\n",)
    match: str = "exact"  # "exact" or "regex"
    pattern: str | None = None
    limit: int | None = None
    # code tasks
    samples: int = 1
    k: tuple[int, ...] = (1,)
    temperature: float = 0.0
    top_p: float = 1.0
    timeout_s: float = 10.0
    batch_tokens: int = 8192
    # generation tasks: each prompt as a user turn in the tokenizer's chat format (few-shot
    # examples as earlier user/assistant turns), the answer the assistant's reply
    chat: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def template(self, kind: str) -> dict[str, Any]:
        """What shapes the prompts of a ``kind`` task (hashed into the result's template hash)."""
        common = {"kind": kind, "bos": True}
        if kind == "choice":
            return {
                **common,
                "shots": self.shots,
                "seed": self.seed,
                "delimiter": self.delimiter,
                "fewshot_delimiter": "\n\n",
            }
        if kind == "generate":
            return {
                **common,
                "shots": self.shots,
                "seed": self.seed,
                "delimiter": self.delimiter,
                "until": list(self.until),
                "max_new_tokens": self.max_new_tokens,
                "match": self.match,
                "pattern": self.pattern,
                **({"chat": True} if self.chat else {}),  # absent: the hashes of plain runs
            }
        if kind == "code":
            return {
                **common,
                "samples": self.samples,
                "k": list(self.k),
                "temperature": self.temperature,
                "top_p": self.top_p,
                "seed": self.seed,
                "max_new_tokens": self.max_new_tokens,
            }
        return common


def encode_pair(engine: Engine, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids with BOS, continuation ids), split as lm-evaluation-harness splits them."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    tok = engine.tokenizer
    whole = tok.encode(context + continuation, bos=True)
    cut = len(tok.encode(context, bos=True))
    cut = min(cut, len(whole) - 1)  # a continuation merged into the context keeps one token
    return whole[:cut], whole[cut:]


def likelihoods(
    engine: Engine,
    pairs: list[tuple[list[int], list[int]]],
    *,
    batch_tokens: int = 8192,
    progress: Progress | None = None,
) -> list[tuple[float, bool, int]]:
    """(summed logprob, every token the greedy choice, tokens) of each continuation given its
    context. Pairs sharing a context (an item's choices) run it once
    (``Engine.score_continuations``); a pair longer than the context window loses tokens from
    the left of its context and is scored on its own."""
    limit = engine.max_seq_len
    out: list[tuple[float, bool, int] | None] = [None] * len(pairs)
    shared: dict[tuple[int, ...], list[int]] = {}
    alone: list[int] = []
    for n, (ctx, cont) in enumerate(pairs):
        if len(cont) >= limit:
            raise EvalError(f"request {n}: a continuation of {len(cont)} tokens fills the context")
        fits = len(ctx) + len(cont) <= limit + 1
        if fits and ctx and hasattr(engine, "score_continuations"):
            shared.setdefault(tuple(ctx), []).append(n)
        else:
            alone.append(n)

    def put(n: int, toks: list) -> None:
        out[n] = (sum(t.logprob for t in toks), all(t.rank == 1 for t in toks), len(toks))

    groups = list(shared.items())
    step = 64  # groups per call, so the progress bar moves
    for i in range(0, len(groups), step):
        chunk = groups[i : i + step]
        scored = engine.score_continuations(
            [(list(ctx), [pairs[n][1] for n in members]) for ctx, members in chunk],
            batch_tokens=batch_tokens,
        )
        for (_, members), per in zip(chunk, scored, strict=True):
            for n, toks in zip(members, per, strict=True):
                put(n, toks)
        if progress is not None:
            progress(sum(len(m) for _, m in chunk))
    seqs, starts = [], []
    for n in alone:
        ctx, cont = pairs[n]
        seq = (ctx + cont)[-(limit + 1) :]  # inputs fill the context; the last is a target
        seqs.append(seq)
        starts.append(len(seq) - len(cont))
    for i in range(0, len(alone), 256):
        scored = engine.score_batch(seqs[i : i + 256], starts[i : i + 256],
                                    batch_tokens=batch_tokens)  # fmt: skip
        for n, toks in zip(alone[i : i + 256], scored, strict=True):
            put(n, toks)
        if progress is not None:
            progress(len(scored))
    return out  # type: ignore[return-value]


def _stderr(values: list[float]) -> float | None:
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def _indices(task: Task, opts: Options, indices: list[int] | None) -> list[int]:
    if indices is not None:
        return indices
    n = len(task.items)
    return list(range(n if opts.limit is None else min(n, opts.limit)))


# ---------------------------------------------------------------------------- multiple choice
def run_choice(
    engine: Engine,
    task: Task,
    opts: Options,
    progress: Progress | None = None,
    indices: list[int] | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    chosen = _indices(task, opts, indices)
    pairs = []
    for n in chosen:
        item: ChoiceItem = task.items[n]
        context = few_shot_context(task, n, opts.shots, opts.seed, opts.delimiter) + item.context
        for choice in item.choices:
            pairs.append(encode_pair(engine, context, opts.delimiter + choice))
    per_pair = iter(likelihoods(engine, pairs, batch_tokens=opts.batch_tokens))
    records = []
    for n in chosen:
        item = task.items[n]
        scores = [next(per_pair) for _ in item.choices]
        record = {
            "id": item.id,
            "gold": item.gold,
            "logprobs": [s[0] for s in scores],
            "greedy": [s[1] for s in scores],
            "tokens": [s[2] for s in scores],
            "choice_chars": [len(c) for c in item.choices],
        }
        records.append({**record, **_choice_scores(record)})
        if progress is not None:
            progress(1)
    return metrics_from_items("choice", records, opts.template("choice")), records


def _choice_scores(record: dict[str, Any]) -> dict[str, Any]:
    lps, chars = record["logprobs"], record["choice_chars"]
    pred = _argmax(lps)
    pred_norm = _argmax([lp / c for lp, c in zip(lps, chars, strict=True)])
    gold = record["gold"]
    return {
        "pred": pred,
        "pred_norm": pred_norm,
        "acc": float(pred == gold),
        "acc_norm": float(pred_norm == gold),
    }


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: values[i])


def _means(columns: dict[str, list[float]]) -> dict[str, Any]:
    out: dict[str, Any] = {"items": len(next(iter(columns.values())))}
    for name, values in columns.items():
        out[name] = sum(values) / len(values) if values else None
        out[f"{name}_stderr"] = _stderr(values)
    return out


# -------------------------------------------------------------------------------- generation
def run_generate(
    engine: Engine,
    task: Task,
    opts: Options,
    progress: Progress | None = None,
    indices: list[int] | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    chosen = _indices(task, opts, indices)
    template = opts.template("generate")
    _pattern(template)  # a bad pattern fails before any generation
    if opts.chat:
        from camelid.tokenizer.chat import chat_prompt_ids

        tokenizer = getattr(engine, "tokenizer", None)
        if tokenizer is None:
            raise EvalError("--chat needs the model's own tokenizer: it is not supported with "
                            "--server yet (ask the server's chat endpoint instead)")  # fmt: skip
        prompts = [
            chat_prompt_ids(tokenizer, [*few_shot_turns(task, n, opts.shots, opts.seed),
                                        {"role": "user", "content": task.items[n].prompt}])
            for n in chosen
        ]  # fmt: skip
    else:
        prompts = [
            few_shot_context(task, n, opts.shots, opts.seed, opts.delimiter) + task.items[n].prompt
            for n in chosen
        ]
    params = SamplingParams(
        max_new_tokens=opts.max_new_tokens,
        temperature=0.0,
        stop=list(opts.until),
        truncate_prompt=True,
    )
    records = []
    step = engine.max_batch_size
    for i in range(0, len(chosen), step):
        outs = engine.generate(prompts[i : i + step], params)
        for n, out in zip(chosen[i : i + step], outs, strict=True):
            item: GenerateItem = task.items[n]
            record = {
                "id": item.id,
                "output": out.text,
                "answers": list(item.answers),
                "finish_reason": out.finish_reason,
            }
            records.append({**record, **_generate_scores(record, template)})
        if progress is not None:
            progress(len(outs))
    return metrics_from_items("generate", records, template), records


def _pattern(template: dict[str, Any]) -> re.Pattern | None:
    match = template.get("match", "exact")
    if match not in ("exact", "regex"):
        raise EvalError(f"--match must be exact or regex, got {match!r}")
    if match == "exact":
        return None
    if not template.get("pattern"):
        raise EvalError("--match regex needs --pattern")
    try:
        return re.compile(template["pattern"])
    except re.error as e:
        raise EvalError(f"--pattern {template['pattern']!r}: {e}") from None


def _generate_scores(record: dict[str, Any], template: dict[str, Any]) -> dict[str, Any]:
    answer = _extract(record["output"], _pattern(template))
    ok = answer is not None and answer in {a.strip() for a in record["answers"]}
    return {"extracted": answer, "exact_match": float(ok)}


def _extract(text: str, pattern: re.Pattern | None) -> str | None:
    if pattern is None:
        return text.strip()
    m = pattern.search(text)
    if m is None:
        return None
    return (m.group(1) if m.groups() else m.group(0)).strip()


# -------------------------------------------------------------------------------- perplexity
def run_perplexity(
    engine: Engine,
    task: Task,
    opts: Options,
    progress: Progress | None = None,
    indices: list[int] | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    if task.prepared is not None:
        docs = _prepared_docs(engine, task, opts.limit, indices)
    else:
        docs = []
        for n in _indices(task, opts, indices):
            text = task.items[n].text()
            docs.append(
                (
                    task.items[n].id,
                    engine.tokenizer.encode(text, bos=True),
                    len(text.encode()),
                    len(text.split()),
                )
            )
    records = []
    for ident, ids, doc_bytes, doc_words in docs:
        seqs, starts = _windows(ids, engine.max_seq_len)
        scored = engine.score_batch(seqs, starts, batch_tokens=opts.batch_tokens)
        records.append(
            {
                "id": ident,
                "logprob": sum(t.logprob for toks in scored for t in toks),
                "tokens": sum(len(toks) for toks in scored),
                "bytes": doc_bytes,
                "words": doc_words,
            }
        )
        if progress is not None:
            progress(1)
    if sum(r["tokens"] for r in records) == 0:
        raise EvalError(f"{task.source}: nothing to score (every document is one token)")
    return metrics_from_items("perplexity", records, opts.template("perplexity")), records


def _windows(ids: list[int], limit: int) -> tuple[list[list[int]], list[int]]:
    """Windows of at most ``limit`` input tokens that together predict every token but the
    first once: each window's first token is the previous window's last (one token of
    context, as lm-evaluation-harness's rolling log-likelihood does)."""
    seqs, starts = [], []
    for s in range(0, max(len(ids) - 1, 0), limit):
        seqs.append(ids[s : s + limit + 1])
        starts.append(1)
    return seqs, starts


def _prepared_docs(
    engine: Engine, task: Task, limit: int | None, indices: list[int] | None
) -> Iterable:
    """The validation split's shards, one document each (token ids as stored; bytes from the
    tokenizer's byte length of every token)."""
    import numpy as np

    from camelid.data.loader import read_manifest

    manifest = read_manifest(task.prepared)
    want = (manifest.get("tokenizer") or {}).get("digest")
    if want and want != engine.tokenizer.digest:
        raise EvalError(
            f"{task.prepared}: tokenized with tokenizer {want[:12]}, but the model's tokenizer is "
            f"{engine.tokenizer.digest[:12]}: the tokens would mean something else"
        )
    lengths = engine.tokenizer.token_byte_lengths()
    shards = manifest["splits"].get("validation", {}).get("shards", [])
    if not shards:
        raise EvalError(f"{task.prepared}: the dataset has no validation split")
    dtype = np.dtype(manifest["dtype"])
    if indices is None:
        indices = list(range(len(shards) if limit is None else min(limit, len(shards))))
    for n in indices:
        shard = shards[n]
        ids = np.memmap(task.prepared / shard["file"], dtype=dtype, mode="r").tolist()
        yield shard["file"], ids, sum(lengths[t] for t in ids[1:] if t < len(lengths)), 0


# ------------------------------------------------------------------ metrics, and re-scoring
def metrics_from_items(
    kind: str | None, records: list[dict[str, Any]], template: dict[str, Any]
) -> dict[str, Any]:
    """A task's metrics from its item records alone: what a result file's metrics must equal
    (each item's own scores are recomputed from its raw outputs first)."""
    if kind == "choice":
        scored = [_choice_scores(r) for r in records]
        return _means(
            {"acc": [s["acc"] for s in scored], "acc_norm": [s["acc_norm"] for s in scored]}
        )
    if kind == "generate":
        return _means(
            {"exact_match": [_generate_scores(r, template)["exact_match"] for r in records]}
        )
    if kind == "perplexity":
        nats = -sum(r["logprob"] for r in records)
        tokens = sum(r["tokens"] for r in records)
        nbytes = sum(r["bytes"] for r in records)
        words = sum(r.get("words", 0) for r in records)
        out: dict[str, Any] = {
            "items": len(records),
            "tokens": tokens,
            "bytes": nbytes,
            "loss": nats / tokens if tokens else None,
            "perplexity": math.exp(nats / tokens) if tokens else None,
            "bits_per_byte": nats / (math.log(2) * nbytes) if nbytes else None,
        }
        if nbytes:
            out["byte_perplexity"] = 2 ** out["bits_per_byte"]
        if words:
            out["word_perplexity"] = math.exp(nats / words)
        return out
    if kind == "code":
        from camelid.eval.code import pass_at_k

        ks = template.get("k") or [1]
        out: dict[str, Any] = {"items": len(records)}
        for k in ks:
            vals = [pass_at_k(r["n"], r["correct"], k) for r in records if r["n"] >= k]
            out[f"pass@{k}"] = sum(vals) / len(vals) if vals else None
        return out
    raise EvalError(f"unknown task kind {kind!r}")


def rescore(
    engine: Engine, task: Task, result: dict[str, Any], picks: list[int], tolerance: float
) -> list[tuple[int, str]]:
    """Score the items at ``picks`` again, as the result's template says, and name every item
    whose fresh score differs from the recorded one (logprobs beyond ``tolerance`` per token,
    any other output at all)."""
    kind = task.kind
    template = result.get("template") or {}
    items = result.get("items") or []
    opts = options_from_template(template, result)
    problems: list[tuple[int, str]] = []
    index_of = {item.id: n for n, item in enumerate(task.items)}
    wanted = []
    for p in picks:
        n = index_of.get(str(items[p].get("id")))
        if n is None:
            problems.append((p, "no such item in the task data"))
        else:
            wanted.append((p, n))
    if not wanted:
        return problems
    if kind == "code":
        return problems + recheck_code(task, items, wanted, opts)
    _, fresh = RUNNERS[kind](engine, task, opts, indices=[n for _, n in wanted])
    for (p, _), new in zip(wanted, fresh, strict=True):
        problems.extend((p, d) for d in differences(kind, items[p], new, tolerance))
    return problems


def differences(kind: str, old: dict[str, Any], new: dict[str, Any], tolerance: float) -> list[str]:
    """How item record ``new`` disagrees with ``old``: a log-probability beyond ``tolerance``
    per token, or any other output or decision."""
    out = []
    if kind == "choice":
        pairs = zip(old.get("logprobs", []), new["logprobs"], new["tokens"], strict=False)
        for c, (a, b, t) in enumerate(pairs):
            if abs(a - b) > tolerance * max(t, 1):
                out.append(f"choice {c}: logprob {a:.6f} against {b:.6f}")
        for key in ("pred", "acc", "pred_norm", "acc_norm"):
            if old.get(key) != new[key]:
                out.append(f"{key}: {old.get(key)!r} against {new[key]!r}")
    elif kind == "generate":
        if old.get("output") != new["output"]:
            out.append(f"output: {old.get('output')!r} against {new['output']!r}")
    elif kind == "perplexity":
        a, b = old.get("logprob", 0.0), new["logprob"]
        if abs(a - b) > tolerance * max(new["tokens"], 1):
            out.append(f"logprob: {a:.6f} against {b:.6f}")
    return out


def options_from_template(template: dict[str, Any], result: dict[str, Any]) -> Options:
    """The Options a result was scored with, from its template."""
    opts = Options()
    for key in (
        "shots",
        "seed",
        "delimiter",
        "max_new_tokens",
        "match",
        "pattern",
        "samples",
        "temperature",
        "top_p",
    ):
        if key in template:
            setattr(opts, key, template[key])
    if "until" in template:
        opts.until = tuple(template["until"])
    if "k" in template:
        opts.k = tuple(template["k"])
    return opts


# ------------------------------------------------------------------------------------ code
def run_code(
    engine: Engine,
    task: Task,
    opts: Options,
    progress: Progress | None = None,
    indices: list[int] | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """HumanEval pass@k: ``opts.samples`` completions per problem, each run in the sandbox."""
    from camelid.eval import code

    chosen = _indices(task, opts, indices)
    out = code.evaluate_humaneval(
        engine,
        n=opts.samples,
        k=opts.k,
        temperature=opts.temperature,
        top_p=opts.top_p,
        max_new_tokens=opts.max_new_tokens,
        seed=opts.seed,
        timeout_s=opts.timeout_s,
        problems=[task.items[n].problem for n in chosen],
        progress=progress is not None,
    )
    records = [{"id": p["task_id"], **{k: v for k, v in p.items() if k != "task_id"}}
               for p in out["problems"]]  # fmt: skip
    metrics = metrics_from_items("code", records, opts.template("code"))
    metrics["sandbox"] = out["sandbox"]["isolation"]
    return metrics, records


def recheck_code(
    task: Task, items: list[dict[str, Any]], wanted: list[tuple[int, int]], opts: Options
) -> list[tuple[int, str]]:
    """Run the recorded completions of the items at ``wanted`` (result index, task index) in
    the sandbox again; name every one whose pass/fail differs from the record."""
    from camelid.eval import code

    jobs = [(task.items[n].problem, c) for p, n in wanted for c in items[p].get("completions", [])]
    fresh = iter(code.check_many(jobs, timeout_s=opts.timeout_s, progress=False))
    problems = []
    for p, _ in wanted:
        rec = items[p]
        passed = sum(next(fresh).passed for _ in rec.get("completions", []))
        if passed != rec.get("correct"):
            problems.append(
                (p, f"correct: recorded {rec.get('correct')}, the sandbox gives {passed}")
            )
    return problems


RUNNERS = {
    "choice": run_choice,
    "generate": run_generate,
    "perplexity": run_perplexity,
    "code": run_code,
}
