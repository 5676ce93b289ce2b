"""Packed SFT batches: several whole conversations per training row, with their loss mask.

A conversation of n tokens gives n - 1 (input, target) pairs, shifted *within* the
conversation, so no target ever crosses into the next one; its target is learned where the
mask (see :mod:`camelid.data.sft`) marks the target token, else ``IGNORE_INDEX``. Rows are
packed once, by next-fit over the conversations in an order drawn from ``seed``: a
conversation goes into the current row if it fits, else it starts a new one, and the rest of a
row is padding (input ``pad_id``, target ignored, its own document id). ``padding_share`` says
how much of the rows that is. Each row comes with ``positions`` (0, 1, ... restarting at each
conversation) and ``doc_ids`` (0, 1, ... per conversation, -1 for padding): passed to
``Transformer.forward(..., input_pos=positions, doc_ids=doc_ids)`` no token attends across a
conversation, and the packed loss equals the unpacked one.

An epoch visits every row once, in an order drawn from ``(seed, epoch)``; rank r of W takes
every W-th row, as :class:`camelid.data.TokenLoader` does with windows, and the whole position
is ``(epoch, batch)``: a resumed loader yields exactly the batch the original would have.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from camelid.data.loader import check_resumable, read_manifest
from camelid.data.pipeline import SPLITS
from camelid.data.sft import KIND
from camelid.errors import DataError
from camelid.loss import IGNORE_INDEX


class SFTData:
    """The conversations of one split of an SFT dataset: ``example(i)`` is (ids, mask)."""

    def __init__(self, data_dir: str | Path, split: str = "train") -> None:
        if split not in SPLITS:
            raise DataError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        self.data_dir, self.split = Path(data_dir), split
        self.manifest = read_manifest(data_dir)
        if self.manifest.get("kind") != KIND:
            raise DataError(
                f"{data_dir}: a pre-training dataset (no loss mask); prepare SFT data with "
                "'camelid prepare --format chat'"
            )
        dtype = np.dtype(self.manifest["dtype"])
        bos = self.manifest["tokenizer"]["bos_id"]
        self._tokens, self._masks = [], []
        shard_of, starts, lengths = [], [], []
        for s, shard in enumerate(self.manifest["splits"][split]["shards"]):
            tokens = self._open(shard["file"], shard["tokens"], dtype)
            mask = self._open(shard["mask"], shard["tokens"], np.dtype(np.uint8))
            begin = np.flatnonzero(tokens == bos)  # one BOS per conversation, at its start
            if len(begin) != shard["documents"] or (len(tokens) and begin[0] != 0):
                raise DataError(
                    f"{self.data_dir / shard['file']}: {len(begin)} conversation starts (BOS), "
                    f"the manifest says {shard['documents']}: the shard is corrupt"
                )
            self._tokens.append(tokens)
            self._masks.append(mask)
            shard_of.append(np.full(len(begin), s))
            starts.append(begin)
            lengths.append(np.diff(np.append(begin, len(tokens))))
        self.shard_of = np.concatenate(shard_of or [np.zeros(0, np.int64)]).astype(np.int64)
        self.starts = np.concatenate(starts or [np.zeros(0, np.int64)]).astype(np.int64)
        self.lengths = np.concatenate(lengths or [np.zeros(0, np.int64)]).astype(np.int64)

    def _open(self, name: str, count: int, dtype: np.dtype) -> np.ndarray:
        path = self.data_dir / name
        expected = count * dtype.itemsize
        if not path.exists() or path.stat().st_size != expected:
            found = path.stat().st_size if path.exists() else "no file"
            raise DataError(f"{path}: expected {expected} bytes, found {found}")
        if count == 0:
            return np.zeros(0, dtype)
        return np.memmap(path, dtype=dtype, mode="r")

    def __len__(self) -> int:
        return len(self.starts)

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Conversation ``i``'s token ids and 0/1 mask (1 = learned)."""
        s, a = int(self.shard_of[i]), int(self.starts[i])
        b = a + int(self.lengths[i])
        # int64: a uint16 shard would turn IGNORE_INDEX into 65436 in np.where below.
        return self._tokens[s][a:b].astype(np.int64), np.asarray(self._masks[s][a:b])


def next_fit(pairs: np.ndarray, order: np.ndarray, seq_len: int) -> np.ndarray:
    """Row boundaries of next-fit packing: conversation ``order[i]`` (of ``pairs`` input/target
    pairs) goes into the current row while it fits in ``seq_len``, else opens the next one.
    Row r holds ``order[ptr[r]:ptr[r + 1]]``."""
    row_ptr, fill = [0], 0
    for i, c in enumerate(order):
        if fill + pairs[c] > seq_len:
            row_ptr.append(i)
            fill = 0
        fill += int(pairs[c])
    if len(order):
        row_ptr.append(len(order))
    return np.asarray(row_ptr, dtype=np.int64)


def packed_rows(data_dir: str | Path, split: str, seq_len: int) -> int:
    """How many rows of ``seq_len`` a split of an SFT dataset packs into in file order (as the
    validation loader reads it); 0 for an empty split."""
    data = SFTData(data_dir, split)
    pairs = data.lengths - 1
    return len(next_fit(pairs, np.arange(len(pairs)), seq_len)) - 1 if len(pairs) else 0


def epoch_order(
    n: int, seed: int, epoch: int, shuffle: bool, per_rank: int, rank: int, world_size: int
) -> np.ndarray:
    """Rank ``rank``'s items of an epoch, in visiting order: all ``n`` in an order drawn from
    ``(seed, epoch)`` (or as they are), cut to ``per_rank`` x ``world_size`` and dealt out
    round-robin, so one optimizer step's items are the same for any number of ranks of the
    same global batch. The SFT row loader and DPO's pair loader share it."""
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    return order[: per_rank * world_size][rank::world_size]


class SFTLoader:
    """Iterate ``(inputs, targets, positions, doc_ids)``, int64 tensors (batch_size, seq_len)."""

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
        pad_id: int | None = None,
    ) -> None:
        if batch_size <= 0 or seq_len <= 0:
            raise DataError(f"batch_size and seq_len must be positive, got {batch_size}, {seq_len}")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world_size {world_size}")
        self.data = SFTData(data_dir, split)
        self.manifest = self.data.manifest
        self.split, self.batch_size, self.seq_len, self.seed = split, batch_size, seq_len, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        # Padding is told by position, never by id: any pad id (the end-of-turn one too) is safe.
        self.pad_id = self.manifest["tokenizer"]["eos_id"] if pad_id is None else int(pad_id)
        pairs = self.data.lengths - 1  # (input, target) pairs of each conversation
        if len(pairs) and pairs.max() > seq_len:
            raise DataError(
                f"{data_dir}: a conversation of {int(pairs.max()) + 1} tokens does not fit "
                f"seq_len {seq_len} (at most seq_len + 1 tokens); prepare it with "
                f"--max-len {seq_len + 1} or train with a longer seq_len"
            )
        self._pack(pairs)
        self.batches_per_epoch = self.num_rows // world_size // batch_size
        if self.batches_per_epoch == 0:
            raise DataError(
                f"{data_dir}: the {split} split packs into {self.num_rows} rows of {seq_len} "
                f"tokens, fewer than one batch of {batch_size} per rank for {world_size} rank(s)"
            )
        self.epoch, self.batch = 0, 0
        self._order: np.ndarray | None = None

    def _pack(self, pairs: np.ndarray) -> None:
        """Next-fit packing of the conversations, in an order fixed by the seed alone (so the
        rows are the same for any number of ranks and any epoch)."""
        n = len(pairs)
        order = np.random.default_rng(self.seed).permutation(n) if self.shuffle else np.arange(n)
        self._row_convs = order
        self._row_ptr = next_fit(pairs, order, self.seq_len)
        self.num_rows = len(self._row_ptr) - 1
        used = int(pairs.sum())
        self.padding_share = 1 - used / (self.num_rows * self.seq_len) if self.num_rows else 0.0

    # -------------------------------------------------------------------------- iteration
    def __iter__(self) -> SFTLoader:
        return self

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.batch >= self.batches_per_epoch:
            self.epoch, self.batch, self._order = self.epoch + 1, 0, None
        order = self._epoch_order()
        first = self.batch * self.batch_size
        rows = order[first : first + self.batch_size]
        self.batch += 1
        shape = (len(rows), self.seq_len)
        inputs = np.full(shape, self.pad_id, dtype=np.int64)
        targets = np.full(shape, IGNORE_INDEX, dtype=np.int64)
        positions = np.zeros(shape, dtype=np.int64)
        doc_ids = np.full(shape, -1, dtype=np.int64)
        for b, r in enumerate(rows):
            at = 0
            for d, c in enumerate(self._row_convs[self._row_ptr[r] : self._row_ptr[r + 1]]):
                ids, mask = self.data.example(int(c))
                n = len(ids) - 1
                inputs[b, at : at + n] = ids[:-1]
                targets[b, at : at + n] = np.where(mask[1:] == 1, ids[1:], IGNORE_INDEX)
                positions[b, at : at + n] = np.arange(n)
                doc_ids[b, at : at + n] = d
                at += n
        return tuple(torch.from_numpy(a) for a in (inputs, targets, positions, doc_ids))

    def _epoch_order(self) -> np.ndarray:
        """This rank's rows for the current epoch, in visiting order."""
        if self._order is None:
            self._order = epoch_order(self.num_rows, self.seed, self.epoch, self.shuffle,
                                      self.batches_per_epoch * self.batch_size, self.rank,
                                      self.world_size)  # fmt: skip
        return self._order

    # ------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "batch": self.batch,
            "seed": self.seed,
            "split": self.split,
            "shuffle": self.shuffle,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "world_size": self.world_size,
            "rank": self.rank,
            "recipe_digest": self.manifest["recipe_digest"],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``: the same data, packing and global batch (the number of
        ranks may change while batch_size x world_size stays)."""
        keys = ("seed", "split", "shuffle", "seq_len", "recipe_digest")
        check_resumable(state, self.state_dict(), keys)
        self.epoch, self.batch, self._order = int(state["epoch"]), int(state["batch"]), None
