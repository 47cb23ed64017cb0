//! Network telemetry of a store that fetches over a network: requests, bytes, retries,
//! failures and time to first byte, counted by the store and read through
//! [`crate::store::ShardStore::network`] (local files have none).

#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Time-to-first-byte buckets: bucket `i` holds times below `2^((i + 1) / 4)` µs (four buckets
/// an octave, so a percentile read from them is within 19 % of the real one), the last one
/// everything from about 100 s up.
const BUCKETS: usize = 108;

fn bucket_of(d: Duration) -> usize {
    let us = d.as_micros().max(1) as f64;
    ((us.log2() * 4.0).floor() as usize).min(BUCKETS - 1)
}

/// The upper bound of bucket `i`, in milliseconds.
fn bucket_ms(i: usize) -> f64 {
    2f64.powf((i + 1) as f64 / 4.0) / 1e3
}

/// Live counters (relaxed atomics: statistics only).
#[derive(Debug)]
pub(crate) struct NetCounters {
    gets: AtomicU64,
    heads: AtomicU64,
    bytes: AtomicU64,
    retries: AtomicU64,
    failed_attempts: AtomicU64,
    timeouts: AtomicU64,
    errors: AtomicU64,
    ttfb_ns: AtomicU64,
    ttfb: [AtomicU64; BUCKETS],
}

impl Default for NetCounters {
    fn default() -> Self {
        NetCounters {
            gets: AtomicU64::new(0),
            heads: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            failed_attempts: AtomicU64::new(0),
            timeouts: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            ttfb_ns: AtomicU64::new(0),
            ttfb: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl NetCounters {
    /// A GET sent (each attempt counts).
    pub(crate) fn get(&self) {
        self.gets.fetch_add(1, Relaxed);
    }

    /// A HEAD sent.
    pub(crate) fn head(&self) {
        self.heads.fetch_add(1, Relaxed);
    }

    /// A GET's answer arrived `d` after it was sent.
    pub(crate) fn first_byte(&self, d: Duration) {
        self.ttfb_ns
            .fetch_add(d.as_nanos().min(u64::MAX as u128) as u64, Relaxed);
        self.ttfb[bucket_of(d)].fetch_add(1, Relaxed);
    }

    /// Body bytes received (those of attempts that failed later included).
    pub(crate) fn bytes(&self, n: u64) {
        self.bytes.fetch_add(n, Relaxed);
    }

    /// An attempt failed; `timed_out` when a timeout ended it.
    pub(crate) fn failed(&self, timed_out: bool) {
        self.failed_attempts.fetch_add(1, Relaxed);
        if timed_out {
            self.timeouts.fetch_add(1, Relaxed);
        }
    }

    /// A failed attempt is tried again.
    pub(crate) fn retry(&self) {
        self.retries.fetch_add(1, Relaxed);
    }

    /// A read ended in an error (retries exhausted, or a failure that is not retried).
    pub(crate) fn error(&self) {
        self.errors.fetch_add(1, Relaxed);
    }

    pub(crate) fn snapshot(&self) -> NetworkStats {
        NetworkStats::from_parts(
            [
                self.gets.load(Relaxed),
                self.heads.load(Relaxed),
                self.bytes.load(Relaxed),
                self.retries.load(Relaxed),
                self.failed_attempts.load(Relaxed),
                self.timeouts.load(Relaxed),
                self.errors.load(Relaxed),
                self.ttfb_ns.load(Relaxed),
            ],
            self.ttfb.iter().map(|b| b.load(Relaxed)).collect(),
        )
    }
}

/// A snapshot of a store's network counters since it was opened (or, from
/// [`NetworkStats::since`], between two snapshots).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct NetworkStats {
    /// GET requests sent (every attempt counts).
    pub get_requests: u64,
    /// HEAD requests sent (pinning shards at open, re-checks, small objects).
    pub head_requests: u64,
    /// Body bytes received, including bytes of attempts that failed part-way and the gaps that
    /// coalescing reads and drops.
    pub bytes_fetched: u64,
    /// Attempts tried again after a transient failure.
    pub retries: u64,
    /// Attempts that failed (throttled, 5xx, connection errors, cut bodies, timeouts).
    pub failed_attempts: u64,
    /// Of the failed attempts, those ended by a timeout (first byte, stalled body or the
    /// whole request).
    pub timeouts: u64,
    /// Reads that ended in an error.
    pub errors: u64,
    /// Mean time from sending a GET to its answer's headers, in milliseconds.
    pub ttfb_mean_ms: f64,
    /// Median time to first byte (upper bound of its histogram bucket, within 19 %), ms.
    pub ttfb_p50_ms: f64,
    /// 99th percentile time to first byte (same precision), ms.
    pub ttfb_p99_ms: f64,
    /// Sum of the times to first byte, ns (for differences of snapshots).
    #[serde(default)]
    pub ttfb_total_ns: u64,
    /// Time-to-first-byte histogram (four buckets an octave from 1 µs); for differences.
    #[serde(default, skip_serializing)]
    pub ttfb_buckets: Vec<u64>,
}

impl NetworkStats {
    fn from_parts(c: [u64; 8], buckets: Vec<u64>) -> Self {
        let [
            gets,
            heads,
            bytes,
            retries,
            failed,
            timeouts,
            errors,
            ttfb_ns,
        ] = c;
        let answered: u64 = buckets.iter().sum();
        let pct = |p: f64| -> f64 {
            if answered == 0 {
                return 0.0;
            }
            let want = ((answered as f64 * p).ceil() as u64).max(1);
            let mut seen = 0;
            for (i, n) in buckets.iter().enumerate() {
                seen += n;
                if seen >= want {
                    return bucket_ms(i);
                }
            }
            bucket_ms(BUCKETS - 1)
        };
        NetworkStats {
            get_requests: gets,
            head_requests: heads,
            bytes_fetched: bytes,
            retries,
            failed_attempts: failed,
            timeouts,
            errors,
            ttfb_mean_ms: if answered == 0 {
                0.0
            } else {
                ttfb_ns as f64 / answered as f64 / 1e6
            },
            ttfb_p50_ms: pct(0.5),
            ttfb_p99_ms: pct(0.99),
            ttfb_total_ns: ttfb_ns,
            ttfb_buckets: buckets,
        }
    }

    /// What happened between `earlier` (a snapshot of the same store) and this one.
    pub fn since(&self, earlier: &NetworkStats) -> NetworkStats {
        let buckets = (0..self.ttfb_buckets.len())
            .map(|i| {
                self.ttfb_buckets[i]
                    .saturating_sub(earlier.ttfb_buckets.get(i).copied().unwrap_or(0))
            })
            .collect();
        NetworkStats::from_parts(
            [
                self.get_requests.saturating_sub(earlier.get_requests),
                self.head_requests.saturating_sub(earlier.head_requests),
                self.bytes_fetched.saturating_sub(earlier.bytes_fetched),
                self.retries.saturating_sub(earlier.retries),
                self.failed_attempts.saturating_sub(earlier.failed_attempts),
                self.timeouts.saturating_sub(earlier.timeouts),
                self.errors.saturating_sub(earlier.errors),
                self.ttfb_total_ns.saturating_sub(earlier.ttfb_total_ns),
            ],
            buckets,
        )
    }
}

impl std::fmt::Display for NetworkStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "network: {} GETs ({} HEADs), {:.1} MB fetched, time to first byte mean {:.1} ms \
             p50 {:.1} ms p99 {:.1} ms, {} retries, {} failed attempts ({} timed out), {} errors",
            self.get_requests,
            self.head_requests,
            self.bytes_fetched as f64 / 1e6,
            self.ttfb_mean_ms,
            self.ttfb_p50_ms,
            self.ttfb_p99_ms,
            self.retries,
            self.failed_attempts,
            self.timeouts,
            self.errors
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_come_from_the_histogram_and_differences_subtract() {
        let c = NetCounters::default();
        for _ in 0..98 {
            c.get();
            c.first_byte(Duration::from_millis(20));
        }
        for _ in 0..2 {
            c.get();
            c.first_byte(Duration::from_millis(900));
        }
        c.bytes(1000);
        let a = c.snapshot();
        assert_eq!(a.get_requests, 100);
        assert!((20.0..=20.0 * 1.19).contains(&a.ttfb_p50_ms), "{a:?}");
        assert!((900.0..=900.0 * 1.19).contains(&a.ttfb_p99_ms), "{a:?}");
        assert!((a.ttfb_mean_ms - 37.6).abs() < 0.01, "{a:?}");
        c.retry();
        c.failed(true);
        c.get();
        c.first_byte(Duration::from_millis(5));
        let d = c.snapshot().since(&a);
        assert_eq!(
            (d.get_requests, d.retries, d.timeouts, d.bytes_fetched),
            (1, 1, 1, 0)
        );
        assert!((5.0..=5.0 * 1.19).contains(&d.ttfb_p99_ms), "{d:?}");
        assert!((d.ttfb_mean_ms - 5.0).abs() < 0.01, "{d:?}");
    }
}
