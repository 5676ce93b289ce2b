"""Sharded checkpoints with ``torch.distributed.checkpoint`` (DCP).

A checkpoint is a directory ``checkpoints/step-00000200/`` holding the model and optimizer
state (each rank writes its own shards; DCP re-shards on load, so a run may resume on another
number of processes), ``trainer.json`` (step, tokens, data-loader position, guard state, model
config) and each rank's RNG state. It is written under ``.step-00000200.tmp`` and renamed when
every rank has finished, with ``trainer.json`` last: a run killed or out of disk mid-write leaves
the previous checkpoint as the latest usable one.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from camelid.errors import CamelidError
from camelid.io import write_text_atomic
from camelid.train.distributed import World, barrier

# The format's names have one home, shared with what reads weights out of checkpoints.
from camelid.weights.checkpoint import STATE_FILE, checkpoint_dir, list_checkpoints, step_dir_name
from camelid.weights.checkpoint import STEP_NAME as _NAME  # noqa: F401


def save(
    run_dir: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    world: World,
    keep: int,
) -> Path:
    """Write a checkpoint for ``step``; keep only the newest ``keep``. Returns its path."""
    root = checkpoint_dir(run_dir)
    final, tmp = root / step_dir_name(step), root / f".{step_dir_name(step)}.tmp"
    if world.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(world)
    try:
        model_state, optim_state = get_state_dict(model, optimizer)
        with _quiet_single_process():
            dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp))
        rng = {"torch": torch.get_rng_state()}
        if world.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(world.device)
        torch.save(rng, tmp / f"rng-{world.rank}.pt")
        barrier(world)
        if world.is_main:
            write_text_atomic(tmp / STATE_FILE, json.dumps({**state, "step": step}) + "\n")
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        if world.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    barrier(world)
    return final


def read_state(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CamelidError(f"{path}: not a usable checkpoint ({e})") from None


def load(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, world: World
) -> dict[str, Any]:
    """Restore model, optimizer and RNG from ``path``; return its trainer state."""
    state = read_state(path)
    model_state, optim_state = get_state_dict(model, optimizer)
    bundle = {"model": model_state, "optim": optim_state}
    with _quiet_single_process():
        dcp.load(bundle, checkpoint_id=str(path))
    set_state_dict(
        model, optimizer, model_state_dict=bundle["model"], optim_state_dict=bundle["optim"]
    )
    rng_file = path / f"rng-{world.rank}.pt"
    if rng_file.exists():
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and world.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], world.device)
    return state


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """DCP warns that it runs without a process group; for a single process that is the plan."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield
