"""Errors a user can cause.

Anything raised as a :class:`CamelidError` is shown by the CLI as one clear line and a non-zero
exit, never as a traceback: the message must name the file, key or field at fault.
"""

from __future__ import annotations


class CamelidError(Exception):
    """A problem with the user's input (path, config, checkpoint, request), not a bug."""


class ConfigError(CamelidError, ValueError):
    """An invalid or unsupported model configuration."""


class CheckpointError(CamelidError):
    """A checkpoint that is missing, incomplete, corrupt or does not fit the model."""


class TokenizerError(CamelidError):
    """A tokenizer file that cannot be loaded, or a tokenizer request that cannot be met."""


class DataError(CamelidError):
    """A corpus, dataset directory or shard that cannot be used as asked."""


class RequestError(CamelidError, ValueError):
    """An invalid generation or scoring request: a sampling value out of range, a prompt that
    does not fit the context."""
