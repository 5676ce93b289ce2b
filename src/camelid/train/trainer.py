"""The pre-training loop: one function from one CPU to many GPUs.

    summary = train(load_recipe("configs/quickstart.toml"))

Per step: the learning rate for this step, ``grad_accum`` micro-batches forward and backward
(bf16 autocast on GPU, fp32 on CPU), gradient clipping, the stability guard's verdict, and the
update — or, for a bad step, none. Around it: periodic validation (loss, bits per byte, a sample
completion), sharded checkpoints, roll-back after repeated bad steps, a checkpoint on SIGTERM /
SIGINT, and at the end a Hugging Face export and a report.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import math
import shutil
import signal
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from camelid.data import TokenLoader, read_manifest
from camelid.errors import CamelidError, CheckpointError, DataError
from camelid.infer import Engine, SamplingParams
from camelid.infer.export import keep_run_tokenizer, save_pretrained
from camelid.io import write_text_atomic
from camelid.loss import IGNORE_INDEX, next_token_loss, valid_targets
from camelid.model import Transformer
from camelid.system import device_name
from camelid.tokenizer import Tokenizer
from camelid.train import checkpoint as ckpt
from camelid.train.distributed import World, all_reduce_sum, any_rank, barrier, init_world
from camelid.train.distributed import close as close_world
from camelid.train.guard import Guard
from camelid.train.metrics import Clock, MetricsLog, device_peak_flops, peak_memory
from camelid.train.parallelize import build_model, local_param_bytes
from camelid.train.recipe import Recipe, RecipeError
from camelid.train.schedule import lr_at
from camelid.train.step import build_optimizer, clip_grad_norm, forward_backward

# Roll-backs to the same checkpoint before the run gives up: the data is not the problem then.
MAX_ROLLBACKS = 5


@dataclass
class TrainSummary:
    """What a training run did, as this rank saw it. Every rank returns one; only the rank
    that ``reports`` (rank 0) wrote the log, the report and the export.

    Fields can also be read as ``summary["status"]``, for code written against the plain dict
    the trainer used to return.
    """

    status: str  # "finished", or "stopped" by a signal (resume it)
    steps: int
    tokens: int
    wall_s: float
    goodput: float
    time_s: dict[str, float]
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

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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

    # ------------------------------------------------------------------------------ set-up
    def run(self, resume: str | None, fresh: bool) -> TrainSummary:
        r, world = self.recipe, self.world
        # Everything a user can get wrong is checked before the run directory is touched: a
        # failed start leaves no empty run directory and changes nothing of an existing run.
        self._check_run_dir(resume, fresh)
        manifest = read_manifest(r.data.dir)
        tok_path = r.data.tokenizer or manifest["tokenizer"]["path"]
        self.tokenizer = Tokenizer.load(tok_path)
        if self.tokenizer.digest != manifest["tokenizer"]["digest"]:
            raise RecipeError(
                f"{r.data.dir} was prepared with another tokenizer than {tok_path} "
                "(digests differ); prepare the data again or point data.tokenizer at the right one"
            )
        self.config = r.model_config(self.tokenizer.vocab_size)
        if self.config.vocab_size < self.tokenizer.vocab_size:
            raise RecipeError(
                f"model.vocab_size {self.config.vocab_size} is smaller than the tokenizer's "
                f"{self.tokenizer.vocab_size}"
            )
        self._check_training_windows(manifest)
        self.loader = TokenLoader(r.data.dir, "train", r.train.batch_size, r.train.seq_len,
                                  r.train.seed, world.rank, world.world_size)  # fmt: skip
        if r.log.tensorboard and importlib.util.find_spec("tensorboard") is None:
            raise RecipeError(
                "log.tensorboard = true needs the tensorboard package (pip install tensorboard)"
            )
        start_state = self._resume_state(resume)
        self._prepare_dir(fresh)  # the first write of this run
        if world.is_main:  # the run's own copy: its checkpoints stay exportable
            keep_run_tokenizer(self.tokenizer, self.run_dir)

        torch.manual_seed(r.train.seed)
        bf16 = r.train.precision == "bf16" or (
            r.train.precision == "auto" and world.device.type == "cuda"
        )
        model = build_model(self.config, world, seed=r.train.seed,
                            activation_checkpointing=r.train.activation_checkpointing,
                            compile=r.train.compile, bf16=bf16)  # fmt: skip
        self.model = model
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
        self.peak = device_peak_flops(world.device, r.run.peak_tflops)
        self.flops_per_token = self.config.flops_per_token(r.train.seq_len)
        self.tokens_per_step = (
            r.train.batch_size * r.train.seq_len * r.train.grad_accum * world.world_size
        )
        self.log = MetricsLog(self.run_dir, world.is_main, self.clock, r.log.tensorboard)
        self.step, self.tokens = 0, 0
        if start_state is not None:
            self._restore(start_state[0], start_state[1])
            for detail in self.unusable:  # newer checkpoints that _resume_state passed over
                self._event("checkpoint_unusable", detail)
            self._event("resume", str(start_state[0]))
        elif r.guard.enabled and r.guard.max_bad_steps > 0:
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

    def _restore(self, path: Path, state: dict[str, Any]) -> None:
        ckpt.load(path, self.model, self.optimizer, self.world)
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        self.loader.load_state_dict(state["loader"])
        self.guard.load_state_dict(state["guard"])

    # -------------------------------------------------------------------------------- loop
    def _loop(self) -> str:
        r, world = self.recipe, self.world
        bar = None
        if self.show_bar:
            from tqdm import tqdm

            bar = tqdm(total=r.train.steps, initial=self.step, desc="train", unit="step")
        since_checkpoint = 0.0  # productive seconds a roll-back would undo
        rollbacks: dict[int, int] = {}
        try:
            while self.step < r.train.steps:
                lr = lr_at(self.step, r)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                batches = [
                    tuple(t.to(world.device, non_blocking=True) for t in next(self.loader))
                    for _ in range(r.train.grad_accum)
                ]
                loss = forward_backward(self.model, batches, self.autocast, world)
                grad_norm = clip_grad_norm(self.model, r.optim.grad_clip)  # global, every rank
                stats = torch.stack([loss.float(), grad_norm.float().to(loss.device)])
                loss_value, norm_value = (float(v) for v in stats.tolist())
                drill = self.guard.drill(self.step)
                if drill == "nan":
                    loss_value = math.nan
                elif drill == "spike":
                    loss_value *= 100.0
                verdict = self.guard.verdict(loss_value, norm_value)
                if verdict is None:
                    self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                self.tokens += self.tokens_per_step
                seconds = self.clock.lap("train")
                if verdict is None:
                    since_checkpoint += seconds
                else:
                    self.clock.move("train", "skipped", seconds)
                    self._event(verdict, f"loss {loss_value:.4g}, grad norm {norm_value:.4g}; "
                                "update skipped" + (" (drill)" if drill else ""))  # fmt: skip
                tps = self.tokens_per_step / seconds
                mfu = tps * self.flops_per_token / self.peak if self.peak else None
                self.log.write("step", step=self.step, loss=loss_value, grad_norm=norm_value,
                               lr=lr, tokens=self.tokens, tokens_per_s=tps, mfu=mfu,
                               peak_mem_bytes=peak_memory(world.device), step_time_s=seconds,
                               skipped=verdict is not None)  # fmt: skip
                self._show(bar, loss_value, lr, tps, mfu)

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
        return "finished"

    def _show(self, bar: Any, loss: float, lr: float, tps: float, mfu: float | None) -> None:
        text = f"loss {loss:.4f} lr {lr:.2e} {tps:,.0f} tok/s" + (
            f" MFU {100 * mfu:.1f}%" if mfu is not None else ""
        )
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(text, refresh=False)
        elif self.world.is_main and (
            self.step % self.recipe.log.interval == 0 or self.step == self.recipe.train.steps
        ):
            print(f"step {self.step}/{self.recipe.train.steps}  {text}", flush=True)

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
                             self.world, self.recipe.checkpoint.keep)  # fmt: skip
            ok, detail = True, str(path)
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
        r, world = self.recipe, self.world
        try:
            val = TokenLoader(r.data.dir, "validation", r.train.batch_size, r.train.seq_len,
                              0, world.rank, world.world_size, shuffle=False)  # fmt: skip
        except DataError as e:
            self.clock.lap("eval")
            self._event("no_validation", str(e))
            return None
        sums = torch.zeros(3, dtype=torch.float64, device=world.device)  # nats, tokens, bytes
        for _ in range(min(r.eval.batches, len(val))):
            x, y = (t.to(world.device) for t in next(val))
            with self._autocast():
                nats = next_token_loss(self.model, x, y, reduction="sum")
            valid = y != IGNORE_INDEX
            sums += torch.stack(
                [nats.double(), valid_targets(y).double(),
                 (self.byte_lengths[y.where(valid, 0)] * valid).sum().double()]
            )  # fmt: skip
        nats, tokens, nbytes = all_reduce_sum(sums, world).tolist()
        result = {
            "val_loss": nats / tokens,
            "val_bpb": nats / (math.log(2) * nbytes) if nbytes else None,
            "prompt": r.eval.sample_prompt,
            "sample": self._sample() if r.eval.sample_tokens > 0 else None,
        }
        self.clock.lap("eval")
        self.log.write("eval", step=self.step, **result)
        self.last_eval = result
        return result

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
        try:
            # Compiled blocks are compiled for training shapes; decoding runs them eagerly.
            with self._autocast(), torch.compiler.set_stance("force_eager"):
                return engine.generate(r.eval.sample_prompt, params).text
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
            if not (r.eval.interval and self.step % r.eval.interval == 0):
                self._evaluate()
            if not (r.checkpoint.interval and self.step % r.checkpoint.interval == 0):
                self._checkpoint()
            if r.checkpoint.export_hf:
                self._export()
        last = self.last_eval
        c = self.config
        summary = TrainSummary(
            status=status,
            steps=self.step,
            tokens=self.tokens,
            wall_s=self.clock.elapsed(),
            goodput=self.clock.goodput(),
            time_s=dict(self.clock.buckets),
            final_val_loss=last["val_loss"] if last else None,
            final_val_bpb=last["val_bpb"] if last else None,
            sample_prompt=r.eval.sample_prompt,
            sample=last["sample"] if last else None,
            model=f"{c.name}: {c.n_layers} layers, dim {c.dim}, {c.n_heads}/{c.n_kv_heads} "
            f"heads, vocab {c.vocab_size}",
            params=c.num_params(),
            param_bytes_per_rank=self.param_bytes,
            device=device_name(self.world.device),
            world_size=self.world.world_size,
            run_dir=str(self.run_dir),
            export=str(self.run_dir / "hf")
            if status == "finished" and r.checkpoint.export_hf
            else None,
            events=dict(self.events),
            reports=self.world.is_main,
        )
        record = summary.to_dict()
        for key in ("sample_prompt", "sample", "reports", "report"):
            record.pop(key)
        self.log.write("summary", **record)
        if self.world.is_main:
            from camelid.train.report import write_report

            summary.report = str(write_report(self.run_dir))
        return summary

    def _export(self) -> None:
        """The complete Hugging Face directory run_dir/hf (weights, config with token ids,
        generation_config, tokenizer), loadable by transformers and camelid: what
        ``camelid export`` makes of the run's last checkpoint, written by the same function."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(self.model, options=options)
        if self.world.is_main:
            with torch.device("meta"):
                model = Transformer(self.config)
            model = model.to_empty(device="cpu")
            model.tie_weights()
            model.load_state_dict({k: v.float() for k, v in state.items()})
            save_pretrained(model, self.tokenizer, self.run_dir / "hf")
        barrier(self.world)
        self.clock.lap("export")
        self._event("export", str(self.run_dir / "hf"))

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
