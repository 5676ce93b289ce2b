"""Cleaning: Unicode normalisation and cheap, configurable quality filters.

Each filter has a name; a rejected document is counted under the first filter it fails, so the
report can say how much each one removed.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import asdict, dataclass

from camelid.errors import DataError

_NOT_ALNUM = re.compile(r"[\W_]+")
_ASCII_NOT_ALNUM = bytes(b for b in range(128) if not chr(b).isalnum())
NORMALIZATIONS = ("NFC", "NFKC", "none")


@dataclass(frozen=True)
class CleanConfig:
    """Defaults suit code and prose alike; every bound can be changed or disabled (0 / 1.0)."""

    normalize: str = "NFC"
    min_chars: int = 32  # too short to teach anything
    max_chars: int = 2_000_000  # generated blobs, dumps
    min_alnum_fraction: float = 0.25  # tables of symbols, base64-ish noise
    max_repeated_line_fraction: float = 0.5  # share of non-blank lines repeating an earlier one
    max_line_chars: int = 5_000  # minified or data-embedded files

    def __post_init__(self) -> None:
        if self.normalize not in NORMALIZATIONS:
            raise DataError(
                f"normalize must be one of {', '.join(NORMALIZATIONS)}, got {self.normalize!r}"
            )
        for name in ("min_alnum_fraction", "max_repeated_line_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise DataError(f"{name} must be within [0, 1], got {getattr(self, name)}")
        if self.min_chars < 0 or self.max_chars < self.min_chars:
            raise DataError(
                f"need 0 <= min_chars <= max_chars, got {self.min_chars}, {self.max_chars}"
            )

    def to_dict(self) -> dict:
        return asdict(self)


FILTERS = ("too_short", "too_long", "low_alnum", "repeated_lines", "long_line")


def clean(text: str, config: CleanConfig) -> tuple[str, str | None]:
    """Normalise ``text``; return it with the name of the first filter it fails (or None)."""
    if config.normalize != "none":
        text = unicodedata.normalize(config.normalize, text)
    n = len(text)
    if n < config.min_chars:
        return text, "too_short"
    if n > config.max_chars:
        return text, "too_long"
    if config.min_alnum_fraction > 0 and _alnum_count(text) < config.min_alnum_fraction * n:
        return text, "low_alnum"
    lines = text.splitlines()
    if config.max_line_chars and max(map(len, lines), default=0) > config.max_line_chars:
        return text, "long_line"
    if config.max_repeated_line_fraction < 1.0:
        stripped = [s for s in (line.strip() for line in lines) if s]
        if stripped:
            repeated = 1 - len(set(stripped)) / len(stripped)
            if repeated > config.max_repeated_line_fraction:
                return text, "repeated_lines"
    return text, None


def _alnum_count(text: str) -> int:
    """Letters and digits in ``text``; a byte-level fast path for ASCII text (most code)."""
    if text.isascii():
        return len(text.encode("ascii").translate(None, _ASCII_NOT_ALNUM))
    return len(_NOT_ALNUM.sub("", text))
