#!/usr/bin/env python3
"""A small real PyTorch training loop over an encrypted ciphershard dataset, with resume.

    python examples/train_torch.py                      # makes a synthetic dataset, trains 3 epochs
    python examples/train_torch.py --stop-after 25      # "crashes" after 25 steps (checkpoint kept)
    python examples/train_torch.py --resume             # continues exactly where it stopped

The dataset (a 10-class problem: 32 features, labels from a hidden linear teacher plus noise)
is converted once into encrypted shards with `ciphershard.convert`; its master key is a file
(never an argument). Batches arrive as `dict[str, torch.Tensor]` that view the loader's
decrypted buffers (no copy). Every `--checkpoint-every` steps the model, the optimizer and the
loader's `state_dict()` are saved together, so a resumed run sees exactly the batches the
uninterrupted run would have seen.
"""

from __future__ import annotations

import argparse
import pathlib
import time

import numpy as np
import torch

import ciphershard


def make_dataset(root: pathlib.Path, rows: int) -> tuple[pathlib.Path, pathlib.Path]:
    data, key = root / "data", root / "master.key"
    if (data / "manifest.json").exists():
        return data, key
    root.mkdir(parents=True, exist_ok=True)
    ciphershard.generate_key(key)
    rng = np.random.default_rng(0)
    teacher = rng.standard_normal((32, 10)).astype(np.float32)
    x = rng.standard_normal((rows, 32)).astype(np.float32)
    y = np.argmax(x @ teacher + 0.5 * rng.standard_normal((rows, 10)), axis=1).astype(np.int64)
    summary = ciphershard.convert(
        {"features": x, "label": y}, out=data, key_file=key, chunk_size=64 << 10, shard_size=1 << 20
    )
    print(f"converted {summary['rows']} rows into {summary['shards']} encrypted shards "
          f"({summary['mb_per_s']:.0f} MB/s)")
    return data, key


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path("target/train_torch"))
    ap.add_argument("--rows", type=int, default=50_000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--checkpoint-every", type=int, default=20)
    ap.add_argument("--stop-after", type=int, default=None, help="stop after N steps (simulated crash)")
    ap.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    args = ap.parse_args()

    data, key = make_dataset(args.workdir, args.rows)
    ckpt_path = args.workdir / "checkpoint.pt"
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ds = ciphershard.Dataset(data, key_file=key, backend=args.backend)
    loader = ciphershard.Loader(ds, args.batch_size, shuffle=True, seed=1, epochs=args.epochs, as_torch=True)
    step = 0
    if args.resume:
        ckpt = torch.load(ckpt_path, weights_only=True)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        loader.load_state_dict(ckpt["loader"])
        step = ckpt["step"]
        print(f"resumed at step {step}, epoch {loader.epoch}")
    print(f"{ds!r}, backend: {ds.backend_description}")

    def checkpoint() -> None:
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                    "loader": loader.state_dict(), "step": step}, ckpt_path)

    t0, running, seen = time.perf_counter(), 0.0, 0
    epoch = loader.epoch
    for batch in loader:
        logits = model(batch["features"])
        loss = torch.nn.functional.cross_entropy(logits, batch["label"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        running += loss.item()
        seen += 1
        if loader.epoch != epoch or step % 50 == 0:
            print(f"epoch {epoch} step {step:5d}  loss {running / seen:.4f}")
            running, seen, epoch = 0.0, 0, loader.epoch
        if step % args.checkpoint_every == 0:
            checkpoint()
        if args.stop_after is not None and step >= args.stop_after:
            print(f"stopping after step {step} (checkpoint at step {step - step % args.checkpoint_every})")
            return
    checkpoint()
    with torch.no_grad():
        eval_loader = ciphershard.Loader(ds, 4096, shuffle=False)
        correct = total = 0
        for b in eval_loader:
            x, y = torch.from_dlpack(b["features"]), torch.from_dlpack(b["label"])
            correct += (model(x).argmax(1) == y).sum().item()
            total += len(y)
    st = loader.stats()
    print(f"done: {step} steps in {time.perf_counter() - t0:.1f} s, accuracy {correct / total:.3f}, "
          f"loader waited {st['consumer_wait_ns'] / 1e6:.0f} ms, read amplification {st['read_amplification']:.2f}")


if __name__ == "__main__":
    main()
