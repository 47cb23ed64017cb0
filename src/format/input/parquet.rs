//! Parquet input: a file's columns decoded batch by batch through arrow-rs's Parquet reader and
//! mapped as [`arrow_columns`] says.
//!
//! The row count is the footer's (the sum of its row groups' counts, which must equal the
//! file's); [`estimated_bytes`](RecordInput::estimated_bytes) is the row groups' total
//! uncompressed size. Batches of [`BATCH_ROWS`] rows are decoded page by page, so memory stays
//! bounded by a batch and the pages it spans. The file's key-value metadata, less the Arrow
//! schema arrow-rs stores there (`ARROW:schema`) and keys without a value, is the input's
//! metadata. Codecs: uncompressed, snappy, zstd, lz4 and gzip; a brotli page is refused with
//! an error naming the codec. Every failure, a corrupt or truncated file included, is an
//! error naming the file.

#![forbid(unsafe_code)]
// Until the converter reads these inputs (issue 14, written beside them); remove with it.

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};

use arrow_array::RecordBatch;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};

use super::arrow_columns::{self, ArrowRecords};
use super::records::RecordInput;
use super::{open_file, parquet_pages};
use crate::error::{Error, Result};

const WHAT: &str = "Parquet file";
/// Rows per decoded batch.
pub const BATCH_ROWS: usize = 8192;

/// Opens Parquet file `path`: reads its footer (schema, row groups, metadata) and prepares to
/// decode its rows in order.
pub fn open(path: &Path) -> Result<Box<dyn RecordInput>> {
    let (file, file_len) = open_file(path, WHAT)?;
    let probe = file.try_clone().map_err(|e| Error::io(path, e))?;
    let malformed = |e: parquet::errors::ParquetError| Error::format(path, WHAT, e.to_string());
    let builder = guarded(path, || {
        ParquetRecordBatchReaderBuilder::try_new(file).map_err(malformed)
    })?;
    let fields = arrow_columns::fields(path, builder.schema())?;
    let meta = builder.metadata();
    // Before the decoder sizes any buffer from a page header.
    parquet_pages::check_pages(path, probe, file_len, meta)?;
    let groups = meta.row_groups();
    let rows = groups.iter().try_fold(0u64, |sum, g| {
        sum.checked_add(u64::try_from(g.num_rows()).ok()?)
    });
    let rows = match rows {
        Some(rows) if i64::try_from(rows) == Ok(meta.file_metadata().num_rows()) => rows,
        _ => {
            return Err(Error::format(
                path,
                WHAT,
                format!(
                    "its footer counts {} rows, its {} row groups do not add up to that",
                    meta.file_metadata().num_rows(),
                    groups.len()
                ),
            ));
        }
    };
    let estimated_bytes = groups
        .iter()
        .map(|g| u64::try_from(g.total_byte_size()).unwrap_or(0))
        .fold(0, u64::saturating_add);
    let metadata: BTreeMap<String, String> = meta
        .file_metadata()
        .key_value_metadata()
        .into_iter()
        .flatten()
        .filter(|kv| kv.key != "ARROW:schema")
        .filter_map(|kv| Some((kv.key.clone(), kv.value.clone()?)))
        .collect();
    let reader = guarded(path, || {
        builder
            .with_batch_size(BATCH_ROWS)
            .build()
            .map_err(malformed)
    })?;
    let batches = Batches {
        path: path.to_path_buf(),
        reader: Some(reader),
    };
    Ok(ArrowRecords::boxed(
        path,
        WHAT,
        fields,
        rows,
        estimated_bytes,
        metadata,
        batches,
    ))
}

/// The decoded batches of a Parquet file, each decoded under [`guarded`]; none after a panic.
struct Batches {
    path: PathBuf,
    reader: Option<ParquetRecordBatchReader>,
}

impl Iterator for Batches {
    type Item = Result<RecordBatch>;

    fn next(&mut self) -> Option<Result<RecordBatch>> {
        let reader = self.reader.as_mut()?;
        let path = &self.path;
        let next = guarded(path, || {
            reader
                .next()
                .transpose()
                .map_err(|e| Error::format(path, WHAT, e.to_string()))
        });
        if next.is_err() {
            // After a panic the decoder's state is unknown: it is dropped, never called again.
            self.reader = None;
        }
        next.transpose()
    }
}

thread_local! {
    /// Whether this thread is inside [`guarded`] (the panic hook of
    /// [`quiet_guarded_panics`] then stays silent).
    static GUARDED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Installs (once per process) a panic hook that prints nothing for a panic of the Parquet
/// decoder that [`guarded`] catches and turns into an error naming the file, and hands every
/// other panic to the hook that was installed before. The CLI and the Python module call it;
/// a library user who keeps their own hook need not.
pub fn quiet_guarded_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !GUARDED.with(std::cell::Cell::get) {
                previous(info);
            }
        }));
    });
}

/// Runs `f`, a call into arrow-rs's Parquet decoder, turning a panic into an error naming the
/// file. A last resort: that decoder panics on some corrupt files instead of returning an
/// error (a data page that claims dictionary encoding in a column chunk without a dictionary
/// page, say), and a corrupt input must be an error, never a crash. The panic hook prints the
/// panic's message unless [`quiet_guarded_panics`] is installed; whatever `f` borrowed mutably is dropped by the caller
/// after an error (see [`Batches`]), so no broken state is used again.
fn guarded<T>(path: &Path, f: impl FnOnce() -> Result<T>) -> Result<T> {
    /// Clears the flag however `f` ends.
    struct Unset;
    impl Drop for Unset {
        fn drop(&mut self) {
            GUARDED.with(|g| g.set(false));
        }
    }
    GUARDED.with(|g| g.set(true));
    let unset = Unset;
    let result = std::panic::catch_unwind(AssertUnwindSafe(f));
    drop(unset);
    result.unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "no message".into());
        Err(Error::format(
            path,
            WHAT,
            format!("corrupt: the Parquet decoder failed ({what})"),
        ))
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow_array::{ArrayRef, Decimal128Array, Int32Array, RecordBatch, StructArray};
    use arrow_schema::{DataType, Field};
    use parquet::arrow::ArrowWriter;
    use parquet::basic::{Compression, GzipLevel, ZstdLevel};
    use parquet::file::metadata::KeyValue;
    use parquet::file::properties::WriterProperties;

    use super::*;
    use crate::format::input::arrow_columns::test_data::{batch, drain, expected, specs};

    fn write(path: &Path, batches: &[RecordBatch], props: WriterProperties) {
        let file = std::fs::File::create(path).unwrap();
        let mut w = ArrowWriter::try_new(file, batches[0].schema(), Some(props)).unwrap();
        for b in batches {
            w.write(b).unwrap();
        }
        w.close().unwrap();
    }

    fn props(compression: Compression) -> WriterProperties {
        WriterProperties::builder()
            .set_compression(compression)
            .set_max_row_group_row_count(Some(7000))
            .set_key_value_metadata(Some(vec![
                KeyValue::new("source".into(), "test".to_string()),
                KeyValue::new("no value".into(), None),
            ]))
            .build()
    }

    #[test]
    fn reads_every_column_kind_over_row_groups_and_batches() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data.parquet");
        // 20000 rows written in pieces that do not line up with the 7000-row groups.
        let pieces = [0..3000, 3000..15000, 15000..20000];
        let batches: Vec<_> = pieces.iter().map(|r| batch(r.clone())).collect();
        write(&path, &batches, props(Compression::SNAPPY));
        let mut input = open(&path).unwrap();
        assert_eq!(input.path(), path);
        assert_eq!(input.fields(), specs());
        assert_eq!(input.rows(), 20000);
        assert!(
            input.estimated_bytes() > 20000 * 8,
            "{}",
            input.estimated_bytes()
        );
        let meta = input.metadata();
        assert_eq!(meta.get("source").map(String::as_str), Some("test"));
        assert!(
            !meta.contains_key("ARROW:schema") && !meta.contains_key("no value"),
            "{meta:?}"
        );
        let (cols, sizes) = drain(input.as_mut()).unwrap();
        assert_eq!(sizes.iter().sum::<usize>(), 20000);
        assert!(sizes.iter().all(|&n| n <= BATCH_ROWS), "{sizes:?}");
        assert!(sizes.len() >= 3, "batches: {sizes:?}");
        for (i, (got, want)) in cols.iter().zip(expected(0..20000)).enumerate() {
            assert!(*got == want, "column {}", specs()[i].name);
        }
        assert!(input.next_batch().unwrap().is_none(), "stays at its end");
    }

    #[test]
    fn reads_every_codec_but_brotli() {
        let dir = tempfile::tempdir().unwrap();
        for c in [
            Compression::UNCOMPRESSED,
            Compression::SNAPPY,
            Compression::ZSTD(ZstdLevel::default()),
            Compression::LZ4_RAW,
            Compression::LZ4,
            Compression::GZIP(GzipLevel::default()),
        ] {
            let path = dir.path().join(format!("{c:?}.parquet"));
            write(&path, &[batch(0..100)], props(c));
            let mut input = open(&path).unwrap();
            assert!(
                drain(input.as_mut()).unwrap().0 == expected(0..100),
                "{c:?}"
            );
        }
    }

    #[test]
    fn nulls_are_refused_naming_the_row() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nulls.parquet");
        let values = (0..10000).map(|i| (i != 9000).then_some(i));
        let b = RecordBatch::try_from_iter([(
            "n",
            Arc::new(Int32Array::from_iter(values)) as ArrayRef,
        )])
        .unwrap();
        write(&path, &[b], props(Compression::SNAPPY));
        let mut input = open(&path).unwrap();
        let mut e = None;
        for _ in 0..3 {
            if let Err(err) = input.next_batch() {
                e = Some(err.to_string());
                break;
            }
        }
        let e = e.expect("a null is refused");
        assert!(
            e.contains(&path.display().to_string()) && e.contains("'n'"),
            "{e}"
        );
        assert!(e.contains("null at row 9000 "), "{e}");
    }

    #[test]
    fn unsupported_columns_are_refused_when_opened() {
        let dir = tempfile::tempdir().unwrap();
        let inner: ArrayRef = Arc::new(Int32Array::from(vec![1, 2]));
        let cases: Vec<(ArrayRef, &str)> = vec![
            (
                Arc::new(StructArray::from(vec![(
                    Arc::new(Field::new("x", DataType::Int32, false)),
                    inner,
                )])),
                "Struct",
            ),
            (
                Arc::new(
                    Decimal128Array::from(vec![1, 2])
                        .with_precision_and_scale(9, 2)
                        .unwrap(),
                ),
                "Decimal128(9, 2)",
            ),
        ];
        for (i, (array, shown)) in cases.into_iter().enumerate() {
            let path = dir.path().join(format!("{i}.parquet"));
            let b = RecordBatch::try_from_iter([
                ("ok", Arc::new(Int32Array::from(vec![1, 2])) as ArrayRef),
                ("odd", array),
            ])
            .unwrap();
            write(&path, &[b], props(Compression::SNAPPY));
            let e = open(&path).err().expect("refused").to_string();
            assert!(
                e.contains(&path.display().to_string()) && e.contains("column 'odd'"),
                "{e}"
            );
            assert!(e.contains(shown), "{e}");
        }
    }

    /// Opens `path` and reads all of it.
    fn read_all(path: &Path) -> Result<()> {
        let mut input = open(path)?;
        drain(input.as_mut()).map(|_| ())
    }

    /// A decoder panic becomes an error naming the file; with the quiet hook installed it
    /// prints nothing, and a panic elsewhere still reaches the hook installed before.
    #[test]
    fn guarded_panics_are_errors_and_quiet() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static SEEN: AtomicUsize = AtomicUsize::new(0);
        std::panic::set_hook(Box::new(|_| {
            SEEN.fetch_add(1, Ordering::SeqCst);
        }));
        quiet_guarded_panics();
        let path = Path::new("x.parquet");
        let e = guarded::<()>(path, || panic!("decoder bug")).unwrap_err();
        assert!(
            e.to_string().contains("x.parquet") && e.to_string().contains("decoder bug"),
            "{e}"
        );
        assert_eq!(
            SEEN.load(Ordering::SeqCst),
            0,
            "a caught decoder panic was printed"
        );
        assert!(!GUARDED.with(std::cell::Cell::get));
        let outside = std::panic::catch_unwind(|| panic!("elsewhere"));
        assert!(outside.is_err());
        assert_eq!(SEEN.load(Ordering::SeqCst), 1, "another panic was silenced");
        // The default hook again, for the other tests' failure messages.
        drop(std::panic::take_hook());
    }

    /// A page header claiming a 2 GiB page (which arrow-rs would allocate before decoding) is
    /// refused when the file is opened, naming the row group and column, in bounded time.
    #[test]
    fn a_page_claiming_a_huge_size_is_refused_before_decoding() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pages.parquet");
        write(&path, &[batch(0..50)], props(Compression::UNCOMPRESSED));
        let mut bytes = std::fs::read(&path).unwrap();
        // The first column chunk's first page header, rewritten in place at the same length:
        // type, uncompressed size i32::MAX, the same compressed size, then a skipped binary
        // field padding it out.
        let file = std::fs::File::open(&path).unwrap();
        let meta = ParquetRecordBatchReaderBuilder::try_new(file)
            .unwrap()
            .metadata()
            .clone();
        let chunk = meta.row_group(0).column(0);
        let at = chunk
            .dictionary_page_offset()
            .unwrap_or(chunk.data_page_offset()) as usize;
        let (len, compressed) = super::parquet_pages::header_at(&bytes[at..]).unwrap();
        let zz = |v: i64| -> Vec<u8> {
            let mut u = ((v << 1) ^ (v >> 63)) as u64;
            let mut out = Vec::new();
            while u >= 0x80 {
                out.push((u as u8) | 0x80);
                u >>= 7;
            }
            out.push(u as u8);
            out
        };
        let mut h = vec![0x15];
        h.extend(zz(0));
        h.push(0x15);
        h.extend(zz(i32::MAX.into()));
        h.push(0x15);
        h.extend(zz(compressed));
        let pad = len - h.len() - 3;
        assert!(pad < 0x80, "header of {len} bytes");
        h.extend([0x68, pad as u8]); // field 9, binary
        h.extend(std::iter::repeat_n(0u8, pad));
        h.push(0);
        assert_eq!(h.len(), len);
        bytes[at..at + len].copy_from_slice(&h);
        let bad = dir.path().join("huge-page.parquet");
        std::fs::write(&bad, &bytes).unwrap();
        let t = std::time::Instant::now();
        let e = open(&bad).err().expect("refused").to_string();
        assert!(
            e.contains("huge-page.parquet")
                && e.contains("row group 0")
                && e.contains("claims 2147483647 bytes uncompressed"),
            "{e}"
        );
        assert!(t.elapsed().as_secs() < 5, "{:?}", t.elapsed());
    }

    #[test]
    fn truncated_files_are_errors_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("whole.parquet");
        write(&path, &[batch(0..20)], props(Compression::SNAPPY));
        let bytes = std::fs::read(&path).unwrap();
        let cut = dir.path().join("cut.parquet");
        // Lengths in the header magic, in data pages, in the footer, its length, the magic
        // (every third length: the debug-built decoder is slow).
        for len in (0..bytes.len()).step_by(3) {
            std::fs::write(&cut, &bytes[..len]).unwrap();
            let e = read_all(&cut).expect_err(&format!("cut at {len} of {}", bytes.len()));
            assert!(e.to_string().contains("cut.parquet"), "cut at {len}: {e}");
        }
    }

    #[test]
    fn corrupt_files_are_errors_naming_the_file_never_panics() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("whole.parquet");
        for (start, c) in [(0, Compression::UNCOMPRESSED), (1, Compression::SNAPPY)] {
            write(&path, &[batch(0..10), batch(10..20)], props(c));
            let bytes = std::fs::read(&path).unwrap();
            let bad = dir.path().join("bad.parquet");
            let mut refused = 0;
            // Every third byte (the debug-built decoder is slow), a different third each codec.
            for at in (start..bytes.len()).step_by(3) {
                let mut b = bytes.clone();
                b[at] ^= 0x5a;
                std::fs::write(&bad, &b).unwrap();
                if let Err(e) = read_all(&bad) {
                    assert!(e.to_string().contains("bad.parquet"), "byte {at}: {e}");
                    refused += 1;
                }
            }
            // Flipped values may still decode (Parquet pages carry no checksum by default),
            // but flipped structure may not.
            assert!(
                refused > bytes.len() / 10,
                "{c:?}: {refused} of {} refused",
                bytes.len()
            );
        }
    }
}
