//! Typed, bounded reading of untrusted JSON (shard headers, `manifest.json`, `keyring.json`).
//!
//! Nothing here builds a generic value tree: each file is read straight into the structures the
//! format defines, so memory follows what the file may hold rather than how it is nested.
//! Every list and map has a cap on its entries, checked while it is read (an oversized one is
//! refused before it grows further); every value has a fixed JSON type, so nesting is as deep
//! as the format's own structure and no deeper (serde_json's recursion limit of 128 stays on
//! as a second line). Values of unknown fields are never read: the field name is refused
//! first. Type errors name the field; syntax errors are "invalid JSON". docs/FORMAT.md section
//! 9 states the limits and the memory bound per input.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;
use std::path::Path;

use serde::Deserializer;
use serde::de::{self, DeserializeSeed, Error as _, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::Dtype;
use crate::error::{Error, Result};

/// Parses all of `bytes` (UTF-8 JSON, nothing after the value but whitespace) with `seed`.
/// Syntax errors read "invalid JSON: ..."; shape errors say which field is wrong, and where.
pub(crate) fn parse<'de, S: DeserializeSeed<'de>>(
    path: &Path,
    what: &'static str,
    bytes: &'de [u8],
    seed: S,
) -> Result<S::Value> {
    // The deserializer (and its scratch space, one byte per nesting level) is dropped before
    // an error's second pass below builds its own.
    let parsed = {
        let mut de = serde_json::Deserializer::from_slice(bytes);
        seed.deserialize(&mut de).and_then(|v| de.end().map(|()| v))
    };
    parsed.map_err(|e| match e.classify() {
        serde_json::error::Category::Data => {
            // A shape error found before the end: if the text is not JSON at all, say
            // that instead (as a parser that reads everything first would). Skipping
            // builds nothing and nests without recursion.
            match serde_json::from_slice::<IgnoredAny>(bytes) {
                Err(syntax) => Error::format(path, what, format!("invalid JSON: {syntax}")),
                Ok(_) => Error::format(path, what, shorten(e.to_string())),
            }
        }
        _ => Error::format(path, what, format!("invalid JSON: {e}")),
    })
}

/// serde's type errors quote the offending string whole ("invalid type: string \"...\""),
/// and a file may put 60 MB there: keep the start and the position at the end.
fn shorten(msg: String) -> String {
    const HEAD: usize = 160;
    const TAIL: usize = 200;
    if msg.len() <= HEAD + TAIL + 16 {
        return msg;
    }
    let head = msg.floor_char_boundary(HEAD);
    let tail = msg.ceil_char_boundary(msg.len() - TAIL);
    format!("{} ... {}", &msg[..head], &msg[tail..])
}

/// Parses `bytes` as an object of type `T` (the whole file).
pub(crate) fn parse_object<'de, T: FromJson<'de>>(
    path: &Path,
    what: &'static str,
    bytes: &'de [u8],
) -> Result<T> {
    parse(path, what, bytes, Field::<T>::new(what))
}

/// At most this many characters of an unexpected name are quoted in an error.
const QUOTE_MAX: usize = 80;

/// `s`, cut to [`QUOTE_MAX`] characters (an attacker's 60 MB field name stays out of errors).
pub(crate) fn quote(s: &str) -> std::borrow::Cow<'_, str> {
    match s.char_indices().nth(QUOTE_MAX) {
        Some((i, _)) => format!("{}...", &s[..i]).into(),
        None => s.into(),
    }
}

/// A value read from a named field: its type errors say which field (serde's own do not).
pub(crate) trait FromJson<'de>: Sized {
    /// Reads the value of field `field` from `d`.
    fn read<D: Deserializer<'de>>(d: D, field: &'static str) -> Result<Self, D::Error>;
}

/// The seed that reads field `name` as a `T`.
pub(crate) struct Field<T>(&'static str, PhantomData<T>);

impl<T> Field<T> {
    pub(crate) fn new(name: &'static str) -> Self {
        Field(name, PhantomData)
    }
}

impl<'de, T: FromJson<'de>> DeserializeSeed<'de> for Field<T> {
    type Value = T;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<T, D::Error> {
        T::read(d, self.0)
    }
}

/// A visitor whose `expecting` names the field: "`rows` to be a non-negative integer".
struct Expect<T> {
    field: &'static str,
    kind: &'static str,
    _t: PhantomData<T>,
}

fn expect<T>(field: &'static str, kind: &'static str) -> Expect<T> {
    Expect {
        field,
        kind,
        _t: PhantomData,
    }
}

impl<T> Expect<T> {
    fn describe(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}` to be {}", self.field, self.kind)
    }
}

impl<'de> Visitor<'de> for Expect<u64> {
    type Value = u64;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.describe(f)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
        Ok(v)
    }
}

impl<'de> FromJson<'de> for u64 {
    fn read<D: Deserializer<'de>>(d: D, field: &'static str) -> Result<Self, D::Error> {
        d.deserialize_u64(expect::<u64>(field, "a non-negative integer"))
    }
}

impl<'de> Visitor<'de> for Expect<u32> {
    type Value = u32;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.describe(f)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<u32, E> {
        u32::try_from(v).map_err(|_| E::invalid_value(de::Unexpected::Unsigned(v), &self))
    }
}

impl<'de> FromJson<'de> for u32 {
    fn read<D: Deserializer<'de>>(d: D, field: &'static str) -> Result<Self, D::Error> {
        d.deserialize_u64(expect::<u32>(field, "a non-negative integer below 2^32"))
    }
}

impl<'de> Visitor<'de> for Expect<bool> {
    type Value = bool;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.describe(f)
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<bool, E> {
        Ok(v)
    }
}

impl<'de> FromJson<'de> for bool {
    fn read<D: Deserializer<'de>>(d: D, field: &'static str) -> Result<Self, D::Error> {
        d.deserialize_bool(expect::<bool>(field, "true or false"))
    }
}

impl<'de> Visitor<'de> for Expect<String> {
    type Value = String;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.describe(f)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
        Ok(v.to_owned())
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<String, E> {
        Ok(v)
    }
}

impl<'de> FromJson<'de> for String {
    fn read<D: Deserializer<'de>>(d: D, field: &'static str) -> Result<Self, D::Error> {
        d.deserialize_string(expect::<String>(field, "a string"))
    }
}

impl<'de> FromJson<'de> for Box<str> {
    fn read<D: Deserializer<'de>>(d: D, field: &'static str) -> Result<Self, D::Error> {
        // A boxed string: 16 bytes in a list entry rather than a String's 24.
        String::read(d, field).map(String::into_boxed_str)
    }
}

/// A string borrowed from the input where it has no escapes (a shard's tags, up to 100 MB).
pub(crate) type Text<'de> = std::borrow::Cow<'de, str>;

impl<'de> Visitor<'de> for Expect<Text<'de>> {
    type Value = Text<'de>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.describe(f)
    }
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Text<'de>, E> {
        Ok(Text::Borrowed(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Text<'de>, E> {
        Ok(Text::Owned(v.to_owned()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Text<'de>, E> {
        Ok(Text::Owned(v))
    }
}

impl<'de> FromJson<'de> for Text<'de> {
    fn read<D: Deserializer<'de>>(d: D, field: &'static str) -> Result<Self, D::Error> {
        d.deserialize_str(expect::<Text<'de>>(field, "a string"))
    }
}

/// A string that must be there but whose value is not kept (checked by other means).
pub(crate) struct AnyString;

impl<'de> Visitor<'de> for Expect<AnyString> {
    type Value = AnyString;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.describe(f)
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<AnyString, E> {
        Ok(AnyString)
    }
}

impl<'de> FromJson<'de> for AnyString {
    fn read<D: Deserializer<'de>>(d: D, field: &'static str) -> Result<Self, D::Error> {
        d.deserialize_str(expect::<AnyString>(field, "a string"))
    }
}

/// A dtype name: known (`F32`, ...) or not (kept to report it as unsupported).
#[derive(Debug)]
pub(crate) struct DtypeName(pub(crate) std::result::Result<Dtype, Box<str>>);

impl<'de> Visitor<'de> for Expect<DtypeName> {
    type Value = DtypeName;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.describe(f)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<DtypeName, E> {
        Ok(DtypeName(v.parse().map_err(|_| quote(v).into())))
    }
}

impl<'de> FromJson<'de> for DtypeName {
    fn read<D: Deserializer<'de>>(d: D, field: &'static str) -> Result<Self, D::Error> {
        d.deserialize_str(expect::<DtypeName>(field, "a dtype name (a string)"))
    }
}

impl DtypeName {
    /// The dtype, or "unsupported dtype" naming the file.
    pub(crate) fn get(self, path: &Path) -> Result<Dtype> {
        self.0.map_err(|found| Error::Unsupported {
            path: path.into(),
            what: "dtype",
            found: found.into(),
            supported: "the safetensors dtypes".into(),
        })
    }
}

/// `N` bytes written as `2N` lower-case hex digits.
pub(crate) struct Hex<const N: usize>(pub(crate) [u8; N]);

impl<'de, const N: usize> Visitor<'de> for Expect<Hex<N>> {
    type Value = Hex<N>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}` to be {} lower-case hex digits", self.field, 2 * N)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Hex<N>, E> {
        let mut out = [0u8; N];
        if v.len() != 2 * N
            || v.bytes().any(|b| b.is_ascii_uppercase())
            || hex::decode_to_slice(v, &mut out).is_err()
        {
            return Err(E::invalid_value(de::Unexpected::Str(&quote(v)), &self));
        }
        Ok(Hex(out))
    }
}

impl<'de, const N: usize> FromJson<'de> for Hex<N> {
    fn read<D: Deserializer<'de>>(d: D, field: &'static str) -> Result<Self, D::Error> {
        d.deserialize_str(expect::<Hex<N>>(field, "hex"))
    }
}

/// A JSON array of at most `CAP` entries, refused as soon as entry `CAP + 1` starts. No
/// capacity is reserved from the input (serde_json gives no length hint anyway); the list
/// grows with what was actually read, and is boxed to its length when done.
#[derive(Debug)]
pub(crate) struct List<T, const CAP: usize>(pub(crate) Box<[T]>);

struct ListVisitor<T, const CAP: usize>(&'static str, PhantomData<T>);

impl<'de, T: FromJson<'de>, const CAP: usize> Visitor<'de> for ListVisitor<T, CAP> {
    type Value = List<T, CAP>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}` to be an array", self.0)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut v = Vec::new();
        loop {
            if v.len() == CAP {
                // One more entry is one too many; the end of the array is fine.
                return match seq.next_element::<IgnoredAny>()? {
                    None => Ok(List(v.into_boxed_slice())),
                    Some(_) => Err(A::Error::custom(format_args!(
                        "`{}` holds more than {CAP} entries (the limit)",
                        self.0
                    ))),
                };
            }
            match seq.next_element_seed(Field::<T>::new(self.0))? {
                Some(x) => v.push(x),
                None => break,
            }
        }
        Ok(List(v.into_boxed_slice()))
    }
}

impl<'de, T: FromJson<'de>, const CAP: usize> FromJson<'de> for List<T, CAP> {
    fn read<D: Deserializer<'de>>(d: D, field: &'static str) -> Result<Self, D::Error> {
        d.deserialize_seq(ListVisitor::<T, CAP>(field, PhantomData))
    }
}

/// `[a, b]`: exactly two non-negative integers.
pub(crate) struct Pair(pub(crate) [u64; 2]);

impl<'de> Visitor<'de> for Expect<Pair> {
    type Value = Pair;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.describe(f)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Pair, A::Error> {
        let mut out = [0u64; 2];
        for o in &mut out {
            *o = seq
                .next_element_seed(Field::<u64>::new(self.field))?
                .ok_or_else(|| A::Error::invalid_length(0, &self))?;
        }
        if seq.next_element::<IgnoredAny>()?.is_some() {
            return Err(A::Error::invalid_length(3, &self));
        }
        Ok(Pair(out))
    }
}

impl<'de> FromJson<'de> for Pair {
    fn read<D: Deserializer<'de>>(d: D, field: &'static str) -> Result<Self, D::Error> {
        d.deserialize_seq(expect::<Pair>(
            field,
            "an array of two non-negative integers",
        ))
    }
}

/// A JSON object mapping strings to strings (nothing nested), at most `CAP` entries, no key
/// twice.
pub(crate) struct StrMap<const CAP: usize>(pub(crate) BTreeMap<String, String>);

impl<'de, const CAP: usize> Visitor<'de> for Expect<StrMap<CAP>> {
    type Value = StrMap<CAP>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.describe(f)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<StrMap<CAP>, A::Error> {
        let mut m = BTreeMap::new();
        while let Some(k) = map.next_key_seed(Field::<String>::new(self.field))? {
            if m.len() == CAP {
                return Err(A::Error::custom(format_args!(
                    "`{}` holds more than {CAP} entries (the limit)",
                    self.field
                )));
            }
            let v = map.next_value_seed(Field::<String>::new(self.field))?;
            match m.entry(k) {
                std::collections::btree_map::Entry::Vacant(e) => {
                    e.insert(v);
                }
                std::collections::btree_map::Entry::Occupied(e) => {
                    return Err(A::Error::custom(format_args!(
                        "`{}` lists key '{}' twice",
                        self.field,
                        quote(e.key())
                    )));
                }
            }
        }
        Ok(StrMap(m))
    }
}

impl<'de, const CAP: usize> FromJson<'de> for StrMap<CAP> {
    fn read<D: Deserializer<'de>>(d: D, field: &'static str) -> Result<Self, D::Error> {
        d.deserialize_map(expect::<StrMap<CAP>>(field, "an object of strings"))
    }
}

/// The seed reading an object key that must be one of `fields`: an unknown name is refused
/// before its value is read.
pub(crate) struct Key(pub(crate) &'static [&'static str]);

impl<'de> DeserializeSeed<'de> for Key {
    type Value = &'static str;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<&'static str, D::Error> {
        d.deserialize_identifier(self)
    }
}

impl<'de> Visitor<'de> for Key {
    type Value = &'static str;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a field name")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<&'static str, E> {
        self.0
            .iter()
            .find(|&&f| f == v)
            .copied()
            .ok_or_else(|| E::unknown_field(&quote(v), self.0))
    }
}

/// The seed reading an object key and telling which of `names` it is (`None`: another one).
pub(crate) struct Which(pub(crate) &'static [&'static str]);

impl<'de> DeserializeSeed<'de> for Which {
    type Value = Option<usize>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Option<usize>, D::Error> {
        d.deserialize_identifier(self)
    }
}

impl<'de> Visitor<'de> for Which {
    type Value = Option<usize>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a field name")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Option<usize>, E> {
        Ok(self.0.iter().position(|&n| n == v))
    }
}

/// Declares a struct read from a JSON object with exactly these fields (each once, any
/// order); each field's type reads its own value through [`FromJson`].
macro_rules! json_object {
    ($(#[$attr:meta])* struct $name:ident { $($field:ident : $ty:ty,)* }) => {
        $(#[$attr])*
        struct $name { $($field: $ty,)* }

        impl<'de> $crate::format::json::FromJson<'de> for $name {
            fn read<D: serde::Deserializer<'de>>(
                d: D,
                field: &'static str,
            ) -> std::result::Result<Self, D::Error> {
                const FIELDS: &[&str] = &[$(stringify!($field)),*];
                struct V(&'static str);
                impl<'de> serde::de::Visitor<'de> for V {
                    type Value = $name;
                    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                        write!(f, "`{}` to be an object", self.0)
                    }
                    fn visit_map<A: serde::de::MapAccess<'de>>(
                        self,
                        mut map: A,
                    ) -> std::result::Result<$name, A::Error> {
                        use serde::de::Error as _;
                        $(let mut $field: Option<$ty> = None;)*
                        while let Some(key) = map.next_key_seed($crate::format::json::Key(FIELDS))? {
                            $(if key == stringify!($field) {
                                if $field.is_some() {
                                    return Err(A::Error::duplicate_field(key));
                                }
                                $field = Some(map.next_value_seed(
                                    $crate::format::json::Field::new(key),
                                )?);
                            })*
                        }
                        Ok($name {
                            $($field: $field.ok_or_else(|| A::Error::missing_field(stringify!($field)))?,)*
                        })
                    }
                }
                d.deserialize_map(V(field))
            }
        }
    };
}
pub(crate) use json_object;

/// What a file says its format, version and cipher are, read before its schema so that a
/// future version is reported as unsupported rather than as a schema error. Other fields are
/// skipped without being built.
#[derive(Default)]
pub(crate) struct Probe {
    format: Option<Scalar>,
    version: Option<Scalar>,
    cipher: Option<Scalar>,
}

/// A probed value: a string, an unsigned integer, or anything else (described).
enum Scalar {
    Str(String),
    Uint(u64),
    Other(String),
}

impl fmt::Display for Scalar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scalar::Str(s) => write!(f, "\"{}\"", quote(s)),
            Scalar::Uint(n) => write!(f, "{n}"),
            Scalar::Other(s) => f.write_str(s),
        }
    }
}

struct ScalarSeed;

impl<'de> DeserializeSeed<'de> for ScalarSeed {
    type Value = Scalar;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Scalar, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ScalarSeed {
    type Value = Scalar;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Scalar, E> {
        Ok(Scalar::Str(quote(v).into_owned()))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar, E> {
        Ok(Scalar::Uint(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scalar, E> {
        Ok(Scalar::Other(v.to_string()))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Scalar, E> {
        Ok(Scalar::Other(v.to_string()))
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Scalar, E> {
        Ok(Scalar::Other(v.to_string()))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Scalar, E> {
        Ok(Scalar::Other("null".into()))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Scalar, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Scalar::Other("an array".into()))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Scalar, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Scalar::Other("an object".into()))
    }
}

impl<'de> Visitor<'de> for &mut Probe {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(k) = map.next_key_seed(Which(&["format", "version", "cipher"]))? {
            let slot = match k {
                Some(0) => &mut self.format,
                Some(1) => &mut self.version,
                Some(2) => &mut self.cipher,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                    continue;
                }
            };
            let v = map.next_value_seed(ScalarSeed)?;
            // The first occurrence counts; the schema pass refuses a repeated field.
            slot.get_or_insert(v);
        }
        Ok(())
    }
}

impl<'de> DeserializeSeed<'de> for &mut Probe {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

/// Checks the `format` and `version` fields (and `cipher`, where `cipher` is given) of the
/// object in `bytes` before anything else, so that a future version gets "unsupported
/// version" rather than a schema error.
pub(crate) fn check_format_version(
    path: &Path,
    what: &'static str,
    bytes: &[u8],
    format: &str,
    versions: std::ops::RangeInclusive<u32>,
    cipher: Option<&str>,
) -> Result<u32> {
    let mut p = Probe::default();
    parse(path, what, bytes, &mut p)?;
    match &p.format {
        Some(Scalar::Str(f)) if f == format => {}
        Some(Scalar::Str(f)) => {
            return Err(Error::format(
                path,
                what,
                format!("format is '{f}', expected '{format}'"),
            ));
        }
        _ => return Err(Error::format(path, what, "missing string field 'format'")),
    }
    let version = match &p.version {
        Some(Scalar::Uint(v)) if u32::try_from(*v).is_ok_and(|v| versions.contains(&v)) => {
            *v as u32
        }
        Some(other) => {
            let supported = versions
                .clone()
                .map(|v| v.to_string())
                .collect::<Vec<_>>()
                .join(", ");
            return Err(Error::Unsupported {
                path: path.into(),
                what: "format version",
                found: other.to_string(),
                supported,
            });
        }
        None => return Err(Error::format(path, what, "missing field 'version'")),
    };
    if let (Some(want), Some(Scalar::Str(c))) = (cipher, &p.cipher)
        && c != want
    {
        return Err(Error::Unsupported {
            path: path.into(),
            what: "cipher",
            found: c.clone(),
            supported: want.into(),
        });
    }
    Ok(version)
}

/// Index of the first item equal to an earlier one: O(n) with a hash set, for uniqueness
/// checks on lists read from files (key ids, tensor names), never a pairwise comparison.
pub(crate) fn first_repeat<'a>(items: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let mut seen = std::collections::HashSet::new();
    items.into_iter().find(|s| !seen.insert(*s))
}

#[cfg(test)]
mod tests {
    use super::*;

    json_object! {
        #[derive(Debug)]
        struct Point {
            x: u64,
            tags: List<Box<str>, 3>,
        }
    }

    #[test]
    fn caps_types_and_field_names() {
        let p = Path::new("f.json");
        let get =
            |s: &str| parse_object::<Point>(p, "point", s.as_bytes()).map_err(|e| e.to_string());
        let ok = get(r#"{"tags":["a","b","c"],"x":7}"#).unwrap();
        assert_eq!((ok.x, ok.tags.0.len()), (7, 3));
        for (text, cause) in [
            (
                r#"{"x":1,"tags":["a","b","c","d"]}"#,
                "`tags` holds more than 3 entries",
            ),
            (
                r#"{"x":"1","tags":[]}"#,
                "expected `x` to be a non-negative integer",
            ),
            (
                r#"{"x":-1,"tags":[]}"#,
                "expected `x` to be a non-negative integer",
            ),
            (
                r#"{"x":1.5,"tags":[]}"#,
                "expected `x` to be a non-negative integer",
            ),
            (
                r#"{"x":1,"tags":[["a"]]}"#,
                "expected `tags` to be a string",
            ),
            (r#"{"x":1}"#, "missing field `tags`"),
            (r#"{"x":1,"x":2,"tags":[]}"#, "duplicate field `x`"),
            (r#"{"x":1,"tags":[],"y":[[[[]]]]}"#, "unknown field `y`"),
            (r#"[1]"#, "expected `point` to be an object"),
            (
                r#"{"x":1,"tags":[]} x"#,
                "invalid JSON: trailing characters",
            ),
            (r#"{"x":1,"tags":[1,"#, "invalid JSON"),
        ] {
            let e = get(text).unwrap_err();
            assert!(e.contains(cause) && e.contains("f.json"), "{text}: {e}");
        }
        // An unknown name or a wrong-typed string is quoted, but not at any length.
        let e = get(&format!(r#"{{"{}":1}}"#, "n".repeat(10_000))).unwrap_err();
        assert!(e.len() < 500, "{e}");
        let e = get(&format!(r#"{{"x":"{}","tags":[]}}"#, "é".repeat(10_000))).unwrap_err();
        assert!(
            e.len() < 600 && e.contains("expected `x`") && e.contains("column"),
            "{e}"
        );
    }

    #[test]
    fn first_repeat_finds_the_first_duplicate() {
        assert_eq!(first_repeat(["a", "b", "c"]), None);
        assert_eq!(first_repeat(["a", "b", "a", "b"]), Some("a"));
    }
}
