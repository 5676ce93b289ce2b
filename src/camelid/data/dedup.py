"""Deduplication: exact (content hash) and near-duplicate (MinHash + LSH over token n-grams).

MinHash signatures are computed from the document's token ids, which the pipeline has anyway,
with vectorised numpy: each n-gram of ids is hashed to 64 bits, and each of ``num_perm`` hash
functions ``(a·h + b) mod 2^64 >> 32`` keeps its minimum. Documents whose signatures agree on
all rows of any LSH band are candidates; a candidate is a duplicate when the share of equal
signature rows (an estimate of the Jaccard similarity of the n-gram sets) reaches the threshold.
"""

from __future__ import annotations

import hashlib

import numpy as np

from camelid.errors import DataError

_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


def exact_key(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


class MinHasher:
    """Signatures of token-id n-gram sets; same parameters, same signatures, in every process."""

    def __init__(self, num_perm: int = 128, ngram: int = 5, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.num_perm, self.ngram = num_perm, ngram
        self._mult = rng.integers(1, 2**63, size=num_perm, dtype=np.uint64) * 2 + 1  # odd
        self._add = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)
        self._gram = rng.integers(1, 2**63, size=ngram, dtype=np.uint64) * 2 + 1

    def shingles(self, ids: np.ndarray) -> np.ndarray:
        """64-bit hashes of the n-grams of ``ids`` (the whole sequence if shorter).

        Repeats are left in: they cannot change a minimum, and removing them costs more.
        """
        ids = np.asarray(ids, dtype=np.uint64)
        n = max(len(ids) - self.ngram + 1, 1)
        h = np.zeros(n, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for j in range(min(self.ngram, len(ids))):
                h += ids[j : j + n] * self._gram[j]
            h ^= h >> np.uint64(31)  # mix so that low bits depend on every id
            h *= np.uint64(0x9E3779B97F4A7C15)
            h ^= h >> np.uint64(29)
        return h

    def signature(self, ids: np.ndarray, chunk: int = 512) -> np.ndarray:
        """The signature; blocks of ``chunk`` n-grams keep the (chunk, num_perm) work in cache."""
        h = self.shingles(ids)
        low = np.full(self.num_perm, np.iinfo(np.uint64).max, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for start in range(0, len(h), chunk):
                block = h[start : start + chunk, None] * self._mult
                block += self._add
                np.minimum(low, block.min(axis=0), out=low)
        # The top 32 bits of each minimum: x >> 32 is monotonic, so min and shift commute.
        return (low >> np.uint64(32)).astype(np.uint32)


class LSHIndex:
    """Finds, for each new signature, whether a kept document is a near duplicate of it."""

    def __init__(self, num_perm: int = 128, bands: int = 16, threshold: float = 0.8) -> None:
        if num_perm % bands:
            raise DataError(f"num_perm ({num_perm}) must be a multiple of bands ({bands})")
        if not 0 < threshold <= 1:
            raise DataError(f"near-duplicate threshold must be in (0, 1], got {threshold}")
        self.bands, self.rows, self.threshold = bands, num_perm // bands, threshold
        self._tables: list[dict[bytes, list[int]]] = [{} for _ in range(bands)]
        self._sigs: list[np.ndarray] = []

    def __len__(self) -> int:
        return len(self._sigs)

    def add_if_new(self, sig: np.ndarray) -> bool:
        """Insert ``sig`` unless a near duplicate is already indexed; return whether it was new."""
        keys = [sig[b * self.rows : (b + 1) * self.rows].tobytes() for b in range(self.bands)]
        seen: set[int] = set()
        for table, key in zip(self._tables, keys, strict=True):
            for idx in table.get(key, ()):
                if idx not in seen:
                    seen.add(idx)
                    if np.mean(self._sigs[idx] == sig) >= self.threshold:
                        return False
        idx = len(self._sigs)
        self._sigs.append(sig)
        for table, key in zip(self._tables, keys, strict=True):
            table.setdefault(key, []).append(idx)
        return True
