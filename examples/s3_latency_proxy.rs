//! A proxy on 127.0.0.1 that forwards HTTP/1.1 to an S3-compatible server with a fixed added
//! first-byte latency on every answer: a local server made to look as far away as a cloud
//! store, for scripts/bench-s3.sh. The same proxy the fault tests use
//! (tests/s3_common/proxy.rs).
//!
//! ```text
//! cargo run --release --example s3_latency_proxy -- --listen 9100 --upstream 127.0.0.1:9000 --latency-ms 20
//! ```
//! Runs until killed.

#[path = "../tests/s3_common/proxy.rs"]
mod proxy;

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut listen, mut upstream, mut latency) = (0u16, None, 0u64);
    while let Some(a) = args.next() {
        let mut value = || {
            args.next()
                .unwrap_or_else(|| fail(&format!("{a} needs a value")))
        };
        match a.as_str() {
            "--listen" => listen = value().parse().unwrap_or_else(|_| fail("--listen PORT")),
            "--upstream" => upstream = Some(value()),
            "--latency-ms" => {
                latency = value()
                    .parse()
                    .unwrap_or_else(|_| fail("--latency-ms MILLISECONDS"))
            }
            _ => fail(&format!("unknown argument {a}")),
        }
    }
    let upstream = upstream.unwrap_or_else(|| fail("--upstream HOST:PORT is required"));
    let mut p = proxy::Proxy::bind(listen);
    p.set_latency_ms(latency);
    p.start(&upstream);
    println!("{}", p.endpoint());
    loop {
        std::thread::park();
    }
}

fn fail(why: &str) -> ! {
    eprintln!(
        "s3_latency_proxy: {why}\nusage: s3_latency_proxy [--listen PORT] --upstream HOST:PORT \
         [--latency-ms N]"
    );
    std::process::exit(2)
}
