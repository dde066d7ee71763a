//! Sessions from a Rust keep-alive client at the daemon: a shell-session command (`true`, a
//! built-in) and a Python-session snippet (`x += 1`), against the same-run spawn floor (a
//! minimal keep-alive HTTP server spawning `/bin/true` per request) and an exec of
//! `/bin/true` through the daemon.
//!
//! Where the time goes: the same runs sent straight to the sandbox's agent over its Unix
//! socket (no daemon), the agent's own `duration_ms` (writing the frame, the shell or
//! interpreter running it, reading both markers), and the daemon's no-spawn round trip.

#[path = "common.rs"]
mod common;

use common::*;

const WARMUP: usize = 200;
const ROUNDS: usize = 5;
const PER_ROUND: usize = 400;

/// Times `n` requests; pushes the reply's `duration_ms` to `inner` when given.
/// The one field an exec's `ExecResult` and a session run's `RunResult` share that the
/// timings read: how long the command ran inside the sandbox.
#[derive(serde::Deserialize)]
struct Timed {
    duration_ms: f64,
}

fn time_posts(
    c: &mut Client,
    path: &str,
    body: &[u8],
    n: usize,
    mut inner: Option<&mut Vec<f64>>,
) -> Vec<f64> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = std::time::Instant::now();
        let r = c.request("POST", path, Some(body)).expect("POST");
        out.push(ms(t.elapsed()));
        assert_eq!(r.status, 200, "POST {path}: {}", r.text());
        if let Some(inner) = inner.as_deref_mut() {
            inner.push(r.json::<Timed>().duration_ms);
        }
    }
    out
}

fn open(c: &mut Client, base: &str, kind: &str) -> String {
    let body = format!(r#"{{"kind":"{kind}"}}"#);
    let r = c
        .request("POST", &format!("{base}/sessions"), Some(body.as_bytes()))
        .expect("open");
    assert!(r.status == 201, "open {kind}: {}", r.text());
    r.json::<arl::api::sessions::SessionInfo>().id
}

fn main() {
    print_header("sessions (issue 15)");
    let daemon = Daemon::start("[pools.default]\nmin_idle = 2\nmax = 8\n", &[]);
    let mut c = daemon.client();
    c.wait_idle("default", 1, std::time::Duration::from_secs(30));
    let id = c.acquire("default");
    let base = format!("/v1/sandboxes/{id}");
    let sh = open(&mut c, &base, "shell");
    let py = open(&mut c, &base, "python");
    let mut direct = Client::connect_unix(&daemon.agent_socket(&id)).expect("agent socket");
    let floor = Floor::start();
    let mut f = floor.client();

    let cases: [(&str, String, String, &[u8]); 3] = [
        (
            "shell `true`",
            format!("{base}/sessions/{sh}/run"),
            format!("/sessions/{sh}/run"),
            br#"{"code":"true"}"#,
        ),
        (
            "python `x += 1`",
            format!("{base}/sessions/{py}/run"),
            format!("/sessions/{py}/run"),
            br#"{"code":"x += 1"}"#,
        ),
        (
            "exec /bin/true",
            format!("{base}/exec"),
            "/exec".to_string(),
            br#"{"cmd":["/bin/true"]}"#,
        ),
    ];
    // `x` must exist before `x += 1`.
    let r = c
        .request("POST", &cases[1].1, Some(br#"{"code":"x = 0"}"#.as_slice()))
        .expect("init x");
    assert_eq!(r.status, 200);

    for (_, path, agent_path, body) in &cases {
        time_posts(&mut c, path, body, WARMUP, None);
        time_posts(&mut direct, agent_path, body, WARMUP, None);
    }
    time_execs(&mut f, "/exec", WARMUP, None);

    let mut via = vec![Vec::new(); cases.len()];
    let mut via_inner = vec![Vec::new(); cases.len()];
    let mut dir = vec![Vec::new(); cases.len()];
    let mut dir_inner = vec![Vec::new(); cases.len()];
    let mut flo = Vec::new();
    // Interleaved rounds, so drift hits all alike.
    for _ in 0..ROUNDS {
        for (i, (_, path, agent_path, body)) in cases.iter().enumerate() {
            via[i].extend(time_posts(
                &mut c,
                path,
                body,
                PER_ROUND,
                Some(&mut via_inner[i]),
            ));
            dir[i].extend(time_posts(
                &mut direct,
                agent_path,
                body,
                PER_ROUND,
                Some(&mut dir_inner[i]),
            ));
        }
        flo.extend(time_execs(&mut f, "/exec", PER_ROUND, None));
    }
    let healthz = {
        let mut out = Vec::new();
        for _ in 0..2000 {
            let t = std::time::Instant::now();
            let r = c.request("GET", "/healthz", None).expect("healthz");
            out.push(ms(t.elapsed()));
            assert_eq!(r.status, 200);
        }
        stats(&out)
    };
    let fl = stats(&flo);

    println!();
    println!(
        "{} timed calls each after {WARMUP} warm-up, one keep-alive connection each:",
        ROUNDS * PER_ROUND
    );
    println!("  floor (spawn /bin/true per request)   {}", fl.line_ms());
    println!(
        "  daemon GET /healthz (no agent)        {}",
        healthz.line_ms()
    );
    for (i, (name, ..)) in cases.iter().enumerate() {
        let (v, d) = (stats(&via[i]), stats(&dir[i]));
        let (vi, di) = (stats(&via_inner[i]), stats(&dir_inner[i]));
        println!("  {name}:");
        println!("    via daemon            {}", v.line_ms());
        println!("    agent direct (Unix)   {}", d.line_ms());
        println!("    agent duration_ms     {}", di.line_ms());
        println!(
            "    => p50 {:.3} ms = daemon hop {:.3} + agent HTTP {:.3} + in the session {:.3} (agent-reported via daemon {:.3}); {:.2}x the floor",
            v.p50,
            v.p50 - d.p50,
            d.p50 - di.p50,
            di.p50,
            vi.p50,
            v.p50 / fl.p50
        );
    }
    println!();
    for (i, (name, ..)) in cases.iter().take(2).enumerate() {
        let v = stats(&via[i]);
        println!(
            "RESULT {name} p50 = {:.3} ms, {:.2}x the same-run spawn floor ({:.3} ms)",
            v.p50,
            v.p50 / fl.p50,
            fl.p50
        );
    }
    c.release(&id);
}
