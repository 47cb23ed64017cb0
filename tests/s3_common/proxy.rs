//! A fault-injecting HTTP/1.1 proxy on 127.0.0.1, between an object-store client and a real
//! server: requests are forwarded byte for byte (so signatures still check), keep-alive
//! connections are kept, and chosen requests get a fault instead of, or on top of, the real
//! answer: added first-byte latency, an error status (500, 503 SlowDown, 429, 404, 412…), a
//! connection reset mid-body, a truncated body, a stalled body. Every request is counted.
//!
//! Plain std threads (one per client connection, each with its own upstream connection): no
//! TLS, no async, nothing mocked — the server behind it is the real one.
//!
//! Also compiled into `examples/s3_latency_proxy.rs` for the latency benchmark.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What to do to a request.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// Forward it, but hold the answer back this long (time to first byte).
    Delay(Duration),
    /// Answer this status with an S3 XML error `code` instead of forwarding.
    Status(u16, &'static str),
    /// Forward the head and half the body, then reset the connection (RST).
    ResetMidBody,
    /// Forward the head (its full Content-Length) and half the body, then close.
    Truncate,
    /// Forward the head and half the body, then send nothing for this long (then close).
    Stall(Duration),
}

/// Gives `fault` to the next `times` requests whose method is `method` (any, if empty) and
/// whose path contains `path`.
#[derive(Debug, Clone)]
pub struct Rule {
    pub method: &'static str,
    pub path: String,
    pub times: u64,
    pub fault: Fault,
}

#[derive(Default)]
struct State {
    rules: Mutex<Vec<Rule>>,
    /// Added to every answer's first byte (the benchmark's simulated distance).
    latency_ms: AtomicU64,
    /// (method, path) of every request seen.
    seen: Mutex<Vec<(String, String)>>,
    faults_given: AtomicU64,
    closing: AtomicBool,
}

/// The proxy; stops accepting when dropped.
pub struct Proxy {
    state: Arc<State>,
    pub port: u16,
    listener: Option<TcpListener>,
}

impl Proxy {
    /// Binds a port on 127.0.0.1 (`port` 0: any free one); forwards nothing until
    /// [`Proxy::start`].
    pub fn bind(port: u16) -> Self {
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind the proxy");
        let port = listener.local_addr().unwrap().port();
        Proxy {
            state: Arc::default(),
            port,
            listener: Some(listener),
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Starts forwarding to `upstream` (`host:port`).
    pub fn start(&mut self, upstream: &str) {
        let listener = self.listener.take().expect("started once");
        let state = self.state.clone();
        let upstream = upstream.to_string();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if state.closing.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(client) = conn else { continue };
                let (state, upstream) = (state.clone(), upstream.clone());
                std::thread::spawn(move || {
                    let _ = serve(&state, client, &upstream);
                });
            }
        });
    }

    /// Adds a rule (rules are tried in the order added).
    pub fn add(&self, method: &'static str, path: &str, times: u64, fault: Fault) {
        self.state.rules.lock().unwrap().push(Rule {
            method,
            path: path.to_string(),
            times,
            fault,
        });
    }

    /// Drops every rule not used up yet.
    pub fn clear(&self) {
        self.state.rules.lock().unwrap().clear();
    }

    /// Delays every answer's first byte by `ms` milliseconds (besides the rules).
    pub fn set_latency_ms(&self, ms: u64) {
        self.state.latency_ms.store(ms, Ordering::Relaxed);
    }

    /// Requests seen so far whose method is `method` (any, if empty) and whose path contains
    /// `path`.
    pub fn count(&self, method: &str, path: &str) -> usize {
        self.state
            .seen
            .lock()
            .unwrap()
            .iter()
            .filter(|(m, p)| (method.is_empty() || m == method) && p.contains(path))
            .count()
    }

    /// Faults given so far.
    pub fn faults_given(&self) -> u64 {
        self.state.faults_given.load(Ordering::Relaxed)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.state.closing.store(true, Ordering::Relaxed);
        // Wake the accept loop so that it sees `closing`.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// The fault for a request, using up one of its rule's `times`.
fn fault_for(state: &State, method: &str, path: &str) -> Option<Fault> {
    let mut rules = state.rules.lock().unwrap();
    let i = rules.iter().position(|r| {
        r.times > 0 && (r.method.is_empty() || r.method == method) && path.contains(&r.path)
    })?;
    rules[i].times -= 1;
    state.faults_given.fetch_add(1, Ordering::Relaxed);
    Some(rules[i].fault.clone())
}

/// A message head: its lines (CRLF included) and the body framing it announces.
struct Head {
    raw: Vec<u8>,
    first_line: String,
    content_length: Option<u64>,
    chunked: bool,
}

/// Reads a head; `None` at a clean end of the connection.
fn read_head(r: &mut impl BufRead) -> std::io::Result<Option<Head>> {
    let mut raw = Vec::new();
    let mut first_line = String::new();
    let (mut content_length, mut chunked) = (None, false);
    loop {
        let mut line = Vec::new();
        if r.read_until(b'\n', &mut line)? == 0 {
            return if raw.is_empty() {
                Ok(None)
            } else {
                Err(std::io::ErrorKind::UnexpectedEof.into())
            };
        }
        raw.extend_from_slice(&line);
        let text = String::from_utf8_lossy(&line).trim_end().to_string();
        if first_line.is_empty() {
            first_line = text;
            continue;
        }
        if text.is_empty() {
            break;
        }
        if let Some((k, v)) = text.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            if k == "content-length" {
                content_length = v.parse().ok();
            } else if k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked") {
                chunked = true;
            }
        }
    }
    Ok(Some(Head {
        raw,
        first_line,
        content_length,
        chunked,
    }))
}

/// Copies a body framed by `head` from `r` to `w`; `limit` stops after that many bytes of a
/// Content-Length body (for the faults that cut it).
fn copy_body(
    r: &mut impl BufRead,
    w: &mut impl Write,
    head: &Head,
    limit: Option<u64>,
) -> std::io::Result<()> {
    if head.chunked {
        loop {
            let mut line = Vec::new();
            r.read_until(b'\n', &mut line)?;
            w.write_all(&line)?;
            let size = u64::from_str_radix(
                String::from_utf8_lossy(&line)
                    .trim()
                    .split(';')
                    .next()
                    .unwrap_or(""),
                16,
            )
            .map_err(|_| std::io::Error::other("bad chunk size"))?;
            if size == 0 {
                // Trailers, up to the empty line.
                loop {
                    let mut t = Vec::new();
                    r.read_until(b'\n', &mut t)?;
                    w.write_all(&t)?;
                    if t == b"\r\n" || t.is_empty() {
                        return Ok(());
                    }
                }
            }
            std::io::copy(&mut r.by_ref().take(size + 2), w)?;
        }
    }
    let len = head.content_length.unwrap_or(0);
    let n = limit.map_or(len, |l| l.min(len));
    let copied = std::io::copy(&mut r.by_ref().take(n), w)?;
    if copied < n {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// Forwards a `Content-Length` body of `n` bytes from the server to the client: what the
/// reader has buffered first, then the rest through a pipe with splice(2), so the bytes never
/// cross into this process. Copying them through user space (8 KiB at a time, as
/// `std::io::copy` does here) made this proxy, not the loader, the bound of the latency
/// benchmark on a 2-core machine.
fn splice_body(
    r: &mut BufReader<TcpStream>,
    w: &mut TcpStream,
    pipe: &(std::os::fd::OwnedFd, std::os::fd::OwnedFd),
    n: u64,
) -> std::io::Result<()> {
    use rustix::pipe::{SpliceFlags, splice};
    let buffered = r
        .buffer()
        .len()
        .min(usize::try_from(n).unwrap_or(usize::MAX));
    w.write_all(&r.buffer()[..buffered])?;
    r.consume(buffered);
    let mut left = n - buffered as u64;
    // Not MORE: it corks the socket, holding back the body's last segment.
    let flags = SpliceFlags::MOVE;
    while left > 0 {
        let want = usize::try_from(left).unwrap_or(usize::MAX).min(PIPE_BYTES);
        let mut in_pipe = splice(r.get_ref(), None, &pipe.1, None, want, flags)?;
        if in_pipe == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        left -= in_pipe as u64;
        while in_pipe > 0 {
            let out = splice(&pipe.0, None, &*w, None, in_pipe, flags)?;
            if out == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            in_pipe -= out;
        }
    }
    Ok(())
}

/// The pipe's capacity asked for (the kernel's default is 64 KiB).
const PIPE_BYTES: usize = 1 << 20;

/// A pipe for [`splice_body`], as large as the kernel allows an unprivileged user.
fn body_pipe() -> std::io::Result<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)> {
    let pipe = rustix::pipe::pipe()?;
    // Refused above /proc/sys/fs/pipe-max-size: the default size still works, more slowly.
    let _ = rustix::pipe::fcntl_setpipe_size(&pipe.1, PIPE_BYTES);
    Ok(pipe)
}

/// Serves one client connection until either side closes it.
fn serve(state: &State, client: TcpStream, upstream: &str) -> std::io::Result<()> {
    client.set_nodelay(true)?;
    let server = TcpStream::connect(upstream)?;
    server.set_nodelay(true)?;
    let mut from_client = BufReader::new(client.try_clone()?);
    let mut to_client = client;
    let mut from_server = BufReader::new(server.try_clone()?);
    let mut to_server = server;
    let pipe = body_pipe()?;
    while let Some(req) = read_head(&mut from_client)? {
        let mut words = req.first_line.split(' ');
        let method = words.next().unwrap_or("").to_string();
        let path = words.next().unwrap_or("").to_string();
        state
            .seen
            .lock()
            .unwrap()
            .push((method.clone(), path.clone()));
        let fault = fault_for(state, &method, &path);
        if let Some(Fault::Status(status, code)) = fault {
            // Answer in the server's stead; the request body (if any) is read and dropped.
            copy_body(&mut from_client, &mut std::io::sink(), &req, None)?;
            let body = format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code>\
                 <Message>injected by the test proxy</Message></Error>"
            );
            let head = format!(
                "HTTP/1.1 {status} {code}\r\nContent-Type: application/xml\r\n\
                 Content-Length: {}\r\n\r\n",
                body.len()
            );
            to_client.write_all(head.as_bytes())?;
            if method != "HEAD" {
                to_client.write_all(body.as_bytes())?;
            }
            continue;
        }
        to_server.write_all(&req.raw)?;
        copy_body(&mut from_client, &mut to_server, &req, None)?;
        let Some(res) = read_head(&mut from_server)? else {
            return Ok(());
        };
        let latency = Duration::from_millis(state.latency_ms.load(Ordering::Relaxed));
        let extra = match fault {
            Some(Fault::Delay(d)) => d,
            _ => Duration::ZERO,
        };
        if !(latency + extra).is_zero() {
            std::thread::sleep(latency + extra);
        }
        to_client.write_all(&res.raw)?;
        let status: u16 = res
            .first_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let bodiless = method == "HEAD" || status == 204 || status == 304 || status < 200;
        if bodiless {
            continue;
        }
        let half = res.content_length.map(|n| n / 2);
        match fault {
            Some(Fault::ResetMidBody) => {
                copy_body(&mut from_server, &mut to_client, &res, half)?;
                to_client.flush()?;
                // Linger 0: close() sends a reset, not a FIN.
                rustix::net::sockopt::set_socket_linger(&to_client, Some(Duration::ZERO))?;
                return Ok(());
            }
            Some(Fault::Truncate) => {
                copy_body(&mut from_server, &mut to_client, &res, half)?;
                to_client.flush()?;
                let _ = to_client.shutdown(Shutdown::Both);
                return Ok(());
            }
            Some(Fault::Stall(d)) => {
                copy_body(&mut from_server, &mut to_client, &res, half)?;
                to_client.flush()?;
                let until = std::time::Instant::now() + d;
                while std::time::Instant::now() < until && !state.closing.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = to_client.shutdown(Shutdown::Both);
                return Ok(());
            }
            _ => match res.content_length {
                Some(n) if !res.chunked => splice_body(&mut from_server, &mut to_client, &pipe, n)?,
                _ => copy_body(&mut from_server, &mut to_client, &res, None)?,
            },
        }
    }
    Ok(())
}
