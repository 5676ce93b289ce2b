"""``camelid chat``: an interactive chat in the tokenizer's chat template."""

from __future__ import annotations

import argparse
import contextlib
import sys

from camelid.cli.args import (
    add_engine_args,
    add_sampling_args,
    engine_from_args,
    note,
    sampling_params,
)
from camelid.infer import Completion, Engine, SamplingParams
from camelid.tokenizer.chat import chat_prompt_ids, fit_history

CHAT_HELP = """commands:
  /reset         forget the conversation (the system message stays)
  /help          this list
  /exit, /quit   leave (as does Ctrl-D, or Ctrl-C at the prompt)
Ctrl-C while an answer is being written stops it; what was shown stays in the history."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "chat",
        help="chat with a model interactively, in its tokenizer's chat template",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Chat with an instruction-tuned Llama (a Hugging Face Llama directory, a "
        "training run or\none of its checkpoints). The conversation is kept and sent with each "
        "message in the\ntokenizer's chat template; when it no longer fits the context, the "
        "oldest turns are\ndropped (the system message stays). Commands: /reset clears the "
        "history, /help, /exit\nor /quit (or Ctrl-D) leaves. Ctrl-C stops an answer being "
        "written (what was shown stays\nin the history); at the prompt it leaves. Input is "
        "read line by line, so piped stdin\nworks too.",
        epilog="""examples:
  camelid chat path/to/Llama-3.2-1B-Instruct
  camelid chat MODEL --system "You are a terse assistant." --temperature 0.6 --top-p 0.9
  printf 'hello\\n/reset\\nhi again\\n' | camelid chat MODEL --greedy --quiet""",
    )
    p.add_argument(
        "model",
        metavar="MODEL",
        help="a Hugging Face directory, a training run (its export, or its newest checkpoint "
        "if it has none yet) or one checkpoint (RUN/checkpoints/step-N)",
    )
    p.add_argument("--system", metavar="TEXT", help="a system message at the start of the chat")
    add_sampling_args(p, max_new_tokens=512, chat=True)
    add_engine_args(p, chat=True)
    p.set_defaults(func=run, truncate=False, batch_size=1)


def run(args: argparse.Namespace) -> int:
    params = sampling_params(args)
    engine = engine_from_args(args)
    tok = engine.tokenizer
    system = [{"role": "system", "content": args.system}] if args.system is not None else []
    chat_prompt_ids(tok, [*system, {"role": "user", "content": ""}])  # fail now if it cannot chat
    # Room kept for the answer: --max-new-tokens, but at most half the context.
    budget = engine.max_seq_len - min(params.max_new_tokens, engine.max_seq_len // 2)
    interactive = sys.stdin.isatty()
    if interactive:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (line editing and history for input())
    note(args, "type a message; /help lists commands, /exit or Ctrl-D leaves")
    messages = list(system)
    turn = 0
    while True:
        try:
            line = input(">>> " if interactive else "")
        except EOFError:
            if interactive:
                print()
            return 0
        except KeyboardInterrupt:  # at the prompt: leave, with Ctrl-C's status (130)
            print()
            raise
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            command = text.split()[0].lower()
            if command in ("/exit", "/quit"):
                return 0
            if command == "/reset":
                messages = list(system)
                note(args, "(conversation cleared)")
            elif command == "/help":
                print(CHAT_HELP)
            else:
                print(f"unknown command {command}; /help lists them", file=sys.stderr)
            continue
        trial = [*messages, {"role": "user", "content": line}]
        ids, dropped = fit_history(tok, trial, budget)
        if len(ids) >= engine.max_seq_len:  # the history is left as it was
            print(
                f"camelid: that message is {len(ids)} tokens with the chat framing, more than "
                f"fit the context of {engine.max_seq_len}; try a shorter one",
                file=sys.stderr,
            )
            continue
        messages = trial
        if dropped:
            context = engine.max_seq_len
            note(args, f"(dropped the {dropped} oldest message(s) to fit the context, {context})")
        seed = None if params.seed is None else params.seed + turn
        text, completion, stopped = stream_answer(engine, ids, params.replace(seed=seed))
        print(flush=True)
        turn += 1
        if stopped:
            note(args, "(answer stopped; the part shown is kept in the conversation)")
        elif completion is not None and completion.finish_reason == "length":
            note(args, "(answer cut at --max-new-tokens or the end of the context)")
        messages.append({"role": "assistant", "content": text})


def stream_answer(
    engine: Engine, ids: list[int], params: SamplingParams
) -> tuple[str, Completion | None, bool]:
    """Stream one answer to stdout. Returns (its text, the completion or None, whether Ctrl-C
    stopped it: then the text is the part shown)."""
    shown: list[str] = []
    completion = None
    try:
        for _, piece, c in engine.stream_batch([ids], params):
            if piece:
                sys.stdout.write(piece)
                sys.stdout.flush()
                shown.append(piece)
            if c is not None:
                completion = c
    except KeyboardInterrupt:
        return "".join(shown), None, True
    return (completion.text if completion else "".join(shown)), completion, False
