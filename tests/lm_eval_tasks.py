"""Local lm-evaluation-harness tasks for tests, run fully offline.

No lm-eval task ships its data, so a test writes its own: rows as a JSONL file and a task YAML
with ``dataset_path: json`` over it, in a directory given to lm-eval as ``include_path``. The
environment of :func:`offline_env` keeps lm-eval (and the Hub libraries under it) off the
network: nothing cached to fall back on, offline switches on, a dead proxy for anything not on
loopback. Those switches are read when the Hub libraries are imported, so lm-eval runs in a
fresh interpreter with it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

# A multiple-choice task over rows {"question", "choices", "label"}: lm-eval asks for the
# log-likelihood of " " + each choice after "Question: ...\nAnswer:".
MC_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""

# The log-likelihood of each row's whole "text" (perplexities).
ROLLING_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""

# Greedy completion of each row's "prompt" until a newline, scored against its "answer".
GENERATE_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: {max_gen_toks}
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def write_task(task_dir: Path, task: str, yaml: str, rows: Sequence[dict], **fields) -> Path:
    """``task_dir/task.jsonl`` holding ``rows`` and ``task_dir/task.yaml`` from the template
    ``yaml`` (with ``fields``); returns the YAML's path."""
    task_dir.mkdir(parents=True, exist_ok=True)
    data = task_dir / f"{task}.jsonl"
    with data.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    path = task_dir / f"{task}.yaml"
    path.write_text(yaml.format(task=task, data=data, **fields))
    return path


def write_mc_task(
    task_dir: Path, task: str, items: Sequence[tuple[str, list[str]]], labels: Sequence[int]
) -> Path:
    """A multiple-choice task (:data:`MC_YAML`) of (question, choices) items and gold labels."""
    rows = [
        {"question": question, "choices": choices, "label": label}
        for (question, choices), label in zip(items, labels, strict=True)
    ]
    return write_task(task_dir, task, MC_YAML, rows)


def mc_pairs(question: str, choices: list[str]) -> list[tuple[str, str]]:
    """lm-eval's requests for one item of :data:`MC_YAML`: (context, continuation)."""
    return [(f"Question: {question}\nAnswer:", f" {c}") for c in choices]


def offline_env(tmp_path: Path) -> dict[str, str]:
    """The environment for lm-eval in a subprocess, off the network (see the module)."""
    return {
        **os.environ,
        "HF_HOME": str(tmp_path / "hf"),  # empty: nothing cached to fall back on
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HTTP_PROXY": "http://127.0.0.1:9",  # anything not on loopback fails at once
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "NO_PROXY": "127.0.0.1,localhost",
        "TOKENIZERS_PARALLELISM": "false",
    }
