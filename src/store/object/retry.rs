//! Which failed requests are worth trying again, and how long to wait before each try.
//!
//! The read path runs its own retry loop (read.rs) rather than `object_store`'s, so that every
//! retry is counted, a body cut short resumes where it stopped, and first-byte and stalled-body
//! timeouts are ours. The backoff is exponential with full jitter (a uniformly random wait
//! between zero and the exponential bound): clients throttled together spread out instead of
//! coming back in step.

#![forbid(unsafe_code)]

use std::time::Duration;

/// The first retry waits up to this long…
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// …each next one up to twice as long, and never more than this.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// Exponential backoff with full jitter.
#[derive(Debug, Default)]
pub(super) struct Backoff {
    tries: u32,
}

impl Backoff {
    /// The wait before the next try.
    pub(super) fn next(&mut self) -> Duration {
        let bound = FIRST_BACKOFF
            .saturating_mul(1 << self.tries.min(16))
            .min(MAX_BACKOFF);
        self.tries += 1;
        bound.mul_f64(uniform())
    }
}

/// A number in [0, 1) from the OS (a fixed midpoint if it cannot say: jitter is not security).
fn uniform() -> f64 {
    let mut b = [0u8; 8];
    match getrandom::fill(&mut b) {
        Ok(()) => (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64,
        Err(_) => 0.5,
    }
}

/// How a failed request ended.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Throttling, a server error, a connection failure: try again within the budget.
    Transient,
    /// The answer will not change by asking again (4xx other than 408 and 429).
    Permanent,
}

/// The verdict on an `object_store` error from sending a request. Its typed variants
/// (missing object, refused credentials, failed precondition) are final; an untyped one is
/// final when it carries a 4xx status other than 408 (request timeout) and 429 (throttling);
/// a 5xx (503 SlowDown included) or no status at all (connecting, a reset, a timeout) is
/// transient.
pub(super) fn verdict(e: &object_store::Error, chain: &str) -> Verdict {
    match e {
        object_store::Error::Generic { .. } => match status_in(chain) {
            Some(s) if (400..500).contains(&s) && s != 408 && s != 429 => Verdict::Permanent,
            _ => Verdict::Transient,
        },
        _ => Verdict::Permanent,
    }
}

/// The HTTP status an error text reports (`object_store` writes "status code: 503 …"; its
/// error type is not public, so the text is what there is).
fn status_in(chain: &str) -> Option<u16> {
    let i = chain.find("status code: ")? + "status code: ".len();
    let digits = chain.get(i..i + 3)?;
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_with_jitter_under_the_bound() {
        let mut b = Backoff::default();
        let waits: Vec<Duration> = (0..12).map(|_| b.next()).collect();
        for (i, w) in waits.iter().enumerate() {
            let bound = FIRST_BACKOFF.saturating_mul(1 << i).min(MAX_BACKOFF);
            assert!(*w <= bound, "try {i}: {w:?} > {bound:?}");
        }
        // Full jitter: not all the same, and the late ones reach past the early bounds.
        assert!(
            waits[8..].iter().any(|w| *w > Duration::from_millis(800)),
            "{waits:?}"
        );
    }

    #[test]
    fn throttling_and_server_errors_are_retried_client_errors_are_not() {
        let generic = |text: &str| {
            let e = object_store::Error::Generic {
                store: "S3",
                source: text.to_string().into(),
            };
            verdict(&e, text)
        };
        for t in [
            "Server returned non-2xx status code: 503 Service Unavailable: SlowDown",
            "Server returned non-2xx status code: 500 Internal Server Error",
            "Server returned non-2xx status code: 429 Too Many Requests",
            "Server returned non-2xx status code: 408 Request Timeout",
            "HTTP error: error sending request: connection reset",
        ] {
            assert_eq!(generic(t), Verdict::Transient, "{t}");
        }
        for t in [
            "Server returned non-2xx status code: 400 Bad Request",
            "Server returned non-2xx status code: 416 Range Not Satisfiable",
        ] {
            assert_eq!(generic(t), Verdict::Permanent, "{t}");
        }
        let missing = object_store::Error::NotFound {
            path: "p".into(),
            source: "404".to_string().into(),
        };
        assert_eq!(verdict(&missing, ""), Verdict::Permanent);
    }
}
