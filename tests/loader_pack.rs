//! Sequence packing: batches of `[B, L]` tokens cut from a ragged column's rows laid end to end,
//! with `cu_seqlens` and `position_ids`; every token of the epoch once (but the tail), the same
//! for any thread count, split exactly across ranks, and resumed exactly mid-epoch (the
//! carried-over piece of a row included).

mod tokens_common;

use std::collections::HashSet;
use std::sync::Arc;

use ciphershard::MasterKey;
use ciphershard::cipher::Backend;
use ciphershard::pipeline::options::PackOptions;
use ciphershard::pipeline::{Batch, FormatSource, Loader, LoaderOptions};
use tokens_common::make_tokens;

/// Row `r` holds `len(r)` tokens `r * 1000 + j`: empty rows, short ones, and rows far longer
/// than a sequence.
fn len(r: u64) -> u64 {
    match r % 19 {
        0 => 0,
        5 => 400,
        _ => (r * 31) % 23,
    }
}

fn make(dir: &std::path::Path, rows: u64) -> MasterKey {
    make_tokens(dir, rows, len)
}

fn opts(b: usize, l: u64) -> LoaderOptions {
    LoaderOptions {
        batch_size: b,
        seed: 4,
        threads: 2,
        pack: Some(PackOptions {
            column: "input_ids".into(),
            seq_len: l,
        }),
        ..Default::default()
    }
}

/// A packed batch's tokens, checked against its cu_seqlens and position ids: every piece is a
/// run of one row's consecutive tokens, within one sequence, positions counting from 0.
fn tokens(b: &Batch, seqs: usize, l: usize) -> Vec<i32> {
    let t = b.tensor("input_ids").unwrap();
    assert_eq!(t.shape(), vec![seqs as u64, l as u64]);
    let toks = t.as_slice::<i32>().unwrap().to_vec();
    let pos = b.tensor("position_ids").unwrap().as_slice::<i64>().unwrap();
    let cu = b.tensor("cu_seqlens").unwrap().as_slice::<i32>().unwrap();
    assert_eq!(
        b.tensor("position_ids").unwrap().shape(),
        vec![seqs as u64, l as u64]
    );
    assert_eq!(cu[0], 0);
    assert_eq!(*cu.last().unwrap() as usize, seqs * l);
    for w in cu.windows(2) {
        let (a, e) = (w[0] as usize, w[1] as usize);
        assert!(a < e, "empty piece");
        assert_eq!(a / l, (e - 1) / l, "a piece crosses a sequence: {a}..{e}");
        for i in a..e {
            assert_eq!(pos[i], (i - a) as i64);
            if i > a {
                assert_eq!(toks[i], toks[i - 1] + 1, "piece {a}..{e} not consecutive");
            }
        }
    }
    toks
}

fn run(src: Arc<FormatSource>, o: &LoaderOptions) -> Vec<Vec<i32>> {
    let l = o.pack.as_ref().unwrap().seq_len as usize;
    Loader::new(src, o)
        .unwrap()
        .map(|b| tokens(&b.unwrap(), o.batch_size, l))
        .collect()
}

#[test]
fn unshuffled_packing_is_the_dataset_cut_into_sequences() {
    let dir = tempfile::tempdir().unwrap();
    let rows = 300;
    let key = make(dir.path(), rows);
    let src = FormatSource::open(dir.path(), &key, Backend::Cpu).unwrap();
    let stream: Vec<i32> = (0..rows)
        .flat_map(|r| (0..len(r) as i32).map(move |j| r as i32 * 1000 + j))
        .collect();
    let o = LoaderOptions {
        shuffle: false,
        ..opts(4, 64)
    };
    let batches = run(src, &o);
    assert_eq!(batches.len(), stream.len() / 256);
    let got: Vec<i32> = batches.concat();
    assert_eq!(got, stream[..got.len()]);
}

#[test]
fn shuffled_packing_delivers_each_token_once_deterministically() {
    let dir = tempfile::tempdir().unwrap();
    let rows = 400;
    let key = make(dir.path(), rows);
    let src = FormatSource::open(dir.path(), &key, Backend::Cpu).unwrap();
    let total: u64 = (0..rows).map(len).sum();
    let mut reference = None;
    for threads in [1, 3] {
        let o = LoaderOptions {
            threads,
            ..opts(3, 50)
        };
        let batches = run(src.clone(), &o);
        assert_eq!(batches.len() as u64, total / 150);
        let all: Vec<i32> = batches.concat();
        let unique: HashSet<i32> = all.iter().copied().collect();
        assert_eq!(unique.len(), all.len(), "a token delivered twice");
        match &reference {
            None => reference = Some(batches),
            Some(r) => assert_eq!(&batches, r, "threads {threads}"),
        }
    }
}

#[test]
fn ranks_split_tokens_exactly_and_resume_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let rows = 500;
    let key = make(dir.path(), rows);
    let src = FormatSource::open(dir.path(), &key, Backend::Cpu).unwrap();
    let total: u64 = (0..rows).map(len).sum();
    let per_rank: Vec<Vec<Vec<i32>>> = (0..3)
        .map(|rank| {
            let o = LoaderOptions {
                rank,
                world_size: 3,
                ..opts(2, 40)
            };
            run(src.clone(), &o)
        })
        .collect();
    // The same number of batches on every rank, no token on two ranks.
    let n = (total / 3) / 80;
    assert!(per_rank.iter().all(|b| b.len() as u64 == n));
    let mut seen = HashSet::new();
    for t in per_rank.iter().flatten().flatten() {
        assert!(seen.insert(*t), "token {t} on two ranks");
    }
    // Resume after 7 batches of epoch 1 (a row is usually cut there): the rest is identical.
    let o = LoaderOptions {
        epochs: 2,
        ..opts(2, 40)
    };
    let full = run(src.clone(), &o);
    let mut l = Loader::new(src.clone(), &o).unwrap();
    let per_epoch = l.batches_per_epoch() as usize;
    for _ in 0..per_epoch + 7 {
        l.next().unwrap().unwrap();
    }
    let state = l.state();
    drop(l);
    assert!(state.pack.is_some());
    let state: ciphershard::pipeline::LoaderState =
        serde_json::from_str(&serde_json::to_string(&state).unwrap()).unwrap();
    // Only the state's order-defining fields count: packing and seed come from it.
    let resume_opts = LoaderOptions {
        epochs: 2,
        ..Default::default()
    };
    let rest: Vec<Vec<i32>> = Loader::resume(src, &resume_opts, &state)
        .unwrap()
        .map(|b| tokens(&b.unwrap(), 2, 40))
        .collect();
    assert_eq!(rest.len(), full.len() - per_epoch - 7);
    assert!(rest == full[per_epoch + 7..], "resumed batches differ");
}

#[test]
fn packing_refuses_what_it_cannot_do() {
    let dir = tempfile::tempdir().unwrap();
    let key = make(dir.path(), 100);
    let src = FormatSource::open(dir.path(), &key, Backend::Cpu).unwrap();
    let cases = [
        (
            LoaderOptions {
                pack: Some(PackOptions {
                    column: "label".into(),
                    seq_len: 8,
                }),
                ..opts(2, 8)
            },
            "fixed shape",
        ),
        (
            LoaderOptions {
                pack: Some(PackOptions {
                    column: "nope".into(),
                    seq_len: 8,
                }),
                ..opts(2, 8)
            },
            "no column named \"nope\"",
        ),
        (opts(2, 0), "between 1 and"),
        (opts(64, 1 << 20), "fewer than one batch"),
    ];
    for (o, want) in cases {
        let e = Loader::new(src.clone(), &o).unwrap_err().to_string();
        assert!(e.contains(want), "{e}");
    }
}

/// A tampered chunk of the packed column is an integrity error naming it, whether a batch opens
/// it or a worker loads it ahead with the next window: reached in every epoch, the chunk of a
/// later shard (in a window other than the first) included.
#[test]
fn a_tampered_chunk_is_an_error_when_loaded_ahead_too() {
    let dir = tempfile::tempdir().unwrap();
    let key = make(dir.path(), 600);
    let shards: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    assert!(shards.len() > 2, "{} shards", shards.len());
    let shard = shards.iter().max().unwrap();
    let h = ciphershard::format::ShardHeader::read(shard).unwrap();
    let (vi, _) = h.tensor("input_ids").unwrap();
    let c = h.chunk(vi, 0);
    let mut bytes = std::fs::read(shard).unwrap();
    bytes[c.file_offset as usize] ^= 1;
    std::fs::write(shard, &bytes).unwrap();
    let src = FormatSource::open(dir.path(), &key, Backend::Cpu).unwrap();
    for seed in 0..4 {
        let o = LoaderOptions {
            seed,
            window_blocks: 1,
            ..opts(2, 16)
        };
        let e = Loader::new(src.clone(), &o)
            .unwrap()
            .find_map(|b| b.err())
            .expect("an integrity error");
        let msg = e.to_string();
        let name = shard.file_name().unwrap().to_string_lossy();
        assert!(
            msg.contains("tensor 'input_ids'") && msg.contains(name.as_ref()),
            "{msg}"
        );
    }
}
