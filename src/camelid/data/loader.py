"""Fixed-length (input, target) batches over prepared token shards, for pre-training.

Each shard is cut into windows of ``seq_len + 1`` tokens starting every ``seq_len`` tokens
(the target of a window's last input is the next window's first token). An epoch visits every
window once, in an order drawn from ``(seed, epoch)``; rank ``r`` of ``W`` takes every W-th
window of that order, so ranks never share a window, and every rank gets the same number of
batches. The whole position is ``(epoch, batch)``, which is what :meth:`state_dict` saves: a
resumed loader yields exactly the batch the original would have yielded next.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from camelid.data.pipeline import FORMAT, MANIFEST, SPLITS
from camelid.errors import DataError


def read_manifest(data_dir: str | Path) -> dict[str, Any]:
    path = Path(data_dir) / MANIFEST
    if not Path(data_dir).is_dir():
        raise DataError(f"{data_dir}: no such dataset directory (run 'camelid prepare' first)")
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(
            f"{path}: not found — the dataset is unfinished or was never prepared"
        ) from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if manifest.get("format") != FORMAT:
        raise DataError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def check_resumable(
    state: dict[str, Any],
    mine: dict[str, Any],
    keys: tuple[str, ...],
    what: str = "the loader",
    unit: str = "sequences",
    names: dict[str, str] | None = None,
) -> None:
    """Refuse to resume a loader from ``state`` (its saved ``state_dict``) when one of ``keys``
    differs from ``mine`` (this loader's) or the global batch (batch_size x world_size) does:
    the same position would then name other data. The number of ranks may change. ``names``
    spells keys for the message; a ``*_digest`` value is shown by its first 12 characters."""
    names = names or {}
    for key in keys:
        if state.get(key) != mine[key]:
            was, now = state.get(key), mine[key]
            if key.endswith("_digest") and key != "recipe_digest":
                was, now = str(was)[:12], str(now)[:12]
            raise DataError(f"cannot resume {what}: {names.get(key, key)} was {was!r}, now {now!r}")
    before = state.get("batch_size", 0) * state.get("world_size", 0)
    now = mine["batch_size"] * mine["world_size"]
    if before != now:
        raise DataError(
            f"cannot resume {what}: the global batch was {before} {unit} "
            f"(batch_size x world_size), now {now}"
        )


class TokenLoader:
    """Iterate ``(inputs, targets)`` int64 tensors of shape ``(batch_size, seq_len)``."""

    def __init__(
        self,
        data_dir: str | Path,
        split: str = "train",
        batch_size: int = 8,
        seq_len: int = 256,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ) -> None:
        if split not in SPLITS:
            raise DataError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        if batch_size <= 0 or seq_len <= 0:
            raise DataError(f"batch_size and seq_len must be positive, got {batch_size}, {seq_len}")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world_size {world_size}")
        self.data_dir, self.split = Path(data_dir), split
        self.manifest = read_manifest(data_dir)
        if self.manifest.get("kind", "pretrain") != "pretrain":
            raise DataError(
                f"{data_dir}: an {self.manifest['kind']} dataset (conversations with a loss "
                "mask); it is read by camelid.data.SFTLoader, not as a pre-training stream"
            )
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        dtype = np.dtype(self.manifest["dtype"])
        self._shards = []
        for shard in self.manifest["splits"][split]["shards"]:
            path = self.data_dir / shard["file"]
            expected = shard["tokens"] * dtype.itemsize
            if not path.exists() or path.stat().st_size != expected:
                found = path.stat().st_size if path.exists() else "no file"
                raise DataError(f"{path}: expected {expected} bytes, found {found}")
            self._shards.append(np.memmap(path, dtype=dtype, mode="r"))
        windows = [max((len(s) - 1) // seq_len, 0) for s in self._shards]
        self._starts = np.cumsum([0, *windows])  # first global window index of each shard
        self.num_windows = int(self._starts[-1])
        self.batches_per_epoch = self.num_windows // world_size // batch_size
        if self.batches_per_epoch == 0:
            raise DataError(
                f"{data_dir}: the {split} split has {self.num_windows} windows of {seq_len + 1} "
                f"tokens, fewer than one batch of {batch_size} per rank for {world_size} rank(s)"
            )
        self.epoch, self.batch = 0, 0
        self._order: np.ndarray | None = None

    # -------------------------------------------------------------------------- iteration
    def __iter__(self) -> TokenLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.batch >= self.batches_per_epoch:
            self.epoch, self.batch, self._order = self.epoch + 1, 0, None
        order = self._epoch_order()
        first = self.batch * self.batch_size
        ids = order[first : first + self.batch_size]
        self.batch += 1
        rows = np.stack([self._window(int(g)) for g in ids]).astype(np.int64)
        data = torch.from_numpy(rows)
        return data[:, :-1], data[:, 1:]

    def __len__(self) -> int:
        return self.batches_per_epoch

    def _epoch_order(self) -> np.ndarray:
        """This rank's windows for the current epoch, in visiting order."""
        if self._order is None:
            if self.shuffle:
                order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_windows)
            else:
                order = np.arange(self.num_windows)
            usable = self.batches_per_epoch * self.batch_size * self.world_size
            self._order = order[:usable][self.rank :: self.world_size]
        return self._order

    def _window(self, g: int) -> np.ndarray:
        s = int(np.searchsorted(self._starts, g, side="right")) - 1
        start = (g - int(self._starts[s])) * self.seq_len
        return self._shards[s][start : start + self.seq_len + 1]

    # ------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "batch": self.batch,
            "seed": self.seed,
            "split": self.split,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "world_size": self.world_size,
            "rank": self.rank,
            "recipe_digest": self.manifest["recipe_digest"],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``: the same data, window length and global batch.

        The number of ranks may change as long as the global batch (batch_size × world_size)
        does not: the global position ``(epoch, batch)`` then names the same windows.
        """
        check_resumable(state, self.state_dict(), ("seed", "split", "seq_len", "recipe_digest"))
        self.epoch, self.batch, self._order = int(state["epoch"]), int(state["batch"]), None
