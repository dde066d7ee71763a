#!/usr/bin/python3
"""Same-run A/B of two `arl` binaries (as root): sandbox create time (an acquire that misses,
`min_idle = 0`, then a release), exec latency (`/bin/true`, 2000 calls after 200 warm-up) with
the agent's own `duration_ms`, and write throughput to /workspace (`dd` 400 MB, `conv=fsync`).
Rounds alternate the order of the two binaries; each round starts a fresh daemon.

    /usr/bin/python3 benches/ab_binaries.py BEFORE_BIN AFTER_BIN ROUNDS
    (CREATES=100 EXECS=2000 by default)
"""
import http.client, json, os, shutil, signal, socket, statistics, subprocess, sys, tempfile, time

def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

class Node:
    def __init__(self, binary, tag):
        self.dir = tempfile.mkdtemp(prefix=f"arl-ab-{tag}-")
        self.port = free_port()
        cfg = os.path.join(self.dir, "config.toml")
        open(cfg, "w").write("[pools.default]\nmin_idle = 0\nmax = 64\n")
        self.proc = subprocess.Popen([binary, "node", "--listen", f"127.0.0.1:{self.port}",
            "--state-dir", os.path.join(self.dir, "state"), "--cgroup-parent", f"arl-ab-{tag}-{os.getpid()}",
            "--config", cfg], stdout=subprocess.DEVNULL, stderr=open(os.path.join(self.dir, "log"), "w"),
            env={**os.environ, "ARL_LOG": "warn"})
        self.conn = None
        deadline = time.time() + 30
        while True:
            try:
                if self.req("GET", "/readyz")[0] == 200: break
            except OSError:
                self.conn = None
            assert time.time() < deadline, "not ready"
            time.sleep(0.05)
    def req(self, method, path, body=None):
        if self.conn is None:
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        data = json.dumps(body).encode() if body is not None else None
        self.conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
        r = self.conn.getresponse(); raw = r.read()
        return r.status, (json.loads(raw) if raw else None)
    def stop(self):
        self.proc.send_signal(signal.SIGTERM); self.proc.wait(60)
        shutil.rmtree(self.dir, ignore_errors=True)

AGENT = {}

def pct(xs, q):
    xs = sorted(xs); return xs[min(len(xs) - 1, int(q * len(xs)))]

def run(binary, tag, creates, execs):
    n = Node(binary, tag)
    try:
        ct = []
        for _ in range(creates):
            t = time.perf_counter(); s, b = n.req("POST", "/v1/sandboxes", {"pool": "default"})
            ct.append((time.perf_counter() - t) * 1000); assert s == 201, b
            sid = b["sandboxes"][0]["id"]; s, _ = n.req("DELETE", f"/v1/sandboxes/{sid}"); assert s == 204
        s, b = n.req("POST", "/v1/sandboxes", {"pool": "default"}); sid = b["sandboxes"][0]["id"]
        path = f"/v1/sandboxes/{sid}/exec"
        for _ in range(200): n.req("POST", path, {"cmd": ["/bin/true"]})
        et = []
        for _ in range(execs):
            t = time.perf_counter(); s, b = n.req("POST", path, {"cmd": ["/bin/true"]})
            et.append((time.perf_counter() - t) * 1000); assert s == 200 and b["exit_code"] == 0, b
            AGENT.setdefault(tag, []).append(b["duration_ms"])
        wt = []
        for _ in range(3):
            s, b = n.req("POST", path, {"shell": "dd if=/dev/zero of=/workspace/f bs=1M count=400 conv=fsync 2>/dev/null; echo $?; rm -f /workspace/f", "timeout_ms": 60000})
            assert s == 200 and b["stdout"] == "0\n", b
            wt.append(400 / (b["duration_ms"] / 1000))
        return ct, et, wt
    finally:
        n.stop()

if __name__ == "__main__":
    before, after, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
    res = {"before": ([], [], []), "after": ([], [], [])}
    for r in range(rounds):
        for tag, binary in (("before", before), ("after", after)) if r % 2 == 0 else (("after", after), ("before", before)):
            ct, et, wt = run(binary, tag, int(os.environ.get("CREATES", 100)), int(os.environ.get("EXECS", 2000)))
            for acc, new in zip(res[tag], (ct, et, wt)): acc.extend(new)
            print(f"round {r} {tag}: create p50 {statistics.median(ct):.2f} ms, exec p50 {statistics.median(et):.3f} ms p99 {pct(et, .99):.3f}, write {statistics.median(wt):.0f} MB/s", flush=True)
    print("load average:", open("/proc/loadavg").read().strip())
    for tag in ("before", "after"):
        ct, et, wt = res[tag]
        print(f"{tag}: create n={len(ct)} p50 {statistics.median(ct):.2f} ms p99 {pct(ct, .99):.2f}; "
              f"exec n={len(et)} p50 {statistics.median(et):.3f} ms p99 {pct(et, .99):.3f}; "
              f"write /workspace 400 MB: median {statistics.median(wt):.0f} MB/s ({', '.join(f'{w:.0f}' for w in wt)})")
    for tag in ("before", "after"):
        print(f"{tag}: agent's own duration_ms p50 {statistics.median(AGENT[tag]):.3f} ms")
    b, a = res["before"], res["after"]
    print(f"after/before: create p50 {statistics.median(a[0]) / statistics.median(b[0]):.3f}, "
          f"exec p50 {statistics.median(a[1]) / statistics.median(b[1]):.3f}, exec p99 {pct(a[1], .99) / pct(b[1], .99):.3f}")
