//! JSONL input: one JSON object per line, and of each, the named columns, each a list of
//! integers (token ids, say): a ragged column of element shape `[]`.
//!
//! A first pass reads every line: it checks that each named column is a list of integers that
//! fit in 64 bits (signed), counts the rows, and picks each column's dtype: `I32` when every
//! value of that column fits in 32 bits (signed), otherwise `I64`. Reading then parses the file
//! again, line by line. Anything else (a line that is not an object, a missing column, a
//! column given twice, a value that is not a list of integers, a float such as `1.0`) is an
//! error naming the file, the line (counting from 1) and the column. Other keys of a line are
//! skipped unread. Lines holding only whitespace are skipped (as a trailing newline is), and
//! still counted in line numbers. A line may hold at most [`MAX_LINE`] bytes.
//!
//! Memory stays bounded by a line and a batch ([`BATCH_ROWS`] rows, or the first row past
//! [`BATCH_BYTES`]). Every buffer holding the file's bytes or values is [`Zeroizing`] and never
//! reallocated in place (it is copied into a larger one and the old one zeroed), so no copy of
//! the plaintext is left behind unzeroed.

#![forbid(unsafe_code)]
// Until the converter reads these inputs (issue 14, written beside them); remove with it.

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use zeroize::{Zeroize, Zeroizing};

use super::open_file;
use super::records::{ColumnData, FieldSpec, RecordInput, RowBatch};
use crate::error::{Error, Result};
use crate::format::Dtype;
use crate::format::json::quote;

const WHAT: &str = "JSONL file";
/// Longest line accepted, in bytes (its newline excluded).
pub const MAX_LINE: usize = 64 << 20;
/// Most rows per batch.
pub const BATCH_ROWS: usize = 8192;
/// A batch ends with the row that takes its values past this many bytes.
pub const BATCH_BYTES: usize = 64 << 20;
/// Bytes read from the file at a time.
const CHUNK: usize = 64 << 10;

/// Opens JSONL file `path` as the ragged integer columns `columns`, reading it once to check
/// every line, count the rows and choose each column's dtype (see the module doc).
pub fn open(path: &Path, columns: &[String]) -> Result<Box<dyn RecordInput>> {
    open_limited(path, columns, MAX_LINE)
}

/// [`open`] with lines of at most `max_line` bytes.
fn open_limited(path: &Path, columns: &[String], max_line: usize) -> Result<Box<dyn RecordInput>> {
    if columns.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "{}: no column named to read from the JSONL file",
            path.display()
        )));
    }
    let mut index = HashMap::new();
    for (i, name) in columns.iter().enumerate() {
        if index.insert(name.clone(), i).is_some() {
            return Err(Error::InvalidArgument(format!(
                "{}: column '{}' is named twice",
                path.display(),
                quote(name)
            )));
        }
    }
    let (file, _) = open_file(path, WHAT)?;
    let mut lines = Lines::new(file, max_line);
    let mut scan: Vec<Column> = columns.iter().map(|_| Column::scan()).collect();
    let mut rows = 0u64;
    while lines.next(path)? {
        if parse_line(path, columns, &index, &lines, &mut scan)? {
            rows += 1;
        }
    }
    let fields: Vec<FieldSpec> = columns
        .iter()
        .zip(&scan)
        .map(|(name, c)| FieldSpec {
            name: name.clone(),
            dtype: if c.fits_i32 { Dtype::I32 } else { Dtype::I64 },
            shape: Vec::new(),
            ragged: true,
        })
        .collect();
    let estimated_bytes = fields
        .iter()
        .zip(&scan)
        .map(|(f, c)| c.elements.saturating_mul(f.dtype.size_bytes() as u64))
        .fold(0, u64::saturating_add);
    let mut file = lines.file;
    file.seek(SeekFrom::Start(0))
        .map_err(|e| Error::io(path, e))?;
    Ok(Box::new(JsonlInput {
        path: path.to_path_buf(),
        columns: columns.to_vec(),
        index,
        fields,
        rows,
        estimated_bytes,
        lines: Lines::new(file, max_line),
        delivered: 0,
    }))
}

struct JsonlInput {
    path: PathBuf,
    columns: Vec<String>,
    index: HashMap<String, usize>,
    fields: Vec<FieldSpec>,
    rows: u64,
    estimated_bytes: u64,
    lines: Lines,
    delivered: u64,
}

impl RecordInput for JsonlInput {
    fn path(&self) -> &Path {
        &self.path
    }

    fn fields(&self) -> &[FieldSpec] {
        &self.fields
    }

    fn rows(&self) -> u64 {
        self.rows
    }

    fn estimated_bytes(&self) -> u64 {
        self.estimated_bytes
    }

    fn next_batch(&mut self) -> Result<Option<RowBatch>> {
        let mut cols: Vec<Column> = self.fields.iter().map(|f| Column::write(f.dtype)).collect();
        let mut rows = 0usize;
        let changed = |what: String| {
            Error::format(
                &self.path,
                WHAT,
                format!("{what}: the file changed since it was opened"),
            )
        };
        let mut ended = false;
        while rows < BATCH_ROWS && cols.iter().map(|c| c.values.len()).sum::<usize>() < BATCH_BYTES
        {
            if !self.lines.next(&self.path)? {
                ended = true;
                break;
            }
            if !parse_line(
                &self.path,
                &self.columns,
                &self.index,
                &self.lines,
                &mut cols,
            )? {
                continue;
            }
            if self.delivered == self.rows {
                return Err(changed(format!("more than {} rows", self.rows)));
            }
            rows += 1;
            self.delivered += 1;
        }
        if ended && self.delivered != self.rows {
            return Err(changed(format!(
                "{} rows, {} when it was opened",
                self.delivered, self.rows
            )));
        }
        if rows == 0 {
            return Ok(None);
        }
        Ok(Some(RowBatch {
            rows,
            columns: cols
                .into_iter()
                .map(|c| ColumnData::Ragged {
                    values: c.values,
                    offsets: c.offsets,
                })
                .collect(),
        }))
    }
}

/// Parses line `lines.line` into `cols` (in `columns` order; `index` maps names to positions).
/// `false` for a line of whitespace alone.
fn parse_line(
    path: &Path,
    columns: &[String],
    index: &HashMap<String, usize>,
    lines: &Lines,
    cols: &mut [Column],
) -> Result<bool> {
    let line = &lines.line[..];
    if line.iter().all(u8::is_ascii_whitespace) {
        return Ok(false);
    }
    let mut seen = vec![false; cols.len()];
    let mut visitor = LineVisitor {
        index,
        cols,
        seen: &mut seen,
        current: None,
    };
    let mut de = serde_json::Deserializer::from_slice(line);
    let parsed = (&mut visitor).deserialize(&mut de).and_then(|()| de.end());
    let at = |column: Option<usize>| match column {
        Some(c) => format!("line {}, column '{}'", lines.number, quote(&columns[c])),
        None => format!("line {}", lines.number),
    };
    if let Err(e) = parsed {
        // serde_json places the error in the line it was given (always its line 1): say where
        // in this line instead.
        let text = e.to_string();
        let message =
            match text.strip_suffix(&format!(" at line {} column {}", e.line(), e.column())) {
                Some(m) => format!("{m} (at byte {})", e.column()),
                None => text.clone(),
            };
        return Err(Error::format(
            path,
            WHAT,
            format!("{}: {message}", at(visitor.current)),
        ));
    }
    if let Some(missing) = seen.iter().position(|&s| !s) {
        return Err(Error::format(
            path,
            WHAT,
            format!(
                "{}: no column '{}' (every line must hold every column read)",
                at(None),
                quote(&columns[missing])
            ),
        ));
    }
    Ok(true)
}

/// One column of the first pass (`values` unused) or of a batch.
struct Column {
    /// First pass: whether every value so far fits in an `i32`.
    fits_i32: bool,
    /// First pass: values seen.
    elements: u64,
    /// Batch: the dtype chosen by the first pass; `None` in the first pass.
    dtype: Option<Dtype>,
    /// Batch: the values, little-endian.
    values: Zeroizing<Vec<u8>>,
    /// Batch: element offsets, from 0.
    offsets: Zeroizing<Vec<u64>>,
}

impl Column {
    fn scan() -> Self {
        Column {
            fits_i32: true,
            elements: 0,
            dtype: None,
            values: Zeroizing::new(Vec::new()),
            offsets: Zeroizing::new(Vec::new()),
        }
    }

    fn write(dtype: Dtype) -> Self {
        Column {
            dtype: Some(dtype),
            offsets: Zeroizing::new(vec![0]),
            ..Column::scan()
        }
    }

    /// Takes one value; an error if it no longer fits the dtype the first pass chose.
    fn push(&mut self, v: i64) -> std::result::Result<(), String> {
        let fits = i32::try_from(v).ok();
        match self.dtype {
            None => {
                self.fits_i32 &= fits.is_some();
                self.elements += 1;
            }
            Some(Dtype::I32) => {
                let v = fits.ok_or_else(|| {
                    format!("{v} does not fit in 32 bits, as every value of this column did when the file was opened")
                })?;
                extend(&mut self.values, &v.to_le_bytes());
            }
            Some(_) => extend(&mut self.values, &v.to_le_bytes()),
        }
        Ok(())
    }

    /// Ends a row.
    fn end_row(&mut self) {
        if let Some(dtype) = self.dtype {
            let end = (self.values.len() / dtype.size_bytes()) as u64;
            extend(&mut self.offsets, &[end]);
        }
    }
}

/// Appends `items` to `v`, moving `v` to a larger allocation when it is full: the old one is
/// zeroed as it is dropped (a `Vec` growing in place would free it unzeroed).
fn extend<T: Copy + Zeroize>(v: &mut Zeroizing<Vec<T>>, items: &[T]) {
    if v.capacity() - v.len() < items.len() {
        let mut larger = Zeroizing::new(Vec::with_capacity(
            (v.len() + items.len()).max(2 * v.capacity()).max(64),
        ));
        larger.extend_from_slice(v);
        *v = larger;
    }
    v.extend_from_slice(items);
}

/// A file read line by line through one fixed buffer (see [`extend`] for why).
struct Lines {
    file: File,
    buf: Zeroizing<Vec<u8>>,
    /// `buf[pos..end]` is read and not yet consumed.
    pos: usize,
    end: usize,
    /// The current line, its newline excluded.
    line: Zeroizing<Vec<u8>>,
    /// Its number, from 1.
    number: u64,
    /// The most bytes a line may hold.
    max_line: usize,
}

impl Lines {
    fn new(file: File, max_line: usize) -> Self {
        Lines {
            file,
            buf: Zeroizing::new(vec![0; CHUNK]),
            pos: 0,
            end: 0,
            line: Zeroizing::new(Vec::new()),
            number: 0,
            max_line,
        }
    }

    /// Reads the next line into `line`; `false` at the end of the file.
    fn next(&mut self, path: &Path) -> Result<bool> {
        self.line.clear();
        loop {
            if self.pos == self.end {
                self.pos = 0;
                self.end = loop {
                    match self.file.read(&mut self.buf) {
                        Ok(n) => break n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(Error::io(path, e)),
                    }
                };
                if self.end == 0 {
                    // A last line without a newline is a line; the end of the file is not.
                    if self.line.is_empty() {
                        return Ok(false);
                    }
                    self.number += 1;
                    return Ok(true);
                }
            }
            let chunk = &self.buf[self.pos..self.end];
            let newline = chunk.iter().position(|&b| b == b'\n');
            let take = newline.unwrap_or(chunk.len());
            if self.line.len() + take > self.max_line {
                return Err(Error::format(
                    path,
                    WHAT,
                    format!(
                        "line {} is longer than {} bytes, the most a line may hold",
                        self.number + 1,
                        self.max_line
                    ),
                ));
            }
            extend(&mut self.line, &chunk[..take]);
            self.pos += take;
            if newline.is_some() {
                self.pos += 1;
                self.number += 1;
                return Ok(true);
            }
        }
    }
}

/// Reads one line's object into its columns.
struct LineVisitor<'a> {
    index: &'a HashMap<String, usize>,
    cols: &'a mut [Column],
    seen: &'a mut [bool],
    /// The column being read (for errors).
    current: Option<usize>,
}

impl<'de> DeserializeSeed<'de> for &mut LineVisitor<'_> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> std::result::Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for &mut LineVisitor<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<(), A::Error> {
        while let Some(key) = map.next_key_seed(KeySeed(self.index))? {
            let Some(i) = key else {
                map.next_value::<IgnoredAny>()?;
                continue;
            };
            self.current = Some(i);
            if std::mem::replace(&mut self.seen[i], true) {
                return Err(de::Error::custom("given twice on the line"));
            }
            map.next_value_seed(ListSeed(&mut self.cols[i]))?;
            self.current = None;
        }
        Ok(())
    }
}

/// A key: the index of the column it names, `None` for a key read for no column.
struct KeySeed<'a>(&'a HashMap<String, usize>);

impl<'de> DeserializeSeed<'de> for KeySeed<'_> {
    type Value = Option<usize>;

    fn deserialize<D: de::Deserializer<'de>>(
        self,
        d: D,
    ) -> std::result::Result<Option<usize>, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed<'_> {
    type Value = Option<usize>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a key")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> std::result::Result<Option<usize>, E> {
        Ok(self.0.get(key).copied())
    }
}

/// One column's list of integers.
struct ListSeed<'a>(&'a mut Column);

impl<'de> DeserializeSeed<'de> for ListSeed<'_> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> std::result::Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for ListSeed<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a list of integers")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<(), A::Error> {
        while let Some(v) = seq.next_element::<i64>()? {
            self.0.push(v).map_err(de::Error::custom)?;
        }
        self.0.end_row();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cols(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    fn write(dir: &tempfile::TempDir, text: &str) -> PathBuf {
        let path = dir.path().join("data.jsonl");
        std::fs::write(&path, text).unwrap();
        path
    }

    fn ragged(data: &ColumnData) -> (&[u8], &[u64]) {
        match data {
            ColumnData::Ragged { values, offsets } => (values, offsets),
            other => panic!("not ragged: {other:?}"),
        }
    }

    fn le32(v: &[i32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn le64(v: &[i64]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn reads_integer_lists_choosing_i32_or_i64() {
        let dir = tempfile::tempdir().unwrap();
        let text = concat!(
            r#"{"ids": [1, 2, 3], "text": "skipped \"ids\": [", "mask": [1, 1, 0], "deep": {"ids": [1.5, null]}}"#,
            "\n\n  \t\n",
            "{\"mask\": [], \"ids\": []}\r\n",
            r#"{"ids": [-2147483648, 2147483647], "mask": [-5, 3000000000]}"#,
        );
        let path = write(&dir, text);
        let mut input = open(&path, &cols(&["ids", "mask"])).unwrap();
        let want = |name: &str, dtype| FieldSpec {
            name: name.into(),
            dtype,
            shape: vec![],
            ragged: true,
        };
        assert_eq!(
            input.fields(),
            [want("ids", Dtype::I32), want("mask", Dtype::I64)]
        );
        assert_eq!(input.rows(), 3, "whitespace lines are skipped");
        assert_eq!(input.estimated_bytes(), 5 * 4 + 5 * 8);
        let batch = input.next_batch().unwrap().unwrap();
        assert_eq!(batch.rows, 3);
        let (values, offsets) = ragged(&batch.columns[0]);
        assert_eq!(values, le32(&[1, 2, 3, i32::MIN, i32::MAX]));
        assert_eq!(offsets, [0, 3, 3, 5]);
        let (values, offsets) = ragged(&batch.columns[1]);
        assert_eq!(values, le64(&[1, 1, 0, -5, 3_000_000_000]));
        assert_eq!(offsets, [0, 3, 3, 5]);
        assert!(input.next_batch().unwrap().is_none());
        // An empty file: no rows.
        let path = write(&dir, "");
        let mut input = open(&path, &cols(&["ids"])).unwrap();
        assert_eq!(input.rows(), 0);
        assert!(input.next_batch().unwrap().is_none());
    }

    #[test]
    fn batches_hold_at_most_batch_rows() {
        let dir = tempfile::tempdir().unwrap();
        let n = BATCH_ROWS as i32 + 100;
        let text: String = (0..n).map(|i| format!("{{\"t\": [{i}, {i}]}}\n")).collect();
        let path = write(&dir, &text);
        let mut input = open(&path, &cols(&["t"])).unwrap();
        assert_eq!(input.rows(), n as u64);
        let first = input.next_batch().unwrap().unwrap();
        let second = input.next_batch().unwrap().unwrap();
        assert_eq!((first.rows, second.rows), (BATCH_ROWS, 100));
        let (values, offsets) = ragged(&second.columns[0]);
        let i = BATCH_ROWS as i32;
        assert_eq!(&values[..8], le32(&[i, i]));
        assert_eq!(&offsets[..3], [0, 2, 4]);
        assert!(input.next_batch().unwrap().is_none());
    }

    #[test]
    fn bad_lines_are_errors_naming_file_line_and_column() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            (r#"[1, 2]"#, None, "expected a JSON object"),
            (r#"{"other": [1]}"#, None, "no column 'ids'"),
            (
                r#"{"ids": "1 2"}"#,
                Some("ids"),
                "expected a list of integers",
            ),
            (r#"{"ids": null}"#, Some("ids"), "invalid type: null"),
            (r#"{"ids": [1.0]}"#, Some("ids"), "floating point"),
            (r#"{"ids": [1, "2"]}"#, Some("ids"), "invalid type: string"),
            (r#"{"ids": [[1]]}"#, Some("ids"), "invalid type: sequence"),
            (
                r#"{"ids": [9223372036854775808]}"#,
                Some("ids"),
                "9223372036854775808",
            ),
            (r#"{"ids": [1], "ids": [2]}"#, Some("ids"), "given twice"),
            (r#"{"ids": [1, 2"#, Some("ids"), "EOF"),
            (r#"{"ids": [1]} x"#, None, "trailing characters"),
        ];
        for (line, column, reason) in cases {
            let path = write(&dir, &format!("{{\"ids\": [7]}}\n\n{line}\n"));
            let e = open(&path, &cols(&["ids"])).err().expect(line).to_string();
            assert!(e.contains("data.jsonl"), "{line}: {e}");
            let at = match column {
                Some(c) => format!("line 3, column '{c}': "),
                None => "line 3: ".to_string(),
            };
            assert!(e.contains(&at), "{line}: {e}");
            assert!(e.contains(reason), "{line}: {e}");
            assert!(
                !e.contains(" at line 1 column"),
                "{line}: serde's position is rewritten: {e}"
            );
        }
    }

    #[test]
    fn columns_must_be_named_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(&dir, "{\"a\": [1]}\n");
        let e = open(&path, &[]).err().unwrap().to_string();
        assert!(e.contains("no column named"), "{e}");
        let e = open(&path, &cols(&["a", "a"])).err().unwrap().to_string();
        assert!(e.contains("'a' is named twice"), "{e}");
    }

    #[test]
    fn overlong_lines_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("long.jsonl");
        // Lines longer than the chunks the file is read in, a limit met exactly or passed by 1.
        let max = CHUNK * 2 + 10;
        let mut text = "{\"a\": [1]}\n".to_string().into_bytes();
        text.extend(std::iter::repeat_n(b' ', max - 8));
        text.extend(b"{\"a\":[]}\n");
        std::fs::write(&path, &text).unwrap();
        assert_eq!(open_limited(&path, &cols(&["a"]), max).unwrap().rows(), 2);
        let e = open_limited(&path, &cols(&["a"]), max - 1)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("long.jsonl") && e.contains("line 2 is longer than"),
            "{e}"
        );
    }

    #[test]
    fn a_file_changed_after_the_first_pass_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(&dir, "{\"a\": [1]}\n{\"a\": [2]}\n");
        let mut input = open(&path, &cols(&["a"])).unwrap();
        // Rewritten in place (the same file, which the input holds open).
        std::fs::write(&path, "{\"a\": [1]}\n{\"a\": [3000000000]}\n").unwrap();
        let e = input.next_batch().unwrap_err().to_string();
        assert!(
            e.contains("line 2, column 'a'") && e.contains("does not fit in 32 bits"),
            "{e}"
        );
        let mut input = open(&path, &cols(&["a"])).unwrap();
        std::fs::write(&path, "{\"a\": [1]}\n").unwrap();
        let e = input.next_batch().unwrap_err().to_string();
        assert!(
            e.contains("1 rows, 2 when it was opened") && e.contains("changed"),
            "{e}"
        );
        let mut input = open(&path, &cols(&["a"])).unwrap();
        std::fs::write(&path, "{\"a\": [1]}\n{\"a\": [1]}\n").unwrap();
        let e = input.next_batch().unwrap_err().to_string();
        assert!(e.contains("more than 1 rows"), "{e}");
    }
}
