#!/usr/bin/env python3
"""A small causal language model trained on packed sequences from an encrypted dataset, with resume.

    python examples/train_lm.py                      # converts the corpus, trains 4 epochs
    python examples/train_lm.py --stop-after 75      # "crashes" after 75 steps (checkpoint kept)
    python examples/train_lm.py --resume             # continues exactly where it stopped

The corpus is text that ships with the repository (its Markdown documentation), one row per
paragraph, tokenized at byte level (vocabulary 256). It is written to a Parquet file with
pyarrow and encrypted with `ciphershard.convert("corpus.parquet", ...)`. That Parquet file is
plaintext on disk: it is written in a temporary directory, which is removed as soon as the
conversion is done (passing the pyarrow table itself, `ciphershard.convert(table, ...)`, would
leave no plaintext file at all). The master key is a file, never an argument.

`ciphershard.Loader(..., pack="input_ids", seq_len=L)` lays the paragraphs end to end and cuts
`[B, L]` blocks of tokens: no padding. A paragraph that does not fit the rest of a row continues
on the next row as a new piece. Each batch also carries `position_ids` (restarting at 0 for each
piece) and `cu_seqlens` (the pieces' boundaries in the flattened `B*L` tokens). The model uses
`position_ids` for its positional embeddings and builds a block-diagonal causal mask from
`cu_seqlens`, so a token attends only to earlier tokens of its own piece and is never asked to
predict the first token of the next paragraph. No flash-attention dependency: plain
`scaled_dot_product_attention` with a boolean mask.

Every `--checkpoint-every` steps the model, the optimizer and the loader's `state_dict()` are
saved together, so a resumed run sees exactly the batches the uninterrupted run would have seen
(each log line prints a fingerprint of its step's batch).
"""

from __future__ import annotations

import argparse
import hashlib
import pathlib
import tempfile
import time

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

import ciphershard

REPO = pathlib.Path(__file__).resolve().parents[1]
VOCAB = 256


def paragraphs() -> list[bytes]:
    """The repository's Markdown docs, one entry per paragraph (blank-line separated)."""
    files = sorted((REPO / "docs").glob("*.md")) + [REPO / "README.md", REPO / "python" / "README.md"]
    out = []
    for f in files:
        for p in f.read_text(encoding="utf-8").split("\n\n"):
            if p.strip():
                out.append(p.strip().encode("utf-8") + b"\n")
    return out


def make_dataset(root: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    data, key = root / "data", root / "master.key"
    if (data / "manifest.json").exists():
        return data, key
    root.mkdir(parents=True, exist_ok=True)
    ciphershard.generate_key(key)
    rows = paragraphs()
    table = pa.table({"input_ids": pa.array([list(p) for p in rows], pa.list_(pa.uint8()))})
    # The Parquet file is plaintext: it lives only as long as this temporary directory.
    with tempfile.TemporaryDirectory() as tmp:
        corpus = pathlib.Path(tmp) / "corpus.parquet"
        pq.write_table(table, corpus)
        summary = ciphershard.convert(corpus, out=data, key_file=key, chunk_size=16 << 10, shard_size=64 << 10)
    print(f"converted {summary['rows']} paragraphs ({sum(map(len, rows))} bytes) into "
          f"{summary['shards']} encrypted shards; the plaintext Parquet file is deleted")
    return data, key


class Block(torch.nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.qkv, self.proj = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(d, 4 * d), torch.nn.GELU(), torch.nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, l, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, l, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.proj(a.transpose(1, 2).reshape(b, l, d))
        return x + self.mlp(self.ln2(x))


class TinyLM(torch.nn.Module):
    def __init__(self, seq_len: int, d: int = 64, heads: int = 4, layers: int = 2):
        super().__init__()
        self.tok, self.pos = torch.nn.Embedding(VOCAB, d), torch.nn.Embedding(seq_len, d)
        self.blocks = torch.nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln, self.head = torch.nn.LayerNorm(d), torch.nn.Linear(d, VOCAB)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.tok(tokens) + self.pos(positions)
        for blk in self.blocks:
            x = blk(x, mask)
        return self.head(self.ln(x))


def piece_ids(cu_seqlens: torch.Tensor, b: int, l: int) -> torch.Tensor:
    """[B, L]: which piece (sequence of one paragraph) each token belongs to."""
    starts = torch.zeros(b * l, dtype=torch.int64)
    starts[cu_seqlens[1:-1].long()] = 1
    return starts.cumsum(0).view(b, l)


def lm_loss(model: TinyLM, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    tokens, positions = batch["input_ids"].long(), batch["position_ids"]
    b, l = tokens.shape
    piece = piece_ids(batch["cu_seqlens"], b, l)
    # Block-diagonal causal mask [B, 1, L, L]: same piece, and not a later token.
    causal = torch.ones(l, l, dtype=torch.bool).tril()
    mask = (piece[:, :, None] == piece[:, None, :]) & causal
    logits = model(tokens, positions, mask[:, None])
    # Token t predicts token t + 1 only inside one piece.
    same = piece[:, 1:] == piece[:, :-1]
    return F.cross_entropy(logits[:, :-1][same], tokens[:, 1:][same])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path("target/train_lm"))
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (the model is tiny: more threads mostly add synchronization)")
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--checkpoint-every", type=int, default=20)
    ap.add_argument("--stop-after", type=int, default=None, help="stop after N steps (simulated crash)")
    ap.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    args = ap.parse_args()

    data, key = make_dataset(args.workdir)
    ckpt_path = args.workdir / "checkpoint.pt"
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = TinyLM(args.seq_len)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    ds = ciphershard.Dataset(data, key_file=key, backend=args.backend)
    loader = ciphershard.Loader(ds, args.batch_size, shuffle=True, seed=1, epochs=args.epochs,
                                pack="input_ids", seq_len=args.seq_len, as_torch=True)
    step = 0
    if args.resume:
        ckpt = torch.load(ckpt_path, weights_only=True)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        loader.load_state_dict(ckpt["loader"])
        step = ckpt["step"]
        print(f"resumed at step {step}, epoch {loader.epoch}")
    print(f"{ds!r}, {len(loader)} batches of {args.batch_size}x{args.seq_len} tokens per epoch")

    def checkpoint() -> None:
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                    "loader": loader.state_dict(), "step": step}, ckpt_path)

    t0, window = time.perf_counter(), []
    for batch in loader:
        loss = lm_loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        window.append(loss.item())
        if step % args.log_every == 0:
            fp = hashlib.sha256(batch["input_ids"].numpy().tobytes()).hexdigest()[:12]
            print(f"step {step:5d}  epoch {loader.epoch}  loss {sum(window) / len(window):.4f}  batch {fp}")
            window = []
        if step % args.checkpoint_every == 0:
            checkpoint()
        if args.stop_after is not None and step >= args.stop_after:
            print(f"stopping after step {step} (checkpoint at step {step - step % args.checkpoint_every})")
            return
    checkpoint()
    print(f"done: {step} steps, last loss {loss.item():.4f}, "
          f"{time.perf_counter() - t0:.1f} s, loader waited {loader.stats()['consumer_wait_ns'] / 1e6:.0f} ms")


if __name__ == "__main__":
    main()
