//! The sampling plan: which rows form which batch, as a pure function of
//! (seed, epoch, rank, world size, layout). Worker threads only execute it, so the order never
//! depends on the number of threads or on timing.
//!
//! Per epoch: all chunk-aligned row blocks of all shards are permuted (one Fisher–Yates over
//! the global block list, so shards and blocks are both shuffled), cut into windows of
//! `window_blocks` consecutive blocks, and the rows of each window are shuffled among
//! themselves. The concatenation is the epoch's global order. Rank `r` of `w` takes the
//! contiguous slice `[r·per, (r+1)·per)` of it (contiguous, not strided, so that each rank reads
//! mostly its own windows and read amplification stays near 1), where `per` is
//! `floor(N / w)` with `drop_last` or `ceil(N / w)` without it (positions past `N` wrap
//! to the start, padding by repetition as torch's `DistributedSampler` does).

#![forbid(unsafe_code)]

use crate::cipher::conformance::SplitMix;

/// One row: shard index and row within the shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RowRef {
    /// Shard index.
    pub shard: u32,
    /// Row within the shard.
    pub row: u64,
}

/// The sampler's configuration (everything the order depends on).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SamplerConfig {
    /// Seed of every permutation.
    pub seed: u64,
    /// Shuffle (`false`: the dataset's order; windows still bound the chunks held).
    pub shuffle: bool,
    /// Rows per block (chunk-aligned on the largest column).
    pub block_rows: u64,
    /// Blocks per shuffle window.
    pub window_blocks: u64,
    /// Rank of this process.
    pub rank: u64,
    /// Number of processes.
    pub world_size: u64,
    /// Rows per batch.
    pub batch_size: u64,
    /// `true`: drop the tail so every rank gets `floor(N / world)` rows, and drop the last
    /// incomplete batch. `false`: pad by repeating rows from the start of the epoch order so
    /// every rank gets `ceil(N / world)` rows, and yield the last batch short.
    pub drop_last: bool,
}

/// Mixes the seed with an epoch and a stream id into an independent generator.
fn stream(seed: u64, epoch: u64, id: u64) -> SplitMix {
    let mut m = SplitMix(seed ^ 0x6C6F_6164_6572_2D76);
    let a = m.next_u64();
    let mut m = SplitMix(a ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let b = m.next_u64();
    SplitMix(b ^ id.wrapping_mul(0xD1B5_4A32_D192_ED03))
}

/// Unbiased uniform integer in `0..n` (Lemire's method would be faster; rejection is simple).
fn below(rng: &mut SplitMix, n: u64) -> u64 {
    let zone = u64::MAX - (u64::MAX % n);
    loop {
        let v = rng.next_u64();
        if v < zone {
            return v % n;
        }
    }
}

fn shuffle<T>(rng: &mut SplitMix, v: &mut [T]) {
    for i in (1..v.len()).rev() {
        let j = below(rng, i as u64 + 1) as usize;
        v.swap(i, j);
    }
}

/// The order of one epoch: block permutation and window boundaries. Rows of a window are
/// generated on demand, so memory is O(blocks), not O(rows).
#[derive(Debug, Clone)]
pub struct EpochPlan {
    cfg: SamplerConfig,
    epoch: u64,
    /// (shard, first row, rows) of every block, in epoch order.
    blocks: Vec<(u32, u64, u64)>,
    /// `window_start[k]` = position of window k's first row; last entry = N.
    window_start: Vec<u64>,
    total: u64,
}

impl EpochPlan {
    /// Builds the plan of `epoch` for shards of the given row counts.
    pub fn new(cfg: &SamplerConfig, epoch: u64, shard_rows: &[u64]) -> Self {
        let br = cfg.block_rows.max(1);
        let mut blocks = Vec::new();
        for (s, &rows) in shard_rows.iter().enumerate() {
            let mut r = 0;
            while r < rows {
                let n = br.min(rows - r);
                blocks.push((s as u32, r, n));
                r += n;
            }
        }
        if cfg.shuffle {
            shuffle(&mut stream(cfg.seed, epoch, u64::MAX), &mut blocks);
        }
        // Windows exist without shuffling too: they bound the chunks held in memory.
        let wb = cfg.window_blocks.max(1) as usize;
        let mut window_start = vec![0u64];
        let mut pos = 0;
        for w in blocks.chunks(wb) {
            pos += w.iter().map(|b| b.2).sum::<u64>();
            window_start.push(pos);
        }
        EpochPlan {
            cfg: cfg.clone(),
            epoch,
            blocks,
            window_start,
            total: pos,
        }
    }

    /// Rows in the whole epoch (all ranks).
    pub fn total_rows(&self) -> u64 {
        self.total
    }

    /// Number of windows.
    pub fn windows(&self) -> usize {
        self.window_start.len() - 1
    }

    /// Rows assigned to this rank.
    pub fn rank_rows(&self) -> u64 {
        let (n, w) = (self.total, self.cfg.world_size.max(1));
        if self.cfg.drop_last {
            n / w
        } else {
            n.div_ceil(w)
        }
    }

    /// Batches this rank yields in the epoch.
    pub fn batches(&self) -> u64 {
        let (r, b) = (self.rank_rows(), self.cfg.batch_size.max(1));
        if self.cfg.drop_last {
            r / b
        } else {
            r.div_ceil(b)
        }
    }

    /// Global epoch positions `[start, end)` (before wrapping) of batch `k` of this rank.
    pub fn batch_positions(&self, k: u64) -> (u64, u64) {
        let base = self.cfg.rank * self.rank_rows();
        let b = self.cfg.batch_size.max(1);
        let start = base + k * b;
        let end = start.saturating_add(b).min(base + self.rank_rows());
        (start, end)
    }

    /// The window holding epoch position `p` (already wrapped into `0..N`).
    pub fn window_of(&self, p: u64) -> usize {
        self.window_start.partition_point(|&s| s <= p) - 1
    }

    /// The blocks of window `k`: (shard, first row, rows).
    pub fn window_blocks(&self, k: usize) -> &[(u32, u64, u64)] {
        let wb = self.cfg.window_blocks.max(1) as usize;
        let lo = k * wb;
        &self.blocks[lo..(lo + wb).min(self.blocks.len())]
    }

    /// The rows of window `k`, shuffled within the window.
    pub fn window_rows(&self, k: usize) -> Vec<RowRef> {
        let mut rows: Vec<RowRef> = self
            .window_blocks(k)
            .iter()
            .flat_map(|&(s, r0, n)| (r0..r0 + n).map(move |row| RowRef { shard: s, row }))
            .collect();
        if self.cfg.shuffle {
            shuffle(&mut stream(self.cfg.seed, self.epoch, k as u64), &mut rows);
        }
        rows
    }

    /// Start position of window `k`.
    pub fn window_start(&self, k: usize) -> u64 {
        self.window_start[k]
    }
}

/// Walks an epoch's positions in order, keeping the current window's rows.
pub struct Cursor<'a> {
    plan: &'a EpochPlan,
    window: usize,
    rows: Vec<RowRef>,
}

impl<'a> Cursor<'a> {
    /// A cursor over `plan`.
    pub fn new(plan: &'a EpochPlan) -> Self {
        Cursor {
            plan,
            window: usize::MAX,
            rows: Vec::new(),
        }
    }

    /// The row at epoch position `p` (wrapped modulo N for padding) and its window index.
    pub fn row_at(&mut self, p: u64) -> (RowRef, usize) {
        let p = p % self.plan.total.max(1);
        let w = self.plan.window_of(p);
        if w != self.window {
            self.rows = self.plan.window_rows(w);
            self.window = w;
        }
        (self.rows[(p - self.plan.window_start(w)) as usize], w)
    }
}

/// The rows of every batch of one rank in one epoch (a convenience for tests and tools; the
/// loader walks the same plan lazily).
pub fn epoch_batches(cfg: &SamplerConfig, epoch: u64, shard_rows: &[u64]) -> Vec<Vec<RowRef>> {
    let plan = EpochPlan::new(cfg, epoch, shard_rows);
    let mut cur = Cursor::new(&plan);
    (0..plan.batches())
        .map(|k| {
            let (a, b) = plan.batch_positions(k);
            (a..b).map(|p| cur.row_at(p).0).collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(world: u64, rank: u64, drop_last: bool) -> SamplerConfig {
        SamplerConfig {
            seed: 7,
            shuffle: true,
            block_rows: 5,
            window_blocks: 3,
            rank,
            world_size: world,
            batch_size: 4,
            drop_last,
        }
    }

    #[test]
    fn one_rank_is_a_permutation_and_changes_per_epoch() {
        let shards = [23u64, 17, 0, 9];
        let all = |e| -> Vec<RowRef> { epoch_batches(&cfg(1, 0, false), e, &shards).concat() };
        let (a, b) = (all(0), all(1));
        assert_eq!(a.len(), 49);
        let mut s = a.clone();
        s.sort();
        s.dedup();
        assert_eq!(s.len(), 49);
        assert_ne!(a, b);
        assert_eq!(a, all(0));
    }

    #[test]
    fn ranks_are_disjoint_and_cover() {
        let shards = [23u64, 17, 9];
        for drop_last in [false, true] {
            let mut seen = Vec::new();
            for r in 0..4 {
                seen.extend(epoch_batches(&cfg(4, r, drop_last), 3, &shards).concat());
            }
            let mut uniq = seen.clone();
            uniq.sort();
            uniq.dedup();
            if drop_last {
                // 49 rows / 4 ranks: 12 each, batches of 4 -> 48 rows, all distinct.
                assert_eq!(seen.len(), 48);
                assert_eq!(uniq.len(), 48);
            } else {
                // 13 each = 52 positions, 3 repeated, every row present.
                assert_eq!(seen.len(), 52);
                assert_eq!(uniq.len(), 49);
            }
        }
    }

    #[test]
    fn window_bounds_the_shuffle() {
        // A row's position lies inside its block's window: no row moves across windows.
        let c = cfg(1, 0, false);
        let plan = EpochPlan::new(&c, 0, &[100]);
        let mut cur = Cursor::new(&plan);
        for p in 0..plan.total_rows() {
            let (row, w) = cur.row_at(p);
            assert!(
                plan.window_blocks(w)
                    .iter()
                    .any(|&(_, r0, n)| row.row >= r0 && row.row < r0 + n)
            );
        }
    }
}
