"""PyTorch adapter: a ciphershard dataset as a ``torch.utils.data.IterableDataset``.

Use it with ``DataLoader(ds, batch_size=None)``: ciphershard already batches, shuffles and
prefetches on its own threads, so the DataLoader only passes batches through. Keep
``num_workers=0`` (the default): extra worker processes would only duplicate the pipeline
(with ``num_workers=N`` each worker reads a disjoint 1/N of this rank's share, and
``state_dict`` is then per worker and not supported).

The adapter implements ``state_dict()`` / ``load_state_dict()``, so torchdata's
``StatefulDataLoader`` checkpoints it, and each ``iter()`` runs the next epoch.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Iterator, Optional

import torch
import torch.utils.data

from ._ciphershard import Dataset, Loader

# Loaders inherited through fork(): their threads do not exist in the child, so they are never
# used there, and never dropped either (dropping would join threads that are not there).
_FORKED_LOADERS: list = []


class TorchIterableDataset(torch.utils.data.IterableDataset):
    """Yields ``dict[str, torch.Tensor]`` batches decrypted by a :class:`ciphershard.Loader`.

    Only paths and options are stored (it pickles without any key material); the dataset is
    opened lazily in the process that iterates. Arguments after ``batch_size`` are those of
    :class:`ciphershard.Loader` (``shuffle``, ``seed``, ``prefetch``, ``threads``, ``backend``,
    ``rank``, ``world_size``, ``drop_last``, ...).
    """

    def __init__(
        self,
        path: "str | os.PathLike[str]",
        batch_size: int,
        *,
        key_file: "Optional[str | os.PathLike[str]]" = None,
        key_env: Optional[str] = None,
        backend: str = "auto",
        **loader_kwargs: Any,
    ) -> None:
        super().__init__()
        if "epochs" in loader_kwargs or "as_torch" in loader_kwargs:
            raise TypeError("TorchIterableDataset runs one epoch per iter(); do not pass epochs/as_torch")
        self.path = os.fspath(path)
        self.key_file = os.fspath(key_file) if key_file is not None else None
        self.key_env = key_env
        self.backend = backend
        self.batch_size = batch_size
        self.loader_kwargs = loader_kwargs
        self._loader: Optional[Loader] = None
        self._loader_pid: Optional[int] = None
        self._pending_state: Optional[Dict[str, Any]] = None

    def _get_loader(self) -> Loader:
        if self._loader is not None and self._loader_pid != os.getpid():
            # A DataLoader worker forked from a process that had already iterated.
            _FORKED_LOADERS.append(self._loader)
            self._loader = None
        if self._loader is None:
            kwargs = dict(self.loader_kwargs)
            info = torch.utils.data.get_worker_info()
            if info is not None and info.num_workers > 1:
                rank = kwargs.pop("rank", None)
                world = kwargs.pop("world_size", None)
                rank = int(os.environ.get("RANK", 0)) if rank is None else rank
                world = int(os.environ.get("WORLD_SIZE", 1)) if world is None else world
                kwargs["rank"] = rank * info.num_workers + info.id
                kwargs["world_size"] = world * info.num_workers
            ds = Dataset(self.path, key_file=self.key_file, key_env=self.key_env, backend=self.backend)
            self._loader = Loader(ds, self.batch_size, as_torch=True, **kwargs)
            self._loader_pid = os.getpid()
            if self._pending_state is not None:
                self._loader.load_state_dict(self._pending_state)
                self._pending_state = None
        return self._loader

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        return iter(self._get_loader())

    def __len__(self) -> int:
        return len(self._get_loader())

    def state_dict(self) -> Dict[str, Any]:
        return self._get_loader().state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if self._loader is None:
            self._pending_state = state
        else:
            self._loader.load_state_dict(state)

    def stats(self) -> Dict[str, Any]:
        return self._get_loader().stats()

    def __getstate__(self) -> Dict[str, Any]:
        d = self.__dict__.copy()
        d["_loader"] = None  # a running pipeline does not cross processes
        return d
