//! Persistent reader threads for the CUDA file benchmark: the one `unsafe` of `src/bench`
//! (a job hands a worker a raw pointer into the caller's pinned staging buffer).

#![allow(unsafe_code)] // `ReadJob` is sent to a worker thread: see its SAFETY comment

use std::sync::Arc;

use crate::cipher::cuda::backend_err;
use crate::error::{Error, Result};

/// Persistent reader threads for the file benchmark (spawning threads for every 64 MiB batch
/// would cost a visible share of the time being measured): [`ReaderPool::read`] splits a buffer
/// into contiguous pieces, one `pread` per piece, and returns once every piece is in.
pub(super) struct ReaderPool {
    jobs: Option<crossbeam_channel::Sender<ReadJob>>,
    done: crossbeam_channel::Receiver<std::io::Result<()>>,
    workers: Vec<std::thread::JoinHandle<()>>,
    path: std::path::PathBuf,
}

struct ReadJob {
    ptr: *mut u8,
    len: usize,
    offset: u64,
}

// SAFETY: a job's region is written only by the one worker that receives it, and
// `ReaderPool::read` does not return before every job it sent has reported back (or every worker
// is gone), so the region is neither aliased nor released while a worker writes into it.
unsafe impl Send for ReadJob {}

impl ReaderPool {
    pub(super) fn new(file: std::fs::File, path: &std::path::Path, threads: usize) -> ReaderPool {
        use std::os::unix::fs::FileExt;
        let file = Arc::new(file);
        let (jobs, rx) = crossbeam_channel::unbounded::<ReadJob>();
        let (done_tx, done) = crossbeam_channel::unbounded();
        let workers = (0..threads.max(1))
            .map(|_| {
                let (rx, done_tx, file) = (rx.clone(), done_tx.clone(), file.clone());
                std::thread::spawn(move || {
                    for job in rx {
                        // SAFETY: see `ReadJob`: this worker is the only writer of the region,
                        // which stays alive and unaliased until `read` has this job's report.
                        let buf = unsafe { std::slice::from_raw_parts_mut(job.ptr, job.len) };
                        if done_tx.send(file.read_exact_at(buf, job.offset)).is_err() {
                            return;
                        }
                    }
                })
            })
            .collect();
        ReaderPool {
            jobs: Some(jobs),
            done,
            workers,
            path: path.to_path_buf(),
        }
    }

    /// Fills `buf` from the file at `offset`, one piece per worker.
    pub(super) fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let jobs = self.jobs.as_ref().expect("pool is open");
        let piece = buf
            .len()
            .div_ceil(self.workers.len())
            .next_multiple_of(64 << 10)
            .max(1);
        let mut sent = 0usize;
        for (i, p) in buf.chunks_mut(piece).enumerate() {
            let job = ReadJob {
                ptr: p.as_mut_ptr(),
                len: p.len(),
                offset: offset + (i * piece) as u64,
            };
            if jobs.send(job).is_err() {
                break;
            }
            sent += 1;
        }
        let mut result = Ok(());
        for _ in 0..sent {
            match self.done.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    if result.is_ok() {
                        result = Err(Error::io(&self.path, e));
                    }
                }
                // Every worker is gone: nothing can still be writing into `buf`.
                Err(_) => {
                    return Err(backend_err(
                        "reading the benchmark file",
                        "the reader threads stopped",
                    ));
                }
            }
        }
        if sent * piece < buf.len() {
            return Err(backend_err(
                "reading the benchmark file",
                "the reader threads stopped",
            ));
        }
        result
    }
}

impl Drop for ReaderPool {
    fn drop(&mut self) {
        drop(self.jobs.take());
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reader_pool_reads_every_byte_at_its_place() {
        use std::io::Write;
        let mut f = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..3_000_017u32).map(|i| (i * 7 + i / 251) as u8).collect();
        f.write_all(&data).unwrap();
        for threads in [1, 5, 16] {
            let pool = ReaderPool::new(f.try_clone().unwrap(), std::path::Path::new("t"), threads);
            for (off, len) in [(0, 0), (0, 100), (13, 2_000_000), (1 << 20, 1_900_000)] {
                let mut buf = vec![0u8; len];
                pool.read(off as u64, &mut buf).unwrap();
                assert!(buf == data[off..off + len], "threads {threads} off {off}");
            }
            let mut past = vec![0u8; 10];
            let e = pool.read(data.len() as u64 - 5, &mut past).unwrap_err();
            assert!(e.to_string().contains('t'), "{e}");
        }
    }
}
