//! Token-budget batching: batches cut by a ragged column's tokens, each within the budget and
//! the row cap, every row once per epoch, the same for any thread count, split across ranks as
//! the single-rank cut's batches, and resumed exactly mid-epoch and across epochs.

mod tokens_common;

use std::collections::HashSet;
use std::sync::Arc;

use ciphershard::MasterKey;
use ciphershard::cipher::Backend;
use ciphershard::pipeline::options::PackOptions;
use ciphershard::pipeline::{Batch, FormatSource, Loader, LoaderOptions, TokenBudget};
use tokens_common::make_tokens;

/// Row `r` holds `len(r)` tokens `r * 1000 + j`: empty rows, short ones and a few long ones.
fn len(r: u64) -> u64 {
    match r % 17 {
        0 => 0,
        3 => 90,
        _ => (r * 37) % 29,
    }
}

fn make(dir: &std::path::Path, rows: u64) -> MasterKey {
    make_tokens(dir, rows, len)
}

const MAX_TOKENS: u64 = 100;
const MAX_ROWS: usize = 9;

fn opts(threads: usize) -> LoaderOptions {
    LoaderOptions {
        batch_size: MAX_ROWS,
        seed: 11,
        threads,
        epochs: 3,
        budget: Some(TokenBudget {
            column: "input_ids".into(),
            max_tokens: MAX_TOKENS,
        }),
        ..Default::default()
    }
}

/// A batch's rows, checked: every row's tokens and label exactly as converted, within the
/// budget and the row cap.
fn rows(b: &Batch) -> Vec<u64> {
    let t = b.tensor("input_ids").unwrap();
    let offsets = t.offsets().unwrap();
    let values = t.as_slice::<i32>().unwrap();
    let labels = b.tensor("label").unwrap().as_slice::<i64>().unwrap();
    assert!(!b.is_empty() && b.len() <= MAX_ROWS, "{} rows", b.len());
    assert!(values.len() as u64 <= MAX_TOKENS, "{} tokens", values.len());
    assert_eq!(offsets.len(), b.len() + 1);
    assert_eq!(*offsets.last().unwrap() as usize, values.len());
    for (i, &g) in b.row_ids().iter().enumerate() {
        let want: Vec<i32> = (0..len(g) as i32).map(|j| g as i32 * 1000 + j).collect();
        assert_eq!(
            &values[offsets[i] as usize..offsets[i + 1] as usize],
            want.as_slice()
        );
        assert_eq!(labels[i], g as i64);
    }
    b.row_ids().to_vec()
}

/// Every batch of a run, by epoch: (epoch, the batch's rows), and the batch counts the loader
/// announced at each epoch's start.
fn run(src: Arc<FormatSource>, o: &LoaderOptions) -> (Vec<(u64, Vec<u64>)>, Vec<u64>) {
    let mut l = Loader::new(src, o).unwrap();
    let mut counts = vec![l.batches_per_epoch()];
    let mut out = Vec::new();
    let mut epoch = l.state().epoch;
    while let Some(b) = l.next() {
        let b = b.unwrap();
        out.push((b.epoch(), rows(&b)));
        if l.state().epoch != epoch && l.state().epoch < o.epochs {
            epoch = l.state().epoch;
            counts.push(l.batches_per_epoch());
        }
    }
    (out, counts)
}

#[test]
fn unshuffled_batches_are_the_greedy_cut_of_the_dataset() {
    let dir = tempfile::tempdir().unwrap();
    let n = 400;
    let key = make(dir.path(), n);
    let src = FormatSource::open(dir.path(), &key, Backend::Cpu).unwrap();
    let o = LoaderOptions {
        shuffle: false,
        epochs: 1,
        ..opts(2)
    };
    let (got, _) = run(src, &o);
    // The expected cut, written out independently.
    let mut want: Vec<Vec<u64>> = vec![vec![]];
    let mut tokens = 0;
    for r in 0..n {
        let last = want.last().unwrap();
        if last.len() == MAX_ROWS || tokens + len(r) > MAX_TOKENS {
            want.push(vec![]);
            tokens = 0;
        }
        want.last_mut().unwrap().push(r);
        tokens += len(r);
    }
    let got: Vec<Vec<u64>> = got.into_iter().map(|(_, r)| r).collect();
    assert_eq!(got, want);
}

#[test]
fn every_epoch_holds_every_row_once_for_any_thread_count() {
    let dir = tempfile::tempdir().unwrap();
    let n = 700;
    let key = make(dir.path(), n);
    let src = FormatSource::open(dir.path(), &key, Backend::Cpu).unwrap();
    let (one, counts) = run(src.clone(), &opts(1));
    let (three, counts3) = run(src.clone(), &opts(3));
    assert_eq!(one, three, "the cut depends on the thread count");
    assert_eq!(counts, counts3);
    assert_eq!(counts.len(), 3);
    let mut by_epoch = vec![Vec::new(); 3];
    for (e, rows) in &one {
        by_epoch[*e as usize].push(rows.clone());
    }
    for (e, batches) in by_epoch.iter().enumerate() {
        assert_eq!(
            batches.len() as u64,
            counts[e],
            "epoch {e}'s announced count"
        );
        let mut all: Vec<u64> = batches.concat();
        all.sort_unstable();
        assert_eq!(all, (0..n).collect::<Vec<_>>(), "epoch {e}");
    }
    assert_ne!(by_epoch[0], by_epoch[1], "the order changes per epoch");
    // Batches are full: a batch ends only where the next row would not fit.
    for (e, batches) in by_epoch.iter().enumerate() {
        for w in batches.windows(2) {
            let tokens: u64 = w[0].iter().map(|&r| len(r)).sum();
            assert!(
                w[0].len() == MAX_ROWS || tokens + len(w[1][0]) > MAX_TOKENS,
                "epoch {e}: a batch cut early"
            );
        }
    }
}

#[test]
fn ranks_take_equal_shares_of_the_single_rank_cut() {
    let dir = tempfile::tempdir().unwrap();
    let key = make(dir.path(), 500);
    let src = FormatSource::open(dir.path(), &key, Backend::Cpu).unwrap();
    let (whole, counts) = run(src.clone(), &opts(2));
    let world = 3u64;
    let mut shares = Vec::new();
    for rank in 0..world {
        let o = LoaderOptions {
            rank,
            world_size: world,
            ..opts(2)
        };
        shares.push(run(src.clone(), &o));
    }
    for e in 0..3u64 {
        let single: Vec<&Vec<u64>> = whole
            .iter()
            .filter(|(be, _)| *be == e)
            .map(|(_, r)| r)
            .collect();
        let q = counts[e as usize] / world;
        let mut seen = HashSet::new();
        for (rank, (batches, rank_counts)) in shares.iter().enumerate() {
            assert_eq!(rank_counts[e as usize], q, "rank {rank} epoch {e}");
            let mine: Vec<&Vec<u64>> = batches
                .iter()
                .filter(|(be, _)| *be == e)
                .map(|(_, r)| r)
                .collect();
            let from = rank * q as usize;
            assert_eq!(
                mine,
                single[from..from + q as usize],
                "rank {rank} epoch {e}"
            );
            for r in mine.into_iter().flatten() {
                assert!(seen.insert(*r), "row {r} on two ranks");
            }
        }
    }
}

#[test]
fn resume_continues_exactly_mid_epoch_and_across_epochs() {
    let dir = tempfile::tempdir().unwrap();
    let key = make(dir.path(), 600);
    let src = FormatSource::open(dir.path(), &key, Backend::Cpu).unwrap();
    let o = opts(2);
    let (whole, counts) = run(src.clone(), &o);
    // Stop mid-epoch 0, at the last batch of epoch 1, and anywhere else.
    for stop in [5usize, (counts[0] + counts[1]) as usize - 1, 1] {
        let mut l = Loader::new(src.clone(), &o).unwrap();
        for _ in 0..stop {
            l.next().unwrap().unwrap();
        }
        let state = l.state();
        drop(l);
        let json = serde_json::to_string(&state).unwrap();
        let state = serde_json::from_str(&json).unwrap();
        let resumed: Vec<(u64, Vec<u64>)> = Loader::resume(src.clone(), &o, &state)
            .unwrap()
            .map(|b| {
                let b = b.unwrap();
                (b.epoch(), rows(&b))
            })
            .collect();
        assert_eq!(resumed, whole[stop..], "resumed after {stop} batches");
    }
    // The budget is part of the order: a state saved with it names the difference.
    let mut l = Loader::new(src.clone(), &o).unwrap();
    l.next().unwrap().unwrap();
    let state = l.state();
    let other = LoaderOptions {
        budget: Some(TokenBudget {
            column: "input_ids".into(),
            max_tokens: 99,
        }),
        ..opts(2)
    };
    assert_eq!(
        state.mismatches(&other),
        ["budget (state input_ids:100, options input_ids:99)"]
    );
}

#[test]
fn bad_budgets_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let key = make(dir.path(), 300);
    let src = FormatSource::open(dir.path(), &key, Backend::Cpu).unwrap();
    let err = |o: LoaderOptions| Loader::new(src.clone(), &o).unwrap_err().to_string();
    let with = |column: &str, max_tokens: u64| LoaderOptions {
        budget: Some(TokenBudget {
            column: column.into(),
            max_tokens,
        }),
        ..opts(1)
    };
    let e = err(with("input_ids", 50));
    assert!(
        e.contains("rows of column \"input_ids\" hold more than max_tokens = 50")
            && e.contains("the longest 90"),
        "{e}"
    );
    let e = err(with("label", 50));
    assert!(e.contains("fixed shape"), "{e}");
    let e = err(with("nope", 50));
    assert!(e.contains("no column named \"nope\""), "{e}");
    let e = err(with("input_ids", 0));
    assert!(e.contains("max_tokens 0"), "{e}");
    let e = err(LoaderOptions {
        pack: Some(PackOptions {
            column: "input_ids".into(),
            seq_len: 16,
        }),
        ..with("input_ids", 100)
    });
    assert!(e.contains("pack and budget"), "{e}");
    // 300 rows of at most 9 a batch: at least 34 batches, fewer than one per rank of 40.
    let e = err(LoaderOptions {
        world_size: 40,
        rank: 39,
        ..with("input_ids", 100_000)
    });
    assert!(e.contains("fewer than one per rank for 40 ranks"), "{e}");
}
