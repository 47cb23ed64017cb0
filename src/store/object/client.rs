//! Building an object-store client from a URL and the environment, and turning its errors into
//! ours with nothing that could be a credential left in them.

#![forbid(unsafe_code)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use object_store::multipart::MultipartStore;
use object_store::{
    BackoffConfig, ClientConfigKey, ClientOptions, ObjectStore, ObjectStoreScheme, RetryConfig,
};

use super::Settings;
use crate::error::Error;
use crate::store::OpenOptions;

/// A client as both the general interface and, for stores that have it (S3, GCS, Azure), the
/// multipart one, whose parts can be sent in any order (a shard's header, part 0, goes last).
pub(super) type Clients = (Arc<dyn ObjectStore>, Option<Arc<dyn MultipartStore>>);

fn both<S: ObjectStore + MultipartStore>(s: S) -> Clients {
    let s = Arc::new(s);
    (s.clone(), Some(s))
}

/// Builds the client for `url`: our defaults (timeouts, retry budget) first, then the
/// store's standard environment variables over them (`AWS_*`, `GOOGLE_*`, `AZURE_*`), then the
/// caller's [`OpenOptions`] over those. An option key the store does not know is an error (a
/// misspelt setting must not be silently dropped); unknown environment variables are not.
/// `retrying: false` builds the client of the read path, which runs its own retry loop (and
/// counts it): `object_store` retries nothing there.
pub(super) fn build_store(
    scheme: &ObjectStoreScheme,
    url: &url::Url,
    s: &Settings,
    opts: &OpenOptions,
    retrying: bool,
) -> std::result::Result<Clients, String> {
    fn apply<B, K: std::str::FromStr>(
        mut b: B,
        env: Vec<(String, String)>,
        opts: &OpenOptions,
        set: impl Fn(B, K, String) -> B,
    ) -> std::result::Result<B, String> {
        for (k, v) in env {
            if let Ok(key) = k.parse() {
                b = set(b, key, v);
            }
        }
        for (k, v) in opts.storage_entries() {
            let key = k.parse().map_err(|_| {
                format!(
                    "storage option '{}' is not a setting of this store (see the object_store \
                     crate's config keys; docs/STORAGE.md)",
                    crate::error::escape_untrusted(k)
                )
            })?;
            b = set(b, key, v.to_string());
        }
        Ok(b)
    }
    let client = ClientOptions::new()
        .with_timeout(s.timeout)
        .with_connect_timeout(Duration::from_secs(10));
    let retry = RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
            base: 2.0,
        },
        max_retries: if retrying { s.retries } else { 0 },
        retry_timeout: if retrying {
            s.retry_time
        } else {
            Duration::ZERO
        },
    };
    let env = |prefix: &str| -> Vec<(String, String)> {
        std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.to_ascii_lowercase(), v))
            .collect()
    };
    let built: std::result::Result<Clients, object_store::Error> = match scheme {
        ObjectStoreScheme::AmazonS3 => {
            let mut b = object_store::aws::AmazonS3Builder::new()
                .with_client_options(client)
                .with_retry(retry);
            b = apply(
                b,
                env("AWS_"),
                opts,
                |b, k: object_store::aws::AmazonS3ConfigKey, v| b.with_config(k, v),
            )?;
            b.with_url(url.as_str()).build().map(both)
        }
        ObjectStoreScheme::GoogleCloudStorage => {
            let mut b = object_store::gcp::GoogleCloudStorageBuilder::new()
                .with_client_options(client)
                .with_retry(retry);
            b = apply(
                b,
                env("GOOGLE_"),
                opts,
                |b, k: object_store::gcp::GoogleConfigKey, v| b.with_config(k, v),
            )?;
            b.with_url(url.as_str()).build().map(both)
        }
        ObjectStoreScheme::MicrosoftAzure => {
            let mut b = object_store::azure::MicrosoftAzureBuilder::new()
                .with_client_options(client)
                .with_retry(retry);
            b = apply(
                b,
                env("AZURE_"),
                opts,
                |b, k: object_store::azure::AzureConfigKey, v| b.with_config(k, v),
            )?;
            b.with_url(url.as_str()).build().map(both)
        }
        ObjectStoreScheme::Http if opts.has_storage() => {
            return Err(
                "storage options do not apply to plain HTTP(S) URLs (they carry no credentials)"
                    .into(),
            );
        }
        ObjectStoreScheme::Http => object_store::http::HttpBuilder::new()
            .with_client_options(client)
            .with_config(
                ClientConfigKey::AllowHttp,
                (url.scheme() == "http").to_string(),
            )
            .with_retry(retry)
            .with_url(&url[..url::Position::BeforePath])
            .build()
            .map(|s| (Arc::new(s) as _, None)),
        other => {
            return Err(format!(
                "{other:?} URLs are not object stores; name a local dataset by its path"
            ));
        }
    };
    built.map_err(|e| scrub(&error_chain(&e)))
}

/// Credentials given as [`crate::store::OpenOptions`] values: scrubbed from every message like
/// the environment's. Process-wide, so an error built far from the options still cannot print
/// them; each is kept (zeroized at exit only) because a message may be built at any time.
static SECRETS: std::sync::Mutex<Vec<zeroize::Zeroizing<String>>> =
    std::sync::Mutex::new(Vec::new());

fn registered_secrets() -> std::sync::MutexGuard<'static, Vec<zeroize::Zeroizing<String>>> {
    SECRETS.lock().unwrap_or_else(|p| p.into_inner())
}

/// Remembers `value` as a credential to scrub from messages (once per distinct value).
pub fn register_secret(value: &str) {
    let mut all = registered_secrets();
    if value.len() >= 8 && !all.iter().any(|v| v.as_str() == value) {
        all.push(zeroize::Zeroizing::new(value.to_string()));
    }
}

/// `e` and its sources, joined by ": ".
pub(super) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

/// An `object_store` error as ours: the object's URL and the scrubbed cause, with an
/// `io::ErrorKind` that says what happened (a missing object is `NotFound`, refused
/// credentials `PermissionDenied`).
pub(super) fn store_error(url: &Path, e: object_store::Error) -> Error {
    use std::io::ErrorKind;
    let (kind, hint) = match &e {
        object_store::Error::NotFound { .. } => (ErrorKind::NotFound, "no such object"),
        object_store::Error::PermissionDenied { .. }
        | object_store::Error::Unauthenticated { .. } => (
            ErrorKind::PermissionDenied,
            "the store refused the credentials (check AWS_*/GOOGLE_*/AZURE_* variables or the \
             instance's role; docs/STORAGE.md)",
        ),
        _ => (ErrorKind::Other, "request failed"),
    };
    let mut cause = scrub(&error_chain(&e));
    // Some stores answer 403 as a generic error: say what it means all the same.
    let kind = if kind == ErrorKind::Other
        && (cause.contains("403") || cause.contains("SignatureDoesNotMatch"))
    {
        cause = format!(
            "the store refused the credentials (check AWS_*/GOOGLE_*/AZURE_* variables; \
             docs/STORAGE.md): {cause}"
        );
        ErrorKind::PermissionDenied
    } else {
        if kind != ErrorKind::Other {
            cause = format!("{hint}: {cause}");
        }
        kind
    };
    Error::io(url, std::io::Error::new(kind, cause))
}

/// Removes from an error text whatever could be a credential: query strings and user info of
/// URLs (signatures, SAS tokens), XML bodies beyond their `Code` and `Message` (S3's
/// `SignatureDoesNotMatch` echoes the signed request, session token included), the values of
/// credential-looking environment variables; and caps the length.
pub fn scrub(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(600));
    // XML bodies: keep <Code> and <Message>, drop the rest.
    let mut rest = text;
    while let Some(i) = rest.find('<') {
        out.push_str(&rest[..i]);
        let xml = &rest[i..];
        let code = tag(xml, "Code");
        let msg = tag(xml, "Message");
        if code.is_some() || msg.is_some() {
            out.push_str(&format!(
                "{} {}",
                code.unwrap_or_default(),
                msg.unwrap_or_default()
            ));
        }
        // Skip to the end of the body: the last '>' of this text.
        match xml.rfind('>') {
            Some(j) => rest = &xml[j + 1..],
            None => rest = "",
        }
    }
    out.push_str(rest);
    // URLs: drop user info and query strings.
    let mut cleaned = String::with_capacity(out.len());
    for word in out.split_inclusive(char::is_whitespace) {
        if word.contains("://") {
            let (w, ws) = match word.find(char::is_whitespace) {
                Some(i) => word.split_at(i),
                None => (word, ""),
            };
            cleaned.push_str(&redact_url(w));
            cleaned.push_str(ws);
        } else {
            cleaned.push_str(word);
        }
    }
    for v in registered_secrets().iter() {
        if v.len() >= 8 && cleaned.contains(v.as_str()) {
            cleaned = cleaned.replace(v.as_str(), "[redacted]");
        }
    }
    for (k, v) in std::env::vars_os() {
        let (Some(k), Some(v)) = (k.to_str(), v.to_str()) else {
            continue;
        };
        let k = k.to_ascii_uppercase();
        let secret = ["SECRET", "TOKEN", "PASSWORD", "SAS", "KEY", "CREDENTIAL"]
            .iter()
            .any(|w| k.contains(w));
        if secret && v.len() >= 8 && cleaned.contains(v) {
            cleaned = cleaned.replace(v, "[redacted]");
        }
    }
    const CAP: usize = 600;
    if cleaned.len() > CAP {
        let mut cut = CAP;
        while !cleaned.is_char_boundary(cut) {
            cut -= 1;
        }
        cleaned.truncate(cut);
        cleaned.push('…');
    }
    cleaned
}

fn tag(xml: &str, name: &str) -> Option<String> {
    let open = format!("<{name}>");
    let i = xml.find(&open)? + open.len();
    let j = xml[i..].find('<')? + i;
    Some(xml[i..j].chars().take(200).collect())
}

/// `url` without user info, query or fragment (unparseable text is cut at `?` and `@`).
pub(super) fn redact_url(url: &str) -> String {
    let cut = url.split(['?', '#']).next().unwrap_or("");
    match cut.split_once("://") {
        Some((scheme, rest)) => match rest.split('/').next().and_then(|h| h.rfind('@')) {
            Some(at) => format!("{scheme}://{}", &rest[at + 1..]),
            None => cut.to_string(),
        },
        None => cut.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::object::{ObjectDir, as_url};

    #[test]
    fn urls_are_told_from_paths() {
        assert_eq!(as_url(Path::new("s3://b/p/")), Some("s3://b/p/"));
        assert_eq!(as_url(Path::new("https://h/x")), Some("https://h/x"));
        assert_eq!(as_url(Path::new("ds/")), None);
        assert_eq!(as_url(Path::new("./s3://b")), None);
        assert_eq!(as_url(Path::new("C://x")), None);
    }

    #[test]
    fn scrub_keeps_the_cause_and_drops_secrets() {
        let t = "Error performing GET https://u:pw@h/b/k?X-Amz-Signature=abc in 1s: \
                 <?xml version=\"1.0\"?><Error><Code>SignatureDoesNotMatch</Code>\
                 <Message>no</Message><CanonicalRequest>x-amz-security-token:SECRET\
                 </CanonicalRequest></Error> tail";
        let s = scrub(t);
        assert!(s.contains("https://h/b/k"), "{s}");
        assert!(s.contains("SignatureDoesNotMatch no"), "{s}");
        assert!(s.ends_with(" tail"), "{s}");
        for bad in ["pw", "Signature=", "SECRET", "CanonicalRequest"] {
            assert!(!s.contains(bad), "{bad} in {s}");
        }
    }

    #[test]
    fn credentials_in_urls_are_refused_unprinted() {
        for url in ["s3://k:hunter2@b/p/", "https://h/p/?sig=hunter2"] {
            let e = ObjectDir::open(url).unwrap_err().to_string();
            assert!(!e.contains("hunter2"), "{e}");
        }
    }
}
