"""The exception hierarchy of ciphershard.

Every error raised by the native module is a :class:`CiphershardError`. The message is the
same text the ``ciphershard`` command line prints (it names the file and the cause); no key
material ever appears in it. Extra attributes carry the structured parts (``path``,
``tensor``, ``chunk``, ``key_id``...).
"""

from __future__ import annotations


class CiphershardError(Exception):
    """Base class of every ciphershard error."""

    def __str__(self) -> str:  # KeyError would repr() the message; keep it readable.
        return str(self.args[0]) if self.args else ""


class IntegrityError(CiphershardError):
    """An authentication tag did not verify: the data was modified, truncated or moved.

    No byte of the affected chunk was released. ``path``, ``tensor`` and ``chunk`` locate it
    (``tensor``/``chunk`` are None when a shard header or the manifest failed instead).
    """

    path: str | None = None
    tensor: str | None = None
    chunk: int | None = None


class WrongKeyError(CiphershardError, KeyError):
    """The master key cannot open this dataset (no keyring entry matches it).

    ``key_id`` is the id of the key that was tried, ``available`` the ids that can open it.
    Also a :class:`KeyError`, so ``except KeyError`` catches it.
    """

    path: str | None = None
    key_id: str | None = None
    available: str | None = None


class KeySourceError(CiphershardError, ValueError):
    """A key file or key source is unusable (missing, unreadable, not 32 bytes or 64 hex)."""


class FormatError(CiphershardError, ValueError):
    """A file is not a well-formed ciphershard shard, manifest or keyring, or uses a format
    version or cipher this build does not support. ``path`` names it."""

    path: str | None = None


class DatasetIOError(CiphershardError, OSError):
    """An operating-system I/O error on a named file (``path``)."""

    path: str | None = None


class BackendError(CiphershardError, RuntimeError):
    """A decryption backend is unavailable here or failed at run time."""

    backend: str | None = None


class InvalidArgumentError(CiphershardError, ValueError):
    """An argument or configuration value is invalid."""


class LoaderStoppedError(CiphershardError, RuntimeError):
    """The loader was closed or its pipeline shut down."""


__all__ = [
    "CiphershardError",
    "IntegrityError",
    "WrongKeyError",
    "KeySourceError",
    "FormatError",
    "DatasetIOError",
    "BackendError",
    "InvalidArgumentError",
    "LoaderStoppedError",
]
