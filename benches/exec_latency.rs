//! Target 1: exec `/bin/true` through the daemon's HTTP API from a Rust keep-alive client.
//!
//! Targets: p50 <= 0.8 ms, p99 <= 2.5 ms, and p50 <= 1.5x the same-run floor (a minimal
//! keep-alive HTTP server that spawns `/bin/true` per request, measured with the same client).
//!
//! Also measured, to show where the time goes: the same exec sent straight to the sandbox's
//! agent over its Unix socket (no daemon), and the agent's own `duration_ms`.

#[path = "common.rs"]
mod common;

use common::*;

const WARMUP: usize = 200;
const ROUNDS: usize = 5;
const PER_ROUND: usize = 400;

fn time_get(c: &mut Client, path: &str, n: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = std::time::Instant::now();
        let r = c.request("GET", path, None).expect("GET");
        out.push(ms(t.elapsed()));
        assert_eq!(r.status, 200, "GET {path}: {}", r.text());
    }
    out
}

fn main() {
    print_header("exec_latency (target 1)");
    let daemon = Daemon::start("[pools.default]\nmin_idle = 2\nmax = 8\n", &[]);
    let mut c = daemon.client();
    c.wait_idle("default", 1, std::time::Duration::from_secs(30));
    let id = c.acquire("default");
    let path = format!("/v1/sandboxes/{id}/exec");
    let floor = Floor::start();
    let mut f = floor.client();
    let mut direct = Client::connect_unix(&daemon.agent_socket(&id)).expect("agent socket");

    time_execs(&mut c, &path, WARMUP, None);
    time_execs(&mut f, "/exec", WARMUP, None);
    time_execs(&mut direct, "/exec", WARMUP, None);
    let before = c.metrics();

    // Interleaved rounds, so drift (page cache, CPU frequency, neighbours) hits all alike.
    let mut flo_spawn = Vec::new();
    let (mut arl, mut arl_agent, mut flo, mut dir, mut dir_agent) =
        (vec![], vec![], vec![], vec![], vec![]);
    for _ in 0..ROUNDS {
        arl.extend(time_execs(&mut c, &path, PER_ROUND, Some(&mut arl_agent)));
        flo.extend(time_execs(&mut f, "/exec", PER_ROUND, Some(&mut flo_spawn)));
        dir.extend(time_execs(
            &mut direct,
            "/exec",
            PER_ROUND,
            Some(&mut dir_agent),
        ));
    }
    let after = c.metrics();

    let a = stats(&arl);
    let fl = stats(&flo);
    let d = stats(&dir);
    let aa = stats(&arl_agent);
    let da = stats(&dir_agent);
    let overhead: Vec<f64> = arl.iter().zip(&arl_agent).map(|(e, a)| e - a).collect();
    let o = stats(&overhead);

    println!();
    println!(
        "exec /bin/true, {} timed calls each after {WARMUP} warm-up, one keep-alive connection:",
        a.n
    );
    println!("  arl daemon (HTTP API)      {}", a.line_ms());
    println!("  floor (spawn per request)  {}", fl.line_ms());
    println!("  agent direct (Unix socket) {}", d.line_ms());
    println!("  agent-reported duration_ms via daemon: {}", aa.line_ms());
    println!("  agent-reported duration_ms direct:     {}", da.line_ms());
    println!(
        "  floor's own spawn+wait of /bin/true:   {}",
        stats(&flo_spawn).line_ms()
    );
    println!(
        "  end-to-end minus agent duration (daemon path): {}",
        o.line_ms()
    );
    println!(
        "  => daemon hop costs {:.3} ms at p50 (daemon p50 - direct p50); agent beyond its spawn+wait {:.3} ms (direct p50 - agent p50)",
        a.p50 - d.p50,
        d.p50 - da.p50
    );

    let exec_hist = bucket_delta(
        &after.buckets("arl_exec_seconds", &[("pool", "default")]),
        &before.buckets("arl_exec_seconds", &[("pool", "default")]),
    );
    let http_hist = bucket_delta(
        &after.buckets(
            "arl_http_request_seconds",
            &[("route", "/v1/sandboxes/{id}/exec")],
        ),
        &before.buckets(
            "arl_http_request_seconds",
            &[("route", "/v1/sandboxes/{id}/exec")],
        ),
    );
    let (eb, ei) = histogram_quantile(&exec_hist, 50.0);
    let (hb, hi) = histogram_quantile(&http_hist, 50.0);
    println!(
        "  daemon histograms (p50, bucket bound / interpolated): arl_exec_seconds <= {:.3} ms (~{:.3}), arl_http_request_seconds <= {:.3} ms (~{:.3})",
        eb * 1e3,
        ei * 1e3,
        hb * 1e3,
        hi * 1e3
    );

    // Request costs without any spawn: the daemon's HTTP path and the agent's.
    let healthz = stats(&time_get(&mut c, "/healthz", 2000));
    let info = stats(&time_get(&mut c, &format!("/v1/sandboxes/{id}"), 2000));
    let ping = stats(&time_get(&mut direct, "/ping", 2000));
    println!("no-spawn round trips (2000 each):");
    println!("  daemon GET /healthz              {}", healthz.line_ms());
    println!("  daemon GET /v1/sandboxes/{{id}}    {}", info.line_ms());
    println!("  agent direct GET /ping           {}", ping.line_ms());
    println!(
        "  => proxying an exec costs the daemon ~{:.3} ms beyond its own HTTP round trip (hop {:.3} - GET sandbox {:.3})",
        (a.p50 - d.p50) - info.p50,
        a.p50 - d.p50,
        info.p50
    );

    let ratio = a.p50 / fl.p50;
    println!();
    println!(
        "RESULT exec p50   = {:.3} ms (target <= 0.8 ms)  {}",
        a.p50,
        verdict(a.p50 <= 0.8)
    );
    println!(
        "RESULT exec p99   = {:.3} ms (target <= 2.5 ms)  {}",
        a.p99,
        verdict(a.p99 <= 2.5)
    );
    println!(
        "RESULT floor p50  = {:.3} ms, p99 = {:.3} ms",
        fl.p50, fl.p99
    );
    println!(
        "RESULT p50 ratio  = {ratio:.2}x floor (target <= 1.5x)  {}",
        verdict(ratio <= 1.5)
    );
    println!("RESULT p99 ratio  = {:.2}x floor", a.p99 / fl.p99);
    drop(direct);
    drop(c);
    let mut daemon = daemon;
    if let Some(t) = daemon.stop() {
        println!("daemon stopped (SIGTERM) in {:.0} ms", ms(t));
    }
}
