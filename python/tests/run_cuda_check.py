#!/usr/bin/env python3
"""Standalone CUDA device-batch check for a GPU box: needs only python3 with torch (CUDA) and
numpy, and an installed ciphershard wheel built with the ``cuda`` feature.

    pip install --no-deps --no-index --target /tmp/site ciphershard-*.whl
    PYTHONPATH=/tmp/site python3 python/tests/run_cuda_check.py

Builds small encrypted datasets with ciphershard.convert in a temporary folder, runs the checks
of cuda_checks.py, prints one PASS/FAIL line each; exit status 0 only if every check passed.
"""

from __future__ import annotations

import pathlib
import sys
import tempfile
import traceback

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))


def main() -> int:
    try:
        import numpy  # noqa: F401 - ciphershard.convert takes NumPy arrays
    except ImportError:
        print("FAIL setup: numpy is not installed (ciphershard.convert needs it)")
        return 1
    try:
        import ciphershard
    except ImportError as e:
        print(f"FAIL setup: cannot import ciphershard ({e}); put the wheel's folder on PYTHONPATH")
        return 1
    import cuda_checks as cc

    print(f"ciphershard {ciphershard.__version__} from {ciphershard.__file__}")
    try:
        import torch

        print(f"torch {torch.__version__}, cuda available: {torch.cuda.is_available()}")
        if torch.cuda.is_available():
            print(f"device: {torch.cuda.get_device_name(0)}")
    except ImportError:
        pass
    print(f"backends: {ciphershard.backends()}")
    reason = cc.cuda_unavailable_reason()
    if reason is not None:
        print(f"FAIL setup: {reason}")
        return 1
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        path, key_file, _ = cc.make_dataset(root, "ds")
        checks = [(c.__name__, c, (path, key_file)) for c in cc.CHECKS]
        bad = cc.make_dataset(root, "bad", rows=500, chunk_size=1024, shard_size=16 << 10)[:2]
        checks.append(("check_tamper", cc.check_tamper, bad))
        for name, check, args in checks:
            try:
                check(*args)
                print(f"PASS {name}")
            except Exception as e:  # noqa: BLE001 - report every failure, keep going
                failed += 1
                print(f"FAIL {name}: {type(e).__name__}: {e}")
                traceback.print_exc()
    print("ALL PASS" if failed == 0 else f"{failed} FAILED")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
