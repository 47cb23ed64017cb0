"""ciphershard: encrypted safetensors datasets streamed into training loops.

Decrypted batches arrive as :class:`Tensor` objects that export through DLPack, so
``torch.from_dlpack``, ``numpy.from_dlpack`` and ``jax.dlpack.from_dlpack`` view the loader's
buffer without copying it; the buffer returns to the loader's pool when the last view is freed.

    import ciphershard, torch
    ds = ciphershard.Dataset("data/", key_file="master.key")
    loader = ciphershard.Loader(ds, batch_size=256, shuffle=True, seed=0, as_torch=True)
    for batch in loader:                 # dict[str, torch.Tensor], no copy
        ...
    state = loader.state_dict()          # Loader(ds, 256, shuffle=True, seed=0, as_torch=True, state=state) resumes

Keys are given as files (``key_file=``) or as an environment variable naming a file
(``key_env=``), never as bytes, so they cannot leak into a ``repr`` or a traceback.
"""

from __future__ import annotations

from ._ciphershard import (
    Dataset,
    Loader,
    Tensor,
    __version__,
    backends,
    convert,
    generate_key,
    inspect,
)
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


def __getattr__(name: str):
    # The PyTorch adapter imports torch, so it is loaded only when asked for.
    if name == "TorchIterableDataset":
        from .torch import TorchIterableDataset

        return TorchIterableDataset
    raise AttributeError(f"module 'ciphershard' has no attribute {name!r}")


__all__ = [
    "Dataset",
    "Loader",
    "Tensor",
    "TorchIterableDataset",
    "__version__",
    "backends",
    "convert",
    "generate_key",
    "inspect",
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
