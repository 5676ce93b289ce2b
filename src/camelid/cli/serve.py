"""``camelid serve``: the OpenAI-compatible HTTP server for one model."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys

from camelid.cli.args import add_engine_args, engine_from_args, note
from camelid.errors import CamelidError
from camelid.infer.load import resolve_model
from camelid.weights.digest import source_digest

KEY_ENV = "CAMELID_API_KEY"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Serve MODEL (a Hugging Face directory, a training run or one of its "
        "checkpoints) at\n/v1/completions, /v1/chat/completions, /v1/models, /tokenize, "
        "/detokenize, /metrics\nand /health. SIGTERM or Ctrl-C stops taking requests, lets "
        "the running ones finish,\nand exits. See docs/serving.md.",
        epilog=f"""examples:
  camelid serve runs/quickstart
  {KEY_ENV}=secret camelid serve MODEL --host 0.0.0.0 --port 8080
  camelid serve MODEL --served-model-name llama --max-batch 32 --compile""",
    )
    p.add_argument("model", metavar="MODEL", help="a Hugging Face directory, a run or a checkpoint")
    g = p.add_argument_group("server")
    g.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: %(default)s, this machine only; 0.0.0.0 for all)",
    )
    g.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    g.add_argument(
        "--api-key",
        default=None,
        help=f"require 'Authorization: Bearer KEY' on every route but /health (default: "
        f"${KEY_ENV} if set; none). Prefer the variable: a flag shows in the process list",
    )
    g.add_argument(
        "--served-model-name",
        default=None,
        metavar="NAME",
        help="the model id clients ask for (default: MODEL's directory name)",
    )
    g.add_argument(
        "--max-batch",
        type=int,
        default=16,
        metavar="N",
        help="requests decoded together (default: %(default)s)",
    )
    g.add_argument(
        "--max-queue",
        type=int,
        default=256,
        metavar="N",
        help="requests waiting to start; more are refused with 429 (default: %(default)s)",
    )
    g.add_argument(
        "--max-n", type=int, default=16, metavar="N", help="most choices per request (n)"
    )
    g.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        metavar="N",
        help="most tokens a request may ask to generate (default: the context)",
    )
    g.add_argument(
        "--prefill-chunk",
        type=int,
        default=256,
        metavar="N",
        help="prompt tokens prefilled per step between decode steps, shared by several "
        "requests (default: %(default)s)",
    )
    g.add_argument(
        "--prefix-block",
        type=int,
        default=16,
        metavar="N",
        help="the prefix cache's block size in tokens: a hit reuses every full block a prompt "
        "shares; --batch-invariant uses --prefill-chunk instead (default: %(default)s)",
    )
    g.add_argument(
        "--prefix-cache",
        type=float,
        default=None,
        metavar="MIB",
        help="memory for cached prompt prefixes, in MiB; 0 turns it off (default: half the "
        "size of the KV cache rows)",
    )
    g.add_argument(
        "--batch-invariant",
        action="store_true",
        help="bitwise identical tokens and logprobs whatever else is batched, at a cost in "
        "throughput (each row decodes on its own; docs/inference.md)",
    )
    add_engine_args(p, chat=True)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from camelid.serve import Limits, create_app
        from camelid.serve.app import generation_stop_ids
    except ImportError as e:
        raise CamelidError(
            f"camelid serve needs the server packages ({e.name} is missing): "
            "pip install fastapi uvicorn prometheus-client"
        ) from None
    for flag in ("max_batch", "max_queue", "max_n", "prefill_chunk", "prefix_block"):
        if getattr(args, flag) < (0 if flag == "max_queue" else 1):
            raise CamelidError(f"--{flag.replace('_', '-')} must be positive")
    if args.prefix_cache is not None and args.prefix_cache < 0:
        raise CamelidError(f"--prefix-cache must be >= 0 MiB, got {args.prefix_cache:g}")
    if not 0 <= args.port < 65536:
        raise CamelidError(f"--port {args.port}: must be in [0, 65535]")
    api_key = args.api_key if args.api_key is not None else os.environ.get(KEY_ENV) or None
    source = resolve_model(args.model)
    name = args.served_model_name or source.given.resolve().name
    stop_ids = generation_stop_ids(source.path) if source.kind == "hf" else ()
    sock = _bind(args.host, args.port)  # a taken port fails before the weights are read
    # The weights as stored, before loading them (which may upcast them), and before the
    # engine holds them, so a checkpoint read for its digest is not in memory twice.
    # With an adapter the weights served are the merged ones: their digest, from the engine.
    digest = None if args.adapter else source_digest(source, progress=False if args.quiet else None)
    args.batch_size = args.max_batch  # the engine's rows are the scheduler's
    engine = engine_from_args(args)
    digest = digest or engine.weights_digest
    app = create_app(
        engine,
        model_name=name,
        api_key=api_key,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        limits=Limits(max_n=args.max_n, max_tokens=args.max_tokens),
        extra_stop_ids=stop_ids,
        digest=digest,
        scheduler={
            "prefill_chunk": args.prefill_chunk,
            "prefix_block": args.prefix_block,
            "prefix_cache_bytes": None
            if args.prefix_cache is None
            else int(args.prefix_cache * 2**20),
            "batch_invariant": args.batch_invariant,
        },
    )
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    auth = "an API key" if api_key else "no API key"
    print(
        f"camelid serve: {name} ({source.path}, context {engine.max_seq_len}, weights "
        f"{digest[:16]}) at "
        f"http://{shown}:{port}/v1 with {auth}; Ctrl-C or SIGTERM to stop",
        file=sys.stderr,
        flush=True,
    )
    if args.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        note(args, f"warning: listening on {args.host} without an API key (set ${KEY_ENV})")
    logging.basicConfig(level=logging.WARNING, format="camelid serve: %(message)s")
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=60, lifespan="on")
    )
    stopped: list[int] = []
    # uvicorn drains on SIGINT/SIGTERM, then re-raises the signal to the handler it found:
    # record it there, so a drained server exits 0 instead of dying by the signal.
    previous = {s: signal.signal(s, lambda sig, _: stopped.append(sig)) for s in _SIGNALS}
    try:
        server.run(sockets=[sock])
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        sock.close()
    if stopped:
        note(args, f"camelid serve: stopped by {signal.Signals(stopped[0]).name}, requests drained")
    return 0


_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise CamelidError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(2048)
    return sock
