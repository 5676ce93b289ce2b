"""What a ``[dpo]`` recipe adds to ``camelid train``: preference pairs instead of token batches,
a reference computed once from the frozen start and kept in the run directory, DPO's loss and
rewards at every step and evaluation.

The trainer holds one :class:`DPORun` and asks it for each step's forward and backward
(:meth:`DPORun.step`), its validation (:meth:`DPORun.evaluate`) and its header lines; the
optimizer, clipping, the guard, checkpoints, FSDP2, LoRA and the export stay the trainer's own.
The maths is :mod:`camelid.train.dpo`'s.

The reference log-probs are computed before step 1 — with LoRA from the base with its adapters
off, for full DPO from the start weights — and saved beside the run's checkpoints with their
checksum, which binds them to ``init.model``'s weights digest and to the tokenised pairs. A
resumed run reads and verifies them before it writes anything, and never recomputes them: after
step 1 the weights have moved, so a recomputed reference would be another objective.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from camelid.config import ModelConfig
from camelid.errors import CheckpointError, DataError
from camelid.model.lora import adapters_disabled
from camelid.tokenizer import Tokenizer
from camelid.train import balance
from camelid.train.distributed import World, all_reduce_sum, barrier
from camelid.train.dpo import (
    PairLoader,
    PreferenceBatch,
    PreferenceSet,
    Reference,
    collate,
    dpo_evaluate,
    dpo_step,
    read_preferences,
    reference_logps,
)
from camelid.train.parallelize import average_expert_grads
from camelid.train.recipe import Recipe, RecipeError
from camelid.train.step import StepOutcome

REFERENCE_FILE = "dpo-reference.safetensors"  # in the run directory
VAL_REFERENCE_FILE = "dpo-reference-val.safetensors"
LISTED = 5  # skipped lines named in the warning


class DPORun:
    """The preference data, reference and step of a DPO run (see the module docstring).

    Everything a user can get wrong — a missing or bad preference file, too few pairs for one
    step, a ``max_len`` longer than the model's context — is raised here, before the trainer
    writes anything."""

    def __init__(
        self,
        recipe: Recipe,
        world: World,
        tokenizer: Tokenizer,
        config: ModelConfig,
        weights_digest: str,
        lora: bool,
    ) -> None:
        self.recipe, self.world, self.lora = recipe, world, lora
        self.weights_digest = weights_digest  # of init.model: the start the reference is of
        d, t = recipe.dpo, recipe.train
        self.max_len = recipe.dpo_max_len
        if self.max_len > config.max_seq_len:
            key = "dpo.max_len" if d.max_len else "train.seq_len (dpo.max_len = 0)"
            raise RecipeError(
                f"{key} is {self.max_len}, longer than the model's context (max_seq_len "
                f"{config.max_seq_len}): lower it, or raise model.max_seq_len"
            )
        self.train_set = self._read(d.data, "dpo.data", tokenizer)
        self.val_set = self._read(d.val_data, "dpo.val_data", tokenizer) if d.val_data else None
        try:
            self.loader = PairLoader(
                self.train_set, t.batch_size, t.seed, world.rank, world.world_size, shuffle=True
            )
        except DataError as e:
            raise RecipeError(f"dpo.data {e}: lower train.batch_size or add pairs") from None
        self.val_batches, self.val_batch_size = self._plan_validation()
        self.ref: Reference | None = None
        self.val_ref: Reference | None = None

    def _read(self, path: str, key: str, tokenizer: Tokenizer) -> PreferenceSet:
        if not Path(path).is_file():
            what = "a directory, not a file" if Path(path).is_dir() else "no such file"
            raise RecipeError(f"{key}: {path}: {what} (preference pairs, one JSON a line)")
        return read_preferences(path, tokenizer, self.max_len, truncate=self.recipe.dpo.truncate)

    def _plan_validation(self) -> tuple[list[PreferenceBatch], int]:
        """This rank's validation batches: up to ``eval.batches`` of ``train.batch_size`` pairs
        per rank, in file order, rank r taking every W-th pair; every rank the same number
        (FSDP2's forwards are collective). Fewer pairs than one batch per rank: one smaller."""
        if self.val_set is None:
            return [], 0
        w = self.world
        per_rank = len(self.val_set) // w.world_size
        size = min(self.recipe.train.batch_size, per_rank)
        if size == 0:
            return [], 0
        count = min(self.recipe.eval.batches, per_rank // size)
        mine = list(range(count * size * w.world_size))[w.rank :: w.world_size]
        chunks = [mine[i : i + size] for i in range(0, len(mine), size)]
        pairs = self.val_set.pairs
        return [collate([pairs[i] for i in c], c, self.val_set.pad_id) for c in chunks], size

    @property
    def pairs_per_step(self) -> int:
        t = self.recipe.train
        return t.batch_size * t.grad_accum * self.world.world_size

    # ------------------------------------------------------------------------------ header
    def header_rows(self, when: str) -> list[tuple[str, str]]:
        """The header's lines on the objective, the batch, the data and the validation."""
        r, t, w = self.recipe, self.recipe.train, self.world
        per_step = self.pairs_per_step
        n = len(self.train_set)
        ranks = f"{w.world_size} rank" + ("s" if w.world_size > 1 else "")
        smoothing = f", label smoothing {r.dpo.label_smoothing:g}" if r.dpo.label_smoothing else ""
        ref = "the base with its adapters off" if self.lora else "the start weights"
        fit = f"max_len {self.max_len}"
        if self.train_set.skipped:
            fit += f", {len(self.train_set.skipped):,} longer skipped"
        if self.train_set.truncated:
            fit += f", {self.train_set.truncated:,} truncated"
        micro = f"{t.grad_accum} micro-batch" + ("es" if t.grad_accum > 1 else "")
        rows = [
            ("dpo", f"beta {r.dpo.beta:g}{smoothing}; reference: {ref}, computed once"),
            ("batch", f"{per_step:,} pairs per step = {t.batch_size} pairs x {micro} x {ranks}"),
            (
                "training",
                f"{t.steps:,} steps = {t.steps * per_step:,} pairs = "
                f"{t.steps * per_step / n:.2f} epochs of the {n:,} pairs of "
                f"{self.train_set.path} ({fit})",
            ),
        ]
        if self.val_set is None:
            rows.append(("validation", "none (dpo.val_data is not set)"))
        elif not self.val_batches:
            rows.append(("validation", f"{len(self.val_set)} pairs; not evaluated"))
        else:
            rows.append(
                (
                    "validation",
                    f"{len(self.val_set):,} pairs of {self.val_set.path}; "
                    f"{when}, {len(self.val_batches)} batch(es) of {self.val_batch_size} "
                    "pairs per rank",
                )
            )
        return rows

    def warnings(self) -> list[tuple[str, str]]:
        """(event kind, text) for what the data reading passed over."""
        out = []
        for key, data in (("dpo.data", self.train_set), ("dpo.val_data", self.val_set)):
            if data is not None and data.skipped:
                lines = ", ".join(str(n) for n in data.skipped[:LISTED])
                more = ", ..." if len(data.skipped) > LISTED else ""
                out.append(
                    (
                        "dpo_pairs_skipped",
                        (
                            f"{key}: {len(data.skipped):,} pair(s) of {data.path} are longer than "
                            f"{self.max_len} tokens and are skipped (lines {lines}{more}); set "
                            "dpo.truncate = true to cut them instead, or raise dpo.max_len"
                        ),
                    )
                )
        if self.val_set is not None and not self.val_batches:
            out.append(
                (
                    "no_validation",
                    (
                        f"dpo.val_data {self.val_set.path} holds {len(self.val_set)} pair(s), "
                        f"fewer than one per rank ({self.world.world_size} ranks): no validation"
                    ),
                )
            )
        return out

    # --------------------------------------------------------------------------- reference
    def _sets(self, run_dir: Path) -> list[tuple[Path, PreferenceSet]]:
        out = [(run_dir / REFERENCE_FILE, self.train_set)]
        if self.val_batches and self.val_set is not None:
            out.append((run_dir / VAL_REFERENCE_FILE, self.val_set))
        return out

    def load_reference(self, run_dir: Path) -> list[Path]:
        """A resumed run's reference: read, its checksum checked, and verified to be of
        init.model's weights and of these pairs; never recomputed. Returns the files read."""
        refs, paths = [], []
        for path, data in self._sets(run_dir):
            if not path.is_file():
                raise CheckpointError(
                    f"{path}: the run's DPO reference is missing; it is computed once, from the "
                    "start weights, and cannot be recomputed from moved ones: start over with "
                    "--fresh"
                )
            ref = Reference.load(path)  # names the file when the checksum fails
            try:
                ref.verify(self.weights_digest, data.digest)
            except CheckpointError as e:
                raise CheckpointError(
                    f"{path}: {e} (init.model or the pairs changed since "
                    "the run began: start over with --fresh)"
                ) from None
            refs.append(ref)
            paths.append(path)
        self.ref, self.val_ref = refs[0], (refs[1] if len(refs) > 1 else None)
        return paths

    def compute_reference(
        self,
        model: nn.Module,
        run_dir: Path,
        autocast: torch.dtype | None,
        progress: bool,
    ) -> list[Path]:
        """The reference log-probs of every training (and validation) pair from ``model`` as
        it starts — with LoRA, with its adapters off — saved in the run directory (main rank).
        Returns the files written."""
        context = (lambda: adapters_disabled(model)) if self.lora else None
        refs, paths = [], []
        for path, data in self._sets(run_dir):
            refs.append(
                reference_logps(
                    model,
                    data,
                    weights_digest=self.weights_digest,
                    batch_size=self.recipe.train.batch_size,
                    reference=context,
                    autocast_dtype=autocast,
                    progress=progress,
                    world=self.world,
                )
            )
            if self.world.is_main:
                refs[-1].save(path)
            paths.append(path)
        barrier(self.world)
        self.ref, self.val_ref = refs[0], (refs[1] if len(refs) > 1 else None)
        return paths

    # -------------------------------------------------------------------------------- step
    def step(self, model: nn.Module, autocast: torch.dtype | None) -> StepOutcome:
        """Forward and backward of one optimizer step: ``train.grad_accum`` micro-batches of
        ``train.batch_size`` pairs on each rank. The caller clips, steps and zeroes."""
        assert self.ref is not None, "compute_reference or load_reference first"
        r, w = self.recipe, self.world
        batches = [next(self.loader).to(w.device) for _ in range(r.train.grad_accum)]
        mine = sum(b.tokens for b in batches)  # without the padding
        tokens = int(all_reduce_sum(torch.tensor(float(mine), dtype=torch.float64,
                                                 device=w.device), w))  # fmt: skip
        # MoE router accounting over the pairs' own tokens (sequence_logps marks the padding)
        balance.begin_step(model, tokens, w.world_size, mine)
        average_expert_grads(model)
        loss, metrics = dpo_step(
            model, batches, self.ref, r.dpo.beta, r.dpo.label_smoothing, autocast, w
        )
        values = torch.stack(list(metrics.values())).tolist()
        return StepOutcome(loss, int(tokens), dict(zip(metrics, values, strict=True)))

    @staticmethod
    def live_text(metrics: dict[str, float]) -> str:
        """The rewards on the live line."""
        return f"acc {metrics['rewards/accuracies']:.2f} margin {metrics['rewards/margins']:.4f}"

    # ---------------------------------------------------------------------------- evaluate
    def evaluate(
        self, model: nn.Module, autocast: torch.dtype | None
    ) -> tuple[dict[str, Any], str] | None:
        """The DPO loss and rewards of the validation pairs (``val_loss``, ``val_rewards/...``)
        and a line saying them; None without validation pairs."""
        if not self.val_batches or self.val_ref is None:
            return None
        r, w = self.recipe, self.world
        batches = [b.to(w.device) for b in self.val_batches]
        loss, metrics = dpo_evaluate(
            model, batches, self.val_ref, r.dpo.beta, r.dpo.label_smoothing, autocast, w
        )
        values = torch.stack([loss, *metrics.values()]).tolist()
        pairs = len(self.val_batches) * self.val_batch_size * w.world_size
        out: dict[str, Any] = {"val_loss": values[0], "val_bpb": None, "val_pairs": pairs}
        out.update((f"val_{k}", v) for k, v in zip(metrics, values[1:], strict=True))
        text = (
            f"validation DPO loss {out['val_loss']:.4f}, reward accuracy "
            f"{out['val_rewards/accuracies']:.2f}, margin {out['val_rewards/margins']:.4f} "
            f"over {pairs:,} pairs"
        )
        return out, text

    def data_summary(self) -> dict[str, Any]:
        """What the model card says of the training data: the preference files."""
        sets = {"train": self.train_set, "validation": self.val_set}
        files = [s.path for s in sets.values() if s is not None]
        return {
            "dir": self.train_set.path,
            "tokens": {
                k: sum(len(p.prompt) * 2 + len(p.chosen) + len(p.rejected) for p in s.pairs)
                for k, s in sets.items()
                if s is not None
            },
            "documents": {f"{k} pairs": len(s) for k, s in sets.items() if s is not None},
            "sources": {
                "files": len(files),
                "bytes": sum(Path(f).stat().st_size for f in files),
                "corpus": files,
            },
            "tokenizer_digest": self.train_set.tokenizer_digest,
            "recipe_digest": self.train_set.digest,
        }
