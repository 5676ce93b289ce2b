"""HumanEval pass@k: the unbiased estimator against its closed form, the check program on the
package's own canonical solutions (they pass; a wrong body fails), and ``evaluate_humaneval``
end to end, on a tiny random model (nothing it writes is correct) and on an engine that
answers with the canonical solutions (everything is), so that a pipeline that never ran the
programs could pass neither."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import pytest
from conftest import random_llama_dir

import camelid
from camelid import RequestError
from camelid.eval.code import (
    STOP,
    check,
    check_many,
    evaluate_humaneval,
    generate_completions,
    load_problems,
    pass_at_k,
    program,
)
from camelid.tokenizer import train_tokenizer

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")


def closed_form(n: int, c: int, k: int) -> float:
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)  # comb(a, b) is 0 when b > a


def test_pass_at_k_equals_the_closed_form():
    cases = 0
    for n in range(1, 21):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(closed_form(n, c, k), abs=1e-12)
                cases += 1
    assert cases > 1000
    # the edges, exactly
    assert pass_at_k(10, 0, 1) == 0.0  # nothing correct
    assert pass_at_k(10, 10, 5) == 1.0  # everything correct
    assert pass_at_k(10, 8, 3) == 1.0  # n - c < k: every draw of 3 holds a correct one
    assert pass_at_k(200, 13, 1) == pytest.approx(13 / 200)
    # large n, where the binomials themselves would overflow a float
    assert pass_at_k(2000, 100, 100) == pytest.approx(closed_form(2000, 100, 100), abs=1e-12)


@pytest.mark.parametrize("n, c, k", [(5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6), (5.0, 2, 1)])
def test_pass_at_k_rejects_impossible_counts(n, c, k):
    with pytest.raises(RequestError):
        pass_at_k(n, c, k)


@pytest.fixture(scope="module")
def problems():
    return load_problems()


def test_the_package_ships_164_problems(problems):
    assert len(problems) == 164
    assert problems[0]["task_id"] == "HumanEval/0" and problems[-1]["task_id"] == "HumanEval/163"
    assert [p["task_id"] for p in load_problems(limit=3)] == ["HumanEval/0", "HumanEval/1",
                                                              "HumanEval/2"]  # fmt: skip
    with pytest.raises(RequestError, match="limit"):
        load_problems(limit=0)


def test_program_layout(problems):
    p = problems[0]
    text = program(p, "    return True\n")
    tail = "\n" + p["test"] + "\ncheck(has_close_elements)\n"
    assert text == p["prompt"] + "    return True\n" + tail


def test_canonical_solutions_pass_and_a_wrong_body_fails(problems):
    chosen = [problems[i] for i in (0, 2, 12, 53, 162)]  # 162 imports hashlib
    right = check_many([(p, p["canonical_solution"]) for p in chosen], workers=2)
    assert [r.status for r in right] == ["passed"] * 5, [r.error for r in right]
    wrong = check_many([(p, "    return None\n") for p in chosen], workers=2)
    assert [r.status for r in wrong] == ["failed"] * 5
    assert all(r.error and r.error.split(":")[0] in ("AssertionError", "TypeError") for r in wrong)
    # one at a time gives the same verdict
    assert check(chosen[0], chosen[0]["canonical_solution"]).passed


@dataclass
class _Answer:
    text: str


class AnsweringEngine:
    """Stands in for camelid's Engine: answers each prompt from a table, and records the
    sampling settings it was asked for."""

    max_batch_size = 2

    def __init__(self, answers: dict[str, str]) -> None:
        self.answers, self.params = answers, []

    def generate(self, prompts, params):
        self.params.append(params)
        return [_Answer(self.answers[p]) for p in prompts]


def test_evaluate_runs_the_programs(problems):
    first = problems[:3]
    right = AnsweringEngine({p["prompt"]: p["canonical_solution"] for p in first})
    result = evaluate_humaneval(right, limit=3, progress=False)
    assert result["pass_at_k"] == {"pass@1": 1.0}
    assert [p["statuses"] for p in result["problems"]] == [["passed"]] * 3
    assert all(params.stop == STOP and params.temperature == 0 for params in right.params)
    assert len(right.params) == 2  # 3 prompts in batches of max_batch_size=2

    wrong = AnsweringEngine({p["prompt"]: "    return None\n" for p in first})
    result = evaluate_humaneval(wrong, limit=3, progress=False)
    assert result["pass_at_k"] == {"pass@1": 0.0}
    assert result["status_counts"] == {"failed": 3}


def test_evaluate_with_n_samples_estimates_pass_at_k(problems):
    # Two problems, two samples each: one right and one wrong for the first, both wrong for
    # the second. pass@1 = (1/2 + 0) / 2, pass@2 = (1 + 0) / 2; k=5 > n cannot be estimated.
    p0, p1 = problems[:2]

    class Alternating(AnsweringEngine):
        def generate(self, prompts, params):
            self.params.append(params)
            right = p0["canonical_solution"] if len(self.params) == 1 else "    pass\n"
            return [_Answer(right if p == p0["prompt"] else "    pass\n") for p in prompts]

    engine = Alternating({})
    result = evaluate_humaneval(
        engine, problems=[p0, p1], n=2, k=(1, 2, 5), temperature=0.8, seed=7, progress=False
    )
    assert result["pass_at_k"] == {"pass@1": pytest.approx(0.25), "pass@2": pytest.approx(0.5)}
    assert result["k"] == [1, 2] and result["k_skipped"] == [5]
    assert [p["correct"] for p in result["problems"]] == [1, 0]
    assert engine.params[0].seed == 7 and engine.params[1].seed not in (None, 7)
    with pytest.raises(RequestError, match="temperature"):
        evaluate_humaneval(engine, problems=[p0], n=2, temperature=0.0, progress=False)


@pytest.fixture(scope="module")
def tiny_engine(problems, tmp_path_factory):
    """A random 2-layer model with a small BPE tokenizer learned from the HumanEval prompts."""
    tok = train_tokenizer([p["prompt"] + p["canonical_solution"] for p in problems], 800, 16)
    path = random_llama_dir(
        tmp_path_factory.mktemp("humaneval") / "model",
        vocab_size=tok.vocab_size,
        max_position_embeddings=1024,
    )
    return camelid.Engine(camelid.load(path), tok)


def test_evaluate_humaneval_on_a_random_model(tiny_engine):
    result = evaluate_humaneval(tiny_engine, limit=2, max_new_tokens=24, progress=False)
    assert result["task"] == "humaneval" and result["num_problems"] == 2
    assert result["pass_at_k"] == {"pass@1": 0.0}  # a random model writes no correct code
    assert result["settings"]["temperature"] == 0.0 and result["settings"]["limit"] == 2
    assert "guard" in result["sandbox"]["isolation"]
    assert sum(result["status_counts"].values()) == 2
    for record, task_id in zip(result["problems"], ["HumanEval/0", "HumanEval/1"], strict=True):
        assert record["task_id"] == task_id and record["n"] == 1 and record["correct"] == 0
        assert len(record["statuses"]) == len(record["errors"]) == len(record["completions"]) == 1
        (completion,) = record["completions"]
        assert isinstance(completion, str) and not any(s in completion for s in STOP)
        # The program ran: its verdict is an error it raised (or a limit it hit), not a
        # placeholder; "error" would mean the sandbox never started it.
        (status,) = record["statuses"]
        assert status in ("failed", "refused", "timeout", "cpu", "memory", "killed"), record
        assert record["errors"][0], record


def test_seeded_samples_repeat(tiny_engine, problems):
    kwargs = dict(n=2, temperature=1.0, top_p=1.0, max_new_tokens=12, seed=3)
    a = generate_completions(tiny_engine, problems[:2], **kwargs)
    b = generate_completions(tiny_engine, problems[:2], **kwargs)
    assert a == b
    assert a[0][0] != a[0][1]  # distinct seeds per sample
