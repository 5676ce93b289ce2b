"""Text out of a growing list of token ids: streamed pieces that never split a character, and
stop strings cut exactly.

A byte-level BPE token can hold part of a UTF-8 character (an emoji or a CJK character often
spans two or three tokens), so decoding one token at a time would print replacement characters.
:class:`TextStream` decodes a short window of recent tokens and only releases text once it no
longer ends in an incomplete character; decoding from the same window start twice and taking
the difference also keeps decoders that drop a leading space (SentencePiece) consistent.
A UTF-8 character has at most four bytes, so a tail still incomplete after four tokens never
completes (invalid bytes, as a poorly trained model emits): it is released as the decoder
shows it rather than held, perhaps to the end of the stream.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

_INCOMPLETE = "\ufffd"  # what a decoder shows for bytes that do not yet form a character
_CHAR_TOKENS = 4  # the most tokens one character can span (each token has at least one byte)


class TextStream:
    """Incremental detokenizer with stop strings.

    ``push(token)`` returns the text that is now safe to show; ``finish()`` returns what is
    left. ``text`` is everything released plus anything held back, with any stop string (and
    what follows it) cut off once ``stopped`` is true. The concatenation of every piece
    returned equals ``text`` when the stream is done.
    """

    def __init__(self, decode: Callable[[Sequence[int]], str], stop: Sequence[str] = ()) -> None:
        self._decode = decode
        self._ids: list[int] = []
        self._prefix = 0  # window start: decoded text before it is settled
        self._read = 0  # ids up to here have been turned into text
        self._text = ""  # all decoded text so far
        self._emitted = 0  # characters of _text already returned
        self._stop = tuple(stop)
        self._longest_stop = max((len(s) for s in self._stop), default=0)
        self._searched = 0  # stop strings cannot start before this index of _text
        self.stopped = False

    @property
    def text(self) -> str:
        return self._text

    def push(self, token: int) -> str:
        """Add one token; return the newly releasable text ('' while a character is partial
        or while the end of the text could still become a stop string)."""
        if self.stopped:
            return ""
        self._ids.append(token)
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        new_text = self._decode(self._ids[self._prefix :])
        partial = new_text.endswith(_INCOMPLETE) and len(self._ids) - self._read < _CHAR_TOKENS
        if len(new_text) <= len(prefix_text) or partial:
            return ""  # an incomplete character: wait for the next token
        self._text += new_text[len(prefix_text) :]
        self._prefix, self._read = self._read, len(self._ids)
        return self._release(final=False)

    def finish(self) -> str:
        """Release everything still held (an incomplete tail is decoded as is)."""
        if not self.stopped and self._read < len(self._ids):
            prefix_text = self._decode(self._ids[self._prefix : self._read])
            self._text += self._decode(self._ids[self._prefix :])[len(prefix_text) :]
            self._read = len(self._ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self._stop and not self.stopped:
            cut = self._find_stop()
            if cut is not None:
                self._text = self._text[:cut]
                self.stopped = True
                final = True
        end = len(self._text) if final else self._safe_end()
        piece = self._text[self._emitted : end]
        self._emitted = max(self._emitted, end)
        return piece

    def _find_stop(self) -> int | None:
        start = max(0, self._searched - self._longest_stop + 1)
        hits = [i for i in (self._text.find(s, start) for s in self._stop) if i >= 0]
        self._searched = len(self._text)
        return min(hits) if hits else None

    def _safe_end(self) -> int:
        """Hold back the longest tail of the text that is a proper prefix of a stop string."""
        text = self._text
        for n in range(min(self._longest_stop - 1, len(text) - self._emitted), 0, -1):
            tail = text[len(text) - n :]
            if any(s.startswith(tail) for s in self._stop):
                return len(text) - n
        return len(text)
