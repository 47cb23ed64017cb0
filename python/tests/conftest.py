"""Fixtures: small encrypted datasets made with ciphershard.convert in a temporary folder."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

import ciphershard

ROWS = 2000


def make_columns(rows: int = ROWS, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "features": rng.standard_normal((rows, 16)).astype(np.float32),
        "label": rng.integers(0, 10, rows).astype(np.int64),
        "row_id": np.arange(rows, dtype=np.int64),
        "pixels": rng.integers(0, 256, (rows, 3, 2)).astype(np.uint8),
        "half": rng.standard_normal((rows, 2)).astype(np.float16),
        "mask": rng.integers(0, 2, rows).astype(np.bool_),
    }


class DatasetFixture:
    def __init__(self, root: pathlib.Path, columns: dict[str, np.ndarray], name: str, **kw):
        self.key_file = root / f"{name}.key"
        self.key_id = ciphershard.generate_key(self.key_file)
        self.path = root / name
        self.columns = columns
        self.summary = ciphershard.convert(
            columns, out=self.path, key_file=self.key_file, **kw
        )

    def open(self, **kw) -> ciphershard.Dataset:
        kw.setdefault("backend", "cpu")
        return ciphershard.Dataset(self.path, key_file=self.key_file, **kw)


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> DatasetFixture:
    """2000 rows, six columns of different dtypes, 4 KiB chunks, several shards. Read-only."""
    root = tmp_path_factory.mktemp("cs")
    return DatasetFixture(
        root, make_columns(), "ds", chunk_size=4096, shard_size=64 << 10, plain=["row_id"]
    )


@pytest.fixture()
def fresh_data(tmp_path) -> DatasetFixture:
    """A private small dataset a test may damage."""
    return DatasetFixture(tmp_path, make_columns(300, seed=1), "ds", chunk_size=1024, shard_size=16 << 10)
