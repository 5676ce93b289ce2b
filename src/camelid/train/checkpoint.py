"""Sharded checkpoints with ``torch.distributed.checkpoint`` (DCP).

A checkpoint is a directory ``checkpoints/step-00000200/`` holding the model and optimizer
state (each rank writes its own shards; DCP re-shards on load, so a run may resume on another
number of processes), ``trainer.json`` (step, tokens, data-loader position, guard state, model
config) and each rank's RNG state. It is written under ``.step-00000200.tmp`` and renamed when
every rank has finished, with ``trainer.json`` last: a run killed or out of disk mid-write leaves
the previous checkpoint as the latest usable one. A checkpoint damaged later (a truncated or
missing tensor file, an unreadable ``.metadata``, ``trainer.json`` or RNG file) is found by
:func:`usable` before any of it is loaded, and :func:`newest_usable` passes over it.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

from camelid.errors import CamelidError, CheckpointError
from camelid.io import write_text_atomic
from camelid.train.distributed import World, barrier

# The format's names have one home, shared with what reads weights out of checkpoints.
from camelid.weights.checkpoint import (
    STATE_FILE,
    check_lengths,
    checkpoint_dir,
    list_checkpoints,
    step_dir_name,
)
from camelid.weights.checkpoint import STEP_NAME as _NAME  # noqa: F401


def save(
    run_dir: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    world: World,
    keep: int,
    model_keys: Callable[[str], bool] | None = None,
) -> Path:
    """Write a checkpoint for ``step``; keep only the newest ``keep``. Returns its path.
    ``model_keys`` keeps only the model tensors it accepts (a LoRA run: the adapters; its
    frozen base comes from ``init.model``)."""
    root = checkpoint_dir(run_dir)
    final, tmp = root / step_dir_name(step), root / f".{step_dir_name(step)}.tmp"
    if world.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(world)
    try:
        model_state, optim_state = get_state_dict(model, optimizer)
        if model_keys is not None:
            model_state = {k: v for k, v in model_state.items() if model_keys(k)}
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
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    world: World,
    model_keys: Callable[[str], bool] | None = None,
) -> dict[str, Any]:
    """Restore model, optimizer and RNG from ``path``; return its trainer state. With
    ``model_keys``, only those model tensors (as :func:`save` kept them) are restored."""
    state = read_state(path)
    model_state, optim_state = get_state_dict(model, optimizer)
    if model_keys is not None:
        model_state = {k: v for k, v in model_state.items() if model_keys(k)}
    bundle = {"model": model_state, "optim": optim_state}
    try:
        with _quiet_single_process():
            dcp.load(bundle, checkpoint_id=str(path))
    except Exception as e:  # damage usable() cannot see (DCP keeps no checksums)
        raise CheckpointError(f"{path}: cannot load the checkpoint ({_first_line(e)})") from None
    set_state_dict(
        model, optimizer, model_state_dict=bundle["model"], optim_state_dict=bundle["optim"],
        options=StateDictOptions(strict=model_keys is None),
    )  # fmt: skip
    rng_file = path / f"rng-{world.rank}.pt"
    if rng_file.exists():
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and world.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], world.device)
    return state


# The trainer state a resume needs; a trainer.json without them is not a training checkpoint.
_STATE_KEYS = ("step", "tokens", "loader", "guard")


def usable(path: Path) -> str | None:
    """Why the checkpoint at ``path`` cannot be resumed from, or None when it looks whole.

    Checked without loading a tensor: ``trainer.json`` parses and holds the trainer state; DCP's
    ``.metadata`` reads; every file it lists exists and is at least as long as the bytes it
    lists there; each RNG file loads. Flipped bits inside tensor data are not detectable here
    (DCP stores no checksums): :func:`load` then names the checkpoint if loading fails.
    """
    if not path.is_dir():
        return "no such directory"
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except FileNotFoundError:
        return f"no {STATE_FILE} (not a checkpoint directory, or an unfinished one)"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"{STATE_FILE} is unreadable ({_first_line(e)})"
    missing = [k for k in _STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        return f"{STATE_FILE} lacks {', '.join(missing)}"
    try:
        metadata = dcp.FileSystemReader(str(path)).read_metadata()
    except FileNotFoundError:
        return "no .metadata (the index of its tensor files)"
    except Exception as e:  # a truncated or overwritten pickle
        return f".metadata is unreadable ({_first_line(e)})"
    try:
        check_lengths(path, getattr(metadata, "storage_data", None) or {})
    except CheckpointError as e:
        return str(e).removeprefix(f"{path}: ").removeprefix(f"{path}/")
    for rng in sorted(path.glob("rng-*.pt")):
        try:
            torch.load(rng, weights_only=True)
        except Exception as e:
            return f"{rng.name} is unreadable ({_first_line(e)})"
    return None


def newest_usable(run_dir: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint of ``run_dir`` that :func:`usable` passes (None if none does),
    and each newer one passed over, with the reason."""
    skipped = []
    for path in reversed(list_checkpoints(run_dir)):
        reason = usable(path)
        if reason is None:
            return path, skipped
        skipped.append((path, reason))
    return None, skipped


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """DCP warns that it runs without a process group; for a single process that is the plan."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield
