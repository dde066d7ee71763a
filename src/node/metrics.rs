//! Prometheus metrics of the daemon. Labels are bounded: pool names (validated, few), route
//! templates, status codes and fixed outcome words; never sandbox ids or user strings.

use prometheus::{
    CounterVec, Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

const LATENCY_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

pub struct Metrics {
    registry: Registry,
    pub acquire_seconds: HistogramVec,
    pub exec_seconds: HistogramVec,
    pub create_seconds: HistogramVec,
    pub http_seconds: HistogramVec,
    pub pause_seconds: HistogramVec,
    pub snapshot_seconds: HistogramVec,
    pub fork_seconds: HistogramVec,
    /// Connections each front thread accepted: shows whether they spread over the threads.
    pub http_connections_total: IntCounterVec,
    pub execs_total: CounterVec,
    pub sandbox_failures_total: CounterVec,
    pub sandboxes_adopted_total: CounterVec,
    pub sandboxes: IntGaugeVec,
}

fn histogram(name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    HistogramVec::new(
        HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()),
        labels,
    )
    .expect("static histogram definition")
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let m = Self {
            acquire_seconds: histogram(
                "arl_acquire_seconds",
                "Time to hand out a sandbox; result is hit (warm) or miss (created on demand).",
                &["pool", "result"],
            ),
            exec_seconds: histogram(
                "arl_exec_seconds",
                "Exec latency through the daemon.",
                &["pool"],
            ),
            create_seconds: histogram(
                "arl_sandbox_create_seconds",
                "Time from create to a sandbox answering its first ping.",
                &["pool", "runtime"],
            ),
            http_seconds: histogram(
                "arl_http_request_seconds",
                "HTTP request latency by route template and status code.",
                &["route", "code"],
            ),
            pause_seconds: histogram(
                "arl_pause_seconds",
                "Time to freeze (pause) or thaw (resume) a sandbox; cause is explicit (its holder asked) or auto (idleness, or a request to a paused sandbox).",
                &["action", "cause"],
            ),
            snapshot_seconds: histogram(
                "arl_snapshot_seconds",
                "Time to snapshot a sandbox's writable state.",
                &["pool"],
            ),
            fork_seconds: histogram(
                "arl_fork_seconds",
                "Time to fork sandboxes from a snapshot, all of one request.",
                &["pool"],
            ),
            http_connections_total: IntCounterVec::new(
                Opts::new(
                    "arl_http_connections_total",
                    "Connections accepted by each front thread of the HTTP API.",
                ),
                &["thread"],
            )
            .expect("static counter definition"),
            execs_total: CounterVec::new(
                Opts::new(
                    "arl_execs_total",
                    "Execs by outcome (ok, nonzero, timeout, error).",
                ),
                &["pool", "outcome"],
            )
            .expect("static counter definition"),
            sandbox_failures_total: CounterVec::new(
                Opts::new("arl_sandbox_failures_total", "Sandbox failures by reason."),
                &["pool", "reason"],
            )
            .expect("static counter definition"),
            sandboxes_adopted_total: CounterVec::new(
                Opts::new(
                    "arl_sandboxes_adopted_total",
                    "Sandboxes a predecessor daemon left, by what became of them at start-up (allocated, idle: taken back; lost: destroyed).",
                ),
                &["runtime", "state"],
            )
            .expect("static counter definition"),
            sandboxes: IntGaugeVec::new(
                Opts::new("arl_sandboxes", "Sandboxes by pool and state."),
                &["pool", "state"],
            )
            .expect("static gauge definition"),
            registry,
        };
        for collector in [
            Box::new(m.acquire_seconds.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.exec_seconds.clone()),
            Box::new(m.create_seconds.clone()),
            Box::new(m.http_seconds.clone()),
            Box::new(m.pause_seconds.clone()),
            Box::new(m.snapshot_seconds.clone()),
            Box::new(m.fork_seconds.clone()),
            Box::new(m.http_connections_total.clone()),
            Box::new(m.execs_total.clone()),
            Box::new(m.sandbox_failures_total.clone()),
            Box::new(m.sandboxes_adopted_total.clone()),
            Box::new(m.sandboxes.clone()),
        ] {
            m.registry.register(collector).expect("unique metric names");
        }
        m
    }

    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}
