//! Many epochs over a tiny dataset: no buffer allocated after warm-up (epoch 10), pool bytes constant,
//! resident memory flat.
mod common;

use std::sync::Arc;

use ciphershard::pipeline::{Loader, LoaderOptions, RowSource};

fn rss_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/self/statm").unwrap();
    s.split(' ').nth(1).unwrap().parse::<u64>().unwrap() * 4096
}

#[test]
fn many_epochs_memory_flat() {
    let dir = tempfile::tempdir().unwrap();
    let fx = common::small(dir.path());
    let src: Arc<dyn RowSource> = fx.clone();
    let o = LoaderOptions {
        batch_size: 16,
        epochs: 300,
        threads: 2,
        prefetch: 4,
        window_blocks: 2,
        ..Default::default()
    };
    let mut l = Loader::new(src, &o).unwrap();
    let mut rss_at_10 = 0;
    let (mut pool_at_10, mut allocs_at_10) = (0, 0);
    let mut n = 0u64;
    while let Some(b) = l.next() {
        let b = b.unwrap();
        if b.epoch() % 50 == 0 {
            fx.check_batch(&b);
        }
        if b.epoch() == 10 && rss_at_10 == 0 {
            rss_at_10 = rss_bytes();
            pool_at_10 = l.stats().pool_bytes;
            allocs_at_10 = l.extra_allocations();
        }
        n += 1;
    }
    assert_eq!(n, 300 * 16);
    let rss_end = rss_bytes();
    assert_eq!(
        l.extra_allocations(),
        allocs_at_10,
        "buffers were allocated in steady state"
    );
    assert_eq!(l.stats().pool_bytes, pool_at_10);
    eprintln!(
        "pool {pool_at_10} B, {allocs_at_10} buffers grown during warm-up, RSS {rss_at_10} -> {rss_end}"
    );
    assert!(
        rss_end < rss_at_10 + (4 << 20),
        "RSS grew from {rss_at_10} to {rss_end}"
    );
}

/// Counts the bytes of the host buffers alive (the pool's pin hook sees every allocation and
/// every free).
#[derive(Default)]
struct LiveBytes(std::sync::atomic::AtomicI64);

impl ciphershard::pipeline::PinHook for LiveBytes {
    fn register(&self, _: *mut u8, len: usize) {
        self.0
            .fetch_add(len as i64, std::sync::atomic::Ordering::Relaxed);
    }
    fn unregister(&self, _: *mut u8, len: usize) {
        self.0
            .fetch_sub(len as i64, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A batch kept after its loader is dropped holds its own buffers only: the pool's idle sets
/// are freed with the loader, and so is a set returned later (before the fix the pool, alive
/// through the batch, kept every preallocated set).
#[test]
fn kept_batch_outliving_its_loader_holds_only_its_buffers() {
    let dir = tempfile::tempdir().unwrap();
    let src: Arc<dyn RowSource> = common::small(dir.path());
    let live = Arc::new(LiveBytes::default());
    let o = LoaderOptions {
        batch_size: 16,
        threads: 2,
        prefetch: 8,
        pin_hook: Some(live.clone()),
        ..Default::default()
    };
    let mut l = Loader::new(src, &o).unwrap();
    let kept = l.next().unwrap().unwrap();
    let other = l.next().unwrap().unwrap();
    let set_bytes: i64 = kept.tensors().count() as i64 * 4096; // one page per small column
    drop(l);
    let load = || live.0.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(load(), 2 * set_bytes, "only the two batches still held");
    drop(other);
    assert_eq!(
        load(),
        set_bytes,
        "a set returned after the loader is freed"
    );
    drop(kept);
    assert_eq!(load(), 0);
}
