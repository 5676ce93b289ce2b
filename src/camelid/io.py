"""Small file helpers shared by every stage: atomic writes, human-readable sizes and counts."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from camelid.errors import CamelidError


@contextlib.contextmanager
def atomic_path(dst: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``dst``; on success it is synced and renamed over ``dst``.

    A job killed mid-write leaves at most a ``.tmp`` file behind, never a half-written file under
    the final name. The file gets the mode a plain ``open()`` gives (0644 under umask 022),
    whatever wrote it: some writers (safetensors' ``save_file``) create theirs 0600.
    """
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
            os.fchmod(f.fileno(), 0o666 & ~_umask())
        os.replace(tmp, dst)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_text_atomic(dst: str | Path, text: str) -> None:
    with atomic_path(dst) as tmp:
        tmp.write_text(text)


def copy_file_atomic(src: str | Path, dst: str | Path) -> None:
    """Copy the bytes of ``src`` to ``dst`` atomically (the mode as :func:`atomic_path` sets)."""
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def _umask() -> int:
    """The process's umask: read from /proc where it can be, since setting it to read it back
    briefly changes it for every thread."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})


def parse_size(text: str | int) -> int:
    """Parse a byte count such as ``5GB``, ``500MiB`` or ``1048576``."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise CamelidError(f"cannot read {text!r} as a size (examples: 5GB, 500MiB, 1048576)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def format_count(n: float) -> str:
    """Counts such as parameters, to three significant figures: 266K, 8.03B."""
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(int(n))


def format_bytes(n: float) -> str:
    """Binary units (GiB), as memory is sized."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
