//! The window layout and gather offsets, checked on the CPU (no GPU needed): windows are
//! opened on the host into buffers laid out exactly as on the device, rows gathered with
//! the same offsets, and every batch compared with the host loader's.

#![forbid(unsafe_code)]
use super::batches::*;
use super::windows::*;
use crate::cipher::{Backend, ChunkParams};
use crate::format::{ConvertInput, ConvertOptions, Dtype, convert};
use crate::keys::MasterKey;
use crate::pipeline::format_source::FormatSource;
use crate::pipeline::sampler::{Cursor, EpochPlan};
use crate::pipeline::source::{ChunkSpec, ColumnInfo, RowSource};
use crate::pipeline::{Loader, LoaderOptions, SamplerConfig};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

fn dataset(dir: &Path, rows: u64) -> MasterKey {
    let key = MasterKey::generate().unwrap();
    let col = |name: &str, dtype, shape: Vec<u64>, data: Vec<u8>| ConvertInput::InMemory {
        name: name.into(),
        dtype,
        shape,
        data,
    };
    let inputs = [
        col(
            "x",
            Dtype::F32,
            vec![rows, 3],
            (0..rows * 3)
                .flat_map(|i| (i as f32).to_le_bytes())
                .collect(),
        ),
        col(
            "y",
            Dtype::I32,
            vec![rows],
            (0..rows as i32)
                .flat_map(|i| (i * 7).to_le_bytes())
                .collect(),
        ),
        col(
            "z",
            Dtype::U8,
            vec![rows, 5],
            (0..rows * 5).map(|i| (i * 31 % 251) as u8).collect(),
        ),
        // Rows wider than a chunk: a row spans two or three chunks.
        col(
            "w",
            Dtype::U8,
            vec![rows, 200],
            (0..rows * 200).map(|i| (i * 13 % 253) as u8).collect(),
        ),
    ];
    let opts = ConvertOptions {
        keys: vec![key.clone()],
        chunk_size: 128,
        shard_size: Some(30_000),
        plain: vec!["y".into()],
        ..Default::default()
    };
    convert(&inputs, dir, &opts, &mut |_, _| {}).unwrap();
    key
}

/// Window `w` opened on the host into buffers with the device layout, one per piece.
fn host_window(
    src: &FormatSource,
    plan: &EpochPlan,
    w: usize,
    bound: usize,
    packing: Packing,
) -> (Vec<Vec<u8>>, ChunkOffsets) {
    let keys = window_keys(src.columns(), src.chunk_size(), plan, w);
    let specs: Vec<ChunkSpec> = keys
        .iter()
        .map(|&(s, c, j)| src.chunk(s as usize, c as usize, j))
        .collect();
    let lay = window_layout(src.columns(), src.chunk_size(), &keys, &specs, packing);
    match packing {
        Packing::Aligned { piece_cap } if lay.pieces.len() > 1 => {
            for p in &lay.pieces {
                assert!(p.range.len() as u64 <= piece_cap, "window {w}: {p:?}");
                assert!(p.range.start.is_multiple_of(16) && p.range.len().is_multiple_of(16));
            }
            assert!(bound as u64 > piece_cap, "split although the window fits");
        }
        _ => assert!(
            lay.staging_len <= bound,
            "window {w}: {} > bound {bound}",
            lay.staging_len
        ),
    }
    let plain: Vec<Vec<u8>> = keys
        .iter()
        .zip(&specs)
        .map(|(k, spec)| {
            let mut chunk = vec![0u8; spec.len];
            src.store()
                .read_at(k.0 as usize, spec.file_offset, &mut chunk)
                .unwrap();
            let params = ChunkParams {
                nonce: spec.nonce,
                aad: &spec.aad,
                tag: spec.tag,
                encrypted: spec.encrypted,
            };
            let opener = src.opener(k.0 as usize);
            if spec.encrypted {
                opener.open_in_place(&params, &mut chunk).unwrap();
            } else {
                opener.verify(&params, &chunk).unwrap();
            }
            chunk
        })
        .collect();
    let mut homes = 0;
    let bufs = lay
        .pieces
        .iter()
        .map(|p| {
            let mut buf = vec![0u8; p.range.len()];
            for part in &p.parts {
                let o = part.at - p.range.start;
                buf[o..o + part.len].copy_from_slice(&plain[part.chunk][..part.len]);
                if part.len == specs[part.chunk].len && lay.dst_offs[part.chunk] == part.at as u64 {
                    homes += 1;
                }
            }
            buf
        })
        .collect();
    assert_eq!(homes, keys.len(), "every chunk has one home");
    (bufs, lay.offsets)
}

/// The reader's window order is exactly what the gather loop asks for, batch by batch,
/// including the last rank's padding that wraps to the epoch's first window.
#[test]
fn reader_load_order_matches_the_gather_loop() {
    let shard_rows = [1000u64, 37, 512, 999];
    for (batch, w_blocks, world, rank, block_rows, drop_last, first) in [
        (64u64, 4u64, 1u64, 0u64, 50u64, false, 0u64),
        (100, 1, 3, 2, 64, false, 0),
        (7, 2, 2, 1, 13, false, 5),
        (1000, 3, 4, 3, 100, false, 0),
        (33, 8, 3, 0, 10, true, 2),
        (2548, 2, 1, 0, 128, false, 0),
    ] {
        let cfg = SamplerConfig {
            seed: batch ^ rank,
            shuffle: true,
            block_rows,
            window_blocks: w_blocks,
            rank,
            world_size: world,
            batch_size: batch,
            drop_last,
        };
        for epoch in 0..2 {
            let plan = EpochPlan::new(&cfg, epoch, &shard_rows);
            let mut cur = Cursor::new(&plan);
            let (mut resident, mut asked) = (Vec::<usize>::new(), Vec::new());
            for k in first.min(plan.batches())..plan.batches() {
                let (a, b) = plan.batch_positions(k);
                let mut needed: Vec<usize> = (a..b).map(|p| cur.row_at(p).1).collect();
                needed.sort_unstable();
                needed.dedup();
                assert_eq!(batch_windows(&plan, k), needed, "batch {k} of {cfg:?}");
                resident.retain(|w| needed.contains(w));
                for &w in &needed {
                    if !resident.contains(&w) {
                        resident.push(w);
                        asked.push(w);
                    }
                }
            }
            assert_eq!(load_order(&plan, first), asked, "{cfg:?} epoch {epoch}");
        }
    }
}

/// Host-side cost of the device path's planning, per batch, at `ciphershard bench`'s
/// geometry (262,144 rows of 1024 + 8 bytes, 2 MiB chunks, batch 1024, W = 8): the planner
/// thread's row walk and offsets (`plan_batch`), the reader's window order and layouts. Run with
/// `cargo test --release --lib window_plan::tests::host_side_costs -- --ignored --nocapture`.
#[test]
#[ignore = "timing probe, run by hand in release"]
fn host_side_costs_per_batch() {
    let dir = tempfile::tempdir().unwrap();
    let key = crate::bench::loader::generate(dir.path(), 262_144, 256, 2 << 20).unwrap();
    let src = FormatSource::open(dir.path(), &key, Backend::Cpu).unwrap();
    let shard_rows: Vec<u64> = (0..src.shard_count()).map(|s| src.shard_rows(s)).collect();
    let widest = src.columns().iter().map(|c| c.row_bytes).max().unwrap();
    let cfg = SamplerConfig {
        seed: 1,
        shuffle: true,
        block_rows: src.chunk_size() / widest,
        window_blocks: 8,
        rank: 0,
        world_size: 1,
        batch_size: 1024,
        drop_last: false,
    };
    let epochs = 3;
    let t = Instant::now();
    let mut windows = 0;
    for epoch in 0..epochs {
        let plan = EpochPlan::new(&cfg, epoch, &shard_rows);
        for w in load_order(&plan, 0) {
            let keys = window_keys(src.columns(), src.chunk_size(), &plan, w);
            let specs: Vec<ChunkSpec> = keys
                .iter()
                .map(|&(s, c, j)| src.chunk(s as usize, c as usize, j))
                .collect();
            std::hint::black_box(window_layout(
                src.columns(),
                src.chunk_size(),
                &keys,
                &specs,
                Packing::Packed,
            ));
            windows += 1;
        }
    }
    let reader = t.elapsed();
    let t = Instant::now();
    let mut batches = 0u64;
    for epoch in 0..epochs {
        let plan = EpochPlan::new(&cfg, epoch, &shard_rows);
        let mut cur = Cursor::new(&plan);
        let mut layouts = Vec::new();
        for k in 0..plan.batches() {
            let bp = plan_batch(
                &src,
                &plan,
                &mut cur,
                &mut layouts,
                epoch,
                k,
                Packing::Packed,
            )
            .unwrap();
            std::hint::black_box(&bp.pairs);
            batches += 1;
        }
    }
    let gather = t.elapsed();
    eprintln!(
        "reader planning: {windows} windows in {:.2} ms ({:.1} us/window); planner thread: \
         {batches} batches in {:.2} ms ({:.1} us/batch)",
        reader.as_secs_f64() * 1e3,
        reader.as_secs_f64() * 1e6 / windows as f64,
        gather.as_secs_f64() * 1e3,
        gather.as_secs_f64() * 1e6 / batches as f64
    );
}

/// Every batch of `o` rebuilt from windows laid out with each of `packings` (opened on the
/// host, one buffer per piece) and the planner's offsets equals the host loader's batch.
/// Returns how many windows were split into pieces.
fn rebuild_host_batches(src: &Arc<FormatSource>, o: &LoaderOptions, packings: &[Packing]) -> usize {
    let host: Vec<_> = Loader::new(src.clone(), o)
        .unwrap()
        .map(|b| b.unwrap())
        .collect();
    let shard_rows: Vec<u64> = (0..src.shard_count()).map(|s| src.shard_rows(s)).collect();
    let widest = src.columns().iter().map(|c| c.row_bytes).max().unwrap();
    let block_rows = o.block_rows.unwrap_or((src.chunk_size() / widest).max(1));
    let bound = window_byte_bound(
        src.columns(),
        src.chunk_size(),
        block_rows,
        o.window_blocks,
        &shard_rows,
    ) as usize;
    let cfg = SamplerConfig {
        seed: o.seed,
        shuffle: o.shuffle,
        block_rows,
        window_blocks: o.window_blocks,
        rank: o.rank,
        world_size: o.world_size,
        batch_size: o.batch_size as u64,
        drop_last: o.drop_last,
    };
    let mut split = 0;
    for &packing in packings {
        let mut hi = host.iter();
        for epoch in 0..o.epochs {
            let plan = EpochPlan::new(&cfg, epoch, &shard_rows);
            let mut cur = Cursor::new(&plan);
            let mut layouts = Vec::new();
            let mut windows: HashMap<usize, Vec<Vec<u8>>> = HashMap::new();
            for k in 0..plan.batches() {
                // What the planner thread sends the gather thread.
                let bp = plan_batch(src, &plan, &mut cur, &mut layouts, epoch, k, packing).unwrap();
                let h = hi.next().expect("as many batches as the host loader");
                assert_eq!((bp.epoch, bp.index), (h.epoch(), h.index()));
                assert_eq!(bp.row_ids, h.row_ids(), "{o:?}");
                for &w in &bp.needed {
                    windows.entry(w).or_insert_with(|| {
                        let (bufs, offsets) = host_window(src, &plan, w, bound, packing);
                        // The reader's layout is the one the planner assumes.
                        assert_eq!(offsets, window_offsets(src, &plan, w, packing));
                        split += usize::from(bufs.len() > 1);
                        bufs
                    });
                }
                let mut got: Vec<Vec<u8>> = src
                    .columns()
                    .iter()
                    .map(|col| vec![0u8; bp.row_ids.len() * col.row_bytes as usize])
                    .collect();
                let mut covered = vec![0usize; src.columns().len()];
                for (c, w, piece, range) in &bp.jobs {
                    let buf = &windows[w][*piece];
                    let n = src.columns()[*c].row_bytes as usize;
                    for &(s, d) in &bp.pairs[range.clone()] {
                        let (s, d) = (s as usize, d as usize);
                        got[*c][d..d + n].copy_from_slice(&buf[s..s + n]);
                    }
                    covered[*c] += range.len();
                }
                for (c, col) in src.columns().iter().enumerate() {
                    assert_eq!(covered[c], bp.row_ids.len(), "every row gathered once");
                    assert_eq!(
                        got[c],
                        h.tensors().nth(c).unwrap().bytes,
                        "column {} {o:?} {packing:?}",
                        col.name
                    );
                }
            }
        }
        assert!(hi.next().is_none());
    }
    split
}

#[test]
fn window_layout_and_gather_offsets_rebuild_the_host_batches() {
    let dir = tempfile::tempdir().unwrap();
    let key = dataset(dir.path(), 700);
    let src = FormatSource::open(dir.path(), &key, Backend::Cpu).unwrap();
    assert!(src.shard_count() > 2);
    let shard_rows: Vec<u64> = (0..src.shard_count()).map(|s| src.shard_rows(s)).collect();
    let unit = piece_unit_bound(src.columns(), src.chunk_size(), &shard_rows);
    let packings = [
        Packing::Packed,
        Packing::Aligned {
            piece_cap: u64::MAX,
        },
        Packing::Aligned { piece_cap: unit },
        Packing::Aligned { piece_cap: 1000 },
        Packing::Aligned {
            piece_cap: 3 * unit,
        },
    ];
    for (seed, batch, w_blocks, world, rank, block_rows) in [
        (1u64, 32usize, 8u64, 1u64, 0u64, None),
        (2, 50, 3, 2, 1, None),
        (3, 300, 1, 1, 0, Some(7)),
        (4, 17, 2, 3, 2, Some(100)),
    ] {
        let o = LoaderOptions {
            batch_size: batch,
            seed,
            window_blocks: w_blocks,
            world_size: world,
            rank,
            block_rows,
            epochs: 2,
            ..Default::default()
        };
        let split = rebuild_host_batches(&src, &o, &packings);
        assert!(split > 0, "the small caps split windows ({o:?})");
    }
}

/// Random geometries (row sizes from 1 byte to several chunks, chunk and shard sizes, options,
/// piece caps from the smallest usable up): every batch rebuilt from split windows equals
/// the host loader's.
#[test]
fn random_geometries_rebuild_the_host_batches() {
    let mut rng = crate::cipher::conformance::SplitMix(0x9EC5);
    let row_sizes = [1u64, 3, 4, 5, 7, 12, 33, 64, 100, 130, 200, 300, 517];
    let mut split = 0;
    for case in 0..24 {
        let dir = tempfile::tempdir().unwrap();
        let key = MasterKey::generate().unwrap();
        let rows = 40 + rng.below(360);
        let inputs: Vec<ConvertInput> = (0..1 + rng.below(3))
            .map(|c| {
                let rb = row_sizes[rng.below(row_sizes.len() as u64) as usize];
                let mut data = vec![0u8; (rows * rb) as usize];
                rng.fill(&mut data);
                ConvertInput::InMemory {
                    name: format!("c{c}"),
                    dtype: Dtype::U8,
                    shape: vec![rows, rb],
                    data,
                }
            })
            .collect();
        let plain = if rng.below(3) == 0 {
            vec!["c0".into()]
        } else {
            Vec::new()
        };
        let copts = ConvertOptions {
            keys: vec![key.clone()],
            chunk_size: 64 * (1 + rng.below(8)),
            shard_size: Some(2000 + rng.below(30_000)),
            plain,
            ..Default::default()
        };
        convert(&inputs, dir.path(), &copts, &mut |_, _| {}).unwrap();
        let src = FormatSource::open(dir.path(), &key, Backend::Cpu).unwrap();
        let world = 1 + rng.below(3);
        let o = LoaderOptions {
            batch_size: 1 + rng.below(150) as usize,
            seed: case,
            window_blocks: 1 + rng.below(12),
            block_rows: (rng.below(2) == 0).then(|| 1 + rng.below(60)),
            shuffle: rng.below(4) != 0,
            world_size: world,
            rank: rng.below(world),
            drop_last: rng.below(3) == 0,
            epochs: 1 + rng.below(2),
            ..Default::default()
        };
        let shard_rows: Vec<u64> = (0..src.shard_count()).map(|s| src.shard_rows(s)).collect();
        let unit = piece_unit_bound(src.columns(), src.chunk_size(), &shard_rows);
        let packings = [
            Packing::Aligned { piece_cap: unit },
            Packing::Aligned {
                piece_cap: unit + 16 * rng.below(unit / 8 + 1),
            },
            Packing::Aligned {
                piece_cap: 2 * unit,
            },
        ];
        split += rebuild_host_batches(&src, &o, &packings);
    }
    assert!(split > 24, "windows were split ({split})");
}

/// A `u8` column of `row_bytes`-byte rows.
fn col(row_bytes: u64) -> ColumnInfo {
    ColumnInfo {
        name: "c".into(),
        dtype: "U8".into(),
        elem_size: 1,
        row_shape: vec![row_bytes],
        row_bytes,
        ragged: false,
    }
}

#[test]
fn piece_unit_bound_covers_a_chunk_and_its_overhang() {
    let rows = [1000, 20];
    // 128-byte chunks: + the 11 bytes a 12-byte row can overhang (padded), in at most 2 parts.
    assert_eq!(
        piece_unit_bound(&[col(12), col(5)], 128, &rows),
        128 + 16 + 2 * 16
    );
    // A 200-byte row overhangs up to 199 bytes over up to 3 chunks.
    assert_eq!(
        piece_unit_bound(&[col(5), col(200)], 128, &rows),
        128 + 208 + 3 * 16
    );
    // 256 MiB chunks over a small dataset: its chunks are as long as its tensors.
    assert_eq!(
        piece_unit_bound(&[col(12)], 256 << 20, &rows),
        12_000 + 16 + 2 * 16
    );
    // Absurd rows saturate instead of wrapping (open then refuses them).
    assert_eq!(
        piece_unit_bound(&[col(u64::MAX - 3)], 128, &[u64::MAX]),
        u64::MAX
    );
}

#[test]
fn window_bound_follows_the_data_not_the_chunk_size() {
    let cols = [col(12), col(5)];
    // 256 MiB chunks over 2 × 100 rows: the bound is the data (padded), not 256 MiB.
    let b = window_byte_bound(&cols, 256 << 20, 1000, 8, &[100, 100]);
    assert_eq!(b, 2 * 1200 + 2 * 500u64.next_multiple_of(16));
    // Absurd windows saturate instead of wrapping, and are still capped by the data.
    assert_eq!(
        window_byte_bound(&cols, 64, 1 << 40, u64::MAX, &[100, 100]),
        b
    );
    assert_eq!(
        window_byte_bound(&[col(u64::MAX / 2)], 64, 3, u64::MAX, &[u64::MAX]),
        u64::MAX
    );
    // Small windows over big data: W blocks' chunks, as before.
    let w = window_byte_bound(&[col(1024)], 2 << 20, 2048, 8, &[1 << 20]);
    assert_eq!(w, 8 * (2 << 20));
}
