"""Datasets in a real S3-compatible server (s3s-fs, started here on 127.0.0.1 with an access key
and a secret, so requests are really signed): ``Dataset("s3://…")`` with credentials from the
environment or from ``storage_options`` yields the same batches as the local files; a wrong
secret is refused naming the URL, never printing the secret.

The server binary is ``$CIPHERSHARD_S3S_FS`` (scripts/test.sh installs it and sets it);
without it the tests fail saying how to install it, unless ``CIPHERSHARD_SKIP_S3=1``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time

import numpy as np
import pytest

import ciphershard

ACCESS = "ciphershard-py-test"
SECRET = "py-s3cr3t-never-printed"
BUCKET = "data"


def _server_binary() -> str | None:
    path = os.environ.get("CIPHERSHARD_S3S_FS")
    if path and os.path.isfile(path):
        return path
    return shutil.which("s3s-fs")


@pytest.fixture(scope="module")
def s3(tmp_path_factory, data):
    binary = _server_binary()
    if binary is None:
        if os.environ.get("CIPHERSHARD_SKIP_S3") == "1":
            pytest.skip("no s3s-fs server (CIPHERSHARD_SKIP_S3=1)")
        pytest.fail(
            "the S3 tests need the s3s-fs server: run scripts/test.sh (it installs it and sets "
            "CIPHERSHARD_S3S_FS), or set CIPHERSHARD_SKIP_S3=1 to skip them"
        )
    root = tmp_path_factory.mktemp("s3root")
    # s3s-fs serves each bucket from a directory of its root: the dataset's files are its objects.
    shutil.copytree(data.path, root / BUCKET / "ds")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [binary, "--host", "127.0.0.1", "--port", str(port), "--access-key", ACCESS,
         "--secret-key", SECRET, str(root)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert time.monotonic() < deadline, "s3s-fs did not start listening within 20 s"
            time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait()


def options(endpoint: str, secret: str = SECRET) -> dict[str, str]:
    return {
        "aws_endpoint": endpoint,
        "aws_access_key_id": ACCESS,
        "aws_secret_access_key": secret,
        "aws_region": "us-east-1",
        "aws_allow_http": "true",
    }


def row_ids(ds, seed=5):
    loader = ciphershard.Loader(ds, 64, seed=seed, threads=2)
    return [
        {k: np.from_dlpack(v).copy() for k, v in batch.items()}
        for batch in loader
    ]


def same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_url_with_storage_options_equals_local_files(data, s3):
    url = f"s3://{BUCKET}/ds/"
    remote = ciphershard.Dataset(url, key_file=data.key_file, backend="cpu",
                                 storage_options=options(s3))
    assert remote.path == url and isinstance(remote.path, str)
    assert remote.rows == 2000
    assert SECRET not in repr(remote)
    same(row_ids(remote), row_ids(data.open()))
    assert remote.verify()["shards"] == remote.num_shards


def test_url_with_credentials_from_the_environment(data, s3, monkeypatch):
    for k, v in options(s3).items():
        monkeypatch.setenv(k.upper(), v)
    remote = ciphershard.Dataset(f"s3://{BUCKET}/ds/", key_file=data.key_file, backend="cpu")
    same(row_ids(remote, seed=9), row_ids(data.open(), seed=9))


def test_wrong_secret_names_the_url_not_the_secret(data, s3):
    wrong = "wr0ng-py-secret-value"
    with pytest.raises(ciphershard.CiphershardError) as e:
        ciphershard.Dataset(f"s3://{BUCKET}/ds/", key_file=data.key_file, backend="cpu",
                            storage_options=options(s3, wrong))
    text = str(e.value)
    assert f"s3://{BUCKET}/ds/" in text
    assert wrong not in text and SECRET not in text


def test_storage_options_for_a_local_path_are_refused(data):
    with pytest.raises(ValueError, match="storage options"):
        ciphershard.Dataset(data.path, key_file=data.key_file, backend="cpu",
                            storage_options={"aws_region": "us-east-1"})


def test_unknown_storage_option_is_named(data, s3):
    with pytest.raises(ValueError, match="aws_endpont"):
        ciphershard.Dataset(f"s3://{BUCKET}/ds/", key_file=data.key_file, backend="cpu",
                            storage_options={"aws_endpont": s3})


RANK_SCRIPT = """
import json, sys
import numpy as np
import ciphershard
url, key_file, out = sys.argv[1:4]
ds = ciphershard.Dataset(url, key_file=key_file, backend="cpu")
loader = ciphershard.Loader(ds, 50, seed=13, threads=2)  # rank/world from RANK/WORLD_SIZE
epochs = [[int(i) for b in loader for i in np.from_dlpack(b["row_id"])] for _ in range(2)]
state = loader.state_dict()
json.dump({"rank": state["loader"]["rank"], "world": state["loader"]["world_size"], "epochs": epochs}, open(out, "w"))
"""


def test_ranks_in_separate_processes_share_one_bucket(data, s3, tmp_path):
    """Four processes, ranks 0-3 of 4 from RANK/WORLD_SIZE as torchrun sets them, read the
    same URL at once: each epoch, their union is every row exactly once."""
    import sys

    world = 4
    env = dict(os.environ, WORLD_SIZE=str(world))
    env.update({k.upper(): v for k, v in options(s3).items()})
    procs = []
    for rank in range(world):
        out = tmp_path / f"rank{rank}.json"
        procs.append((out, subprocess.Popen(
            [sys.executable, "-c", RANK_SCRIPT, f"s3://{BUCKET}/ds/", str(data.key_file), str(out)],
            env=dict(env, RANK=str(rank)), stderr=subprocess.PIPE, text=True,
        )))
    results = []
    for out, p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        results.append(json.loads(out.read_text()))
    assert sorted(r["rank"] for r in results) == list(range(world))
    assert all(r["world"] == world for r in results)
    for epoch in range(2):
        rows = [i for r in results for i in r["epochs"][epoch]]
        assert sorted(rows) == list(range(2000)), f"epoch {epoch}: not every row exactly once"
    assert results[0]["epochs"][0] != results[0]["epochs"][1], "a new epoch, a new order"


def test_ciphertext_cache_serves_a_second_open(data, s3, tmp_path):
    url = f"s3://{BUCKET}/ds/"
    cache = tmp_path / "cache"

    def open_cached():
        return ciphershard.Dataset(url, key_file=data.key_file, backend="cpu",
                                   storage_options=options(s3), cache_dir=cache,
                                   cache_size="64M")

    want = row_ids(data.open())
    cold = open_cached()
    same(row_ids(cold), want)
    assert cold.cache_stats()["misses"] > 0
    warm = open_cached()
    same(row_ids(warm), want)
    stats = warm.cache_stats()
    assert stats["misses"] == 0 and stats["hits"] > 0, stats
    assert 0 < stats["bytes_on_disk"] <= 64 << 20
    assert ciphershard.Dataset(url, key_file=data.key_file, backend="cpu",
                               storage_options=options(s3)).cache_stats() is None
    for f in cache.rglob("*"):
        if f.is_file():
            assert f.stat().st_mode & 0o777 == 0o600
    with pytest.raises(ValueError, match="object-store URLs"):
        ciphershard.Dataset(data.path, key_file=data.key_file, backend="cpu", cache_dir=cache)
    with pytest.raises(ValueError, match="512M"):
        ciphershard.Dataset(url, key_file=data.key_file, backend="cpu",
                            storage_options=options(s3), cache_dir=cache, cache_size="lots")
