"""``camelid train``: pre-train or fine-tune a model from a TOML recipe."""

from __future__ import annotations

import argparse
import signal
import sys
import textwrap

from camelid.cli.args import add_set_arg
from camelid.train.recipe import load_recipe, shipped_recipes
from camelid.train.trainer import TrainSummary, train


class _WholeNames(argparse.HelpFormatter):
    """Help text wrapped at spaces only, so a recipe name (``lora-cpu``) is never split."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        formatter_class=_WholeNames,
        help="pre-train or fine-tune a model from a TOML recipe (one CPU to many GPUs)",
        description="Pre-train or fine-tune a Llama from a TOML recipe: [init] model = an HF "
        "directory or a run starts from its weights (continued pre-training); data prepared "
        "with 'camelid prepare --format chat' makes it supervised fine-tuning; [lora] r = N "
        "trains LoRA adapters only; [dpo] data = PAIRS.jsonl is DPO (docs/finetuning.md). "
        "Run it as is on one device, or under "
        "'torchrun --nproc_per_node N -m camelid.cli train ...' to shard it with FSDP2. "
        "Writes metrics.jsonl, checkpoints, report.md and Hugging Face weights to run.out_dir. "
        "Relative paths in a recipe file are relative to its directory (in a shipped recipe "
        "and in --set values: to the current directory).",
    )
    p.add_argument(
        "recipe",
        nargs="?",
        metavar="RECIPE",
        help="a recipe file, or the name of a shipped one: " + ", ".join(shipped_recipes()),
    )
    add_set_arg(p, "override a recipe key, e.g. --set optim.lr=1e-3 (repeatable)")
    p.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        metavar="CHECKPOINT",
        help="continue from the newest usable checkpoint in run.out_dir, or from the checkpoint "
        "directory given (RECIPE may come before or after --resume)",
    )
    p.add_argument("--fresh", action="store_true", help="discard an earlier run in run.out_dir")
    p.set_defaults(func=run, usage_error=p.error)


def run(args: argparse.Namespace) -> int:
    recipe, resume = args.recipe, args.resume
    if recipe is None and resume not in (None, "latest"):
        recipe, resume = resume, "latest"  # `train --resume RECIPE`: argparse gave --resume it
    if recipe is None:
        args.usage_error("a RECIPE is required (a file, or one of: "
                         f"{', '.join(shipped_recipes())})")  # fmt: skip
    summary = train(load_recipe(recipe, args.set), resume=resume, fresh=args.fresh)
    if not summary.reports:
        return 0  # not the main rank
    print_summary(summary)
    return exit_status(summary)


def exit_status(s: TrainSummary) -> int:
    """0 for a finished run; for one stopped by a signal, 128 + the signal, as a shell reports
    a process killed by it (Ctrl-C: 130, SIGTERM: 143), with one line on stderr saying that
    the checkpoint is safe and how to go on."""
    if s.status == "finished":
        return 0
    signum = s.stop_signal or signal.SIGTERM
    print(
        f"camelid: interrupted ({signal.Signals(signum).name}): checkpoint saved at step "
        f"{s.steps}; resume with: camelid train {s.run_dir}/recipe.toml --resume",
        file=sys.stderr,
        flush=True,
    )
    return 128 + signum


def print_summary(s: TrainSummary) -> None:
    """A finished (or stopped) run in a few lines: what was done, where it is, how to resume.
    Time and goodput are the whole run's, over every process that worked on it."""
    if s.already_finished:
        where = ", ".join(
            f"{name} {path}" for name, path in (("report", s.report), ("weights", s.export)) if path
        )
        print(
            f"{s.run_dir}: already finished at step {s.steps}, nothing to do (raise "
            f"train.steps to train further)" + (f"; {where}" if where else "")
        )
        return
    processes = f" over {s.invocations} processes" if s.invocations > 1 else ""
    val = ""
    if s.final_val_loss is not None:
        val = f"; validation loss {s.final_val_loss:.3f}"
        if s.final_val_bpb is not None:
            val += f", {s.final_val_bpb:.3f} bits/byte"
    print(
        f"{s.status} after {s.steps} steps, {s.tokens:,} tokens in {s.wall_s:.0f}s{processes} "
        f"(goodput {100 * s.goodput:.0f}%){val}"
    )
    print(f"run          {s.run_dir}")
    print(f"report       {s.report}")
    if s.export:
        print(f"weights      {s.export} (Hugging Face format, with the tokenizer)")
