"""Type stubs of the native module ``ciphershard._ciphershard`` (re-exported by ``ciphershard``)."""

from __future__ import annotations

import os
import pathlib
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union, final

import numpy as np

_Path = Union[str, os.PathLike[str]]
# Arrow data: a pyarrow Table, RecordBatch or RecordBatchReader, a datasets.Dataset, or any
# object with __arrow_c_stream__ (typed loosely: pyarrow and datasets are optional).
_ArrowData = Any

__version__: str
__all__ = [
    "__version__",
    "Tensor",
    "Dataset",
    "Loader",
    "convert",
    "inspect",
    "generate_key",
    "backends",
    "_bench_native",
    "_live_dlpack_exports",
    "_wait_like_next",
]

@final
class Tensor:
    """One decrypted column of a batch, shape ``[B, ...]``, viewing the loader's buffer.

    Exports through DLPack without a copy (``torch.from_dlpack``, ``numpy.from_dlpack``,
    ``jax.dlpack.from_dlpack``). The buffer returns to the loader's pool when this object and
    every array made from it are freed.
    """

    @staticmethod
    def from_bytes(data: bytes, dtype: str, shape: Sequence[int]) -> Tensor:
        """A tensor over a private copy of ``data`` (for tests and hand-made inputs)."""
    @property
    def shape(self) -> Tuple[int, ...]: ...
    @property
    def dtype(self) -> str:
        """``float32``, ``bfloat16``, ``float8_e4m3fn``, ``bool``, ..."""
    @property
    def ndim(self) -> int: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def device(self) -> str:
        """``cpu`` or ``cuda:N``."""
    def data_ptr(self) -> int:
        """Address of the first element: the loader's (page-aligned) pool buffer."""
    def __len__(self) -> int: ...
    def __dlpack__(
        self,
        *,
        stream: Optional[int] = None,
        max_version: Optional[Tuple[int, int]] = None,
        dl_device: Optional[Tuple[int, int]] = None,
        copy: Optional[bool] = None,
    ) -> Any:
        """A DLPack capsule (versioned when ``max_version >= (1, 0)``)."""
    def __dlpack_device__(self) -> Tuple[int, int]: ...
    def numpy(self) -> np.ndarray:
        """``numpy.from_dlpack(self)``: a view, no copy."""
    def torch(self) -> Any:
        """``torch.from_dlpack(self)``: a view, no copy."""
    def __array__(self, dtype: Any = None, copy: Optional[bool] = None) -> np.ndarray: ...

@final
class Dataset:
    """An encrypted dataset opened with a master key (``key_file=`` or ``key_env=``).

    Opening authenticates every shard header and unwraps the data keys: a wrong key raises
    :class:`WrongKeyError` here. ``backend``: ``auto``, ``cpu``, ``cuda`` or ``wgpu``.

    ``path`` may be an object-store URL (``s3://bucket/prefix/``, ``gs://``, ``az://``,
    ``https://``; docs/STORAGE.md): give it as ``str`` (``pathlib`` folds ``//``). Credentials
    come from the store's environment variables, or ``storage_options`` (the ``object_store``
    crate's keys, e.g. ``{"aws_endpoint": ..., "aws_access_key_id": ...}``) over them; option
    values are never printed. Options for a local path raise ``ValueError``.

    ``cache_dir`` keeps the shard bytes fetched from an object store (ciphertext only, never
    plaintext) in that folder for later epochs and runs, at most ``cache_size`` bytes (an
    ``int``, or text such as ``"20G"``; default ``$CIPHERSHARD_CACHE_SIZE``, else 10 GiB), least
    recently used evicted first; ``$CIPHERSHARD_CACHE_DIR`` is the default folder. Cached bytes
    are authenticated on every use like fetched ones. A cache for a local path raises
    ``ValueError``.
    """

    def __new__(
        cls,
        path: _Path,
        *,
        key_file: Optional[_Path] = None,
        key_env: Optional[str] = None,
        backend: str = "auto",
        storage_options: Optional[Dict[str, str]] = None,
        cache_dir: Optional[_Path] = None,
        cache_size: Optional[Union[int, str]] = None,
    ) -> Dataset: ...
    def cache_stats(self) -> Optional[Dict[str, int]]:
        """The ciphertext cache's counters since this dataset opened (``hits``, ``misses``,
        ``bytes_from_cache``, ``bytes_fetched``, ``evictions``, ``damaged``,
        ``write_failures``, ``bytes_on_disk``), or ``None`` without a cache."""
    @property
    def path(self) -> Union[pathlib.Path, str]:
        """The dataset's folder; its URL (``str``) for a dataset in an object store."""
    @property
    def rows(self) -> int: ...
    @property
    def num_shards(self) -> int: ...
    @property
    def column_names(self) -> List[str]: ...
    @property
    def columns_info(self) -> Dict[str, Dict[str, Any]]:
        """``{name: {"dtype": str, "shape": [per-row dims], "encrypted": bool}}``."""
    @property
    def key_id(self) -> str:
        """Id of the master key (safe to log)."""
    @property
    def backend(self) -> str: ...
    @property
    def backend_description(self) -> str: ...
    def verify(self) -> Dict[str, Any]:
        """Checks every chunk's tag; raises :class:`IntegrityError` at the first failure."""
    def __len__(self) -> int: ...

@final
class Loader:
    """Iterates decrypted batches as ``dict[str, Tensor]`` (``dict[str, torch.Tensor]`` with
    ``as_torch=True``).

    ``epochs=None``: each ``iter()`` runs the next epoch. ``epochs=N``: one iteration streams
    the remaining batches of epochs ``0..N``. ``rank``/``world_size`` default to the ``RANK`` /
    ``WORLD_SIZE`` environment variables. ``state=`` resumes from :meth:`state_dict` (the
    options must be those it was saved with; a differing one is refused, by name).
    ``device="cuda"`` (or ``"cuda:N"``) decrypts on the GPU into device memory and yields
    ``kDLCUDA`` tensors (DLPack stream protocol; ``backend`` must be None, "auto" or "cuda").

    A ragged column ``NAME`` comes as ``NAME`` (its rows' values concatenated) and
    ``NAME.offsets`` (``int64``, ``B + 1``), and with ``as_torch`` also as ``NAME.nested``, a
    jagged ``torch.nested`` tensor over the same memory. ``pack="input_ids", seq_len=L``
    packs that ragged column's rows into ``[batch_size, L]`` sequences: the batch holds
    ``input_ids``, ``position_ids`` (``int64``, ``[batch_size, L]``) and ``cu_seqlens``
    (``int32``, every sequence piece's boundaries in the flattened batch). ``pad="longest"``
    (or a width) adds ``NAME.padded`` (a dense ``[B, W, ...]`` copy, zeros after each row, rows
    longer than ``W`` cut) and ``NAME.mask`` (``bool``, ``[B, W]``) for each ragged column.
    ``budget="input_ids", max_tokens=N`` cuts batches by tokens instead: each takes the next
    rows while they hold at most ``N`` tokens of that column (and at most ``batch_size`` rows);
    ``len()`` is then the current epoch's count, which varies with each epoch's order, and is
    the same on every rank.

    Batches are writable: each owns its buffers, so a write changes that batch only. A loader
    inherited through ``fork()`` raises :class:`LoaderStoppedError` in the child.
    """

    def __new__(
        cls,
        dataset: Dataset,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        epochs: Optional[int] = None,
        prefetch: int = 4,
        threads: Optional[int] = None,
        backend: Optional[str] = None,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
        drop_last: bool = False,
        window_blocks: int = 8,
        block_rows: Optional[int] = None,
        state: Optional[Mapping[str, Any]] = None,
        as_torch: bool = False,
        device: Optional[str] = None,
        pack: Optional[str] = None,
        seq_len: Optional[int] = None,
        pad: Union[str, int, None] = None,
        budget: Optional[str] = None,
        max_tokens: Optional[int] = None,
    ) -> Loader: ...
    def __iter__(self) -> Loader: ...
    def __next__(self) -> Dict[str, Any]: ...
    def __len__(self) -> int:
        """Batches per epoch for this rank (with a token budget: in the current epoch)."""
    @property
    def epoch(self) -> int:
        """Epoch of the next batch."""
    def state_dict(self) -> Dict[str, Any]: ...
    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...
    def stats(self) -> Dict[str, Any]:
        """Telemetry: per-stage bytes/ns/gbps, consumer wait, read amplification, pool bytes."""
    def close(self) -> None:
        """Stops the pipeline and joins its threads; tensors handed out stay valid."""
    def __enter__(self) -> Loader: ...
    def __exit__(self, *args: Any) -> None: ...

def convert(
    data: Union[
        Mapping[str, Union[np.ndarray, _Path, Tuple[Any, Any], Any]],
        _Path,
        _ArrowData,
        Sequence[Union[_Path, _ArrowData]],
    ],
    /,
    *,
    out: _Path,
    key_file: Optional[_Path] = None,
    key_env: Optional[str] = None,
    columns: Sequence[str] = ...,  # JSONL inputs only: the keys to convert
    chunk_size: int = ...,  # 2 MiB
    shard_size: Optional[int] = None,  # 1 GiB; 64 MiB for Parquet, Arrow, JSONL, ragged columns
    plain: Sequence[str] = ...,  # no plain columns
    metadata: Mapping[str, str] = ...,  # none
) -> Dict[str, Any]:
    """Encrypts ``{name: array, .npy path or (values, offsets) of a ragged column}``, a file
    (``.parquet``, ``.arrow``, ``.jsonl`` with ``columns=``, ``.npy``, safetensors), Arrow data
    (a pyarrow ``Table``, ``RecordBatch`` or ``RecordBatchReader``, a ``datasets.Dataset``,
    anything with ``__arrow_c_stream__``; read in Rust, a stream entirely before converting),
    or a list of files and Arrow data, into a new dataset."""

def inspect(path: _Path) -> Dict[str, Any]:
    """Describes a dataset (manifest, columns, shards, key ids) without a key: the report
    ``ciphershard inspect --json`` prints, schema ``ciphershard.inspect/1`` (dtypes by their
    safetensors names, ``"F32"``; ``"dataset"`` is the directory)."""

def generate_key(path: _Path) -> str:
    """Writes a new random master key file (mode 0600, never overwrites); returns its id."""

def backends() -> List[Tuple[str, bool, str]]:
    """``[(name, available, description or reason), ...]`` for cuda, wgpu and cpu."""

def _live_dlpack_exports() -> int: ...
def _bench_native(
    dataset: Dataset,
    batch_size: int,
    *,
    epochs: int = 1,
    threads: int = 2,
    prefetch: int = 4,
    window_blocks: int = 8,
) -> Dict[str, Any]:
    """Runs the Rust bench (`ciphershard bench`'s library function) over ``dataset``."""

def _wait_like_next(seconds: float) -> None:
    """Sleeps the way ``Loader.__next__`` waits (GIL released, signals checked); for tests."""
