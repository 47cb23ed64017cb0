"""The independent Python reader of docs/FORMAT.md (tests/golden/read_golden.py, which uses
only `cryptography` and the standard library) reads both golden datasets, version 1 and
version 2 (ragged columns), to their expected plaintext."""

import pathlib
import subprocess
import sys

READER = pathlib.Path(__file__).resolve().parents[2] / "tests" / "golden" / "read_golden.py"


def test_independent_reader_reads_both_golden_versions():
    out = subprocess.run([sys.executable, str(READER)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr + out.stdout
    assert "OK: version 1:" in out.stdout
    assert "OK: version 2:" in out.stdout
