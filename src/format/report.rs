//! What `ciphershard inspect --json` prints and Python's `ciphershard.inspect()` returns: one
//! schema (README, "Output for scripts"), built here so the two never drift apart. Everything
//! in it is readable without a key.

#![forbid(unsafe_code)]

use std::path::Path;

use serde_json::{Value, json};

use super::{CIPHER_NAME, Dataset, MANIFEST_FILE, ShardHeader};
use crate::error::Result;

/// The schema's name and version, the report's first field: a script can check it.
pub const INSPECT_SCHEMA: &str = "ciphershard.inspect/1";

/// The report on `path`: a dataset directory, a shard inside one (that shard only), or a lone
/// shard file with no manifest beside it (its header only; `"dataset"` is null).
pub fn inspect(path: &Path) -> Result<Value> {
    if let Some(url) = crate::store::as_url(path) {
        // A folder URL reports every shard; a shard's URL, that shard.
        let ds = Dataset::open(path)?;
        let one = url.ends_with(".safetensors");
        let shards: Vec<ShardHeader> = ds
            .shards()
            .iter()
            .filter(|s| !one || s.path == path)
            .cloned()
            .collect();
        return Ok(inspect_report(Some(&ds), &shards));
    }
    let is_dir = std::fs::metadata(path)
        .map_err(|e| crate::error::Error::io(path, e))?
        .is_dir();
    match Dataset::open(path) {
        Ok(ds) => {
            let shards: Vec<ShardHeader> = if is_dir {
                ds.shards().to_vec()
            } else {
                ds.shards()
                    .iter()
                    .filter(|s| same_file(&s.path, path))
                    .cloned()
                    .collect()
            };
            Ok(inspect_report(Some(&ds), &shards))
        }
        // A lone shard (no manifest beside it) still shows its header, or says what is wrong
        // with it; any other file (`data.npy`) gets the dataset's explanation, not a header
        // parser's complaint about bytes that were never meant as one.
        Err(not_a_dataset) if !is_dir && !path.with_file_name(MANIFEST_FILE).exists() => {
            match ShardHeader::read(path) {
                Ok(header) => Ok(inspect_report(None, &[header])),
                Err(e) if path.extension().is_some_and(|x| x == "safetensors") => Err(e),
                Err(_) => Err(not_a_dataset),
            }
        }
        Err(e) => Err(e),
    }
}

/// `true` when both paths name the same existing file.
pub fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

/// The report on `shards` of `ds` (or on lone shards when `ds` is `None`).
pub fn inspect_report(ds: Option<&Dataset>, shards: &[ShardHeader]) -> Value {
    let shard_json: Vec<Value> = shards.iter().map(shard_report).collect();
    let Some(ds) = ds else {
        return json!({
            "schema": INSPECT_SCHEMA,
            "dataset": null,
            "note": "no manifest.json beside this shard: keys unknown",
            "shards": shard_json,
        });
    };
    let m = ds.manifest();
    json!({
        "schema": INSPECT_SCHEMA,
        "dataset": ds.dir().display().to_string(),
        "format_version": m.version,
        "dataset_id": hex::encode(m.dataset_id),
        "kind": m.kind.as_str(),
        "rows": m.rows,
        "chunk_size": m.chunk_size,
        "columns": m.columns.iter().map(|c| json!({
            "name": c.name, "dtype": c.dtype.as_str(), "shape": c.shape, "encrypted": c.encrypted,
            "ragged": c.ragged,
        })).collect::<Vec<_>>(),
        "key_ids": ds.keyring().key_ids(),
        "key_wrap": "A256KW",
        "shard_count": m.shards.len(),
        "bytes": m.shards.iter().map(|s| s.bytes).sum::<u64>(),
        "shards": shard_json,
    })
}

fn shard_report(h: &ShardHeader) -> Value {
    let d = &h.descriptor;
    json!({
        "file": h.path.display().to_string(),
        "bytes": h.file_len,
        "header_bytes": h.data_start,
        "format_version": d.version,
        "cipher": CIPHER_NAME,
        "dataset_id": hex::encode(d.dataset_id),
        "shard_index": d.shard_index,
        "shard_count": d.shard_count,
        "row_start": d.row_start,
        "rows": d.rows,
        "chunk_size": d.chunk_size,
        "chunks": d.total_chunks(),
        "header_digest": hex::encode(h.digest),
        "metadata": d.metadata,
        "tensors": d.tensors.iter().map(|t| json!({
            "name": t.name,
            "dtype": t.dtype.as_str(),
            "shape": t.shape,
            "bytes": t.len(),
            "offsets": [t.offsets.0, t.offsets.1],
            "encrypted": t.encrypted,
            "first_chunk": t.first_chunk,
            "chunks": t.chunks,
            "layout": t.layout.as_str(),
        })).collect::<Vec<_>>(),
    })
}
