"""Multiple-choice evaluation speed: ``camelid eval``'s scoring vs lm-evaluation-harness's
``hf`` backend on the same model, the same task and the same machine, in one run.

A random-weight ``--preset`` model (saved as a Hugging Face directory with a small trained
tokenizer) and ``--items`` synthetic 4-choice items (contexts of ~``--context-words`` words,
written as a local JSONL task for both). Each side loads the model first (not timed), then
scores every item; items/s is items ÷ the scoring wall time. Both condition on BOS (lm-eval's
``add_bos_token=True``), so they score the same tokens; the accuracies they report are
printed too (they must agree). lm-eval runs fully offline (its ``hf`` backend also needs
``accelerate``). ``--humaneval N`` also runs HumanEval pass@1 end to end on the first N
problems (greedy, sandboxed) and reports how long it took.

    python benchmarks/eval.py
    python benchmarks/eval.py --preset llama-125m --items 200 --batch-size 16
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import camelid
from camelid.tokenizer import train_tokenizer

WORDS = ("the of and to in is that for it as with was on be by this are from at or an sky blue "
         "cat dog runs fast slow water fire green red house tree").split()  # fmt: skip

TASK_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""

LM_EVAL = """
import json, sys, time
import lm_eval
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
model_dir, include, task, batch = sys.argv[1:5]
lm = HFLM(pretrained=model_dir, device="cpu", dtype="float32", batch_size=int(batch),
          add_bos_token=True)
tm = TaskManager(include_path=include, include_defaults=False)
t0 = time.perf_counter()
out = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=tm, num_fewshot=0)
secs = time.perf_counter() - t0
r = out["results"][task]
print(json.dumps({"seconds": secs, "acc": r["acc,none"], "acc_norm": r["acc_norm,none"]}))
"""


def make_model(preset: str, root: Path) -> Path:
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(200)) for _ in range(50)]
    tok = train_tokenizer(texts, 1024, num_special=256)
    config = camelid.ModelConfig.from_preset(preset)
    if config.vocab_size < tok.vocab_size:
        config = dataclasses.replace(config, vocab_size=tok.vocab_size)
    torch.manual_seed(0)
    model = camelid.Transformer(config)
    from camelid.infer.export import save_pretrained

    out = root / preset
    save_pretrained(model, tok, out)
    return out


def make_task(path: Path, items: int, words: int) -> Path:
    rng = random.Random(1)
    with path.open("w") as f:
        for _ in range(items):
            context = " ".join(rng.choice(WORDS) for _ in range(words)) + " :"
            choices = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4)))
                       for _ in range(4)]  # fmt: skip
            f.write(json.dumps({"context": context, "choices": choices,
                                "gold": rng.randrange(4)}) + "\n")  # fmt: skip
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="llama-16m")
    ap.add_argument("--items", type=int, default=200)
    ap.add_argument("--context-words", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=16, help="lm-eval's batch size")
    ap.add_argument("--no-peer", action="store_true", help="skip lm-evaluation-harness")
    ap.add_argument(
        "--humaneval",
        type=int,
        default=0,
        metavar="N",
        help="also run HumanEval pass@1 on the first N problems",
    )
    args = ap.parse_args()

    from camelid.eval import runner
    from camelid.eval.evaluate import score
    from camelid.eval.tasks import load_task
    from camelid.infer.load import load_engine

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = make_model(args.preset, root)
        tasks = root / "tasks"
        tasks.mkdir()
        data = make_task(tasks / "items.jsonl", args.items, args.context_words)
        (tasks / "bench_mc.yaml").write_text(TASK_YAML.format(task="bench_mc", data=data))
        config = camelid.ModelConfig.from_hf(json.loads((model_dir / "config.json").read_text()))
        print(f"{args.preset}: {config.num_params() / 1e6:.1f}M parameters, fp32, CPU "
              f"({torch.get_num_threads()} threads); {args.items} items x 4 choices, "
              f"~{args.context_words}-word contexts")  # fmt: skip

        engine = load_engine(model_dir, device="cpu", dtype="float32", progress=False)
        task = load_task(str(data))
        score(engine, task, runner.Options(limit=8), progress=False)  # warm-up
        t0 = time.perf_counter()
        metrics, _ = score(engine, task, runner.Options(), progress=False)
        ours = time.perf_counter() - t0
        print(
            f"camelid eval: {args.items / ours:8.1f} items/s ({ours:.2f} s)  "
            f"acc {metrics['acc']:.4f} acc_norm {metrics['acc_norm']:.4f}"
        )
        if not args.no_peer:
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                   "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(root / "hf-home"),
                   "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
            proc = subprocess.run(
                [sys.executable, "-c", LM_EVAL, str(model_dir), str(tasks), "bench_mc",
                 str(args.batch_size)], capture_output=True, text=True, env=env,
            )  # fmt: skip
            if proc.returncode != 0:
                print(f"lm-eval hf: failed:\n{proc.stderr[-3000:]}")
            else:
                peer = json.loads(proc.stdout.strip().splitlines()[-1])
                secs = peer["seconds"]
                print(
                    f"lm-eval hf:   {args.items / secs:8.1f} items/s ({secs:.2f} s)  "
                    f"acc {peer['acc']:.4f} acc_norm {peer['acc_norm']:.4f}"
                )
                print(
                    f"ratio: camelid eval is {secs / ours:.2f}x lm-eval's hf backend (target >= 2x)"
                )
                if abs(peer["acc"] - metrics["acc"]) > 1e-9:
                    print("note: the accuracies differ (see docs/evaluation.md)")
        if args.humaneval:
            from camelid.eval.tasks import load_task as load

            he = load("humaneval")
            t0 = time.perf_counter()
            metrics, items = score(engine, he, runner.Options(limit=args.humaneval,
                                                              max_new_tokens=256, until=()),
                                   progress=False)  # fmt: skip
            secs = time.perf_counter() - t0
            print(
                f"HumanEval pass@1 on {len(items)} problems: {metrics['pass@1']:.3f} "
                f"in {secs:.1f} s ({secs / len(items):.2f} s a problem, generation and "
                "sandboxed execution)"
            )


if __name__ == "__main__":
    main()
