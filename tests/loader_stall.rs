//! A consumer that stops reading does not make producers spin: work stops at the prefetch
//! bound and the blocked threads use no CPU. (Its own test binary, so that the process CPU
//! time measured is this test's alone.)
mod common;

use std::sync::Arc;
use std::time::Duration;

use ciphershard::pipeline::{Loader, LoaderOptions, RowSource};

fn big(dir: &std::path::Path) -> Arc<common::Fixture> {
    common::Fixture::create(
        dir,
        &[4000, 4000],
        &[
            common::Col("x", "F32", 4, 16, true),
            common::Col("y", "U8", 1, 3, false),
        ],
        1024,
    )
}

#[test]
fn stalled_consumer_does_not_make_producers_spin() {
    let dir = tempfile::tempdir().unwrap();
    let src: Arc<dyn RowSource> = big(dir.path());
    let o = LoaderOptions {
        batch_size: 16,
        epochs: 10,
        threads: 2,
        prefetch: 3,
        ..Default::default()
    };
    let mut l = Loader::new(src, &o).unwrap();
    l.next().unwrap().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let a = l.stats();
    let cpu0 = process_cpu();
    std::thread::sleep(Duration::from_millis(500));
    let b = l.stats();
    let cpu = process_cpu() - cpu0;
    assert_eq!(
        a.chunks_loaded, b.chunks_loaded,
        "producers kept working while the consumer stalled"
    );
    assert!(
        cpu < Duration::from_millis(100),
        "threads burned {cpu:?} of CPU while blocked"
    );
}

fn process_cpu() -> Duration {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap();
    let f: Vec<&str> = s[s.rfind(')').unwrap() + 2..].split(' ').collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}
