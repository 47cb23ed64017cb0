//! Arrow IPC input: the file format (`ARROW1` magic, a footer listing the record batches) and
//! the stream format (what `datasets.save_to_disk` writes as `data-00000-of-00001.arrow`),
//! told apart by their first bytes. Columns are mapped as [`arrow_columns`] says.
//!
//! The row count is read without decoding any data. File format: every record batch block the
//! footer lists is checked to lie inside the file, and its message header (not its body) read
//! for its row count. Stream format: one pass over the messages reads each header and seeks
//! past its body. [`estimated_bytes`](RecordInput::estimated_bytes) is the record batches'
//! body length (compressed, for a compressed file). The schema's metadata, then the footer's
//! (file format), are the input's metadata. Batches are decoded one at a time, as the file
//! holds them; compressed bodies (lz4, zstd) are supported. Every failure, a corrupt or
//! truncated file included, is an error naming the file.

#![forbid(unsafe_code)]
// Until the converter reads these inputs (issue 14, written beside them); remove with it.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::Arc;

use arrow_array::RecordBatch;
use arrow_buffer::{Buffer, MutableBuffer};
use arrow_ipc::reader::{FileDecoder, StreamReader};
use arrow_ipc::{Block, Message, MessageHeader};
use arrow_schema::Schema;

use super::arrow_columns::{self, ArrowRecords};
use super::open_file;
use super::records::RecordInput;
use crate::error::{Error, Result};

const WHAT: &str = "Arrow IPC file";
/// The file format's first (and last) six bytes.
const FILE_MAGIC: &[u8; 6] = b"ARROW1";
/// The stream format's message prefix (a legacy stream starts with the length alone).
const CONTINUATION: [u8; 4] = [0xff; 4];
/// Largest message header accepted (a header lists a batch's buffers: a few KiB in practice).
const MAX_MESSAGE_HEADER: u64 = 64 << 20;

/// Opens Arrow IPC file or stream `path`, counts its rows and prepares to decode them in
/// order.
pub fn open(path: &Path) -> Result<Box<dyn RecordInput>> {
    let (mut file, len) = open_file(path, WHAT)?;
    let mut head = [0u8; 6];
    let n = len.min(6) as usize;
    file.read_exact(&mut head[..n])
        .map_err(|e| Error::io(path, e))?;
    // A stream starts with a continuation marker, or (legacy) the first message's length.
    let legacy_len = i32::from_le_bytes([head[0], head[1], head[2], head[3]]);
    if &head == FILE_MAGIC {
        open_ipc_file(path, file, len)
    } else if n >= 4
        && (head[..4] == CONTINUATION || (legacy_len > 0 && legacy_len as u64 <= len - 4))
    {
        open_stream(path, file, len)
    } else {
        Err(Error::format(
            path,
            WHAT,
            "neither an Arrow IPC file (no ARROW1 magic) nor an Arrow IPC stream",
        ))
    }
}

fn malformed(path: &Path, reason: impl std::fmt::Display) -> Error {
    Error::format(path, WHAT, reason.to_string())
}

/// Reads `len` bytes at `offset` into an Arrow buffer (aligned, so decoding does not copy).
/// The caller checked that they lie inside the file.
fn read_buffer(path: &Path, file: &File, offset: u64, len: u64) -> Result<Buffer> {
    let len = usize::try_from(len).map_err(|_| malformed(path, "a block larger than memory"))?;
    let mut buf = MutableBuffer::try_from_len_zeroed(len)
        .map_err(|e| malformed(path, format!("a block of {len} bytes: {e}")))?;
    crate::format::read_at(file, path, offset, buf.as_slice_mut())?;
    Ok(buf.into())
}

/// The file format: magic, stream-format messages, footer, footer length, magic.
fn open_ipc_file(path: &Path, file: File, len: u64) -> Result<Box<dyn RecordInput>> {
    // 8 bytes of leading magic and padding, the footer, its 4-byte length, the magic.
    if len < 8 + 10 {
        return Err(malformed(
            path,
            format!("{len} bytes: too short for an Arrow IPC file"),
        ));
    }
    let mut tail = [0u8; 10];
    crate::format::read_at(&file, path, len - 10, &mut tail)?;
    if &tail[4..] != FILE_MAGIC {
        return Err(malformed(path, "no ARROW1 magic at the end (truncated?)"));
    }
    let footer_len = i32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]);
    let footer_start = u64::try_from(footer_len)
        .ok()
        .and_then(|f| (len - 10).checked_sub(f))
        .filter(|&start| start >= 8)
        .ok_or_else(|| {
            malformed(
                path,
                format!("footer length {footer_len} does not fit the file"),
            )
        })?;
    let footer_bytes = read_buffer(path, &file, footer_start, len - 10 - footer_start)?;
    let footer = arrow_ipc::root_as_footer(&footer_bytes)
        .map_err(|e| malformed(path, format!("footer: {e}")))?;
    let ipc_schema = footer
        .schema()
        .ok_or_else(|| malformed(path, "the footer has no schema"))?;
    if !ipc_schema.endianness().equals_to_target_endianness() {
        return Err(malformed(
            path,
            "written big-endian (this machine is little-endian)",
        ));
    }
    let schema = arrow_ipc::convert::try_fb_to_schema(ipc_schema)
        .map_err(|e| malformed(path, format!("schema: {e}")))?;
    let fields = arrow_columns::fields(path, &schema)?;
    let mut metadata: BTreeMap<String, String> = schema.metadata().clone().into_iter().collect();
    for kv in footer.custom_metadata().into_iter().flatten() {
        if let (Some(k), Some(v)) = (kv.key(), kv.value()) {
            metadata.insert(k.to_string(), v.to_string());
        }
    }
    // Every block within the data (after the leading magic, before the footer), with a header
    // that has room for its prefix: arrow-rs indexes such blocks unchecked.
    let check = |b: &Block| -> Result<(u64, u64)> {
        let offset = u64::try_from(b.offset()).ok().filter(|&o| o >= 8);
        let meta = u64::try_from(b.metaDataLength())
            .ok()
            .filter(|&m| (8..=MAX_MESSAGE_HEADER).contains(&m));
        let body = u64::try_from(b.bodyLength()).ok();
        match (offset, meta, body) {
            (Some(o), Some(m), Some(body))
                if o.checked_add(m + body)
                    .is_some_and(|end| end <= footer_start) =>
            {
                Ok((o, m))
            }
            _ => Err(malformed(
                path,
                format!(
                    "a footer block (offset {}, header {} bytes, body {} bytes) lies outside the data",
                    b.offset(),
                    b.metaDataLength(),
                    b.bodyLength()
                ),
            )),
        }
    };
    let mut decoder = FileDecoder::new(Arc::new(schema), footer.version());
    for block in footer.dictionaries().into_iter().flatten() {
        check(block)?;
        let buf = read_buffer(
            path,
            &file,
            block.offset() as u64,
            block.metaDataLength() as u64 + block.bodyLength() as u64,
        )?;
        decoder
            .read_dictionary(block, &buf)
            .map_err(|e| malformed(path, format!("dictionary: {e}")))?;
    }
    let blocks: Vec<Block> = footer
        .recordBatches()
        .ok_or_else(|| malformed(path, "the footer lists no record batches"))?
        .iter()
        .copied()
        .collect();
    let (mut rows, mut body_bytes) = (0u64, 0u64);
    for block in &blocks {
        let (offset, meta_len) = check(block)?;
        let header = read_buffer(path, &file, offset, meta_len)?;
        let message = parse_message(path, &header)?;
        let batch = message.header_as_record_batch().ok_or_else(|| {
            malformed(path, format!("the block at {offset} is not a record batch"))
        })?;
        rows = u64::try_from(batch.length())
            .ok()
            .and_then(|n| rows.checked_add(n))
            .ok_or_else(|| {
                malformed(
                    path,
                    format!(
                        "the record batch at {offset} counts {} rows",
                        batch.length()
                    ),
                )
            })?;
        body_bytes = body_bytes.saturating_add(block.bodyLength() as u64);
    }
    let owned = path.to_path_buf();
    let batches = blocks.into_iter().map(move |block| {
        let buf = read_buffer(
            &owned,
            &file,
            block.offset() as u64,
            block.metaDataLength() as u64 + block.bodyLength() as u64,
        )?;
        decoder
            .read_record_batch(&block, &buf)
            .map_err(|e| malformed(&owned, e))?
            .ok_or_else(|| {
                malformed(
                    &owned,
                    format!("the block at {} holds no record batch", block.offset()),
                )
            })
    });
    Ok(ArrowRecords::boxed(
        path, WHAT, fields, rows, body_bytes, metadata, batches,
    ))
}

/// An encapsulated message's header: a continuation marker (absent in legacy files), the
/// header's length, the header, padding.
fn parse_message<'a>(path: &Path, bytes: &'a [u8]) -> Result<Message<'a>> {
    let header = match bytes.get(..4) {
        Some(p) if p == CONTINUATION => &bytes[8..],
        _ => &bytes[4..],
    };
    arrow_ipc::root_as_message(header).map_err(|e| malformed(path, format!("message header: {e}")))
}

/// The stream format: a schema message, then dictionary and record batch messages, then an
/// end-of-stream marker (or the end of the file).
fn open_stream(path: &Path, file: File, len: u64) -> Result<Box<dyn RecordInput>> {
    let mut reader = BufReader::new(file);
    reader
        .seek(SeekFrom::Start(0))
        .map_err(|e| Error::io(path, e))?;
    let (schema, rows, body_bytes) = count_stream(path, &mut reader, len)?;
    let fields = arrow_columns::fields(path, &schema)?;
    let metadata = schema.metadata().clone().into_iter().collect();
    reader
        .seek(SeekFrom::Start(0))
        .map_err(|e| Error::io(path, e))?;
    let stream = StreamReader::try_new(reader, None).map_err(|e| malformed(path, e))?;
    let owned = path.to_path_buf();
    let batches = stream
        .map(move |b: std::result::Result<RecordBatch, _>| b.map_err(|e| malformed(&owned, e)));
    Ok(ArrowRecords::boxed(
        path, WHAT, fields, rows, body_bytes, metadata, batches,
    ))
}

/// One pass over a stream's message headers, seeking past their bodies: its schema, its row
/// count and its record batches' body bytes.
fn count_stream(path: &Path, r: &mut BufReader<File>, len: u64) -> Result<(Schema, u64, u64)> {
    let mut at = 0u64;
    let (mut schema, mut rows, mut body_bytes) = (None, 0u64, 0u64);
    let truncated = |at: u64| {
        malformed(
            path,
            format!("truncated: a message at byte {at} runs past the end of the file"),
        )
    };
    let read = |r: &mut BufReader<File>, buf: &mut [u8], at: &mut u64| -> Result<()> {
        r.read_exact(buf).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => truncated(*at),
            _ => Error::io(path, e),
        })?;
        *at += buf.len() as u64;
        Ok(())
    };
    loop {
        if at >= len {
            break; // The end of the file ends a stream too.
        }
        let start = at;
        let mut word = [0u8; 4];
        read(r, &mut word, &mut at)?;
        if word == CONTINUATION {
            read(r, &mut word, &mut at)?;
        }
        let meta_len = i32::from_le_bytes(word);
        if meta_len == 0 {
            break; // End-of-stream marker.
        }
        let meta_len = u64::try_from(meta_len)
            .ok()
            .filter(|&m| m <= MAX_MESSAGE_HEADER && m <= len.saturating_sub(at))
            .ok_or_else(|| {
                malformed(
                    path,
                    format!("the message at byte {start} has a header length of {meta_len}"),
                )
            })?;
        let mut header = vec![0u8; meta_len as usize];
        read(r, &mut header, &mut at)?;
        let message = arrow_ipc::root_as_message(&header)
            .map_err(|e| malformed(path, format!("the message at byte {start}: {e}")))?;
        let body = u64::try_from(message.bodyLength())
            .ok()
            .filter(|&b| b <= len.saturating_sub(at))
            .ok_or_else(|| truncated(start))?;
        match message.header_type() {
            MessageHeader::Schema if schema.is_none() => {
                let s = message
                    .header_as_schema()
                    .expect("a schema message holds a schema");
                if !s.endianness().equals_to_target_endianness() {
                    return Err(malformed(
                        path,
                        "written big-endian (this machine is little-endian)",
                    ));
                }
                schema = Some(
                    arrow_ipc::convert::try_fb_to_schema(s)
                        .map_err(|e| malformed(path, format!("schema: {e}")))?,
                );
            }
            MessageHeader::DictionaryBatch if schema.is_some() => {}
            MessageHeader::RecordBatch if schema.is_some() => {
                let n = message
                    .header_as_record_batch()
                    .expect("a record batch message holds one")
                    .length();
                rows = u64::try_from(n)
                    .ok()
                    .and_then(|n| rows.checked_add(n))
                    .ok_or_else(|| {
                        malformed(
                            path,
                            format!("the record batch at byte {start} counts {n} rows"),
                        )
                    })?;
                body_bytes = body_bytes.saturating_add(body);
            }
            t => {
                return Err(malformed(
                    path,
                    format!("unexpected {t:?} message at byte {start}"),
                ));
            }
        }
        r.seek_relative(body as i64)
            .map_err(|e| Error::io(path, e))?;
        at += body;
    }
    let schema = schema.ok_or_else(|| malformed(path, "the stream has no schema message"))?;
    Ok((schema, rows, body_bytes))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use arrow_array::{ArrayRef, Int32Array, RecordBatchWriter, TimestampSecondArray};
    use arrow_ipc::writer::{FileWriter, StreamWriter};

    use super::*;
    use crate::format::input::arrow_columns::test_data::{batch, drain, expected, specs};

    /// The sample batches (an empty one among them), their schema carrying metadata.
    fn sample() -> Vec<RecordBatch> {
        let meta = HashMap::from([("huggingface".to_string(), "{}".to_string())]);
        [0..3000, 3000..3003, 3003..3003, 3003..5001]
            .into_iter()
            .map(|r| {
                let b = batch(r);
                let schema = Arc::new(b.schema().as_ref().clone().with_metadata(meta.clone()));
                b.with_schema(schema).unwrap()
            })
            .collect()
    }

    fn write_file(path: &Path, batches: &[RecordBatch]) {
        let f = File::create(path).unwrap();
        write_all(
            FileWriter::try_new(f, &batches[0].schema()).unwrap(),
            batches,
        );
    }

    fn write_stream(path: &Path, batches: &[RecordBatch]) {
        let f = File::create(path).unwrap();
        write_all(
            StreamWriter::try_new(f, &batches[0].schema()).unwrap(),
            batches,
        );
    }

    fn write_all(mut w: impl RecordBatchWriter, batches: &[RecordBatch]) {
        for b in batches {
            w.write(b).unwrap();
        }
        w.close().unwrap();
    }

    fn check_sample(path: &Path) {
        let mut input = open(path).unwrap();
        assert_eq!(input.fields(), specs());
        assert_eq!(input.rows(), 5001, "counted before any batch is decoded");
        assert!(
            input.estimated_bytes() > 5001 * 8,
            "{}",
            input.estimated_bytes()
        );
        assert_eq!(
            input.metadata().get("huggingface").map(String::as_str),
            Some("{}")
        );
        let (cols, sizes) = drain(input.as_mut()).unwrap();
        assert_eq!(sizes, [3000, 3, 1998], "empty batches are skipped");
        for (i, (got, want)) in cols.iter().zip(expected(0..5001)).enumerate() {
            assert!(*got == want, "column {}", specs()[i].name);
        }
    }

    #[test]
    fn reads_the_file_format() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data.arrow");
        write_file(&path, &sample());
        assert_eq!(&std::fs::read(&path).unwrap()[..6], FILE_MAGIC);
        check_sample(&path);
    }

    #[test]
    fn reads_the_stream_format_with_or_without_its_end_marker() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data-00000-of-00001.arrow");
        write_stream(&path, &sample());
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[..4], CONTINUATION);
        check_sample(&path);
        assert_eq!(
            &bytes[bytes.len() - 8..],
            [0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0]
        );
        std::fs::write(&path, &bytes[..bytes.len() - 8]).unwrap();
        check_sample(&path);
    }

    fn one_column(name: &str, array: ArrayRef) -> Vec<RecordBatch> {
        vec![RecordBatch::try_from_iter([(name, array)]).unwrap()]
    }

    #[test]
    fn nulls_and_unsupported_types_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nulls.arrow");
        let values = Int32Array::from_iter((0..10).map(|i| (i != 7).then_some(i)));
        write_file(&path, &one_column("n", Arc::new(values)));
        let mut input = open(&path).unwrap();
        let e = input.next_batch().unwrap_err().to_string();
        assert!(
            e.contains("nulls.arrow") && e.contains("'n'") && e.contains("null at row 7 "),
            "{e}"
        );
        let path = dir.path().join("time.arrow");
        write_stream(
            &path,
            &one_column("t", Arc::new(TimestampSecondArray::from(vec![1]))),
        );
        let e = open(&path).err().expect("refused").to_string();
        assert!(
            e.contains("time.arrow") && e.contains("column 't'") && e.contains("Timestamp"),
            "{e}"
        );
    }

    #[test]
    fn other_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.arrow");
        for bytes in [
            &b""[..],
            b"AR",
            b"ARROW",
            b"{\"a\": 1}\n",
            b"\0\0\0\0\0\0\0\0",
        ] {
            std::fs::write(&path, bytes).unwrap();
            let e = open(&path).err().expect("refused").to_string();
            assert!(
                e.contains("x.arrow") && e.contains("neither"),
                "{bytes:?}: {e}"
            );
        }
    }

    /// Opens `path` and reads all of it: the rows it counted, or an error.
    fn read_all(path: &Path) -> Result<u64> {
        let mut input = open(path)?;
        let (_, sizes) = drain(input.as_mut())?;
        assert_eq!(sizes.iter().sum::<usize>() as u64, input.rows());
        Ok(input.rows())
    }

    #[test]
    fn truncated_files_are_errors_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let whole = dir.path().join("whole.arrow");
        let cut = dir.path().join("cut.arrow");
        let batches = [batch(0..30), batch(30..60)];
        write_file(&whole, &batches);
        let bytes = std::fs::read(&whole).unwrap();
        for len in 0..bytes.len() {
            std::fs::write(&cut, &bytes[..len]).unwrap();
            let e = read_all(&cut).expect_err(&format!("cut at {len} of {}", bytes.len()));
            assert!(e.to_string().contains("cut.arrow"), "cut at {len}: {e}");
        }
        // A stream cut between two messages is a shorter stream; cut anywhere else, an error.
        write_stream(&whole, &batches);
        let bytes = std::fs::read(&whole).unwrap();
        let mut shorter = 0;
        for len in 0..bytes.len() {
            std::fs::write(&cut, &bytes[..len]).unwrap();
            match read_all(&cut) {
                Ok(rows) => {
                    assert!(
                        rows < 60 || len >= bytes.len() - 8,
                        "cut at {len}: {rows} rows"
                    );
                    shorter += 1;
                }
                Err(e) => assert!(e.to_string().contains("cut.arrow"), "cut at {len}: {e}"),
            }
        }
        // After the schema, after each of the 2 batches (each preceded by its dictionary
        // message), and within the end marker.
        assert!(shorter <= 12, "{shorter} cuts read as streams");
    }

    #[test]
    fn corrupt_files_are_errors_naming_the_file_never_panics() {
        let dir = tempfile::tempdir().unwrap();
        let whole = dir.path().join("whole.arrow");
        let bad = dir.path().join("bad.arrow");
        let batches = [batch(0..4), batch(4..8)];
        for stream in [false, true] {
            if stream {
                write_stream(&whole, &batches);
            } else {
                write_file(&whole, &batches);
            }
            let bytes = std::fs::read(&whole).unwrap();
            let mut refused = 0;
            for at in 0..bytes.len() {
                let mut b = bytes.clone();
                // A low bit, a sign bit or every bit, by turns.
                b[at] ^= [0x01, 0x80, 0xff][at % 3];
                std::fs::write(&bad, &b).unwrap();
                if let Err(e) = read_all(&bad) {
                    assert!(e.to_string().contains("bad.arrow"), "byte {at}: {e}");
                    refused += 1;
                }
            }
            assert!(
                refused > bytes.len() / 10,
                "stream {stream}: {refused} of {} refused",
                bytes.len()
            );
        }
    }
}
