"""The pre-training loop: one function from one CPU to many GPUs.

    summary = train(load_recipe("configs/quickstart.toml"))

Per step: the learning rate for this step, ``grad_accum`` micro-batches forward and backward
(bf16 autocast on GPU, fp32 on CPU), gradient clipping, the stability guard's verdict, and the
update — or, for a bad step, none. Around it: periodic validation (loss, bits per byte, a sample
completion), sharded checkpoints, roll-back after repeated bad steps, a checkpoint on SIGTERM /
SIGINT, and at the end a Hugging Face export and a report.

A recipe with ``[dpo]`` trains on preference pairs instead: each step's forward and backward,
its validation and its reference are :class:`camelid.train.dpo_run.DPORun`'s; the rest is this
loop unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import math
import shutil
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from camelid.data import SFTLoader, TokenLoader, read_manifest
from camelid.data.packing import packed_rows
from camelid.errors import CamelidError, CheckpointError, ConfigError, DataError
from camelid.infer import Engine, SamplingParams
from camelid.infer.export import data_summary, keep_run_tokenizer, save_pretrained
from camelid.io import format_count, write_text_atomic
from camelid.loss import IGNORE_INDEX, next_token_loss, valid_targets
from camelid.model import Transformer
from camelid.model.lora import apply_lora, check_adapters_effective, is_lora_name, merge_lora
from camelid.system import device_name
from camelid.tokenizer import Tokenizer
from camelid.train import balance
from camelid.train import checkpoint as ckpt
from camelid.train.distributed import World, all_reduce_sum, any_rank, barrier, init_world
from camelid.train.distributed import close as close_world
from camelid.train.dpo_run import DPORun
from camelid.train.guard import Guard
from camelid.train.metrics import (
    Clock,
    MetricsLog,
    device_peak,
    expert_balance,
    format_balance,
    format_mfu,
    peak_memory,
)
from camelid.train.parallelize import build_model, check_expert_parallel, local_param_bytes
from camelid.train.recipe import Recipe, RecipeError
from camelid.train.report import format_duration, read_invocations, run_time
from camelid.train.schedule import lr_at
from camelid.train.step import StepOutcome, build_optimizer, clip_grad_norm, forward_backward
from camelid.weights.lora import save_adapter

# Roll-backs to the same checkpoint before the run gives up: the data is not the problem then.
MAX_ROLLBACKS = 5
# A validation split under this many tokens draws a warning: per-token losses spread by 2-3
# nats, so a mean over N tokens is uncertain by at least ~2.5/sqrt(N) nats (0.025 at 10,000;
# more, as neighbouring tokens are not independent) — the size of the gaps runs are judged by.
VAL_MIN_TOKENS = 10_000


@dataclass
class TrainSummary:
    """What a training run did, as this rank saw it. Every rank returns one; only the rank
    that ``reports`` (rank 0) wrote the log, the report and the export.

    ``steps``, ``tokens``, ``wall_s``, ``goodput`` and ``time_s`` are the whole run's, over
    every process that worked on it (a run stopped and resumed twice: three processes; the time
    between them is not counted); the ``invocation_*`` fields are this process's alone. Other
    ranks than the reporting one do not read the log: for them the run's figures are their own.

    Fields can also be read as ``summary["status"]``, for code written against the plain dict
    the trainer used to return.
    """

    status: str  # "finished", or "stopped" by a signal (resume it)
    steps: int
    tokens: int
    wall_s: float  # the run's wall time: the sum of its processes'
    goodput: float  # the run's: time in kept updates / wall_s
    time_s: dict[str, float]  # the run's wall time by bucket (train, eval, checkpoint, ...)
    final_val_loss: float | None
    final_val_bpb: float | None
    sample_prompt: str
    sample: str | None  # the last evaluation's completion of sample_prompt
    model: str
    params: int
    param_bytes_per_rank: list[int]  # parameter bytes each rank holds (its FSDP2 shards)
    device: str
    world_size: int
    run_dir: str
    export: str | None  # the Hugging Face directory, when exported
    events: dict[str, int] = field(default_factory=dict)  # event kind -> count, this invocation
    reports: bool = True
    report: str | None = None  # report.md, on the reporting rank
    invocations: int = 1  # processes that worked on the run, this one included
    invocation_steps: int = 0  # steps this process ran (redone ones after a roll-back too)
    invocation_wall_s: float = 0.0
    invocation_goodput: float = 0.0
    invocation_time_s: dict[str, float] = field(default_factory=dict)
    peak: dict[str, Any] = field(default_factory=dict)  # the MFU peak and its provenance
    # True when --resume found the run already finished: nothing was done or written.
    already_finished: bool = False
    # The signal that stopped the run (SIGINT 2, SIGTERM 15), or None when it was not stopped.
    stop_signal: int | None = None

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# What a finished run's summary record says of the whole run (not of its last process).
_RUN_FIELDS = ("steps", "tokens", "wall_s", "goodput", "time_s", "final_val_loss",
               "final_val_bpb", "model", "params", "param_bytes_per_rank", "device",
               "world_size", "export", "invocations", "peak")  # fmt: skip


def _n(count: int, word: str) -> str:
    """``1 rank``, ``2 ranks``, ``3 batches``."""
    plural = word + ("es" if word.endswith(("s", "sh", "ch", "x")) else "s")
    return f"{count:,} {word if count == 1 else plural}"


def train(
    recipe: Recipe, resume: str | None = None, fresh: bool = False, progress: bool | None = None
) -> TrainSummary:
    """Run ``recipe``; ``resume`` is "latest" or a checkpoint directory."""
    clock = Clock()
    world = init_world(recipe.train.device)
    try:
        return _Run(recipe, world, clock, progress).run(resume, fresh)
    finally:
        close_world(world)


class _Run:
    def __init__(self, recipe: Recipe, world: World, clock: Clock, progress: bool | None) -> None:
        self.recipe, self.world, self.clock = recipe, world, clock
        self.run_dir = Path(recipe.run.out_dir)
        self.show_bar = world.is_main and (sys.stderr.isatty() if progress is None else progress)
        self.stop_signal: int | None = None
        self.events: Counter[str] = Counter()
        self.last_eval: dict[str, Any] | None = None
        self.last_eval_step: int | None = None
        self.saved_step: int | None = None  # the step of the newest checkpoint
        self.steps_run = 0  # steps this process ran
        self.exported = False
        self.bar: Any = None
        self.val_batch_size, self.val_batches = recipe.train.batch_size, recipe.eval.batches

    # ------------------------------------------------------------------------------ set-up
    def run(self, resume: str | None, fresh: bool) -> TrainSummary:
        r, world = self.recipe, self.world
        # Everything a user can get wrong is checked before the run directory is touched: a
        # failed start leaves no empty run directory and changes nothing of an existing run.
        self._check_run_dir(resume, fresh)
        self.dpo: DPORun | None = None
        if r.dpo.enabled:  # preference pairs, read with init.model's tokenizer: no data.dir
            manifest = self.manifest = None
            self.init_source = self._init_source(None)
            self.tokenizer = self.init_tokenizer
        else:
            manifest = self.manifest = read_manifest(r.data.dir)
            tok_path = r.data.tokenizer or manifest["tokenizer"]["path"]
            self.tokenizer = Tokenizer.load(tok_path)
            if self.tokenizer.digest != manifest["tokenizer"]["digest"]:
                raise RecipeError(
                    f"{r.data.dir} was prepared with another tokenizer than {tok_path} (digests "
                    "differ); prepare the data again or point data.tokenizer at the right one"
                )
            self.init_source = self._init_source(manifest) if r.init.model else None
            if self.init_source is None:
                self.config = r.model_config(self.tokenizer.vocab_size)
        if self.config.vocab_size < self.tokenizer.vocab_size:
            raise RecipeError(
                f"model.vocab_size {self.config.vocab_size} is smaller than the tokenizer's "
                f"{self.tokenizer.vocab_size}"
            )
        # A fine-tuning dataset (`camelid prepare --format chat`): masked targets, packed rows.
        self.sft = manifest is not None and manifest.get("kind") == "sft"
        if manifest is not None and not self.sft:
            self._check_training_windows(manifest)
        check_expert_parallel(self.config, world, expert_parallel=r.train.expert_parallel,
                              compile=r.train.compile)  # fmt: skip
        self.lora = r.lora.config()
        if self.lora is not None:  # targets this model lacks: said before anything is written
            with torch.device("meta"):
                apply_lora(Transformer(self.config), self.lora)
        if r.dpo.enabled:
            self.dpo = self._dpo_run()
            self.loader = self.dpo.loader
        else:
            self.loader = self._loader("train", r.train.batch_size, r.train.seed, shuffle=True)
        if r.log.tensorboard and importlib.util.find_spec("tensorboard") is None:
            raise RecipeError(
                "log.tensorboard = true needs the tensorboard package (pip install tensorboard)"
            )
        start_state = self._resume_state(resume)
        if start_state is not None and (done := self._already_finished(*start_state)):
            return done  # a finished run: nothing is written
        if self.dpo is not None and start_state is not None:
            self.dpo_verified = self.dpo.load_reference(self.run_dir)  # before any write
        self._prepare_dir(fresh)  # the first write of this run
        if world.is_main:  # the run's own copy: its checkpoints stay exportable
            keep_run_tokenizer(self.tokenizer, self.run_dir)

        torch.manual_seed(r.train.seed)
        bf16 = r.train.precision == "bf16" or (
            r.train.precision == "auto" and world.device.type == "cuda"
        )
        model = build_model(self.config, world, seed=r.train.seed, lora=self.lora,
                            activation_checkpointing=r.train.activation_checkpointing,
                            compile=r.train.compile, bf16=bf16,
                            expert_parallel=r.train.expert_parallel)  # fmt: skip
        self.model = model
        balance.configure(model, r.moe.aux_loss_coef, r.moe.z_loss_coef, world)
        self.expert_parallel = r.train.expert_parallel and world.distributed
        o = r.optim
        self.optimizer = build_optimizer(model, o.lr, o.weight_decay, (o.beta1, o.beta2), o.eps)
        self.guard = Guard(r.guard)
        # bf16: under FSDP2 its mixed-precision policy casts the parameters; a single process
        # keeps fp32 weights and autocasts the forward.
        self.compute_dtype = torch.bfloat16 if bf16 else torch.float32
        self.autocast = torch.bfloat16 if bf16 and not world.distributed else None
        mine = torch.zeros(world.world_size, dtype=torch.float64, device=world.device)
        mine[world.rank] = local_param_bytes(model)
        self.param_bytes = [int(b) for b in all_reduce_sum(mine, world).tolist()]
        self.byte_lengths = torch.tensor(self.tokenizer.token_byte_lengths() + [0] * (
            self.config.vocab_size - self.tokenizer.vocab_size), device=world.device)  # fmt: skip
        self.peak = device_peak(world.device, r.run.peak_tflops)
        self.flops_per_token = self.config.flops_per_token(r.train.seq_len)
        # A DPO step's tokens vary with its pairs: it counts them itself (StepOutcome).
        self.tokens_per_step = None if self.dpo else (
            r.train.batch_size * r.train.seq_len * r.train.grad_accum * world.world_size
        )  # fmt: skip
        self.local_tokens = (self.tokens_per_step or 0) // world.world_size
        self.log = MetricsLog(self.run_dir, world.is_main, self.clock, r.log.tensorboard)
        self.step, self.tokens = 0, 0
        self._header(manifest, start_state)
        self.clock.lap("startup")  # before the first checkpoint, which laps "checkpoint"
        if start_state is not None:
            if self.lora is not None:  # its checkpoints hold the adapters: the base first
                self._load_init_weights()
            self._restore(start_state[0], start_state[1])
            for detail in self.unusable:  # newer checkpoints that _resume_state passed over
                self._event("checkpoint_unusable", detail)
            self._event("resume", str(start_state[0]))
            for path in self.dpo_verified if self.dpo is not None else []:
                self._event("dpo_reference", f"{path}: verified, not recomputed")
        else:
            if self.init_source is not None:
                self._load_init_weights()
            if self.dpo is not None:
                self._dpo_reference()  # before step 1 (and its checkpoint): the start weights
            if r.guard.enabled and r.guard.max_bad_steps > 0:
                self._checkpoint()  # something to roll back to from the very first steps
        if world.is_main:
            write_text_atomic(self.run_dir / "recipe.toml", r.to_toml())
        self.clock.lap("startup")
        try:
            with self._signals():
                status = self._loop()
            return self._finish(status)
        finally:
            self.log.close()

    def _init_source(self, manifest: dict[str, Any] | None) -> Any:
        """The model ``init.model`` names, checked before anything is written: its config
        becomes the run's (``model.max_seq_len`` may extend it) and its tokenizer
        (``init_tokenizer``) must be the one the data was prepared with (``manifest``; a DPO
        run has none: it tokenises its pairs with this one)."""
        from camelid.infer.load import inspect_model, load_tokenizer, resolve_model

        r = self.recipe
        try:
            source = resolve_model(r.init.model)
            info = inspect_model(source)
            tokenizer = load_tokenizer(source)
        except CamelidError as e:
            raise RecipeError(f"init.model: {e}") from None
        self.init_tokenizer = tokenizer
        if manifest is not None and tokenizer.digest != manifest["tokenizer"]["digest"]:
            raise RecipeError(
                f"init.model {r.init.model} has another tokenizer than the one {r.data.dir} was "
                f"prepared with (digests {tokenizer.digest[:12]} and "
                f"{manifest['tokenizer']['digest'][:12]}): prepare the data with the model's "
                f"tokenizer (camelid prepare --tokenizer {source.tokenizer or source.path} ...)"
            )
        config = info.config
        seq = r.model.overrides.get("max_seq_len", max(config.max_seq_len, r.train.seq_len))
        if seq < r.train.seq_len:
            raise RecipeError(
                f"model.max_seq_len ({seq}) is shorter than train.seq_len ({r.train.seq_len})"
            )
        name = config.name or Path(r.init.model).name
        self.config = dataclasses.replace(config, max_seq_len=seq, name=name)
        return source

    def _check_run_dir(self, resume: str | None, fresh: bool) -> None:
        """Refuse, before anything is read or written, what would clobber or confuse a run."""
        if fresh and resume is not None:
            raise RecipeError("--fresh discards the run that --resume continues: give one of them")
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise RecipeError(f"run.out_dir {self.run_dir} is a file, not a directory")
        if resume is None and not fresh and (self.run_dir / "metrics.jsonl").exists():
            raise RecipeError(
                f"{self.run_dir} already holds a run; resume it with --resume, start over with "
                "--fresh, or choose another run.out_dir"
            )

    def _loader(self, split: str, batch_size: int, seed: int, shuffle: bool) -> Any:
        """The batches of ``split``: windows of pre-training text (``TokenLoader``), or packed
        fine-tuning rows with their masks, positions and documents (``SFTLoader``)."""
        r, w = self.recipe, self.world
        kind = SFTLoader if self.sft else TokenLoader
        return kind(r.data.dir, split, batch_size, r.train.seq_len, seed, w.rank, w.world_size,
                    shuffle=shuffle)  # fmt: skip

    def _check_training_windows(self, manifest: dict[str, Any]) -> None:
        """One step needs ``batch_size`` windows of ``seq_len + 1`` tokens per rank, each within
        one shard (the TokenLoader's rule); say what the split holds when it cannot."""
        t, world = self.recipe.train, self.world
        shards = manifest["splits"]["train"]["shards"]
        windows = sum(max((s["tokens"] - 1) // t.seq_len, 0) for s in shards)
        needed = t.batch_size * world.world_size
        if windows < needed:
            tokens = sum(s["tokens"] for s in shards)
            longest = max((s["tokens"] for s in shards), default=0)
            raise RecipeError(
                f"{self.recipe.data.dir}: the train split holds {tokens:,} tokens in "
                f"{len(shards)} shard(s) (the longest {longest:,}), which make {windows} windows "
                f"of train.seq_len + 1 = {t.seq_len + 1} tokens; one step needs "
                f"train.batch_size x ranks = {needed}: lower train.batch_size or train.seq_len, "
                "or prepare more data"
            )

    def _prepare_dir(self, fresh: bool) -> None:
        """Make the run directory (``--fresh``: after clearing an earlier run's files), once
        every check has passed."""
        if fresh and self.world.is_main and self.run_dir.exists():
            for name in ("checkpoints", "hf", "tensorboard"):
                shutil.rmtree(self.run_dir / name, ignore_errors=True)
            for p in self.run_dir.glob("*"):
                if p.is_file():
                    p.unlink()
        barrier(self.world)
        if self.world.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        barrier(self.world)

    def _resume_state(self, resume: str | None) -> tuple[Path, dict[str, Any]] | None:
        """The checkpoint to continue from and its trainer state, checked against this recipe.

        ``latest`` takes the newest usable checkpoint: a newer one that is truncated or
        corrupt is named in a warning (and an event once the log is open) and passed over.
        A checkpoint named explicitly must be usable: no silent substitute.
        """
        self.unusable: list[str] = []
        if resume is None:
            return None
        if resume == "latest":
            path, skipped = ckpt.newest_usable(self.run_dir)
            for bad, reason in skipped:
                self.unusable.append(f"{bad}: {reason}")
                if self.world.is_main:
                    print(f"camelid: warning: {bad} is not usable: {reason}; passing over it",
                          file=sys.stderr, flush=True)  # fmt: skip
            if path is None:
                if skipped:
                    raise CheckpointError(
                        f"{self.run_dir}: no usable checkpoint to resume from; "
                        + "; ".join(self.unusable)
                    )
                raise RecipeError(
                    f"{self.run_dir}: no checkpoint to resume from (start without --resume)"
                )
            if skipped and self.world.is_main:
                print(f"camelid: warning: resuming from {path} instead", file=sys.stderr,
                      flush=True)  # fmt: skip
        else:
            path = Path(resume)
            reason = ckpt.usable(path)
            if reason is not None and ckpt.checkpoint_dir(path).is_dir():
                raise CheckpointError(
                    f"{path}: a run directory, not a checkpoint; --resume alone takes the newest "
                    f"of run.out_dir, or name one of {ckpt.checkpoint_dir(path)}/step-N"
                )
            if reason is not None:
                raise CheckpointError(f"{path}: not a usable checkpoint: {reason}")
        state = ckpt.read_state(path)
        saved = state.get("model_config", {})
        mine = self.config.to_dict()
        diff = [k for k in mine if k != "name" and saved.get(k) != mine[k]]
        if diff:
            detail = ", ".join(f"{k} {saved.get(k)!r} vs {mine[k]!r}" for k in diff[:4])
            raise RecipeError(
                f"{path}: checkpoint of another model shape than this recipe ({detail})"
            )
        self.loader.load_state_dict(state["loader"])  # the same data and global batch?
        return path, state

    def _already_finished(self, path: Path, state: dict[str, Any]) -> TrainSummary | None:
        """``--resume`` on a run that is done — its checkpoint at or past train.steps, and its
        last process's summary says it finished there — has nothing to do: the summary of that
        run comes back (``already_finished``) and nothing is written. A run killed after its
        last checkpoint but before its summary is not done: it goes on to evaluate, export and
        report. A recipe asking for more steps trains on."""
        step = int(state["step"])
        if step < self.recipe.train.steps:
            return None
        record = None
        metrics = self.run_dir / "metrics.jsonl"
        if self.world.is_main and metrics.is_file():
            try:
                invocations = read_invocations(metrics)
            except OSError:
                invocations = []
            last = invocations[-1].summary if invocations else None
            if last is not None and last.get("status") == "finished" and last.get("steps") == step:
                record = last
        if not any_rank(record is not None, self.world):
            return None
        report = self.run_dir / "report.md"
        summary = TrainSummary(
            status="finished",
            steps=step,
            tokens=int(state.get("tokens", 0)),
            wall_s=0.0,
            goodput=0.0,
            time_s={},
            final_val_loss=None,
            final_val_bpb=None,
            sample_prompt=self.recipe.eval.sample_prompt,
            sample=None,
            model=self._model_text(),
            params=self.config.num_params(),
            param_bytes_per_rank=[],
            device=device_name(self.world.device),
            world_size=self.world.world_size,
            run_dir=str(self.run_dir),
            export=None,
            reports=self.world.is_main,
            report=str(report) if report.is_file() else None,
            invocation_wall_s=self.clock.elapsed(),
            already_finished=True,
        )
        run_figures = {k: v for k, v in (record or {}).items() if k in _RUN_FIELDS}
        return dataclasses.replace(summary, **run_figures)

    def _model_text(self) -> str:
        c = self.config
        text = (
            f"{c.name}: {c.n_layers} layers, dim {c.dim}, {c.n_heads}/{c.n_kv_heads} heads, "
            f"vocab {c.vocab_size}"
        )
        return text + (f", {self._experts_text()}" if c.is_moe else "")

    def _experts_text(self) -> str:
        c = self.config
        return (
            f"{c.n_experts} experts (top-{c.n_experts_per_tok}, {c.n_shared_experts} shared, "
            f"{c.router_scoring}) on {c.n_moe_layers} of {c.n_layers} layers"
        )

    def _header(self, manifest: dict[str, Any], start_state: tuple[Path, dict] | None) -> None:
        """What this process is about to do: the ``start`` record that opens its part of
        metrics.jsonl (the report's accounting of processes rests on it), a few lines on the
        console (main rank), then the warnings that apply."""
        r, t, world, c = self.recipe, self.recipe.train, self.world, self.config
        warnings = self.dpo.warnings() if self.dpo else self._plan_validation(manifest)
        resumed = int(start_state[1]["step"]) if start_state is not None else None
        precision = "bf16" if self.compute_dtype == torch.bfloat16 else "fp32"
        device = device_name(world.device)
        self.log.write(
            "start",
            started_at=datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
            resumed_from=resumed,
            checkpoint=str(start_state[0]) if start_state else None,
            target_steps=t.steps,
            model=self._model_text(),
            params=c.num_params(),
            device=device,
            world_size=world.world_size,
            precision=precision,
            tokens_per_step=self.tokens_per_step,
            peak=self.peak.to_dict(),
        )
        if world.is_main:
            when = (
                f"every {r.eval.interval} steps and at the end" if r.eval.interval else "at the end"
            )
            where = str(self.run_dir)
            if resumed is not None:
                left = max(t.steps - resumed, 0)
                amount = (f"{left * self.dpo.pairs_per_step:,} pairs" if self.dpo
                          else f"{left * self.tokens_per_step:,} tokens")  # fmt: skip
                where += f" (resuming from step {resumed}: {left} steps, {amount} to go)"
            reliable = "" if self.peak.reliable else ", unreliable"
            ranks = _n(world.world_size, "rank")
            experts = f", experts split over the {ranks}" if self.expert_parallel else ""
            data_rows = self.dpo.header_rows(when) if self.dpo else self._data_rows(manifest, when)
            rows = [
                *data_rows,
                ("device", f"{device}, {ranks}, {precision}{experts}"),
                ("MFU peak", f"{self.peak.detail} ({self.peak.source}{reliable})"),
                ("run", where),
            ]
            params = c.num_params()
            active = ""
            if c.is_moe:
                n = c.num_params(active=True)
                active = f", {format_count(n)} active per token ({n:,})"
                rows.insert(0, ("experts", f"{self._experts_text()}; {self._balance_text()}"))
            if self.lora is not None:
                trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
                lo = self.lora
                text = (f"r {lo.r}, alpha {lo.alpha:g} on {', '.join(lo.target_modules)}: "
                        f"{trainable:,} trainable parameters ({trainable / params:.2%}), the "
                        "base frozen")  # fmt: skip
                rows.insert(0, ("lora", text))
            print(f"camelid train: {c.name}, {format_count(params)} parameters ({params:,})"
                  f"{active}")  # fmt: skip
            for key, value in rows:
                print(f"  {key:<11} {value}", flush=True)
        if self.log.torn:
            self._warn(
                "torn_metrics",
                f"{self.log.path} ended in a cut line (a kill while writing); it stays one "
                "unreadable line and the log goes on below it",
            )
        if not self.peak.reliable:
            self._warn(
                "peak_unreliable",
                f"the MFU peak is unreliable: {self.peak.note}; MFU is shown with a '?'",
            )
        for kind, text in warnings:
            self._warn(kind, text)

    def _data_rows(self, manifest: dict[str, Any], when: str) -> list[tuple[str, str]]:
        """The header's lines on the batch, the training tokens and the validation split."""
        t = self.recipe.train
        total = t.steps * self.tokens_per_step
        train_tokens = manifest["splits"]["train"]["tokens"]
        epochs = f"{total / train_tokens:.2f}" if train_tokens else "–"
        val_tokens = manifest["splits"].get("validation", {}).get("tokens", 0)
        val = f"{val_tokens:,} tokens; not evaluated"
        if self.val_batches:
            val = (
                f"{val_tokens:,} tokens; {when}, {_n(self.val_batches, 'batch')} of "
                f"{self.val_batch_size} x {t.seq_len}"
            )
        ranks = _n(self.world.world_size, "rank")
        padding = ""
        if self.sft:  # packed rows: positions, some of them padding
            padding = f" (packing leaves {self.loader.padding_share:.1%} of them padding)"
        return [
            (
                "batch",
                f"{self.tokens_per_step:,} tokens per step = {t.batch_size} sequences x "
                f"{t.seq_len} tokens x {_n(t.grad_accum, 'micro-batch')} x {ranks}"
                f"{padding}",
            ),
            (
                "training",
                f"{t.steps:,} steps = {total:,} tokens = {epochs} epochs of the "
                f"{train_tokens:,} training tokens",
            ),
            ("validation", val),
        ]

    def _balance_text(self) -> str:
        m = self.recipe.moe
        parts = [f"bias balancing at {m.bias_update_rate:g} per step" if m.bias_update_rate
                 else "no bias balancing"]  # fmt: skip
        if m.aux_loss_coef:
            parts.append(f"aux loss x {m.aux_loss_coef:g}")
        if m.z_loss_coef:
            parts.append(f"z-loss x {m.z_loss_coef:g}")
        return ", ".join(parts)

    def _plan_validation(self, manifest: dict[str, Any]) -> list[tuple[str, str]]:
        """How each evaluation reads the validation split (batch size, batches) and the
        warnings that go with it: a split too small to mean much, one smaller than one batch
        (evaluated in one smaller batch; with not one sequence per rank, not at all), and
        ``eval.batches`` cut to what the split holds."""
        r, w = self.recipe, self.world.world_size
        b, t = r.train.batch_size, r.train.seq_len
        split = manifest["splits"].get("validation", {})
        tokens = int(split.get("tokens", 0))
        if self.sft:  # packed rows of whole conversations
            windows = packed_rows(r.data.dir, "validation", t) if tokens else 0
        else:
            windows = sum(max((int(sh["tokens"]) - 1) // t, 0) for sh in split.get("shards", []))
        per_rank = windows // w
        ranks = f" per rank ({w} ranks)" if w > 1 else ""
        warnings = []
        if 0 < tokens < VAL_MIN_TOKENS:
            text = (
                f"the validation split holds only {tokens:,} tokens (under {VAL_MIN_TOKENS:,}): "
                "its loss is too noisy to judge runs by; prepare the data with a larger "
                "--val-fraction"
            )
            warnings.append(("small_validation", text))
        if per_rank == 0:
            self.val_batches = 0
            what = f"a validation split of {tokens:,} tokens, not one sequence of {t + 1}{ranks}"
            if tokens == 0:
                what = "no validation split"
            text = f"the dataset has {what}: no validation loss will be computed"
            warnings.append(("no_validation", text))
        elif per_rank < b:
            self.val_batch_size, self.val_batches = per_rank, 1
            text = (
                f"the validation split holds {_n(per_rank, 'sequence')} of {t + 1} tokens{ranks}, "
                f"fewer than one batch of {b}: each evaluation uses them all, in one batch of "
                f"{per_rank}"
            )
            warnings.append(("validation_under_one_batch", text))
        elif r.eval.batches > per_rank // b:
            self.val_batches = per_rank // b
            text = (
                f"eval.batches is {r.eval.batches}, but the validation split holds "
                f"{_n(self.val_batches, 'batch')} of {b} x {t} tokens{ranks}: each evaluation "
                f"uses {self.val_batches}"
            )
            warnings.append(("eval_batches_reduced", text))
        return warnings

    def _warn(self, kind: str, text: str) -> None:
        """A warning: on the console (main rank) and as an event in metrics.jsonl."""
        self._event(kind, text)
        if self.world.is_main:
            self._say(f"camelid: warning: {text}", file=sys.stderr)

    def _say(self, text: str, file: Any = None) -> None:
        """A line on the console (main rank), above the live bar when there is one."""
        if not self.world.is_main:
            return
        if self.bar is not None:
            from tqdm import tqdm

            tqdm.write(text, file=file)
        else:
            print(text, file=file, flush=True)

    @property
    def _checkpoint_keys(self) -> Any:
        """What a checkpoint holds of the model: a LoRA run's, the adapters alone."""
        return is_lora_name if self.lora is not None else None

    def _load_init_weights(self) -> None:
        """Every rank reads ``init.model``'s weights (fp32, on the CPU) and keeps its shards."""
        from camelid.infer.load import load_model
        from camelid.train.parallelize import load_full_state

        source = self.init_source
        start = load_model(source, device="cpu", dtype=torch.float32, progress=False)
        load_full_state(self.model, start.state_dict())
        del start
        self._event("init", f"weights from {source.path}")
        self._say(f"  init        weights from {source.path}")

    def _dpo_run(self) -> DPORun:
        """The preference pairs, read and checked before anything is written, and the
        digest of init.model's weights that binds the reference to them."""
        from camelid.weights.digest import source_digest

        digest = source_digest(self.init_source, progress=False)
        return DPORun(self.recipe, self.world, self.tokenizer, self.config, digest,
                      lora=self.recipe.lora.config() is not None)  # fmt: skip

    def _dpo_reference(self) -> None:
        """The reference log-probs, computed once from the start weights and saved."""
        self.clock.lap("startup")
        what = "the base (adapters off)" if self.lora is not None else "the start weights"
        self._say(f"  reference   log-probs of every pair from {what} ...")
        paths = self.dpo.compute_reference(self.model, self.run_dir, self.autocast,
                                           self.show_bar)  # fmt: skip
        self.clock.lap("reference")
        for path in paths:
            self._event("dpo_reference", f"{path}: computed from {what} of {self.init_source.path}")

    def _restore(self, path: Path, state: dict[str, Any]) -> None:
        ckpt.load(path, self.model, self.optimizer, self.world, self._checkpoint_keys)
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        self.saved_step = self.step
        self.loader.load_state_dict(state["loader"])
        self.guard.load_state_dict(state["guard"])

    # -------------------------------------------------------------------------------- loop
    def _loop(self) -> str:
        r, world = self.recipe, self.world
        bar = None
        if self.show_bar:
            from tqdm import tqdm

            bar = tqdm(total=r.train.steps, initial=self.step, desc="train", unit="step")
        self.bar, self.loop_start = bar, time.perf_counter()
        since_checkpoint = 0.0  # productive seconds a roll-back would undo
        rollbacks: dict[int, int] = {}
        try:
            while self.step < r.train.steps:
                lr = lr_at(self.step, r)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                outcome = self._forward_backward()
                loss = outcome.loss
                grad_norm = clip_grad_norm(self.model, r.optim.grad_clip)  # global, every rank
                experts = balance.end_step(self.model, world)
                stats = torch.stack([loss.float(), grad_norm.float().to(loss.device)])
                loss_value, norm_value = (float(v) for v in stats.tolist())
                drill = self.guard.drill(self.step)
                if drill == "nan":
                    loss_value = math.nan
                elif drill == "spike":
                    loss_value *= 100.0
                verdict = self.guard.verdict(loss_value, norm_value)
                alarms = []
                if experts is not None:  # after the verdict: a router blow-up makes it bad
                    alarms = self.guard.experts(self.step + 1, experts.layers, experts.tokens,
                                                experts.router_logit_max)  # fmt: skip
                    bad = next((a for a in alarms if a.bad), None)
                    if verdict is None and bad is not None:
                        verdict = bad.kind
                if verdict is None:
                    self.optimizer.step()
                    if experts is not None:
                        balance.update_bias(self.model, experts.tokens, r.moe.bias_update_rate)
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                self.steps_run += 1
                self.tokens += outcome.tokens
                seconds = self.clock.lap("train")
                if verdict is None:
                    since_checkpoint += seconds
                else:
                    self.clock.move("train", "skipped", seconds)
                if verdict is not None and not any(a.kind == verdict for a in alarms):
                    self._event(verdict, f"loss {loss_value:.4g}, grad norm {norm_value:.4g}; "
                                "update skipped" + (" (drill)" if drill else ""))  # fmt: skip
                for alarm in alarms:  # router blow-ups (bad steps) and dead experts
                    (self._event if alarm.bad else self._warn)(alarm.kind, alarm.detail)
                tps = outcome.tokens / seconds
                # The peak is one device's: the run's is world_size of them.
                peak = self.peak.flops * world.world_size if self.peak.flops else None
                mfu = tps * self.flops_per_token / peak if peak else None
                self.log.write("step", step=self.step, loss=loss_value, grad_norm=norm_value,
                               lr=lr, tokens=self.tokens, tokens_per_s=tps, mfu=mfu,
                               peak_mem_bytes=peak_memory(world.device), step_time_s=seconds,
                               skipped=verdict is not None, **outcome.metrics)  # fmt: skip
                balance_now = None
                if experts is not None:
                    balance_now = expert_balance(experts.tokens)
                    self.log.write("experts", step=self.step, **experts.record(), **balance_now)
                detail = self.dpo.live_text(outcome.metrics) if self.dpo else ""
                self._show(bar, loss_value, lr, tps, mfu, balance_now, detail)

                if self.guard.must_roll_back:
                    target = self._roll_back(since_checkpoint)
                    rollbacks[target] = rollbacks.get(target, 0) + 1
                    if rollbacks[target] > MAX_ROLLBACKS:
                        raise CamelidError(
                            f"training diverged {MAX_ROLLBACKS} times after the checkpoint of "
                            f"step {target}, on different data: lower optim.lr or check the model"
                        )
                    since_checkpoint = 0.0
                    if bar is not None:
                        bar.n = self.step
                    continue
                due = r.checkpoint.interval and self.step % r.checkpoint.interval == 0
                if due and self._checkpoint():
                    since_checkpoint = 0.0
                if r.eval.interval and self.step % r.eval.interval == 0:
                    self._evaluate()
                if any_rank(self.stop_signal is not None, world):
                    self._checkpoint()
                    name = signal.Signals(self.stop_signal).name if self.stop_signal else "signal"
                    self._event("signal", f"{name}: checkpoint saved, stopping")
                    return "stopped"
        finally:
            if bar is not None:
                bar.close()
            self.bar = None
        return "finished"

    def _forward_backward(self) -> StepOutcome:
        """One step's forward and backward: a DPO run's pairs, or the loader's token batches."""
        if self.dpo is not None:
            return self.dpo.step(self.model, self.autocast)
        batches = [
            tuple(t.to(self.world.device, non_blocking=True) for t in next(self.loader))
            for _ in range(self.recipe.train.grad_accum)
        ]
        loss = forward_backward(self.model, batches, self.autocast, self.world)
        return StepOutcome(loss, self.tokens_per_step)

    def _show(
        self,
        bar: Any,
        loss: float,
        lr: float,
        tps: float,
        mfu: float | None,
        experts: dict[str, Any] | None = None,
        detail: str = "",
    ) -> None:
        """The live line: a bar's postfix on a terminal, else a line every log.interval steps
        with this process's elapsed time and the ETA at its pace so far (evaluations and
        checkpoints included)."""
        text = f"loss {loss:.4f} lr {lr:.2e} {tps:,.0f} tok/s"
        if mfu is not None:
            text += " " + format_mfu(mfu, self.peak)
        if experts:
            text += " " + format_balance(experts)
        if detail:
            text += " " + detail
        steps = self.recipe.train.steps
        due = self.step % self.recipe.log.interval == 0 or self.step == steps
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(text, refresh=False)
        elif self.world.is_main and due:
            pace = (time.perf_counter() - self.loop_start) / max(self.steps_run, 1)
            eta = format_duration(pace * max(steps - self.step, 0))
            elapsed = format_duration(self.clock.elapsed())
            print(f"step {self.step}/{steps}  {text}  elapsed {elapsed}  ETA {eta}", flush=True)

    def _roll_back(self, since_checkpoint: float) -> int:
        """Back to the last checkpoint, keeping the loader where it is: the data since that
        checkpoint — which led to the bad steps — is skipped."""
        target, skipped = ckpt.newest_usable(self.run_dir)
        for bad, reason in skipped:
            self._event("checkpoint_unusable", f"{bad}: {reason}")
        if target is None:
            raise CamelidError("the guard asked for a roll-back but no usable checkpoint exists")
        failed_at, position, drills = self.step, self.loader.state_dict(), self.guard.drills
        state = ckpt.read_state(target)
        self._restore(target, state)
        self.loader.load_state_dict(position)
        self.guard.bad_streak, self.guard.drills = 0, drills  # a drill fires once
        self.clock.move("train", "rollback", since_checkpoint)
        self.clock.lap("rollback")
        self._event("rollback", f"to step {self.step} after bad steps up to {failed_at}; the "
                    f"data of steps {self.step + 1}..{failed_at} is skipped")  # fmt: skip
        return self.step

    def _checkpoint(self) -> bool:
        """Save a checkpoint; a failure (disk full, say) is logged and training goes on."""
        state = {
            "tokens": self.tokens,
            "loader": self.loader.state_dict(),
            "guard": self.guard.state_dict(),
            "model_config": self.config.to_dict(),
        }
        try:
            path = ckpt.save(self.run_dir, self.step, self.model, self.optimizer, state,
                             self.world, self.recipe.checkpoint.keep,
                             self._checkpoint_keys)  # fmt: skip
            ok, detail = True, str(path)
            self.saved_step = self.step
        except OSError as e:
            ok, detail = False, f"{e}; the previous checkpoint is still the latest"
        self.clock.lap("checkpoint")
        self._event("checkpoint" if ok else "checkpoint_failed", detail)
        return ok

    def _event(self, kind: str, detail: str) -> None:
        self.events[kind] += 1
        self.log.write("event", step=self.step, event=kind, detail=detail)

    # --------------------------------------------------------------------------- evaluate
    @torch.no_grad()
    def _evaluate(self) -> dict[str, Any] | None:
        r = self.recipe
        self.last_eval_step = self.step
        if self.dpo is not None:
            scored = self.dpo.evaluate(self.model, self.autocast)
        else:
            scored = self._validation_loss()
        if scored is None:
            self.clock.lap("eval")
            return None
        scores, text = scored
        result = {
            **scores,
            "prompt": r.eval.sample_prompt,
            "sample": self._sample() if r.eval.sample_tokens > 0 else None,
        }
        self.clock.lap("eval")
        self.log.write("eval", step=self.step, **result)
        self.last_eval = result
        self._say(f"step {self.step}/{r.train.steps}  {text}")
        return result

    def _validation_loss(self) -> tuple[dict[str, Any], str] | None:
        """The validation split's loss and bits per byte, and a line saying them; None when
        there is nothing to evaluate."""
        world = self.world
        if self.val_batches == 0:  # said at start-up (_plan_validation)
            return None
        try:
            val = self._loader("validation", self.val_batch_size, 0, shuffle=False)
        except DataError as e:
            self._event("no_validation", str(e))
            return None
        sums = torch.zeros(3, dtype=torch.float64, device=world.device)  # nats, tokens, bytes
        for _ in range(min(self.val_batches, len(val))):
            x, y, *packed = (t.to(world.device) for t in next(val))
            with self._autocast():
                nats = next_token_loss(self.model, x, y, "sum", *packed)
            valid = y != IGNORE_INDEX
            sums += torch.stack(
                [nats.double(), valid_targets(y).double(),
                 (self.byte_lengths[y.where(valid, 0)] * valid).sum().double()]
            )  # fmt: skip
        nats, tokens, nbytes = all_reduce_sum(sums, world).tolist()
        result = {
            "val_loss": nats / tokens,
            "val_bpb": nats / (math.log(2) * nbytes) if nbytes else None,
        }
        bpb = "" if result["val_bpb"] is None else f", {result['val_bpb']:.4f} bits/byte"
        return result, f"validation loss {result['val_loss']:.4f}{bpb} over {int(tokens):,} tokens"

    def _sample(self) -> str:
        """A completion of the sample prompt by the generation engine, with the stop tokens
        of ``camelid generate``. Every rank decodes in lockstep under FSDP: the same prompt,
        the same gathered weights and a fixed seed give every rank the same tokens."""
        r = self.recipe
        engine = Engine(self.model, self.tokenizer, max_batch_size=1,
                        cache_dtype=self.compute_dtype)  # fmt: skip
        params = SamplingParams(max_new_tokens=r.eval.sample_tokens, top_p=1.0,
                                temperature=r.eval.temperature, seed=r.train.seed,
                                truncate_prompt=True)  # fmt: skip
        prompt: str | list[int] = r.eval.sample_prompt
        if r.eval.sample_chat:  # a chat model answers a user turn, and stops at its turn's end
            prompt = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True
            )
        try:
            # Compiled blocks are compiled for training shapes; decoding runs them eagerly.
            with self._autocast(), torch.compiler.set_stance("force_eager"):
                return engine.generate(prompt, params).text
        finally:
            self.model.train()

    def _autocast(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.world.device.type, dtype=self.autocast)

    # ------------------------------------------------------------------------------ finish
    def _finish(self, status: str) -> TrainSummary:
        r = self.recipe
        if status == "finished":
            if self.last_eval_step != self.step:
                self._evaluate()
            if self.saved_step != self.step:
                self._checkpoint()
            if r.checkpoint.export_hf:
                self.exported = self._export()
        last = self.last_eval
        c = self.config
        # This process's figures, and the run's: the processes before it (as metrics.jsonl
        # accounts for them, its own part excluded) plus this one.
        mine_wall, mine_time = self.clock.elapsed(), dict(self.clock.buckets)
        before = read_invocations(self.log.path)[:-1] if self.world.is_main else []
        wall, time_s = run_time(before)
        wall += mine_wall
        for key, seconds in mine_time.items():
            time_s[key] = time_s.get(key, 0.0) + seconds
        summary = TrainSummary(
            status=status,
            stop_signal=self.stop_signal if status == "stopped" else None,
            steps=self.step,
            tokens=self.tokens,
            wall_s=wall,
            goodput=time_s.get("train", 0.0) / max(wall, 1e-9),
            time_s=time_s,
            final_val_loss=last["val_loss"] if last else None,
            final_val_bpb=last["val_bpb"] if last else None,
            sample_prompt=r.eval.sample_prompt,
            sample=last["sample"] if last else None,
            model=self._model_text(),
            params=c.num_params(),
            param_bytes_per_rank=self.param_bytes,
            device=device_name(self.world.device),
            world_size=self.world.world_size,
            run_dir=str(self.run_dir),
            export=str(self.run_dir / "hf") if self.exported else None,
            events=dict(self.events),
            reports=self.world.is_main,
            invocations=len(before) + 1,
            invocation_steps=self.steps_run,
            invocation_wall_s=mine_wall,
            invocation_goodput=mine_time.get("train", 0.0) / max(mine_wall, 1e-9),
            invocation_time_s=mine_time,
            peak=self.peak.to_dict(),
        )
        record = summary.to_dict()
        for key in ("sample_prompt", "sample", "reports", "report", "already_finished"):
            record.pop(key)
        self.log.write("summary", **record)
        if self.world.is_main:
            from camelid.train.report import write_report

            summary.report = str(write_report(self.run_dir))
        return summary

    def _export(self) -> bool:
        """The complete Hugging Face directory run_dir/hf (weights, config with token ids,
        generation_config, tokenizer), loadable by transformers and camelid: what
        ``camelid export`` makes of the run's last checkpoint, written by the same function.
        A model with no Hugging Face form (an MoE shape HF's Llama 4 cannot express) is not
        exported: a warning says so, and its checkpoints serve every camelid command."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        try:
            self.config.to_hf()
        except ConfigError as e:
            self._warn("export_skipped", f"no Hugging Face export of this model: {e}; "
                       f"`camelid generate` and `serve` read its checkpoints "
                       f"({self.run_dir / 'checkpoints'}) directly")  # fmt: skip
            self.clock.lap("export")
            return False

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(self.model, options=options)
        if self.world.is_main:
            model = Transformer.empty(self.config)
            if self.lora is not None:
                apply_lora(model, self.lora)
            model.load_state_dict({k: v.float() for k, v in state.items()})
            if self.lora is not None:
                # adapters that provably change nothing fail the run (e.g. a frozen B)
                check_adapters_effective(None, model)
                save_adapter(model, self.run_dir / "adapter",
                             base_model_name_or_path=str(self.recipe.init.model))  # fmt: skip
                self._event("export", f"{self.run_dir / 'adapter'} (LoRA, peft's format)")
                model = merge_lora(model)
            data = (self.dpo.data_summary() if self.dpo  # for its model card
                    else data_summary(self.manifest, self.recipe.data.dir))  # fmt: skip
            save_pretrained(model, self.tokenizer, self.run_dir / "hf", data=data)
        barrier(self.world)
        self.clock.lap("export")
        self._event("export", str(self.run_dir / "hf"))
        return True

    @contextlib.contextmanager
    def _signals(self):
        """SIGTERM / SIGINT ask for a checkpoint and a clean stop at the end of the step."""

        def handler(signum, frame):
            if self.stop_signal is not None:  # a second one: stop now
                raise KeyboardInterrupt
            self.stop_signal = signum

        previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
