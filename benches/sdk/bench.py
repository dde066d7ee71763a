"""SDK benchmarks: exec end to end vs. a floor, SDK overhead over a raw keep-alive request,
asyncio throughput with 64 sandboxes, acquire+release latency.

Usage (from the repository root, with the SDK installed in the interpreter that runs it):

    python benches/sdk/bench.py [--n 2000] [--write]

It starts its own daemon (``$ARL_BIN`` or ``target/<triple>/release/arl``) on a free port, unless
``--endpoint URL`` is given. ``--write`` stores the results in benches/sdk/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import arl

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(port: int, path: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            c.request("GET", path)
            if c.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.02)
    raise RuntimeError(f"port {port} not ready")


def stats(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    n = len(s)
    return {
        "n": n,
        "p50_ms": statistics.median(s) * 1e3,
        "p90_ms": s[int(n * 0.90) - 1] * 1e3,
        "p99_ms": s[max(0, int(n * 0.99) - 1)] * 1e3,
        "mean_ms": statistics.fmean(s) * 1e3,
    }


def timed(fn: Callable[[], Any], n: int, warmup: int = 100) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    pc = time.perf_counter
    for _ in range(n):
        t0 = pc()
        fn()
        out.append(pc() - t0)
    return out


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(open("/proc/meminfo").readline().split()[1])
        mem = f", {kb / 1024 / 1024:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    return (
        f"{cpu}, {os.cpu_count()} vCPU{mem}; Linux {platform.release()}; "
        f"Python {platform.python_version()} ({sys.executable.split('/')[-1]})"
    )


def raw_client(port: int, path: str, body: bytes, headers: dict[str, str], with_rid: bool = False) -> Callable[[], bytes]:
    """One keep-alive `http.client` connection POSTing `body`; with `with_rid`, each call's
    body carries a fresh request_id, exactly like the SDK's (the daemon records it)."""
    conn = http.client.HTTPConnection("127.0.0.1", port)
    conn.connect()
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    h = {"Content-Type": "application/json", **headers}
    head = body[:-1]
    counter = iter(range(1 << 62))

    def call() -> bytes:
        b = head + b',"request_id":"raw-%d"}' % next(counter) if with_rid else body
        conn.request("POST", path, b, h)
        r = conn.getresponse()
        data = r.read()
        assert r.status == 200, data
        return data

    return call


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000, help="calls per latency measurement (>= 1000)")
    ap.add_argument("--endpoint", help="use a running daemon instead of starting one")
    ap.add_argument("--write", action="store_true", help="write benches/sdk/RESULTS.md")
    args = ap.parse_args()
    n = max(1000, args.n)

    procs: list[subprocess.Popen[bytes]] = []
    tmp = Path(tempfile.mkdtemp(prefix="arl-bench-"))
    tmp.chmod(0o755)  # sandboxes' unprivileged uids must traverse the state dir
    try:
        # -- floor server ------------------------------------------------------------------
        fport = free_port()
        procs.append(subprocess.Popen([sys.executable, str(HERE / "floor_server.py"), str(fport)], stdout=subprocess.PIPE))
        assert procs[-1].stdout is not None
        procs[-1].stdout.readline()

        # -- daemon --------------------------------------------------------------------------
        daemon_name = "a running daemon"
        if args.endpoint:
            url = args.endpoint
        else:
            binary = os.environ.get("ARL_BIN") or str(next(ROOT.glob("target/*/release/arl"), ROOT / "target" / "release" / "arl"))
            port = free_port()
            cfg = tmp / "config.json"
            cfg.write_text(json.dumps({"pools": {"default": {"min_idle": 8, "max": 96}, "bench": {"min_idle": 16, "max": 96, "reuse": "reset"}}}))
            (tmp / "state").mkdir()
            log = open(tmp / "daemon.log", "wb")
            procs.append(subprocess.Popen(
                [binary, "node", "--listen", f"127.0.0.1:{port}", "--state-dir", str(tmp / "state"), "--config", str(cfg),
                 "--cgroup-parent", f"arl-bench-{os.getpid()}"],
                stdout=log, stderr=subprocess.STDOUT,
            ))
            wait_http(port, "/readyz")
            url = f"http://127.0.0.1:{port}"
            print(f"daemon {binary} (process runtime) on {url}")
            daemon_name = os.path.relpath(binary, ROOT) if binary.startswith(str(ROOT)) else os.path.basename(binary)
        dport = int(url.rsplit(":", 1)[1])
        results: dict[str, Any] = {"machine": machine(), "n": n, "load_before": os.getloadavg()[0], "daemon": daemon_name}
        print("machine:", results["machine"])

        client = arl.Client(url)
        sb = client.sandbox("default")

        # -- 1. floor, raw keep-alive request to the daemon, SDK exec (interleaved blocks) ----
        floor = raw_client(fport, "/exec", b'{"cmd":["true"]}', {})
        body = json.dumps({"cmd": ["true"]}).encode()
        raw = raw_client(dport, f"/v1/sandboxes/{sb.id}/exec", body, {}, with_rid=True)
        agent_s: list[float] = []

        def sdk() -> None:
            agent_s.append(sb.exec(["true"]).duration)

        f_s: list[float] = []
        r_s: list[float] = []
        s_s: list[float] = []
        for fn in (floor, raw, sdk):
            timed(fn, 0, warmup=200)
        # Round-robin, call by call, so that machine noise hits all three alike.
        pc = time.perf_counter
        for _ in range(n):
            for fn, out in ((floor, f_s), (raw, r_s), (sdk, s_s)):
                t0 = pc()
                fn()
                out.append(pc() - t0)
        results["floor"] = stats(f_s)
        results["raw_daemon"] = stats(r_s)
        results["sdk_exec"] = stats(s_s)
        results["agent_exec"] = stats(agent_s[-n:])
        # What spawning alone costs on this machine: no HTTP, no pipes, no sandbox.
        results["spawn_only"] = stats(timed(lambda: os.waitpid(os.posix_spawn("/bin/true", ["/bin/true"], {}), 0), n))
        results["sdk_overhead_us"] = (results["sdk_exec"]["p50_ms"] - results["raw_daemon"]["p50_ms"]) * 1e3
        results["sdk_vs_floor"] = results["sdk_exec"]["p50_ms"] / results["floor"]["p50_ms"]

        # In-process SDK cost without a network: build request + parse result.
        from arl._common import dumps, exec_body, loads, new_request_id
        sample = raw()
        t0 = pc()
        for _ in range(20000):
            dumps(exec_body(["true"], None, None, None, None, None, new_request_id()))
            arl.ExecResult.from_json(loads(sample))
        results["sdk_cpu_us"] = (pc() - t0) / 20000 * 1e6

        # -- 2. acquire + release ----------------------------------------------------------
        def acq_rel() -> None:
            client.sandbox("bench").release()

        results["acquire_release"] = stats(timed(acq_rel, n, warmup=50))
        acq: list[float] = []
        rel: list[float] = []
        for _ in range(n):
            t0 = pc()
            s = client.sandbox("bench")
            t1 = pc()
            s.release()
            acq.append(t1 - t0)
            rel.append(pc() - t1)
        results["acquire"] = stats(acq)
        results["release"] = stats(rel)
        sb.release()
        client.close()

        # -- 3. asyncio, 64 sandboxes in one process -----------------------------------------
        async def throughput() -> dict[str, float]:
            per = max(40, -(-n * 2 // 64))
            async with arl.AsyncClient(url) as ac:
                sbs = await ac.acquire_many("default", 64)
                async with sbs:
                    async def loop(s: arl.AsyncSandbox, k: int) -> list[float]:
                        lat = []
                        for _ in range(k):
                            t0 = time.perf_counter()
                            r = await s.exec(["true"])
                            lat.append(time.perf_counter() - t0)
                            assert r.exit_code == 0
                        return lat

                    await asyncio.gather(*(loop(s, 5) for s in sbs))  # warm connections
                    t0 = time.perf_counter()
                    lats = await asyncio.gather(*(loop(s, per) for s in sbs))
                    wall = time.perf_counter() - t0
            flat = [x for part in lats for x in part]
            st = stats(flat)
            st["execs"] = len(flat)
            st["wall_s"] = wall
            st["exec_per_s"] = len(flat) / wall
            return st

        results["async64"] = asyncio.run(throughput())
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)

    results["load_after"] = os.getloadavg()[0]
    report = render(results)
    print(report)
    print(json.dumps(results, indent=1))
    if args.write:
        (HERE / "RESULTS.md").write_text(report)
        print(f"wrote {HERE / 'RESULTS.md'}")


def render(r: dict[str, Any]) -> str:
    def row(name: str, s: dict[str, float], target: str) -> str:
        return f"| {name} | {s['p50_ms']:.3f} | {s['p90_ms']:.3f} | {s['p99_ms']:.3f} | {s['n']} | {target} |"

    a = r["async64"]
    lines = [
        "# SDK benchmark results",
        "",
        f"Machine: {r['machine']}.",
        f"Daemon: `{r.get('daemon', 'target/debug/arl')}`, process runtime, on the same machine over loopback.",
        "Produced by `python benches/sdk/bench.py --write` (all numbers from one run; latencies in ms; floor, raw and"
        " SDK calls alternate call by call;"
        f" 1-minute load average {r['load_before']:.2f} before, {r['load_after']:.2f} after).",
        "",
        "| measurement | p50 | p90 | p99 | calls | target |",
        "|---|---|---|---|---|---|",
        row("floor: `http.client` keep-alive → minimal server spawning `/bin/true`", r["floor"], "—"),
        row("raw keep-alive `POST /exec` (`http.client`, same body incl. a request_id) to the daemon", r["raw_daemon"], "—"),
        row("`sb.exec([\"true\"])` end to end (sync SDK)", r["sdk_exec"], "p50 ≤ 1.0, p99 ≤ 3"),
        row("… of which the agent's own time for the command (spawn to result, the result's `duration`)", r["agent_exec"], "—"),
        row("`/bin/true` spawned and reaped by the benchmark itself (`os.posix_spawn` + `waitpid`; no HTTP, no pipes)", r["spawn_only"], "—"),
        row("acquire + release (`client.sandbox(pool).release()`, pool `reuse: reset`)", r["acquire_release"], "—"),
        row("acquire alone", r["acquire"], "p50 ≤ 0.5"),
        row("release alone", r["release"], "—"),
        row("asyncio, 64 sandboxes, per-exec latency", a, "—"),
        "",
        f"- SDK exec p50 / floor p50: **{r['sdk_vs_floor']:.2f}x** (target ≤ 1.3x).",
        f"- SDK overhead over one raw keep-alive request (p50 difference): **{r['sdk_overhead_us']:.0f} µs** (target ≤ 100 µs);"
        f" CPU spent in the SDK's own request building and result parsing: {r['sdk_cpu_us']:.1f} µs per call.",
        f"- asyncio, one process, 64 sandboxes: **{a['exec_per_s']:.0f} exec/s** ({a['execs']} execs in {a['wall_s']:.2f} s; target ≥ 1000).",
        "",
        "## Reading the numbers",
        "",
        f"- The daemon's exec path through `http.client` is {r['raw_daemon']['p50_ms'] / r['floor']['p50_ms']:.2f}x the floor at p50."
        " The SDK is faster than that raw request (hence a negative overhead): it speaks HTTP/1.1 on its own socket,"
        " while `http.client` parses every response's headers with the `email` package (~0.1 ms), which the floor pays too.",
        f"- Where an exec's {r['sdk_exec']['p50_ms']:.2f} ms go (p50s): spawning and reaping `/bin/true` alone costs"
        f" {r['spawn_only']['p50_ms']:.2f} ms here; the agent's whole handling of the command (spawn, output pipes, exit)"
        f" {r['agent_exec']['p50_ms']:.2f} ms; the remaining {(r['sdk_exec']['p50_ms'] - r['agent_exec']['p50_ms']) * 1e3:.0f} µs"
        " are the two HTTP hops (SDK → daemon over TCP, daemon → agent over a Unix socket, and back), the daemon's"
        " checks and the SDK; each hop wakes a sleeping process each way.",
        "- In the asyncio run the client process is mostly idle (its CPU per exec is of the order of 0.1 ms); the exec rate"
        " is bounded by the daemon and the process spawns sharing the machine's 2 vCPUs with the client.",
        "- p99 values on a 2-vCPU machine are dominated by scheduling noise (see the load average above).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
