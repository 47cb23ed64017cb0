//! Ranks get disjoint parts whose union is every row exactly once per epoch (drop_last), or
//! every row at least once with only the padding repeated (no drop_last).
mod common;

use std::collections::HashMap;
use std::sync::Arc;

use ciphershard::pipeline::{Loader, LoaderOptions, RowSource};

fn rows_of(src: &Arc<dyn RowSource>, world: u64, rank: u64, drop_last: bool) -> Vec<u64> {
    let o = LoaderOptions {
        batch_size: 7,
        seed: 9,
        epochs: 1,
        rank,
        world_size: world,
        drop_last,
        window_blocks: 2,
        threads: 2,
        ..Default::default()
    };
    Loader::new(src.clone(), &o)
        .unwrap()
        .flat_map(|b| b.unwrap().row_ids().to_vec())
        .collect()
}

#[test]
fn exact_once_across_ranks() {
    let dir = tempfile::tempdir().unwrap();
    let src: Arc<dyn RowSource> = common::small(dir.path()); // 245 rows
    for world in [1u64, 2, 3, 4, 8] {
        // drop_last: floor(245 / world) rows per rank, then whole batches of 7 only.
        let mut all = Vec::new();
        for r in 0..world {
            let rows = rows_of(&src, world, r, true);
            let per = 245 / world;
            assert_eq!(rows.len() as u64, per / 7 * 7, "world {world} rank {r}");
            all.extend(rows);
        }
        let n = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), n, "world {world}: a row went to two ranks");

        // padding: ceil(245 / world) rows per rank, union covers everything, repeats = padding.
        let mut counts: HashMap<u64, u32> = HashMap::new();
        for r in 0..world {
            let rows = rows_of(&src, world, r, false);
            assert_eq!(rows.len() as u64, 245u64.div_ceil(world));
            for g in rows {
                *counts.entry(g).or_default() += 1;
            }
        }
        assert_eq!(counts.len(), 245, "world {world}: some row missing");
        let extra: u32 = counts.values().map(|c| c - 1).sum();
        assert_eq!(extra as u64, 245u64.div_ceil(world) * world - 245);
    }
}

#[test]
fn bad_rank_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let src: Arc<dyn RowSource> = common::small(dir.path());
    let o = LoaderOptions {
        rank: 2,
        world_size: 2,
        ..Default::default()
    };
    assert!(Loader::new(src, &o).is_err());
}
