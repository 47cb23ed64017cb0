//! What both loaders (host and device) share: their options, their position (state), and the
//! setup every loader derives from a source and options before it starts.

#![forbid(unsafe_code)]

use std::sync::Arc;

use crossbeam_channel::Receiver;

use super::budget::BudgetPlan;
use super::pool::PinHook;
use super::sampler::{EpochPlan, SamplerConfig};
use super::source::{ColumnInfo, RowSource};
use crate::error::{Error, Result};

/// How chunk bytes become batch bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum DecryptMode {
    /// Verify the whole chunk's tag on the private ciphertext copy, then AES-CTR-decrypt only
    /// the rows each batch needs straight into the batch buffer (no plaintext intermediate).
    RowCtr,
    /// Open (verify + decrypt, one fused GCM pass) the whole private copy in place, then copy
    /// rows into the batch. Plaintext sits in a private pooled buffer (zeroized on release).
    #[default]
    ChunkOpen,
}

/// How to build a loader.
#[derive(Clone)]
pub struct LoaderOptions {
    /// Rows per batch.
    pub batch_size: usize,
    /// Seed of the shuffle.
    pub seed: u64,
    /// Shuffle blocks and rows (`false`: dataset order).
    pub shuffle: bool,
    /// Epochs to run (the iterator ends after epoch `epochs - 1`).
    pub epochs: u64,
    /// This process's rank.
    pub rank: u64,
    /// Number of processes.
    pub world_size: u64,
    /// See [`SamplerConfig::drop_last`].
    pub drop_last: bool,
    /// Batches in flight ahead of the consumer (bounds memory: about `prefetch × batch bytes`).
    pub prefetch: usize,
    /// Worker threads.
    pub threads: usize,
    /// Blocks per shuffle window: larger shuffles better and holds more chunks in memory.
    pub window_blocks: u64,
    /// Rows per block; `None`: the rows of one chunk of the widest column.
    pub block_rows: Option<u64>,
    /// Decryption strategy.
    pub mode: DecryptMode,
    /// Epoch to start at (resumption).
    pub start_epoch: u64,
    /// Batches of `start_epoch` already consumed (resumption).
    pub start_batch: u64,
    /// Called for every host buffer allocated/freed (page-locking hook for GPU transfers).
    pub pin_hook: Option<Arc<dyn PinHook>>,
    /// Sequence packing: batches of `batch_size` sequences of `seq_len` tokens cut from a
    /// ragged column's rows laid end to end (see [`PackOptions`]); `None`: batches of rows.
    pub pack: Option<PackOptions>,
    /// Token-budget batching: batches of at most `batch_size` rows cut by the tokens of a
    /// ragged column (see [`TokenBudget`]); `None`: batches of `batch_size` rows.
    pub budget: Option<TokenBudget>,
    /// Host loader: shuffle windows whose chunks are read ahead of the workers (ciphertext into
    /// pooled buffers, by the I/O threads) while the current window is decrypted, so the storage
    /// has reads outstanding whatever the decrypt threads do; each costs one window of chunk
    /// buffers. `None` (the default): the store's depth ([`crate::store::ReadDepth`]: 1 for
    /// local files, 8 for an object store). `Some(0)`: the workers read every chunk themselves,
    /// when a batch first needs it.
    pub readahead_windows: Option<u64>,
    /// Host loader: threads reading ahead (`readahead_windows`); each reads one shard's ranges
    /// of a window at a time (an object store's coalesced GETs, or local `pread`s after a
    /// `WILLNEED` hint for them all), so this bounds the shards read at once. `None` (the
    /// default): the store's ([`crate::store::ReadDepth`]: 4 for local files, 16 for an object
    /// store); at least 1.
    pub io_threads: Option<usize>,
}

/// Token-budget batching (docs/LOADER.md, "Token budgets"): each batch takes the epoch's next
/// rows, in the shuffled order, while they hold at most `max_tokens` elements of `column` (and
/// at most `batch_size` rows), so batches of short rows hold many and batches of long rows few.
/// The epoch's cut is computed once from every row's length and split among ranks by batches:
/// rank `r` of `W` takes batches `[r·q, (r+1)·q)` of the epoch's `n`, `q = floor(n / W)`, so
/// every rank has the same number of batches (which varies from epoch to epoch with the order);
/// the last `n mod W` batches (fewer than `W`) are not delivered that epoch. A row longer than
/// `max_tokens` is refused when the loader is built.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TokenBudget {
    /// The ragged column whose elements are counted.
    pub column: String,
    /// Most elements of `column` per batch.
    pub max_tokens: u64,
}

/// Sequence packing, as language-model training uses it (docs/LOADER.md, "Packing"): the
/// epoch's rows of a ragged column, in the shuffled order, are laid end to end as one stream of
/// tokens, and each batch is the next `batch_size × seq_len` of them as `[batch_size, seq_len]`,
/// with `cu_seqlens` (`I32`, the boundaries of every sequence piece in the flattened batch) and
/// `position_ids` (`I64`, each piece counting from 0). A row longer than the room left in a
/// sequence continues at the start of the next one as a new piece. Rank `r` of `W` takes tokens
/// `[r·T/W, (r+1)·T/W)` of the epoch's `T` tokens, so every rank has the same number of
/// batches; the tokens after a rank's last full batch are not delivered that epoch.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PackOptions {
    /// The ragged column whose rows are packed.
    pub column: String,
    /// Tokens per sequence.
    pub seq_len: u64,
}

impl Default for LoaderOptions {
    fn default() -> Self {
        LoaderOptions {
            batch_size: 256,
            seed: 0,
            shuffle: true,
            epochs: 1,
            rank: 0,
            world_size: 1,
            drop_last: false,
            prefetch: 4,
            threads: 2,
            window_blocks: 8,
            block_rows: None,
            mode: DecryptMode::default(),
            start_epoch: 0,
            start_batch: 0,
            pin_hook: None,
            pack: None,
            budget: None,
            readahead_windows: None,
            io_threads: None,
        }
    }
}

impl std::fmt::Debug for LoaderOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoaderOptions")
            .field("batch_size", &self.batch_size)
            .field("seed", &self.seed)
            .field("shuffle", &self.shuffle)
            .field("epochs", &self.epochs)
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .field("drop_last", &self.drop_last)
            .field("prefetch", &self.prefetch)
            .field("threads", &self.threads)
            .field("window_blocks", &self.window_blocks)
            .field("block_rows", &self.block_rows)
            .field("mode", &self.mode)
            .field("start_epoch", &self.start_epoch)
            .field("start_batch", &self.start_batch)
            .field("pack", &self.pack)
            .field("budget", &self.budget)
            .field("readahead_windows", &self.readahead_windows)
            .field("io_threads", &self.io_threads)
            .finish_non_exhaustive()
    }
}

/// Where a loader stands: everything the order depends on plus the position. Serializable;
/// [`LoaderOptions::resume`] continues exactly after the last batch handed out.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LoaderState {
    /// Shuffle seed.
    pub seed: u64,
    /// Current epoch.
    pub epoch: u64,
    /// Batches of `epoch` already handed out.
    pub batches_done_in_epoch: u64,
    /// Rank.
    pub rank: u64,
    /// World size.
    pub world_size: u64,
    /// Rows per batch.
    pub batch_size: u64,
    /// Shuffle on.
    pub shuffle: bool,
    /// drop_last.
    pub drop_last: bool,
    /// Blocks per window.
    pub window_blocks: u64,
    /// Rows per block.
    pub block_rows: u64,
    /// Rows in the dataset (checked on resume).
    pub total_rows: u64,
    /// Sequence packing, if the loader packs.
    #[serde(default)]
    pub pack: Option<PackOptions>,
    /// Token-budget batching, if the loader cuts batches by tokens.
    #[serde(default)]
    pub budget: Option<TokenBudget>,
}

impl LoaderState {
    /// The position a loader built with `opts` starts at.
    pub(crate) fn start(opts: &LoaderOptions, block_rows: u64, total_rows: u64) -> Self {
        LoaderState {
            seed: opts.seed,
            epoch: opts.start_epoch,
            batches_done_in_epoch: opts.start_batch,
            rank: opts.rank,
            world_size: opts.world_size,
            batch_size: opts.batch_size as u64,
            shuffle: opts.shuffle,
            drop_last: opts.drop_last,
            window_blocks: opts.window_blocks,
            block_rows,
            total_rows,
            pack: opts.pack.clone(),
            budget: opts.budget.clone(),
        }
    }

    /// Where a loader built with `opts` over `source` starts (resumed options included) and its
    /// batches per epoch, found without allocating buffers or starting threads: what a caller
    /// that only asks for a length or a position needs.
    pub fn planned(source: &dyn RowSource, opts: &LoaderOptions) -> Result<(Self, u64)> {
        let plan = PlanSetup::new(source, opts)?;
        let mut state = LoaderState::start(opts, plan.block_rows, plan.total_rows);
        state.normalize(plan.batches_per_epoch);
        let batches = plan.epoch_batches(source, state.epoch);
        Ok((state, batches))
    }

    /// The order-defining fields on which this state and `opts` disagree, as
    /// `"name (state X, options Y)"`; `block_rows` only when `opts` sets it. Resuming applies the
    /// state's values, so a caller that wants its own options honoured refuses a non-empty list.
    pub fn mismatches(&self, opts: &LoaderOptions) -> Vec<String> {
        let mut out = Vec::new();
        let mut check =
            |name: &str, state: &dyn std::fmt::Display, given: &dyn std::fmt::Display| {
                let (state, given) = (state.to_string(), given.to_string());
                if state != given {
                    out.push(format!("{name} (state {state}, options {given})"));
                }
            };
        check("batch_size", &self.batch_size, &opts.batch_size);
        check("seed", &self.seed, &opts.seed);
        check("shuffle", &self.shuffle, &opts.shuffle);
        check("drop_last", &self.drop_last, &opts.drop_last);
        check("rank", &self.rank, &opts.rank);
        check("world_size", &self.world_size, &opts.world_size);
        check("window_blocks", &self.window_blocks, &opts.window_blocks);
        if let Some(rows) = opts.block_rows {
            check("block_rows", &self.block_rows, &rows);
        }
        let packing = |p: &Option<PackOptions>| match p {
            Some(p) => format!("{}:{}", p.column, p.seq_len),
            None => "off".into(),
        };
        check("pack", &packing(&self.pack), &packing(&opts.pack));
        let budgeting = |b: &Option<TokenBudget>| match b {
            Some(b) => format!("{}:{}", b.column, b.max_tokens),
            None => "off".into(),
        };
        check("budget", &budgeting(&self.budget), &budgeting(&opts.budget));
        out
    }

    /// A position at the end of an epoch is the start of the next one.
    pub(crate) fn normalize(&mut self, batches_per_epoch: u64) {
        if batches_per_epoch > 0 && self.batches_done_in_epoch >= batches_per_epoch {
            self.epoch += 1;
            self.batches_done_in_epoch = 0;
        }
    }
}

impl LoaderOptions {
    /// Options that continue from `state` (keeping this value's threads, prefetch, mode,
    /// epochs and hook; the order-defining fields come from the state).
    pub fn resume(mut self, state: &LoaderState) -> Self {
        self.seed = state.seed;
        self.start_epoch = state.epoch;
        self.start_batch = state.batches_done_in_epoch;
        self.rank = state.rank;
        self.world_size = state.world_size;
        self.batch_size = state.batch_size as usize;
        self.shuffle = state.shuffle;
        self.drop_last = state.drop_last;
        self.window_blocks = state.window_blocks;
        self.block_rows = Some(state.block_rows);
        self.pack = state.pack.clone();
        self.budget = state.budget.clone();
        self
    }
}

/// Most batches a loader may hold in flight (`prefetch`).
pub const MAX_PREFETCH: usize = 4096;
/// Most worker threads a loader may start.
pub const MAX_THREADS: usize = 1024;
/// Most windows the host loader reads ahead (each holds a window of chunk buffers).
pub const MAX_READAHEAD_WINDOWS: u64 = 64;

/// What the host and the device loaders both derive from a source and options before they start:
/// the plan's configuration and size, and every shard opened once and checked against the length
/// its authenticated header gives.
pub(crate) struct PlanSetup {
    pub(crate) columns: Arc<[ColumnInfo]>,
    pub(crate) chunk_size: u64,
    pub(crate) block_rows: u64,
    pub(crate) shard_rows: Vec<u64>,
    pub(crate) total_rows: u64,
    pub(crate) cfg: SamplerConfig,
    pub(crate) batches_per_epoch: u64,
    /// Batches left to deliver from the start position.
    pub(crate) total: u64,
    /// Most rows one batch can hold: `batch_size`, but never more than the dataset has (so an
    /// absurd batch size sizes no buffer beyond the data).
    pub(crate) batch_rows: usize,
    /// Per column: its rows' bytes, or for a ragged column their mean (at least 1): what
    /// blocks, windows and chunk buffers are sized by.
    pub(crate) mean_row_bytes: Vec<u64>,
    /// Sequence packing, checked and sized.
    pub(crate) pack: Option<PackPlan>,
    /// Token-budget batching, checked (`batches_per_epoch` is then the start epoch's count).
    pub(crate) budget: Option<Arc<BudgetPlan>>,
}

/// [`PackOptions`] checked against a source: the column, and this rank's share of tokens.
#[derive(Debug, Clone)]
pub(crate) struct PackPlan {
    /// Index of the packed (ragged) column.
    pub(crate) column: usize,
    /// Tokens per sequence.
    pub(crate) seq_len: u64,
    /// Sequences per batch.
    pub(crate) sequences: u64,
    /// Where this rank's tokens start in each epoch's stream (`rank × T / W`).
    pub(crate) rank_start: u64,
    /// Batches per epoch: `floor(floor(T / W) / (sequences × seq_len))`.
    pub(crate) batches_per_epoch: u64,
}

/// The index of ragged column `name`, for option `what` (`pack`, `budget`): an error naming the
/// columns there are, or saying that the column's rows have a fixed shape.
pub(crate) fn ragged_column(columns: &[ColumnInfo], name: &str, what: &str) -> Result<usize> {
    let Some(column) = columns.iter().position(|c| c.name == name) else {
        return Err(Error::InvalidArgument(format!(
            "{what}: no column named {name:?} (columns: {})",
            columns
                .iter()
                .map(|c| c.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    };
    if !columns[column].ragged {
        return Err(Error::InvalidArgument(format!(
            "{what}: column {name:?} has rows of a fixed shape; {what} takes a ragged column (token ids)"
        )));
    }
    Ok(column)
}

impl PackPlan {
    fn new(
        source: &dyn RowSource,
        columns: &[ColumnInfo],
        p: &PackOptions,
        opts: &LoaderOptions,
    ) -> Result<Self> {
        let column = ragged_column(columns, &p.column, "pack")?;
        let tokens: u64 = (0..source.shard_count())
            .map(|s| source.row_offsets(s, column).last().copied().unwrap_or(0))
            .fold(0, u64::saturating_add);
        let sequences = opts.batch_size as u64;
        // `cu_seqlens` are I32 offsets into the flattened batch.
        let per_batch = sequences.checked_mul(p.seq_len).filter(|&n| {
            n > 0
                && n < i32::MAX as u64
                && n.checked_mul(columns[column].row_bytes.max(8))
                    .is_some_and(|b| b < isize::MAX as u64 / 4)
        });
        let Some(per_batch) = per_batch else {
            return Err(Error::InvalidArgument(format!(
                "pack: seq_len {} × batch_size {sequences} must be between 1 and 2^31 - 1 tokens and fit in memory",
                p.seq_len
            )));
        };
        let per_rank = tokens / opts.world_size;
        let batches_per_epoch = per_rank / per_batch;
        if batches_per_epoch == 0 {
            return Err(Error::InvalidArgument(format!(
                "pack: column {:?} holds {tokens} tokens, {per_rank} per rank: fewer than one batch of {sequences} × {} tokens; lower batch_size or seq_len",
                p.column, p.seq_len
            )));
        }
        Ok(PackPlan {
            column,
            seq_len: p.seq_len,
            sequences,
            rank_start: opts.rank * per_rank,
            batches_per_epoch,
        })
    }
}

/// [`PlanSetup::mean_row_bytes`], checking that each ragged column's offsets cover every
/// shard's rows and address bytes within 64 bits.
fn mean_row_bytes(
    source: &dyn RowSource,
    columns: &[ColumnInfo],
    shard_rows: &[u64],
) -> Result<Vec<u64>> {
    columns
        .iter()
        .enumerate()
        .map(|(c, col)| {
            if !col.ragged {
                return Ok(col.row_bytes);
            }
            let (mut rows, mut bytes) = (0u64, 0u64);
            for (s, &r) in shard_rows.iter().enumerate() {
                let o = source.row_offsets(s, c);
                let last = o.last().copied().unwrap_or(0);
                let ok = o.len() as u64 == r.saturating_add(1)
                    && o[0] == 0
                    && last.checked_mul(col.row_bytes).is_some();
                if !ok {
                    return Err(Error::InvalidArgument(format!(
                        "ragged column {}: shard {s}'s row offsets do not cover its {r} rows",
                        col.name
                    )));
                }
                rows = rows.saturating_add(r);
                bytes = bytes.saturating_add(last * col.row_bytes);
            }
            Ok(bytes.div_ceil(rows.max(1)).max(1))
        })
        .collect()
}

impl PlanSetup {
    /// This rank's batches in `epoch` (the same in every epoch unless batches are cut by a
    /// token budget).
    pub(crate) fn epoch_batches(&self, source: &dyn RowSource, epoch: u64) -> u64 {
        match &self.budget {
            Some(b) => b.batches(source, epoch),
            None => self.batches_per_epoch,
        }
    }

    pub(crate) fn new(source: &dyn RowSource, opts: &LoaderOptions) -> Result<Self> {
        if opts.batch_size == 0
            || opts.threads == 0
            || opts.prefetch == 0
            || opts.window_blocks == 0
        {
            return Err(Error::InvalidArgument(
                "batch_size, threads, prefetch and window_blocks must be at least 1".into(),
            ));
        }
        // Channels and buffer sets are sized by these up front: refuse absurd values rather
        // than abort on an allocation.
        if let Some(w) = opts
            .readahead_windows
            .filter(|&w| w > MAX_READAHEAD_WINDOWS)
        {
            return Err(Error::InvalidArgument(format!(
                "readahead_windows {w}: at most {MAX_READAHEAD_WINDOWS} windows read ahead"
            )));
        }
        if let Some(t) = opts.io_threads.filter(|&t| t == 0 || t > MAX_THREADS) {
            return Err(Error::InvalidArgument(format!(
                "io_threads {t}: 1 to {MAX_THREADS} I/O threads"
            )));
        }
        if opts.prefetch > MAX_PREFETCH || opts.threads > MAX_THREADS {
            return Err(Error::InvalidArgument(format!(
                "prefetch {} / threads {}: at most {MAX_PREFETCH} batches in flight and \
                 {MAX_THREADS} threads",
                opts.prefetch, opts.threads
            )));
        }
        if opts.world_size == 0 || opts.rank >= opts.world_size {
            return Err(Error::InvalidArgument(format!(
                "rank {} is not below world_size {}",
                opts.rank, opts.world_size
            )));
        }
        let columns: Arc<[ColumnInfo]> = source.columns().to_vec().into();
        let chunk_size = source.chunk_size();
        if chunk_size == 0 {
            return Err(Error::InvalidArgument("chunk_size is 0".into()));
        }
        let shard_rows: Vec<u64> = (0..source.shard_count())
            .map(|s| source.shard_rows(s))
            .collect();
        // A ragged column's rows take their mean bytes (for block sizing); its offsets must
        // cover every shard's rows.
        let mean_row_bytes = mean_row_bytes(source, &columns, &shard_rows)?;
        // The plan holds an entry per block (and the default block is one chunk of the widest
        // column): rows must be bounded by bytes, which they are only if some column's rows
        // hold bytes (a ragged column's rows take at least their offset). Zero-width columns
        // beside it are delivered as [B, 0] tensors.
        let widest = mean_row_bytes.iter().copied().max().unwrap_or(0);
        if widest == 0 {
            return Err(Error::InvalidArgument(format!(
                "every column of the source has zero-byte rows ({} columns, {} shards): a dataset needs at least one column whose rows hold data",
                columns.len(),
                shard_rows.len()
            )));
        }
        // Row offsets (row index x row bytes) are computed per row without checks (planner,
        // workers, gathers): they fit if every shard's rows x the widest row fit, checked once
        // here; so does the sum of the rows.
        let total_rows = shard_rows
            .iter()
            .try_fold(0u64, |sum, &r| {
                r.checked_mul(widest)?;
                sum.checked_add(r)
            })
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "the source's shards hold more rows than 64-bit offsets can address ({widest}-byte rows)"
                ))
            })?;
        // The default block: one chunk of the widest column's bytes, or two when that column is
        // ragged. A ragged column's blocks do not start on chunk boundaries, so a block touches
        // one chunk more than its bytes fill, a chunk its neighbour (in another window) opens
        // again: two chunks a block halve that (docs/LOADER.md, "Ragged columns").
        let widest_ragged = columns
            .iter()
            .zip(&mean_row_bytes)
            .any(|(c, &b)| c.ragged && b == widest);
        let block_bytes = chunk_size.saturating_mul(if widest_ragged { 2 } else { 1 });
        let block_rows = opts
            .block_rows
            .unwrap_or((block_bytes / widest).max(1))
            .max(1);
        let pack = match &opts.pack {
            Some(p) => Some(PackPlan::new(source, &columns, p, opts)?),
            None => None,
        };
        if pack.is_some() && opts.budget.is_some() {
            return Err(Error::InvalidArgument(
                "pack and budget do not go together: a packed batch already holds a fixed number of tokens".into(),
            ));
        }
        // Packing and token budgets order every row (all ranks' rows are one stream, split by
        // tokens or by batches).
        let whole = pack.is_some() || opts.budget.is_some();
        let (rank, world_size, batch_size) = match whole {
            true => (0, 1, 1),
            false => (opts.rank, opts.world_size, opts.batch_size as u64),
        };
        let cfg = SamplerConfig {
            seed: opts.seed,
            shuffle: opts.shuffle,
            block_rows,
            window_blocks: opts.window_blocks,
            rank,
            world_size,
            batch_size,
            drop_last: opts.drop_last && !whole,
        };
        let budget = match &opts.budget {
            Some(b) => Some(Arc::new(BudgetPlan::new(
                source,
                &columns,
                b,
                opts.batch_size as u64,
                (opts.rank, opts.world_size),
                cfg.clone(),
                &shard_rows,
            )?)),
            None => None,
        };
        let batches_per_epoch = match (&pack, &budget) {
            (Some(p), _) => p.batches_per_epoch,
            (_, Some(b)) => b.batches(source, opts.start_epoch),
            _ => EpochPlan::new(&cfg, 0, &shard_rows).batches(),
        };
        if opts.start_batch > batches_per_epoch {
            return Err(Error::InvalidArgument(format!(
                "resume position {} is past the epoch's {batches_per_epoch} batches (different dataset?)",
                opts.start_batch
            )));
        }
        // Saturating: `epochs` may be "forever" (u64::MAX); start_batch <= batches_per_epoch.
        // A token budget's count varies by epoch: the start epoch's batches only, the loader
        // counts each later epoch's when it reaches it.
        let total = if opts.start_epoch >= opts.epochs {
            0
        } else if budget.is_some() {
            batches_per_epoch - opts.start_batch
        } else {
            (opts.epochs - opts.start_epoch).saturating_mul(batches_per_epoch) - opts.start_batch
        };
        // Every shard still as it was when its store pinned it (length from its header).
        let store = source.store();
        if store.shard_count() != source.shard_count() {
            return Err(Error::InvalidArgument(format!(
                "the source has {} shards, its store {}",
                source.shard_count(),
                store.shard_count()
            )));
        }
        for s in 0..source.shard_count() {
            store.check_unchanged(s)?;
        }
        let batch_rows = opts
            .batch_size
            .min(usize::try_from(total_rows.max(1)).unwrap_or(usize::MAX));
        // A batch's bytes (every column's buffer, as the loaders size and count them) within
        // u64; whether they fit in memory is each loader's own check.
        let batch_bytes = columns
            .iter()
            .filter(|c| !c.ragged)
            .try_fold(0u64, |sum, c| sum.checked_add(c.row_bytes))
            .and_then(|row| row.checked_mul(batch_rows as u64));
        if batch_bytes.is_none() {
            return Err(Error::InvalidArgument(format!(
                "a batch of {batch_rows} rows of all {} columns holds more than 2^64 bytes: lower batch_size",
                columns.len()
            )));
        }
        Ok(PlanSetup {
            pack,
            budget,
            mean_row_bytes,
            columns,
            chunk_size,
            block_rows,
            shard_rows,
            total_rows,
            cfg,
            batches_per_epoch,
            total,
            batch_rows,
        })
    }
}

/// A chunk: (shard, column, chunk index j).
pub(crate) type ChunkKey = (u32, u32, u64);

/// Chunk keys covering rows `[r0, r0 + n)` of shard `s`, columns `wanted` (`chunk` bytes per
/// chunk; a ragged column's rows delimited by the source's row offsets).
#[allow(clippy::too_many_arguments)]
pub(crate) fn keys_for_rows(
    source: &dyn RowSource,
    columns: &[ColumnInfo],
    wanted: &[usize],
    chunk: u64,
    s: u32,
    r0: u64,
    n: u64,
    out: &mut Vec<ChunkKey>,
) {
    for &c in wanted {
        let (a, b) = columns[c].byte_range(source, s as usize, c, r0, n);
        push_chunk_keys(s, c, a, b, chunk, out);
    }
}

/// The keys of column `c`'s chunks holding bytes `[a, b)` of shard `s`'s tensor.
pub(crate) fn push_chunk_keys(
    s: u32,
    c: usize,
    a: u64,
    b: u64,
    chunk: u64,
    out: &mut Vec<ChunkKey>,
) {
    if b > a {
        for j in a / chunk..=(b - 1) / chunk {
            out.push((s, c as u32, j));
        }
    }
}

/// The loader was dropped (its stop channel is disconnected).
pub(crate) fn stopped(stop: &Receiver<()>) -> bool {
    matches!(
        stop.try_recv(),
        Err(crossbeam_channel::TryRecvError::Disconnected)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn saved() -> LoaderState {
        let opts = LoaderOptions {
            batch_size: 256,
            seed: 7,
            ..LoaderOptions::default()
        };
        LoaderState::start(&opts, 64, 1000)
    }

    #[test]
    fn mismatches_name_each_differing_field() {
        let state = saved();
        let same = LoaderOptions {
            batch_size: 256,
            seed: 7,
            ..LoaderOptions::default()
        };
        assert!(state.mismatches(&same).is_empty());
        // block_rows left automatic matches any saved value; threads/prefetch do not count.
        let other = LoaderOptions {
            batch_size: 128,
            seed: 8,
            threads: 9,
            prefetch: 1,
            block_rows: Some(32),
            ..LoaderOptions::default()
        };
        assert_eq!(
            state.mismatches(&other),
            [
                "batch_size (state 256, options 128)",
                "seed (state 7, options 8)",
                "block_rows (state 64, options 32)",
            ]
        );
        // Every other order-defining field is compared too.
        let flipped = LoaderOptions {
            shuffle: false,
            drop_last: true,
            rank: 1,
            world_size: 2,
            window_blocks: 3,
            ..same
        };
        let names: Vec<String> = state
            .mismatches(&flipped)
            .iter()
            .map(|m| m.split(' ').next().unwrap_or_default().to_string())
            .collect();
        assert_eq!(
            names,
            [
                "shuffle",
                "drop_last",
                "rank",
                "world_size",
                "window_blocks"
            ]
        );
    }
}
