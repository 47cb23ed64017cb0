//! A loader rebuilt from `state()` (through JSON) yields exactly the remaining batches of the
//! uninterrupted run, compared by contents.
mod common;

use std::sync::Arc;

use ciphershard::pipeline::{Loader, LoaderOptions, LoaderState, RowSource};

#[test]
fn resume_equals_uninterrupted() {
    let dir = tempfile::tempdir().unwrap();
    let src: Arc<dyn RowSource> = common::small(dir.path());
    let o = LoaderOptions {
        batch_size: 8,
        seed: 5,
        epochs: 3,
        threads: 3,
        window_blocks: 3,
        world_size: 2,
        rank: 1,
        ..Default::default()
    };
    let full = common::all_batches(Loader::new(src.clone(), &o).unwrap());
    let per_epoch = full.len() / 3;
    for stop_after in [
        0usize,
        1,
        5,
        per_epoch - 1,
        per_epoch,
        per_epoch + 3,
        full.len() - 1,
        full.len(),
    ] {
        let mut l = Loader::new(src.clone(), &o).unwrap();
        let mut got = Vec::new();
        for _ in 0..stop_after {
            let b = l.next().unwrap().unwrap();
            got.push((
                b.row_ids().to_vec(),
                b.tensors().map(|t| t.bytes.to_vec()).collect::<Vec<_>>(),
            ));
        }
        let json = serde_json::to_string(&l.state()).unwrap();
        drop(l); // mid-epoch
        let state: LoaderState = serde_json::from_str(&json).unwrap();
        // Options other than threads/prefetch come from the state.
        let fresh = LoaderOptions {
            threads: 1,
            prefetch: 2,
            epochs: 3,
            ..Default::default()
        };
        got.extend(common::all_batches(
            Loader::resume(src.clone(), &fresh, &state).unwrap(),
        ));
        assert_eq!(got, full, "stopped after {stop_after}");
    }
}

#[test]
fn state_for_another_dataset_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let src: Arc<dyn RowSource> = common::small(dir.path());
    let mut state = Loader::new(src.clone(), &LoaderOptions::default())
        .unwrap()
        .state();
    state.total_rows += 1;
    assert!(Loader::resume(src, &LoaderOptions::default(), &state).is_err());
}

/// `LoaderState::planned` gives the start position and batches per epoch a loader reports,
/// fresh and resumed, without starting one.
#[test]
fn planned_matches_the_loader() {
    let dir = tempfile::tempdir().unwrap();
    let src: Arc<dyn RowSource> = common::small(dir.path());
    let o = LoaderOptions {
        batch_size: 8,
        seed: 3,
        epochs: 2,
        ..Default::default()
    };
    let mut l = Loader::new(src.clone(), &o).unwrap();
    let (state, per_epoch) = LoaderState::planned(src.as_ref(), &o).unwrap();
    assert_eq!((state, per_epoch), (l.state(), l.batches_per_epoch()));
    for _ in 0..per_epoch + 2 {
        l.next().unwrap().unwrap();
    }
    let saved = l.state();
    let resumed = o.clone().resume(&saved);
    let (state, per_epoch) = LoaderState::planned(src.as_ref(), &resumed).unwrap();
    let r = Loader::resume(src.clone(), &o, &saved).unwrap();
    assert_eq!((&state, per_epoch), (&r.state(), r.batches_per_epoch()));
    assert_eq!(state, saved);
}
