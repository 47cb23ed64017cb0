//! Token-budget batching (`LoaderOptions::budget`, docs/LOADER.md "Token budgets"): batches cut
//! by the tokens of one ragged column rather than by a fixed row count. The cut is a pure
//! function of the epoch's row order (seed, epoch, layout) and the rows' lengths, so it does not
//! depend on threads or timing; every rank computes the same global cut and takes its own
//! contiguous share of it, the same number of batches on every rank.

#![forbid(unsafe_code)]

use std::sync::{Arc, Mutex};

use super::options::TokenBudget;
use super::sampler::{Cursor, EpochPlan, SamplerConfig};
use super::source::{ColumnInfo, RowSource};
use crate::error::{Error, Result};

/// Epochs whose cut is kept (the planner runs ahead of the consumer by at most an epoch
/// boundary, so two are in use at once).
const KEPT_EPOCHS: usize = 3;

/// [`TokenBudget`] checked against a source: how every epoch is cut into batches.
pub(crate) struct BudgetPlan {
    /// Index of the budgeted (ragged) column.
    pub(crate) column: usize,
    /// Most tokens per batch.
    pub(crate) max_tokens: u64,
    /// Most rows per batch (`batch_size`).
    max_rows: u64,
    rank: u64,
    world_size: u64,
    /// The order of every row of the epoch (rank 0 of 1: ranks split the cut, not the rows).
    cfg: SamplerConfig,
    shard_rows: Vec<u64>,
    /// Recent epochs' cuts for this rank.
    recent: Mutex<Vec<(u64, Arc<[u64]>)>>,
}

impl std::fmt::Debug for BudgetPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BudgetPlan")
            .field("column", &self.column)
            .field("max_tokens", &self.max_tokens)
            .field("max_rows", &self.max_rows)
            .finish_non_exhaustive()
    }
}

/// Where each batch of rows of the given lengths starts when batches are cut greedily: a batch
/// takes rows in order while it holds at most `max_tokens` tokens and `max_rows` rows. Returns
/// the first position of every batch, then the number of rows (so batch `k` is
/// `[starts[k], starts[k + 1])`). Every row must hold at most `max_tokens` tokens.
pub(crate) fn cut(lengths: impl Iterator<Item = u64>, max_tokens: u64, max_rows: u64) -> Vec<u64> {
    let mut starts = vec![0u64];
    let (mut p, mut rows, mut tokens) = (0u64, 0u64, 0u64);
    for len in lengths {
        if rows > 0 && (rows == max_rows || tokens + len > max_tokens) {
            starts.push(p);
            (rows, tokens) = (0, 0);
        }
        rows += 1;
        tokens += len;
        p += 1;
    }
    if rows > 0 {
        starts.push(p);
    }
    starts
}

impl BudgetPlan {
    /// Checks `budget` against `source`: a ragged column, a budget that holds its longest row,
    /// and enough tokens or rows that every rank gets at least one batch in every epoch.
    pub(crate) fn new(
        source: &dyn RowSource,
        columns: &[ColumnInfo],
        budget: &TokenBudget,
        max_rows: u64,
        (rank, world_size): (u64, u64),
        cfg: SamplerConfig,
        shard_rows: &[u64],
    ) -> Result<Self> {
        let column = super::options::ragged_column(columns, &budget.column, "budget")?;
        let fits = budget
            .max_tokens
            .checked_mul(columns[column].row_bytes.max(1));
        if budget.max_tokens == 0 || fits.is_none_or(|b| b >= isize::MAX as u64 / 4) {
            return Err(Error::InvalidArgument(format!(
                "budget: max_tokens {} must be at least 1 and a batch of that many tokens must fit in memory",
                budget.max_tokens
            )));
        }
        let (mut tokens, mut rows, mut longest, mut over) = (0u64, 0u64, 0u64, 0u64);
        for s in 0..source.shard_count() {
            for w in source.row_offsets(s, column).windows(2) {
                let len = w[1] - w[0];
                tokens = tokens.saturating_add(len);
                rows += 1;
                longest = longest.max(len);
                over += u64::from(len > budget.max_tokens);
            }
        }
        if over > 0 {
            return Err(Error::InvalidArgument(format!(
                "budget: {over} rows of column {:?} hold more than max_tokens = {} tokens (the longest {longest}); \
                 raise max_tokens to at least {longest}, or leave those rows out when converting",
                budget.column, budget.max_tokens
            )));
        }
        // However the epoch is ordered, it is cut into at least this many batches: every rank
        // gets at least one.
        let fewest = tokens
            .div_ceil(budget.max_tokens)
            .max(rows.div_ceil(max_rows.max(1)));
        if fewest < world_size {
            return Err(Error::InvalidArgument(format!(
                "budget: column {:?} holds {tokens} tokens in {rows} rows: {fewest} batches of at most {} tokens \
                 and {max_rows} rows are fewer than one per rank for {world_size} ranks; lower max_tokens",
                budget.column, budget.max_tokens
            )));
        }
        Ok(BudgetPlan {
            column,
            max_tokens: budget.max_tokens,
            max_rows: max_rows.max(1),
            rank,
            world_size,
            cfg,
            shard_rows: shard_rows.to_vec(),
            recent: Mutex::new(Vec::new()),
        })
    }

    /// This rank's batches of `epoch` as epoch positions: batch `k` is
    /// `[starts[k], starts[k + 1])`. The epoch's global cut gives `n` batches; rank `r` of `W`
    /// takes batches `[r·q, (r+1)·q)` with `q = floor(n / W)`, and the last `n mod W` (fewer
    /// than `W`) are not delivered that epoch.
    pub(crate) fn starts(&self, source: &dyn RowSource, epoch: u64) -> Arc<[u64]> {
        {
            let recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((_, s)) = recent.iter().find(|(e, _)| *e == epoch) {
                return s.clone();
            }
        }
        let plan = EpochPlan::new(&self.cfg, epoch, &self.shard_rows);
        let mut cur = Cursor::new(&plan);
        let c = self.column;
        let lengths = (0..plan.total_rows()).map(|p| {
            let (row, _) = cur.row_at(p);
            let o = source.row_offsets(row.shard as usize, c);
            o[row.row as usize + 1] - o[row.row as usize]
        });
        let global = cut(lengths, self.max_tokens, self.max_rows);
        let q = (global.len() as u64 - 1) / self.world_size;
        let first = (self.rank * q) as usize;
        let mine: Arc<[u64]> = global[first..=first + q as usize].into();
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        if recent.len() == KEPT_EPOCHS {
            recent.remove(0);
        }
        recent.push((epoch, mine.clone()));
        mine
    }

    /// This rank's batches in `epoch`.
    pub(crate) fn batches(&self, source: &dyn RowSource, epoch: u64) -> u64 {
        self.starts(source, epoch).len() as u64 - 1
    }
}

#[cfg(test)]
mod tests {
    use super::cut;

    #[test]
    fn cuts_by_tokens_and_rows() {
        // Budget 10 tokens, at most 3 rows.
        let starts = cut([4, 5, 2, 0, 0, 1, 10, 3].into_iter(), 10, 3);
        // [4,5] (next 2 would make 11) | [2,0,0] (row cap) | [1] (10 would make 11) | [10] | [3]
        assert_eq!(starts, [0, 2, 5, 6, 7, 8]);
        assert_eq!(cut(std::iter::empty(), 10, 3), [0]);
        // Empty rows only: cut by the row cap.
        assert_eq!(cut([0; 7].into_iter(), 10, 3), [0, 3, 6, 7]);
    }
}
