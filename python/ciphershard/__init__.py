"""ciphershard: encrypted safetensors datasets streamed into training loops.

Decrypted batches arrive as :class:`Tensor` objects that export through DLPack, so
``torch.from_dlpack``, ``numpy.from_dlpack`` and ``jax.dlpack.from_dlpack`` view the loader's
buffer without copying it; the buffer returns to the loader's pool when the last view is freed.
"""

from __future__ import annotations

from ._ciphershard import Tensor, __version__
from ._errors import (
    BackendError,
    CiphershardError,
    DatasetIOError,
    FormatError,
    IntegrityError,
    InvalidArgumentError,
    KeySourceError,
    LoaderStoppedError,
    WrongKeyError,
)

__all__ = [
    "Tensor",
    "__version__",
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
