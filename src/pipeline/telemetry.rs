//! Per-stage counters, shared by every thread of a loader (relaxed atomics: statistics only).

#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Live counters.
#[derive(Debug, Default)]
pub struct Counters {
    pub(crate) read_bytes: AtomicU64,
    pub(crate) read_ns: AtomicU64,
    pub(crate) verify_bytes: AtomicU64,
    pub(crate) verify_ns: AtomicU64,
    pub(crate) decrypt_bytes: AtomicU64,
    pub(crate) decrypt_ns: AtomicU64,
    pub(crate) assemble_bytes: AtomicU64,
    pub(crate) assemble_ns: AtomicU64,
    pub(crate) delivered_bytes: AtomicU64,
    pub(crate) batches: AtomicU64,
    pub(crate) consumer_wait_ns: AtomicU64,
    pub(crate) chunks_loaded: AtomicU64,
    pub(crate) first_batch_ns: AtomicU64,
    /// Bytes of host buffers currently allocated by the loader's pools.
    pub(crate) pool_bytes: std::sync::Arc<AtomicU64>,
}

/// Bytes and time of one stage.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StageStats {
    /// Bytes processed.
    pub bytes: u64,
    /// Nanoseconds spent, summed over threads.
    pub ns: u64,
    /// Bytes per second of stage time (per thread-second), 0 when no time was recorded.
    pub gbps: f64,
}

impl StageStats {
    fn new(bytes: &AtomicU64, ns: &AtomicU64) -> Self {
        let (bytes, ns) = (bytes.load(Relaxed), ns.load(Relaxed));
        StageStats {
            bytes,
            ns,
            gbps: if ns == 0 {
                0.0
            } else {
                bytes as f64 / ns as f64
            },
        }
    }
}

/// A snapshot of a loader's telemetry.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoaderStats {
    /// `pread` of chunk ciphertext into private buffers (includes page-cache copies / faults).
    pub read: StageStats,
    /// Tag verification of whole chunks.
    pub verify: StageStats,
    /// Decryption (CTR into the batch, or whole-chunk open in `ChunkOpen` mode).
    pub decrypt: StageStats,
    /// Row copies into batch buffers that are not decryption (plain columns, `ChunkOpen` mode).
    pub assemble: StageStats,
    /// Time the consumer spent waiting in `next()` (0 bytes).
    pub consumer_wait_ns: u64,
    /// Batches handed to the consumer.
    pub batches: u64,
    /// Bytes handed to the consumer.
    pub delivered_bytes: u64,
    /// Chunks read and verified.
    pub chunks_loaded: u64,
    /// Bytes read and verified per byte delivered (1.0 = every chunk read once per use).
    pub read_amplification: f64,
    /// Bytes decrypted per byte delivered.
    pub decrypt_amplification: f64,
    /// Host buffer bytes currently allocated by the loader (batch and chunk pools).
    pub pool_bytes: u64,
    /// Nanoseconds from building the loader to the first batch handed out.
    pub first_batch_ns: u64,
}

impl Counters {
    /// A snapshot.
    pub fn snapshot(&self) -> LoaderStats {
        let delivered = self.delivered_bytes.load(Relaxed);
        let ratio = |b: u64| {
            if delivered == 0 {
                0.0
            } else {
                b as f64 / delivered as f64
            }
        };
        LoaderStats {
            read: StageStats::new(&self.read_bytes, &self.read_ns),
            verify: StageStats::new(&self.verify_bytes, &self.verify_ns),
            decrypt: StageStats::new(&self.decrypt_bytes, &self.decrypt_ns),
            assemble: StageStats::new(&self.assemble_bytes, &self.assemble_ns),
            consumer_wait_ns: self.consumer_wait_ns.load(Relaxed),
            batches: self.batches.load(Relaxed),
            delivered_bytes: delivered,
            chunks_loaded: self.chunks_loaded.load(Relaxed),
            read_amplification: ratio(self.read_bytes.load(Relaxed)),
            decrypt_amplification: ratio(self.decrypt_bytes.load(Relaxed)),
            pool_bytes: self.pool_bytes.load(Relaxed),
            first_batch_ns: self.first_batch_ns.load(Relaxed),
        }
    }
}

pub(crate) fn add(c: &AtomicU64, v: u64) {
    c.fetch_add(v, Relaxed);
}

impl std::fmt::Display for LoaderStats {
    /// A short multi-line summary for the CLI.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |ns: u64| ns as f64 / 1e6;
        writeln!(
            f,
            "batches {}  delivered {:.1} MB  first batch {:.1} ms",
            self.batches,
            self.delivered_bytes as f64 / 1e6,
            ms(self.first_batch_ns)
        )?;
        for (name, s) in [
            ("read", self.read),
            ("verify", self.verify),
            ("decrypt", self.decrypt),
            ("assemble", self.assemble),
        ] {
            writeln!(
                f,
                "  {name:<9} {:>10.1} MB {:>10.1} ms {:>7.2} GB/s/thread",
                s.bytes as f64 / 1e6,
                ms(s.ns),
                s.gbps
            )?;
        }
        writeln!(f, "  consumer waited {:.1} ms", ms(self.consumer_wait_ns))?;
        write!(
            f,
            "  read amplification {:.3}  decrypt amplification {:.3}  host pools {:.1} MiB",
            self.read_amplification,
            self.decrypt_amplification,
            self.pool_bytes as f64 / (1 << 20) as f64
        )
    }
}

/// Device-path telemetry beyond [`LoaderStats`] (`DeviceLoader::device_stats`): wall nanoseconds on the reader thread (which
/// reads windows and drives the GPU) and on the gather thread (which builds batches), so a run
/// shows which side is the bottleneck.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DeviceStats {
    /// Windows read, uploaded and verified.
    pub windows: u64,
    /// Device buffers (and CTR dispatches) those windows took: one each, more on wgpu when a
    /// window above the piece size was split (`WgpuOptions::max_piece_bytes`).
    pub window_pieces: u64,
    /// Bytes of ciphertext (or twin bytes) read into pinned staging.
    pub window_bytes: u64,
    /// Reader: `pread` of chunks into pinned staging.
    pub read_ns: u64,
    /// Reader: enqueueing a window's upload and kernels (host side of the transfer).
    pub submit_ns: u64,
    /// Reader: blocked until a window's upload, GHASH and CTR finished and its tags were
    /// checked (device time not hidden behind reading).
    pub gpu_wait_ns: u64,
    /// Submission to verified, summed over windows (overlaps reading and gathering).
    pub window_latency_ns: u64,
    /// Gather thread: waiting for the reader's next verified window.
    pub window_wait_ns: u64,
    /// Gather thread: building row offsets and enqueueing the gathers.
    pub gather_ns: u64,
    /// Gather thread: waiting for a batch's gathers to complete before handing it out.
    pub batch_sync_ns: u64,
    /// Gather thread: blocked on a full prefetch queue (the consumer is the slower side).
    pub send_wait_ns: u64,
}

impl std::fmt::Display for DeviceStats {
    /// One line per thread of the device loader, for the CLI.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |ns: u64| ns as f64 / 1e6;
        writeln!(
            f,
            "  device reader: {} windows{} {:.1} MB  pread {:.1} ms  submit {:.1} ms  GPU wait {:.1} ms  (submit→verified {:.1} ms summed)",
            self.windows,
            if self.window_pieces > self.windows {
                format!(" ({} pieces)", self.window_pieces)
            } else {
                String::new()
            },
            self.window_bytes as f64 / 1e6,
            ms(self.read_ns),
            ms(self.submit_ns),
            ms(self.gpu_wait_ns),
            ms(self.window_latency_ns)
        )?;
        write!(
            f,
            "  device gather: window wait {:.1} ms  gather {:.1} ms  batch sync {:.1} ms  send wait {:.1} ms",
            ms(self.window_wait_ns),
            ms(self.gather_ns),
            ms(self.batch_sync_ns),
            ms(self.send_wait_ns)
        )
    }
}

/// Live counters of a device loader's threads (see [`DeviceStats`]).
#[cfg(any(feature = "cuda", feature = "wgpu"))]
#[derive(Debug, Default)]
pub(crate) struct DeviceCounters {
    pub(crate) windows: AtomicU64,
    pub(crate) window_pieces: AtomicU64,
    pub(crate) window_bytes: AtomicU64,
    pub(crate) read_ns: AtomicU64,
    pub(crate) submit_ns: AtomicU64,
    pub(crate) gpu_wait_ns: AtomicU64,
    pub(crate) window_latency_ns: AtomicU64,
    pub(crate) window_wait_ns: AtomicU64,
    pub(crate) gather_ns: AtomicU64,
    pub(crate) batch_sync_ns: AtomicU64,
    pub(crate) send_wait_ns: AtomicU64,
}

#[cfg(any(feature = "cuda", feature = "wgpu"))]
impl DeviceCounters {
    pub(crate) fn snapshot(&self) -> DeviceStats {
        let l = |a: &AtomicU64| a.load(Relaxed);
        DeviceStats {
            windows: l(&self.windows),
            window_pieces: l(&self.window_pieces),
            window_bytes: l(&self.window_bytes),
            read_ns: l(&self.read_ns),
            submit_ns: l(&self.submit_ns),
            gpu_wait_ns: l(&self.gpu_wait_ns),
            window_latency_ns: l(&self.window_latency_ns),
            window_wait_ns: l(&self.window_wait_ns),
            gather_ns: l(&self.gather_ns),
            batch_sync_ns: l(&self.batch_sync_ns),
            send_wait_ns: l(&self.send_wait_ns),
        }
    }
}

#[cfg(any(feature = "cuda", feature = "wgpu"))]
pub(crate) fn ns_since(t: std::time::Instant) -> u64 {
    t.elapsed().as_nanos() as u64
}
