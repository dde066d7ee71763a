//! Target 2: acquire from a warm pool.
//!
//! * Sequential: p50 <= 0.3 ms for `POST /v1/sandboxes {"pool":..,"count":1}` alone (the
//!   release happens outside the timed region), every acquire a hit
//!   (`arl_acquire_seconds_count{result="miss"}` must stay 0). Measured twice:
//!   - "quiet": the pool's `min_idle` is dropped to 0 while timing, so no replacement is being
//!     created in the background (the acquire path alone);
//!   - "refilling": `min_idle` stays at 300, so every acquire also starts a replacement
//!     sandbox in the background (what a busy node sees).
//! * Burst: 300 simultaneous acquires on 300 connections against a pool warm with 300
//!   (`min_idle` 300, `max` 400): p99 <= 30 ms. Repeated 4 times (1200 samples).

#[path = "common.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;

const POOL: &str = "acq";
const WARM: u64 = 300;
const BATCH: usize = 150;
const BATCHES: usize = 7;
const BURST: usize = 300;
const BURSTS: usize = 4;

fn spec(min_idle: u64) -> arl::api::PoolSpec {
    pool_spec(min_idle as usize, 400)
}

/// The body of an acquire of one sandbox of `POOL` (built once, outside the timings).
fn acquire_body() -> String {
    serde_json::to_string(&arl::api::AcquireRequest {
        pool: POOL.into(),
        count: Some(1),
        ..Default::default()
    })
    .expect("json")
}

/// Waits until the pool holds `WARM` idle sandboxes and nothing is starting, then a little
/// longer so background destroys finish too.
fn settle(c: &mut Client) -> Duration {
    let started = Instant::now();
    c.wait_idle(POOL, WARM, Duration::from_secs(120));
    loop {
        let st = c.pool_status(POOL);
        if st.starting == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let took = started.elapsed();
    std::thread::sleep(Duration::from_millis(300));
    took
}

fn misses(c: &mut Client) -> f64 {
    c.metrics().sum(
        "arl_acquire_seconds_count",
        &[("pool", POOL), ("result", "miss")],
    )
}

fn sequential(c: &mut Client, quiet: bool) -> Vec<f64> {
    let mut samples = Vec::with_capacity(BATCH * BATCHES);
    let body = acquire_body();
    for _ in 0..BATCHES {
        c.put_pool(POOL, &spec(WARM));
        settle(c);
        if quiet {
            c.put_pool(POOL, &spec(0));
        }
        let mut ids = Vec::with_capacity(BATCH);
        for _ in 0..BATCH {
            let t = Instant::now();
            let r = c
                .request("POST", "/v1/sandboxes", Some(body.as_bytes()))
                .expect("acquire");
            samples.push(ms(t.elapsed()));
            assert_eq!(r.status, 201, "acquire: {}", r.text());
            ids.push(first_id(&r));
        }
        for id in ids {
            c.release(&id);
        }
    }
    c.put_pool(POOL, &spec(WARM));
    samples
}

/// One burst: `BURST` connections, opened beforehand, each send `POST /v1/sandboxes` (or,
/// with `healthz`, `GET /healthz`) at once. The client is a single-threaded tokio loop, so
/// the bench's own threads do not compete with the daemon for the cores: each connection's
/// request is written in turn (all 300 within ~2 ms) and its latency runs from its own write
/// to its complete answer.
/// Returns per-request latencies (ms), the makespan from the first write (ms) and the ids.
fn burst(daemon: &Daemon, healthz: bool) -> (Vec<f64>, f64, Vec<String>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let request = if healthz {
        b"GET /healthz HTTP/1.1\r\nHost: bench\r\n\r\n".to_vec()
    } else {
        let body = acquire_body();
        format!(
            "POST /v1/sandboxes HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    };
    rt.block_on(async {
        let mut conns = Vec::with_capacity(BURST);
        for _ in 0..BURST {
            let s = tokio::net::TcpStream::connect(daemon.addr)
                .await
                .expect("connect");
            s.set_nodelay(true).expect("nodelay");
            conns.push(s);
        }
        // Let the daemon accept them all before the burst.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let t0 = Instant::now();
        let request = &request;
        let results = futures_util::future::join_all(conns.into_iter().map(|mut s| async move {
            s.write_all(request).await.expect("write");
            let sent = Instant::now();
            let mut buf = Vec::with_capacity(1024);
            let mut chunk = [0u8; 4096];
            loop {
                let n = s.read(&mut chunk).await.expect("read");
                assert!(n > 0, "connection closed mid-response");
                buf.extend_from_slice(&chunk[..n]);
                if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    if buf.len() >= end + 4 + len {
                        let done = Instant::now();
                        let status: u16 = head
                            .split_whitespace()
                            .nth(1)
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(0);
                        let body = buf[end + 4..end + 4 + len].to_vec();
                        return (status, body, ms(done - sent), ms(done - t0));
                    }
                }
            }
        }))
        .await;
        let mut lat = Vec::with_capacity(BURST);
        let mut ids = Vec::new();
        let mut makespan: f64 = 0.0;
        for (status, body, l, span) in results {
            let text = String::from_utf8_lossy(&body).into_owned();
            if healthz {
                assert_eq!(status, 200, "healthz: {text}");
            } else {
                assert_eq!(status, 201, "acquire: {text}");
                let r = Response { status, body };
                ids.push(first_id(&r));
            }
            lat.push(l);
            makespan = makespan.max(span);
        }
        (lat, makespan, ids)
    })
}

/// `BURSTS` bursts of acquires; with `quiet`, `min_idle` is 0 during each burst so no
/// replacement is created while the burst is served.
fn bursts(daemon: &Daemon, c: &mut Client, label: &str, quiet: bool) -> (Stats, f64, f64) {
    let mut lat = Vec::new();
    let mut worst_span: f64 = 0.0;
    let m0 = misses(c);
    println!(
        "burst ({label}): {BURST} simultaneous acquires on {BURST} connections, pool warm with >= {WARM}:"
    );
    for i in 0..BURSTS {
        c.put_pool(POOL, &spec(WARM));
        settle(c);
        if quiet {
            c.put_pool(POOL, &spec(0));
        }
        let idle = c.idle(POOL);
        let (l, span, ids) = burst(daemon, false);
        println!(
            "  burst {}: idle before = {idle}, {} ; last answer {span:.1} ms after the start",
            i + 1,
            stats(&l).line_ms()
        );
        lat.extend(l);
        worst_span = worst_span.max(span);
        for id in ids {
            c.release(&id);
        }
    }
    c.put_pool(POOL, &spec(WARM));
    let s = stats(&lat);
    println!("  all {label} bursts: {}", s.line_ms());
    (s, worst_span, misses(c) - m0)
}

fn main() {
    print_header("acquire (target 2)");
    let daemon = Daemon::start("[pools.default]\nmin_idle = 0\nmax = 4\n", &[]);
    let mut c = daemon.client();
    c.put_pool(POOL, &spec(WARM));
    let warm = settle(&mut c);
    println!(
        "pool {POOL:?} warmed to {WARM} idle in {:.2} s",
        warm.as_secs_f64()
    );

    // A few untimed acquires to warm the code paths.
    for _ in 0..20 {
        let id = c.acquire(POOL);
        c.release(&id);
    }
    let misses0 = misses(&mut c);

    let quiet = stats(&sequential(&mut c, true));
    let misses1 = misses(&mut c);
    let m_before = c.metrics();
    let busy = stats(&sequential(&mut c, false));
    let m_after = c.metrics();
    let misses2 = misses(&mut c);
    let hist = bucket_delta(
        &m_after.buckets("arl_acquire_seconds", &[("pool", POOL), ("result", "hit")]),
        &m_before.buckets("arl_acquire_seconds", &[("pool", POOL), ("result", "hit")]),
    );
    let (hb, hi) = histogram_quantile(&hist, 50.0);

    println!();
    println!(
        "sequential acquire (one keep-alive connection, release untimed, batches of {BATCH} from a pool of {WARM}):"
    );
    println!("  quiet (no refill running)        {}", quiet.line_ms());
    println!("  refilling (replacement created)  {}", busy.line_ms());
    println!(
        "  daemon-side arl_acquire_seconds{{result=\"hit\"}} p50 (refilling run): <= {:.3} ms (~{:.3} ms interpolated)",
        hb * 1e3,
        hi * 1e3
    );
    println!(
        "  misses during the quiet run: {}, during the refilling run: {}",
        misses1 - misses0,
        misses2 - misses1
    );

    // Bursts: first the HTTP floor (GET /healthz, same 300-connection pattern), then
    // acquires with no refill running, then the real thing (refill running).
    println!();
    settle(&mut c);
    let mut hz = Vec::new();
    let mut hz_span: f64 = 0.0;
    for _ in 0..2 {
        let (l, span, _) = burst(&daemon, true);
        hz.extend(l);
        hz_span = hz_span.max(span);
    }
    let hz = stats(&hz);
    println!(
        "burst floor: {BURST} simultaneous GET /healthz on {BURST} connections: {} ; worst makespan {hz_span:.1} ms",
        hz.line_ms()
    );
    let (qb, q_span, q_miss) = bursts(&daemon, &mut c, "quiet: min_idle 0 during the burst", true);
    let (b, span, b_miss) = bursts(&daemon, &mut c, "refilling: min_idle 300", false);
    println!("  misses during the bursts: {}", q_miss + b_miss);
    println!();
    println!(
        "RESULT acquire p50 (quiet)     = {:.3} ms, p99 = {:.3} ms (target p50 <= 0.3 ms)  {}",
        quiet.p50,
        quiet.p99,
        verdict(quiet.p50 <= 0.3)
    );
    println!(
        "RESULT acquire p50 (refilling) = {:.3} ms, p99 = {:.3} ms (target p50 <= 0.3 ms)  {}",
        busy.p50,
        busy.p99,
        verdict(busy.p50 <= 0.3)
    );
    println!(
        "RESULT acquire misses          = {} (must be 0)",
        misses2 - misses0 + q_miss + b_miss
    );
    println!(
        "RESULT burst of {BURST} p50 = {:.2} ms, p99 = {:.2} ms (target p99 <= 30 ms)  {}; worst makespan {span:.1} ms",
        b.p50,
        b.p99,
        verdict(b.p99 <= 30.0),
    );
    println!(
        "RESULT burst of {BURST}, no refill running: p50 = {:.2} ms, p99 = {:.2} ms; worst makespan {q_span:.1} ms",
        qb.p50, qb.p99
    );
    println!(
        "RESULT burst floor (GET /healthz): p50 = {:.2} ms, p99 = {:.2} ms",
        hz.p50, hz.p99
    );
    drop(c);
    let mut daemon = daemon;
    if let Some(t) = daemon.stop() {
        println!("daemon stopped (SIGTERM) in {:.0} ms", ms(t));
    }
}
