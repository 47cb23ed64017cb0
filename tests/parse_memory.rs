//! Peak memory of parsing crafted worst-case shard headers, manifests and keyrings near their
//! size caps (issue 13 item 3), and the headers of `convert`'s safetensors inputs, measured by a counting global allocator (this test binary
//! only). Each input is either refused or parsed within the bound docs/FORMAT.md section 9
//! states: extra heap at most `k` times the input's length (plus 1 MiB), `k` per kind below.
//!
//! The inputs are full size in release builds (CI runs the suite in release) and a tenth of
//! that in debug builds; the bounds are ratios, so both check the same thing.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use ciphershard::format::{
    Descriptor, Dtype, Keyring, MAX_HEADER_LEN, MAX_JSON_FILE_LEN, MAX_RANK, Manifest, ShardHeader,
    TensorDesc, canonical_header, safetensors_input,
};

/// Counts live heap bytes and their high-water mark.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(n: usize) {
    let now = LIVE.fetch_add(n, Relaxed) + n;
    PEAK.fetch_max(now, Relaxed);
}

// SAFETY: every call is forwarded unchanged to the system allocator, which upholds
// GlobalAlloc's contract; the counters are only arithmetic beside it.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        // SAFETY: same layout contract as ours.
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            grew(l.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        // SAFETY: same layout contract as ours.
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            grew(l.size());
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: `p` was allocated by System with `l` (every allocation goes through us).
        unsafe { System.dealloc(p, l) };
        LIVE.fetch_sub(l.size(), Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        // SAFETY: `p` was allocated by System with `l`; the caller upholds `new`'s contract.
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            // Counted as a copy (old and new block both live for a moment), the worst case.
            grew(new);
            LIVE.fetch_sub(l.size(), Relaxed);
        }
        q
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Runs `f` and returns its result, the extra heap high-water mark and the time it took.
fn measure<T>(f: impl FnOnce() -> T) -> (T, usize, Duration) {
    let base = LIVE.load(Relaxed);
    PEAK.store(base, Relaxed);
    let start = Instant::now();
    let r = f();
    let took = start.elapsed();
    (r, PEAK.load(Relaxed).saturating_sub(base), took)
}

/// Input sizes: the caps in release builds, a tenth in debug builds.
fn budget(cap: u64) -> usize {
    (if cfg!(debug_assertions) {
        cap / 10
    } else {
        cap
    }) as usize
        - 4096
}

struct Case {
    name: &'static str,
    input: Vec<u8>,
}

/// A shard file of `n` tensors named `t<i>` (U8, shape `shape_of(i)`, zero bytes each, one
/// chunk each), canonical header, zero tags: valid down to the tags, which no key checks here.
fn shard_file(n: usize, shape: &[u64], metadata_entries: usize) -> Vec<u8> {
    let tensors: Vec<TensorDesc> = (0..n)
        .map(|i| TensorDesc {
            name: format!("t{i}"),
            dtype: Dtype::U8,
            shape: shape.to_vec(),
            offsets: (0, 0),
            encrypted: true,
            first_chunk: i as u64,
            chunks: 1,
            layout: ciphershard::format::Layout::Fixed,
        })
        .collect();
    let d = Descriptor {
        version: 1,
        dataset_id: [7; 16],
        shard_index: 0,
        shard_count: 1,
        row_start: 0,
        rows: 0,
        chunk_size: 64,
        tensors,
        metadata: (0..metadata_entries)
            .map(|i| (format!("{i:x}"), String::new()))
            .collect(),
    };
    use base64::Engine;
    let tags = base64::engine::general_purpose::STANDARD.encode(vec![0u8; 16 * (n + 1)]);
    let h = canonical_header(&d.to_json(), &tags, &d.tensors);
    let mut file = (h.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(&h);
    file
}

/// The largest `n` for which `make(n)` stays within `max` bytes (by doubling, then bisection).
fn fill(max: usize, make: impl Fn(usize) -> Vec<u8>) -> Vec<u8> {
    let (mut lo, mut hi) = (1usize, 2usize);
    while make(hi).len() <= max {
        lo = hi;
        hi *= 2;
    }
    // make(lo) fits, make(hi) does not; sizes grow roughly linearly in n.
    let per = (make(hi).len() - make(lo).len()) / (hi - lo);
    let n = lo + (max - make(lo).len()) / per.max(1);
    let mut v = make(n);
    let mut n = n;
    while v.len() > max {
        n -= n / 100 + 1;
        v = make(n);
    }
    v
}

/// A raw header (not canonical, not necessarily valid) wrapped as a shard file.
fn raw_shard(header: String) -> Vec<u8> {
    let mut h = header;
    while !h.len().is_multiple_of(8) {
        h.push(' ');
    }
    let mut file = (h.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(h.as_bytes());
    file
}

/// `open` + `item(0),item(1),...` + `close`, as many items as fit in `max` bytes.
fn repeat_to(max: usize, open: &str, item: impl Fn(usize) -> String, close: &str) -> String {
    let mut s = String::from(open);
    for i in 0.. {
        let it = item(i);
        if s.len() + it.len() + close.len() + 16 > max {
            break;
        }
        if i > 0 {
            s.push(',');
        }
        s.push_str(&it);
    }
    s.push_str(close);
    s
}

/// A header of `before`, brackets nested as deep as `max` allows, then `after`.
fn deep(max: usize, before: &str, after: &str) -> Vec<u8> {
    let k = max / 2 - 64;
    raw_shard(format!("{before}{}{}{after}", "[".repeat(k), "]".repeat(k)))
}

/// A header whose `__metadata__` holds as many tiny entries as fit.
fn tiny_metadata(max: usize) -> Vec<u8> {
    raw_shard(repeat_to(
        max,
        r#"{"__metadata__":{"#,
        |i| format!(r#""{i}":"""#),
        "}}",
    ))
}

fn header_cases() -> Vec<Case> {
    let max = budget(MAX_HEADER_LEN);
    let desc_prefix = r#"{"__metadata__":{"ciphershard.tags":"","ciphershard":"{\"format\":\"ciphershard\",\"version\":1,\"cipher\":\"AES-256-GCM\",\"dataset_id\":\"07070707070707070707070707070707\",\"shard_index\":0,\"shard_count\":1,\"row_start\":0,\"rows\":0,\"chunk_size\":64,"#;
    vec![
        Case {
            name: "header: many tiny tensors (valid)",
            input: fill(max, |n| shard_file(n, &[0], 0)),
        },
        Case {
            name: "header: tensors of rank 64 (valid)",
            input: fill(max, |n| shard_file(n, &[0; MAX_RANK], 0)),
        },
        Case {
            name: "header: tiny outer entries",
            input: raw_shard(repeat_to(
                max,
                r#"{"__metadata__":{},"#,
                |i| format!(r#""{i}":[]"#),
                "}",
            )),
        },
        Case {
            name: "header: deep nesting in an outer entry",
            input: deep(max, r#"{"__metadata__":{},"t":"#, "}"),
        },
        Case {
            name: "header: tiny __metadata__ entries",
            input: tiny_metadata(max),
        },
        Case {
            name: "header: tiny descriptor metadata entries",
            input: raw_shard(repeat_to(
                max,
                &format!(r#"{desc_prefix}\"tensors\":[],\"metadata\":{{"#),
                |i| format!(r#"\"{i}\":\"\""#),
                r#"}}"}}"#,
            )),
        },
        Case {
            name: "header: tiny descriptor tensor entries",
            input: raw_shard(repeat_to(
                max,
                &format!(r#"{desc_prefix}\"tensors\":["#),
                |_| "{}".to_string(),
                r#"]}"}}"#,
            )),
        },
        Case {
            name: "header: tiny descriptor shape entries",
            input: raw_shard(repeat_to(
                max,
                &format!(r#"{desc_prefix}\"tensors\":[{{\"shape\":["#),
                |_| "0".to_string(),
                r#"]}]}"}}"#,
            )),
        },
    ]
}

fn manifest_cases() -> Vec<Case> {
    let max = budget(MAX_JSON_FILE_LEN);
    let head = r#"{"format":"ciphershard-dataset","version":1,"dataset_id":"07070707070707070707070707070707","kind":"dataset","rows":0,"chunk_size":64,"#;
    let shard = r#"{"file":"shard-00000.safetensors","row_start":0,"rows":0,"bytes":0,"header_digest":"0000000000000000000000000000000000000000000000000000000000000000"}"#;
    let rank64 = vec!["0"; MAX_RANK].join(",");
    vec![
        Case {
            name: "manifest: many tiny columns",
            input: repeat_to(
                max,
                &format!(r#"{head}"shards":[{shard}],"columns":["#),
                |i| format!(r#"{{"name":"{i:x}","dtype":"U8","shape":[],"encrypted":true}}"#),
                "]}",
            )
            .into_bytes(),
        },
        Case {
            name: "manifest: columns of rank 64",
            input: repeat_to(
                max,
                &format!(r#"{head}"shards":[{shard}],"columns":["#),
                |i| {
                    format!(
                        r#"{{"name":"{i:x}","dtype":"U8","shape":[{rank64}],"encrypted":true}}"#
                    )
                },
                "]}",
            )
            .into_bytes(),
        },
        Case {
            name: "manifest: many shards",
            input: repeat_to(
                max,
                &format!(r#"{head}"columns":[],"shards":["#),
                |i| shard.replacen("00000", &format!("{i:05}"), 1),
                "]}",
            )
            .into_bytes(),
        },
        Case {
            name: "manifest: tiny arrays in a shape",
            input: repeat_to(
                max,
                &format!(r#"{head}"shards":[{shard}],"columns":[{{"shape":["#),
                |_| "[]".into(),
                "]}]}",
            )
            .into_bytes(),
        },
        Case {
            name: "manifest: deep nesting in an unknown field",
            input: format!(
                r#"{head}"x":{}{}}}"#,
                "[".repeat(max / 2 - 256),
                "]".repeat(max / 2 - 256)
            )
            .into_bytes(),
        },
    ]
}

fn keyring_cases() -> Vec<Case> {
    let max = budget(MAX_JSON_FILE_LEN);
    let head = r#"{"format":"ciphershard-keyring","version":1,"dataset_id":"07070707070707070707070707070707","wraps":["#;
    let key = format!("\"{}==\"", "A".repeat(54));
    vec![
        Case {
            name: "keyring: many tiny wraps",
            input: repeat_to(
                max,
                head,
                |i| format!(r#"{{"key_id":"{i:016x}","alg":"A256KW","data_keys":[]}}"#),
                "]}",
            )
            .into_bytes(),
        },
        Case {
            name: "keyring: one wrap of many keys",
            input: repeat_to(
                max,
                &format!(r#"{head}{{"key_id":"0000000000000000","alg":"A256KW","data_keys":["#),
                |_| key.clone(),
                "]}]}",
            )
            .into_bytes(),
        },
        Case {
            name: "keyring: tiny arrays as wraps",
            input: repeat_to(max, head, |_| "[]".into(), "]}").into_bytes(),
        },
    ]
}

/// Headers of plaintext safetensors inputs to `convert`: every tensor entry is kept (name,
/// shape, offsets), so the cases that cost most are the most entries per byte and the longest
/// shapes. The generic-tree parser this replaced took 16 x (rank 64) to 20 x (tiny arrays).
fn input_cases() -> Vec<Case> {
    let max = budget(MAX_HEADER_LEN);
    let rank64 = vec!["0"; MAX_RANK].join(",");
    let entry = |name: &str, shape: &str| {
        format!(r#""{name}":{{"dtype":"U8","shape":[{shape}],"data_offsets":[0,0]}}"#)
    };
    vec![
        Case {
            name: "input: many tiny tensors (valid)",
            input: raw_shard(repeat_to(max, "{", |i| entry(&format!("{i:x}"), "0"), "}")),
        },
        Case {
            name: "input: tiny tensors of one name",
            input: raw_shard(repeat_to(max, "{", |_| entry("", "0"), "}")),
        },
        Case {
            name: "input: tensors of rank 64 (valid)",
            input: raw_shard(repeat_to(
                max,
                "{",
                |i| entry(&format!("{i:x}"), &rank64),
                "}",
            )),
        },
        Case {
            name: "input: tiny __metadata__ entries",
            input: tiny_metadata(max),
        },
        Case {
            name: "input: tiny arrays in a shape",
            input: raw_shard(repeat_to(
                max,
                r#"{"t":{"dtype":"U8","shape":["#,
                |_| "[]".into(),
                "]}}",
            )),
        },
        Case {
            name: "input: deep nesting in an unknown entry field",
            input: deep(max, r#"{"t":{"x":"#, "}}"),
        },
        Case {
            name: "input: many unknown entry fields",
            input: raw_shard(repeat_to(max, r#"{"t":{"#, |_| r#""x":[]"#.into(), "}}")),
        },
    ]
}

/// Extra heap per input byte each kind may take (docs/FORMAT.md section 9).
const HEADER_K: usize = 5;
const MANIFEST_K: usize = 4;
const KEYRING_K: usize = 4;

#[test]
fn crafted_inputs_parse_within_the_memory_bound() {
    let path = Path::new("crafted");
    let mut report = Vec::new();
    let mut check = |c: Case, k: usize, parse: &dyn Fn(&[u8]) -> Result<(), String>| {
        let (r, peak, took) = measure(|| parse(&c.input));
        let len = c.input.len();
        let outcome = match &r {
            Ok(()) => "parsed".to_string(),
            Err(e) => format!("refused: {}", &e[..e.len().min(100)]),
        };
        report.push(format!(
            "{:45} {:>7.1} MB  peak {:>6.2} x input  {:>6.2} s  {outcome}",
            c.name,
            len as f64 / 1e6,
            peak as f64 / len as f64,
            took.as_secs_f64()
        ));
        assert!(
            peak <= k * len + (1 << 20),
            "{}: {peak} bytes of heap for a {len}-byte input (bound {k} x input)",
            c.name
        );
        assert!(
            took < Duration::from_secs(if cfg!(debug_assertions) { 60 } else { 10 }),
            "{}: took {took:?}",
            c.name
        );
    };
    for c in header_cases() {
        check(c, HEADER_K, &|b| {
            ShardHeader::parse(path, b)
                .map(drop)
                .map_err(|e| e.to_string())
        });
    }
    for c in input_cases() {
        check(c, HEADER_K, &|b| {
            safetensors_input::parse_header(path, b, b.len() as u64)
                .map(drop)
                .map_err(|e| e.to_string())
        });
    }
    for c in manifest_cases() {
        check(c, MANIFEST_K, &|b| {
            Manifest::parse(path, b)
                .map(drop)
                .map_err(|e| e.to_string())
        });
    }
    for c in keyring_cases() {
        check(c, KEYRING_K, &|b| {
            Keyring::parse(path, b).map(drop).map_err(|e| e.to_string())
        });
    }
    eprintln!("{}", report.join("\n"));
}
