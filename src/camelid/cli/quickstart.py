"""``camelid quickstart``: the whole pipeline on the built-in corpus; ``--chat``: then teach
the model to answer a synthetic chat task, measured before and after."""

from __future__ import annotations

import argparse

from camelid.cli.args import add_set_arg
from camelid.cli.train import _WholeNames, exit_status, print_summary
from camelid.data import sources
from camelid.quickstart import CHAT_RECIPE, ChatSummary, quickstart, quickstart_chat


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quickstart",
        formatter_class=_WholeNames,
        help="the whole pipeline on the built-in corpus: tokenizer, data, a small Llama, report "
        "(--chat: then fine-tune it to chat, measured before and after)",
        description="Train a tokenizer on this Python's standard library, prepare deduplicated "
        "token shards, pre-train a small Llama for a few minutes on whatever device is present, "
        "report its validation loss, print a sample Python completion and export Hugging Face "
        "weights. Re-running reuses the tokenizer and data made from the same corpus and "
        "vocabulary size (other ones are refused unless --overwrite); the model is trained "
        "afresh. Ctrl-C during training saves a checkpoint, says how to resume, and exits 130. "
        "With --chat: fine-tune the model that made (OUT/run/hf; made first if missing) on a "
        "synthetic chat task (questions on short lists of words, answered in one line) written "
        "to OUT/chat, with the shipped recipe sft-cpu, and report held-out exact-match accuracy "
        "before and after, a sample conversation, and OUT/chat/summary.json.",
    )
    p.add_argument(
        "--out", default="runs/quickstart", help="output directory (default: %(default)s)"
    )
    p.add_argument(
        "--corpus", default=sources.BUILTIN, help="corpus (default: the built-in 'stdlib')"
    )
    p.add_argument(
        "--vocab-size", type=int, default=4096, help="tokenizer size (default: %(default)s)"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="retrain the tokenizer and re-prepare the data in --out even if they were made "
        "from another corpus or vocabulary size (with --chat: re-prepare the chat data made "
        "with another tokenizer)",
    )
    p.add_argument(
        "--chat",
        action="store_true",
        help="fine-tune the quickstart's model on a synthetic chat task and measure held-out "
        "exact match before and after (the data in OUT/chat, the run in OUT/chat/run)",
    )
    p.add_argument(
        "--recipe",
        metavar="RECIPE",
        help=f"with --chat: the fine-tuning recipe, a file or a shipped name (default: "
        f"{CHAT_RECIPE}; lora-cpu trains LoRA adapters, into OUT/chat/run-lora-cpu)",
    )
    add_set_arg(
        p,
        "override a key of the quickstart recipe, e.g. --set train.steps=50 (with --chat: of "
        "the fine-tuning recipe)",
    )
    p.set_defaults(func=run, usage_error=p.error)


def run(args: argparse.Namespace) -> int:
    if args.recipe is not None and not args.chat:
        args.usage_error("--recipe chooses the fine-tuning recipe of --chat; add --chat")
    if args.chat:
        return _run_chat(args)
    summary = quickstart(args.out, args.corpus, args.vocab_size, args.set, overwrite=args.overwrite)
    print_summary(summary)
    if summary.status != "finished":  # stopped by Ctrl-C: the trainer saved a checkpoint
        return exit_status(summary)
    if summary.sample is not None:
        print(f"\nsample completion of {summary.sample_prompt!r}:")
        print("    " + (summary.sample_prompt + summary.sample).replace("\n", "\n    "))
    print(f"\ntotal {summary.total_s / 60:.1f} min")
    return 0


def _run_chat(args: argparse.Namespace) -> int:
    s: ChatSummary = quickstart_chat(
        args.out,
        args.recipe or CHAT_RECIPE,
        args.set,
        overwrite=args.overwrite,
        corpus=args.corpus,
        vocab_size=args.vocab_size,
    )
    print_summary(s.train)
    if s.train.status != "finished":
        return exit_status(s.train)
    print()
    before = s.before
    after = s.after or {}
    print(f"held-out exact match ({before['items']} questions never trained on):")
    print(f"  before  {100 * before['exact_match']:5.1f}%  {s.base}")
    if s.after is not None:
        print(f"  after   {100 * after['exact_match']:5.1f}%  {s.run_dir}/hf")
        width = max(map(len, before["by_family"]))
        for family, share in before["by_family"].items():
            now = after["by_family"].get(family, 0.0)
            print(f"    {family:<{width}}  {100 * share:5.1f}% -> {100 * now:5.1f}%")
    if s.conversation:
        print("\nsample conversation (held-out questions, greedy):")
        for m in s.conversation:
            print(f"  {m['role']:>9}: {m['content']}")
    print(f"\nsummary {s.summary_path}")
    print(f"total {s.total_s / 60:.1f} min")
    return 0
