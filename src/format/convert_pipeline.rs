//! The shard loop of row-batch conversion, as a two-stage pipeline across shards: the calling
//! thread decodes and gathers shard *i + 1* while a sealing thread seals and writes shard *i*
//! (with the sealer's own threads) and then zeroizes and frees its plaintext.
//!
//! A shard cannot be sealed before its last row is gathered (every chunk's associated data
//! binds the digest of the descriptor, which holds each tensor's length), so overlap comes
//! only from working on two shards at once. The hand-over is a rendezvous (a channel of no
//! capacity): the calling thread gives shard *i + 1* over only once the sealing thread has
//! finished and dropped shard *i*, so at most two shards' plaintext are held (one sealing, one
//! gathered or being gathered), plus the decoder's batch.
//!
//! The caller's callbacks (progress and checkpoint) run on the calling thread only: the sealing
//! thread reports written bytes and sealed shards over a channel, and stops at its next batch
//! of chunks once the calling thread raises `stop`. Whichever stage fails first, the sealing
//! thread is joined before returning, a panic in it becomes an error naming the shard, and
//! every file either stage created is handed to the caller's cleanup.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crossbeam_channel::{RecvTimeoutError, SendTimeoutError};

use super::convert_rows::{GatheredShard, RowsPlan};
use super::output::Output;
use super::seal::Sealer;
use super::{Descriptor, ShardEntry};
use crate::error::{Error, Result};
use crate::keys::DataKey;

/// How long the calling thread waits on the sealing thread before it reports progress and
/// calls the checkpoint again.
const POLL: Duration = Duration::from_millis(20);

/// What the sealing thread tells the calling thread.
enum Event {
    /// Tensor bytes written.
    Written(u64),
    /// A shard sealed, renamed into place and its plaintext freed.
    Sealed(ShardEntry, DataKey),
}

/// Moves the sealing thread's list of files into the caller's cleanup list when dropped.
struct Collect<'a> {
    into: &'a mut Vec<PathBuf>,
    from: Mutex<Vec<PathBuf>>,
}

impl Drop for Collect<'_> {
    fn drop(&mut self) {
        let from = self.from.get_mut().unwrap_or_else(|p| p.into_inner());
        self.into.append(from);
    }
}

/// What [`write_row_shards`] wrote.
pub(super) struct RowShards {
    /// Each shard's manifest entry, in order.
    pub entries: Vec<ShardEntry>,
    /// Each shard's data key, in order.
    pub data_keys: Vec<DataKey>,
    /// Tensor bytes gathered and written.
    pub bytes: u64,
}

/// Gathers and writes the shards `shards` describes (each: its row count and its descriptor,
/// tensors left empty), in order, from `plan`, into `out` with `threads` sealing threads.
/// `written` is called with the tensor bytes of each batch of chunks written, `checkpoint`
/// before each input batch and while waiting on the sealing thread: an error it returns stops
/// both stages. Every file created, on success or not, is appended to `cleanup`.
pub(super) fn write_row_shards(
    plan: &mut RowsPlan<'_>,
    shards: Vec<(u64, Descriptor)>,
    out: &Output,
    threads: usize,
    cleanup: &mut Vec<PathBuf>,
    written: &mut dyn FnMut(u64),
    checkpoint: &mut dyn FnMut() -> Result<()>,
) -> Result<RowShards> {
    let count = shards.len();
    let stop = AtomicBool::new(false);
    // The sealing thread's files reach `cleanup` on every path, a panic of this thread's stage
    // included (the scope joins the sealing thread before unwinding on).
    let collect = Collect {
        into: cleanup,
        from: Mutex::new(Vec::new()),
    };
    let paths = &collect.from;
    let mut entries = Vec::with_capacity(count);
    let mut data_keys = Vec::with_capacity(count);
    let result = std::thread::scope(|sc| {
        let (work_tx, work_rx) = crossbeam_channel::bounded::<GatheredShard>(0);
        let (event_tx, event_rx) = crossbeam_channel::unbounded::<Event>();
        let stop = &stop;
        let sealer = sc.spawn(move || {
            // Held for the thread's life: files are listed even if it panics (poisoned).
            let mut paths = paths.lock().unwrap_or_else(|p| p.into_inner());
            for shard in work_rx {
                let mut on_written = |n| {
                    let _ = event_tx.send(Event::Written(n));
                };
                let mut stopped = || {
                    if stop.load(Ordering::Relaxed) {
                        Err(Error::Stopped("conversion stopped".into()))
                    } else {
                        Ok(())
                    }
                };
                let mut sealer = Sealer {
                    out,
                    threads,
                    cleanup: &mut paths,
                    written: &mut on_written,
                    checkpoint: &mut stopped,
                };
                let sealed = shard.seal(&mut sealer);
                // Zeroized and freed here, off the decoding thread, before the next shard is
                // taken: two shards at most.
                drop(shard);
                let (entry, dk) = sealed?;
                let _ = event_tx.send(Event::Sealed(entry, dk));
            }
            Ok(())
        });

        let mut on_event = |e: Event| match e {
            Event::Written(n) => written(n),
            Event::Sealed(entry, dk) => {
                entries.push(entry);
                data_keys.push(dk);
            }
        };
        // The calling thread's stage: the tensor bytes gathered, or `None` if the sealing
        // thread went away (it failed: its error is the one to return). Consumed by its call,
        // which drops the channel's sender and so ends the sealing thread's loop.
        let gather = || -> Result<Option<u64>> {
            let mut bytes = 0u64;
            for (rows, desc) in shards {
                let mut between = || {
                    event_rx.try_iter().for_each(&mut on_event);
                    checkpoint()
                };
                let mut shard = plan.gather_next_shard(rows, desc, &mut between)?;
                bytes += shard.bytes;
                loop {
                    event_rx.try_iter().for_each(&mut on_event);
                    match work_tx.send_timeout(shard, POLL) {
                        Ok(()) => break,
                        Err(SendTimeoutError::Timeout(s)) => shard = s,
                        Err(SendTimeoutError::Disconnected(_)) => return Ok(None),
                    }
                    checkpoint()?;
                }
            }
            drop(work_tx);
            // The last shard: wait for it, reporting progress.
            loop {
                match event_rx.recv_timeout(POLL) {
                    Ok(e) => on_event(e),
                    Err(RecvTimeoutError::Timeout) => checkpoint()?,
                    Err(RecvTimeoutError::Disconnected) => return Ok(Some(bytes)),
                }
            }
        };
        let gathered = gather();
        if gathered.is_err() {
            stop.store(true, Ordering::Relaxed);
        }
        let sealed = sealer.join().unwrap_or_else(|panic| {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Err(Error::io(
                out.path(),
                std::io::Error::other(format!("the shard sealing thread panicked: {what}")),
            ))
        });
        event_rx.try_iter().for_each(&mut on_event);
        match (gathered, sealed) {
            (Err(e), _) | (Ok(_), Err(e)) => Err(e),
            (Ok(Some(bytes)), Ok(())) => Ok(bytes),
            // Not reached: the sealing thread ends early only on an error.
            (Ok(None), Ok(())) => Err(Error::io(
                out.path(),
                std::io::Error::other("the shard sealing thread ended early"),
            )),
        }
    });
    let bytes = result?;
    if entries.len() != count {
        return Err(Error::io(
            out.path(),
            std::io::Error::other(format!("{} of {count} shards written", entries.len())),
        ));
    }
    Ok(RowShards {
        entries,
        data_keys,
        bytes,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow_array::{Int32Array, RecordBatch};

    use crate::format::{ArrowBatches, ConvertInput, ConvertOptions, MANIFEST_FILE, convert_with};
    use crate::keys::MasterKey;

    /// 20 batches of 1000 `i32` rows (4000 bytes), the last with a null at its row 500 when
    /// `bad`: with 4000-byte shards, 20 shards, the last refused while earlier ones are sealed.
    fn input(bad: bool) -> ConvertInput {
        let batches: Vec<RecordBatch> = (0..20)
            .map(|b| {
                let rows: Vec<Option<i32>> = (0..1000)
                    .map(|r| (!(bad && b == 19 && r == 500)).then_some(b * 1000 + r))
                    .collect();
                RecordBatch::try_from_iter([("n", Arc::new(Int32Array::from(rows)) as _)]).unwrap()
            })
            .collect();
        let schema = batches[0].schema();
        ConvertInput::Arrow(ArrowBatches::new("<table>", schema, batches))
    }

    fn opts() -> ConvertOptions {
        ConvertOptions {
            shard_size: Some(4000),
            chunk_size: 1024,
            keys: vec![MasterKey::from_bytes([3; 32])],
            ..ConvertOptions::default()
        }
    }

    /// What a failed conversion left in `dir`: nothing but the directory.
    fn left(dir: &std::path::Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn many_shards_convert_in_order_with_progress() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("ds");
        let mut last = (0, 0);
        let s = convert_with(
            &[input(false)],
            &out,
            &opts(),
            false,
            &mut |done, total| {
                assert!(done >= last.0);
                last = (done, total);
            },
            &mut || Ok(()),
        )
        .unwrap();
        assert_eq!((s.shards, s.rows, s.bytes), (20, 20_000, 80_000));
        assert_eq!(last, (80_000, 80_000));
        assert!(out.join(MANIFEST_FILE).exists());
    }

    #[test]
    fn a_reader_error_after_sealed_shards_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("ds");
        let e = convert_with(
            &[input(true)],
            &out,
            &opts(),
            false,
            &mut |_, _| {},
            &mut || Ok(()),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("<table>") && e.contains("null"), "{e}");
        assert_eq!(left(&out), Vec::<String>::new());
    }

    #[test]
    fn an_io_error_in_the_sealing_thread_is_the_error_returned() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("ds");
        let mut calls = 0;
        // The output directory disappears under the sealing thread after a few shards.
        let e = convert_with(
            &[input(false)],
            &out,
            &opts(),
            false,
            &mut |_, _| {},
            &mut || {
                calls += 1;
                if calls == 5 {
                    // The sealing thread may create a file while the folder is being removed
                    // ("directory not empty"): try again until the folder is gone.
                    let mut tries = 0;
                    while let Err(e) = std::fs::remove_dir_all(&out) {
                        tries += 1;
                        assert!(
                            e.kind() == std::io::ErrorKind::DirectoryNotEmpty && tries < 1000,
                            "{e}"
                        );
                    }
                }
                Ok(())
            },
        )
        .unwrap_err();
        let text = e.to_string();
        assert!(
            matches!(e, crate::Error::Io { ref path, .. } if path.starts_with(&out)),
            "{text}"
        );
        assert!(!out.exists(), "{text}");
    }

    #[test]
    fn a_checkpoint_error_stops_both_stages_and_leaves_nothing() {
        // At least 21 calls: one before each of the 20 batches, one before the keyring.
        for stop_at in [1, 5, 12, 21] {
            let dir = tempfile::tempdir().unwrap();
            let out = dir.path().join("ds");
            let mut calls = 0;
            let e = convert_with(
                &[input(false)],
                &out,
                &opts(),
                false,
                &mut |_, _| {},
                &mut || {
                    calls += 1;
                    if calls == stop_at {
                        Err(crate::Error::Stopped("interrupted".into()))
                    } else {
                        Ok(())
                    }
                },
            )
            .unwrap_err()
            .to_string();
            assert!(e.contains("interrupted"), "{stop_at}: {e}");
            assert_eq!(left(&out), Vec::<String>::new(), "{stop_at}");
        }
    }
}
