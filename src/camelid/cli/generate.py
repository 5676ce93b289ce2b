"""``camelid generate``: complete prompts, streaming the text."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from camelid.cli.args import (
    add_engine_args,
    add_sampling_args,
    engine_from_args,
    note,
    sampling_params,
)
from camelid.errors import CamelidError
from camelid.infer import Completion, Engine, SamplingParams
from camelid.tokenizer.chat import chat_prompt_ids


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="complete one or more prompts with a model, streaming the text",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Complete prompts with a Hugging Face Llama directory, a training run (its "
        "export RUN/hf, or\nits newest checkpoint while it has none) or one of its checkpoints. "
        "One prompt streams to\nstdout as it is generated; several are decoded together and "
        "printed in order under a\n'=== i/n' header. A one-line summary goes to stderr.",
        epilog="""examples:
  camelid generate runs/quickstart --prompt "def fibonacci(n):" --greedy
  camelid generate MODEL -p "Once upon a time" -p "The capital of France is" -n 64
  echo "Why is the sky blue?" | camelid generate MODEL --prompt - --chat --temperature 0.6
  camelid generate MODEL -p "2 + 2 =" --json --logprobs 5 --max-new-tokens 8""",
    )
    p.add_argument(
        "model",
        metavar="MODEL",
        help="a Hugging Face directory, a training run (its export, or its newest checkpoint "
        "if it has none yet) or one checkpoint (RUN/checkpoints/step-N)",
    )
    p.add_argument(
        "-p",
        "--prompt",
        dest="prompts",
        action="append",
        type=lambda s: ("text", s),
        metavar="TEXT",
        help="a prompt; repeatable; '-' reads one prompt from stdin",
    )
    p.add_argument(
        "--prompt-file",
        dest="prompts",
        action="append",
        type=lambda s: ("file", s),
        metavar="FILE",
        help="a file whose whole content is one prompt (one final newline is dropped); repeatable",
    )
    p.add_argument(
        "--chat",
        action="store_true",
        help="send each prompt as a user message in the tokenizer's chat template",
    )
    p.add_argument("--system", metavar="TEXT", help="with --chat: a system message first")
    p.add_argument("--echo", action="store_true", help="print each prompt before its completion")
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object per prompt (text, token_ids, finish_reason, ...) instead",
    )
    p.add_argument(
        "--logprobs",
        type=int,
        metavar="N",
        help="with --json: each generated token's log-probability and N alternatives",
    )
    p.add_argument(
        "--prompt-logprobs",
        type=int,
        metavar="N",
        help="with --json: also score the prompt's tokens, with N alternatives",
    )
    add_sampling_args(p, max_new_tokens=256)
    add_engine_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Everything that can be checked without the model is checked before loading it.
    if not args.prompts:
        raise CamelidError("no prompt: give --prompt TEXT, --prompt-file FILE or --prompt -")
    if sum(v == "-" for _, v in args.prompts) > 1:
        raise CamelidError("stdin ('-') can give only one prompt")
    for flag in ("logprobs", "prompt_logprobs"):
        if getattr(args, flag) is not None and not args.json:
            raise CamelidError(f"--{flag.replace('_', '-')} needs --json")
    if args.system is not None and not args.chat:
        raise CamelidError("--system needs --chat")
    params = sampling_params(args, logprobs=args.logprobs, prompt_logprobs=args.prompt_logprobs)
    texts = [_read_prompt(kind, value) for kind, value in args.prompts]

    engine = engine_from_args(args)
    tok = engine.tokenizer
    system = [{"role": "system", "content": args.system}] if args.system is not None else []
    prompts = [
        chat_prompt_ids(tok, [*system, {"role": "user", "content": t}])
        if args.chat
        else tok.encode(t, bos=True)
        for t in texts
    ]
    for i, ids in enumerate(prompts):
        label = "the prompt" if len(prompts) == 1 else f"prompt {i + 1}"
        if len(ids) >= engine.max_seq_len and not args.truncate:
            raise CamelidError(
                f"{label} has {len(ids)} tokens, more than fit the context of "
                f"{engine.max_seq_len} tokens; shorten it, or pass --truncate to keep its last "
                "tokens"
            )

    t0 = time.perf_counter()
    if args.json:
        completions = engine.generate(prompts, params)
        for i, (text, c) in enumerate(zip(texts, completions, strict=True)):
            record = c.to_dict(tok, index=i, prompt=text)
            print(json.dumps(record, ensure_ascii=False), flush=True)
    else:
        completions = _stream_in_order(engine, prompts, texts, params, args.echo)
    seconds = time.perf_counter() - t0
    for i, (ids, c) in enumerate(zip(prompts, completions, strict=True)):
        if len(c.prompt_token_ids) < len(ids):
            label = "the prompt" if len(prompts) == 1 else f"prompt {i + 1}"
            kept = len(c.prompt_token_ids)
            note(args, f"note: {label} was truncated from {len(ids)} to its last {kept} tokens")
    compiling = " (including compiling the decode step)" if args.compile else ""
    note(args, _summary(completions, seconds) + compiling)
    return 0


def _read_prompt(kind: str, value: str) -> str:
    if kind == "text" and value != "-":
        return value
    if value == "-":
        text = sys.stdin.read()
    else:
        try:
            text = Path(value).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise CamelidError(f"--prompt-file {value}: cannot read it ({e})") from None
    return text.removesuffix("\n").removesuffix("\r")


def _summary(completions: list[Completion], seconds: float) -> str:
    tokens = sum(len(c.token_ids) for c in completions)
    prompt = sum(len(c.prompt_token_ids) for c in completions)
    reasons: dict[str, int] = {}
    for c in completions:
        reasons[c.finish_reason] = reasons.get(c.finish_reason, 0) + 1
    if len(completions) == 1:
        finish = completions[0].finish_reason
    else:
        finish = ", ".join(f"{n} {r}" for r, n in sorted(reasons.items()))
    return (
        f"[{tokens} tokens generated ({prompt} prompt tokens) in {seconds:.2f}s, "
        f"{tokens / max(seconds, 1e-9):.1f} tokens/s; finish: {finish}]"
    )


def _stream_in_order(
    engine: Engine,
    prompts: list[list[int]],
    texts: list[str],
    params: SamplingParams,
    echo: bool,
) -> list[Completion]:
    """Decode all prompts together; print each completion in prompt order, the current one as
    it is generated, later ones (buffered meanwhile) as soon as their turn comes."""
    n = len(prompts)
    out = sys.stdout
    pending: dict[int, list[str]] = {i: [] for i in range(n)}
    done: dict[int, Completion] = {}
    current = 0

    def start(i: int) -> None:
        if n > 1:
            preview = texts[i] if len(texts[i]) <= 50 else texts[i][:47] + "..."
            out.write(f"{'' if i == 0 else chr(10)}=== {i + 1}/{n} {preview!r} ===\n")
        if echo:
            out.write(texts[i])
        out.write("".join(pending.pop(i)))
        out.flush()

    start(0)
    try:
        for i, piece, completion in engine.stream_batch(prompts, params):
            if i == current:
                out.write(piece)
                out.flush()
            else:
                pending[i].append(piece)
            if completion is not None:
                done[i] = completion
            while current in done:
                out.write("\n")
                current += 1
                if current < n:
                    start(current)
                out.flush()
    except KeyboardInterrupt:
        out.write("\n")
        out.flush()
        raise
    return [done[i] for i in range(n)]
