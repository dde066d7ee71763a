"""ARL side by side with its floors and its peers, in one run on one machine.

Usage (from the repository root, as root, after `scripts/setup-peers.sh`):

    .venv/bin/python benches/side_by_side.py [--quick] [--out DIR]

It runs the Rust half (`benches/side_by_side.rs`: floors from Rust, exec, acquire, new
sandboxes, throughput at 1/8/64 clients, the front with 1 and 2 threads), then measures from
Python: the Python floors, ARL's SDK (sync, async) and the E2B SDK against a daemon of its own,
and the peers (`runc exec` and `ctr task exec` into a containerd container, `docker exec`,
bubblewrap, SWE-ReX locally and in docker). It prints a markdown table (p50, p99, rate, ratio to
the matching same-run floor and to ARL) with the machine, and writes DIR/side_by_side.json and
DIR/side_by_side.md (DIR defaults to target/side-by-side).

* The daemon is `$ARL_BIN`, else `target/<triple>/release/arl`. The Rust half is built with
  `cargo bench` (release), or with `cargo test` (dev profile) in quick mode; `--rust-json FILE`
  reuses the JSON of an earlier Rust run instead.
* `--quick`: a few iterations of everything (CI); the numbers are not meant to be read. With
  `--check` the run fails unless every measurement produced a number, except those that may be
  missing for a stated reason (routes other builds add; docker when dockerd cannot start).
* A peer that cannot run here is listed with the reason, never dropped.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import math
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

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PEERS_WORK = Path(os.environ.get("ARL_PEERS_WORK", "/var/tmp/arl-peers"))
CONTAINERD_TEST_TAR = Path(os.environ.get("ARL_CONTAINERD_WORK", "/var/tmp/arl-containerd")) / "test-image.tar"
PEER_NS = "arl-peers"
BUSYBOX_IMAGE = "arl-peers/busybox:local"
SWEREX_IMAGE = "arl-peers/swerex:local"

# Measurements that may be missing, with the reason printed: routes that other builds add, and
# everything that needs docker when dockerd cannot start.
MAY_BE_MISSING_PREFIXES = ("arl.session", "arl.fork", "arl.python_session", "peer.docker", "peer.swerex_docker")


# ---------------------------------------------------------------------------------------------
# Results


class Results:
    def __init__(self) -> None:
        self.rows: dict[str, dict[str, Any]] = {}
        self.unavailable: dict[str, dict[str, str]] = {}

    def add_row(self, row: dict[str, Any]) -> None:
        self.rows[row["key"]] = row

    def latency(self, key: str, label: str, samples_s: list[float], **extra: Any) -> None:
        s = sorted(samples_s)
        n = len(s)
        row = {
            "key": key,
            "label": label,
            "n": n,
            "p50_ms": statistics.median(s) * 1e3,
            "p99_ms": s[min(n - 1, max(0, math.ceil(n * 0.99) - 1))] * 1e3,
            **extra,
        }
        self.rows[key] = row
        print(f"{label}: p50 {row['p50_ms']:.3f} ms, p99 {row['p99_ms']:.3f} ms (n={n})", flush=True)

    def missing(self, key: str, label: str, reason: str) -> None:
        self.unavailable[key] = {"key": key, "label": label, "reason": reason}
        print(f"{label}: not measured: {reason}", flush=True)


def timed(fn: Callable[[], object], n: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    pc = time.perf_counter
    for _ in range(n):
        t0 = pc()
        fn()
        out.append(pc() - t0)
    return out


def guard(res: Results, keys: list[tuple[str, str]], fn: Callable[[], None]) -> None:
    """Runs measurements; on a failure, those of `keys` (key, label) not measured yet are listed
    as unavailable with the error, and the run goes on."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - any failure of a peer is reported, not fatal
        for key, label in keys:
            if key not in res.rows and key not in res.unavailable:
                res.missing(key, label, f"{type(e).__name__}: {e}".strip()[:300])


# ---------------------------------------------------------------------------------------------
# The machine


def machine() -> dict[str, Any]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "kernel": platform.release(),
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime()),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def arl_binary() -> Path:
    if os.environ.get("ARL_BIN"):
        return Path(os.environ["ARL_BIN"])
    found = next(ROOT.glob("target/*/release/arl"), None)
    if found is None:
        raise SystemExit("no target/<triple>/release/arl: run `cargo build --release` (or set ARL_BIN)")
    return found


# ---------------------------------------------------------------------------------------------
# The Rust half


def rust_half(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    if args.rust_json:
        return json.loads(Path(args.rust_json).read_text())
    path = out / "rust.json"
    bench_args = ["--json", str(path)] + (["--quick"] if args.quick else [])
    # Quick mode builds in the dev profile, which the tests have built already.
    cmd = ["cargo", "test" if args.quick else "bench", "--locked", "--bench", "side_by_side", "--", *bench_args]
    print("$", " ".join(cmd), flush=True)
    env = {**os.environ, "ARL_BIN": str(arl_binary())}
    subprocess.run(cmd, cwd=ROOT, check=True, env=env)
    return json.loads(path.read_text())


# ---------------------------------------------------------------------------------------------
# Python floors


def http_caller(port: int, path: str, body: bytes, headers: dict[str, str] | None = None) -> Callable[[], bytes]:
    """One keep-alive `http.client` connection POSTing `body`."""
    conn = http.client.HTTPConnection("127.0.0.1", port)
    conn.connect()
    assert conn.sock is not None
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    h = {"Content-Type": "application/json", **(headers or {})}

    def call() -> bytes:
        conn.request("POST", path, body, h)
        r = conn.getresponse()
        data = r.read()
        if r.status != 200:
            raise RuntimeError(f"POST {path}: {r.status} {data[:200]!r}")
        return data

    return call


LIVE_INTERPRETER = r"""
import sys
ns = {}
for line in sys.stdin:
    exec(line, ns)
    sys.stdout.write("ok\n")
    sys.stdout.flush()
"""


def python_floors(res: Results, n: int, short: int) -> None:
    res.latency(
        "floor.spawn_python",
        "floor: subprocess.run(['/bin/true']) (Python)",
        timed(lambda: subprocess.run(["/bin/true"], check=True), n, warmup=min(n, 100)),
    )
    res.latency(
        "floor.python_c",
        "floor: /usr/bin/python3 -c pass",
        timed(lambda: subprocess.run(["/usr/bin/python3", "-c", "pass"], check=True), short, warmup=min(short, 5)),
    )
    p = subprocess.Popen(
        ["/usr/bin/python3", "-u", "-c", LIVE_INTERPRETER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0
    )
    assert p.stdin is not None and p.stdout is not None
    stdin, stdout = p.stdin, p.stdout

    def snippet() -> None:
        stdin.write(b"x = x + 1 if 'x' in dir() else 1\n")
        if stdout.readline() != b"ok\n":
            raise RuntimeError("live interpreter did not answer")

    try:
        res.latency(
            "floor.live_interpreter",
            "floor: a live python3 over pipes, one snippet (`x += 1`)",
            timed(snippet, n, warmup=min(n, 100)),
        )
    finally:
        stdin.close()
        p.wait(10)


# ---------------------------------------------------------------------------------------------
# ARL from Python: SDK sync and async, E2B SDK, session hooks


CONFIG = """
[pools.default]
min_idle = 2
max = 8
"""


class Node:
    """A daemon of the Python half's own, with the E2B-compatible endpoint."""

    def __init__(self, tmp: Path) -> None:
        self.port, self.e2b_port = free_port(), free_port()
        (tmp / "node.toml").write_text(CONFIG)
        self.log = open(tmp / "node.log", "wb")
        self.proc = subprocess.Popen(
            [
                str(arl_binary()), "node", "--listen", f"127.0.0.1:{self.port}",
                "--e2b-listen", f"127.0.0.1:{self.e2b_port}", "--state-dir", str(tmp / "state"),
                "--config", str(tmp / "node.toml"), "--cgroup-parent", f"arl-bench-py-{os.getpid()}",
                "--uid-base", str(16777216 + (26 << 27)),
            ],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
                c.request("GET", "/readyz")
                if c.getresponse().status == 200:
                    break
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"arl node did not become ready; log: {(tmp / 'node.log').read_text()[-2000:]}")
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def arl_python(res: Results, node: Node, n: int, floor_port: int) -> None:
    import arl

    client = arl.Client(node.url)
    sb = client.sandbox("default")
    try:
        floor = http_caller(floor_port, "/exec", b'{"cmd":["true"]}')
        sdk = lambda: sb.exec(["true"])  # noqa: E731
        bash = lambda: sb.exec(["/bin/bash", "-l", "-c", "true"])  # noqa: E731
        for fn in (floor, sdk, bash):
            timed(fn, 0, warmup=min(n, 200))
        f_s: list[float] = []
        s_s: list[float] = []
        pc = time.perf_counter
        # Call by call, so that machine noise hits both alike.
        for _ in range(n):
            for fn, out in ((floor, f_s), (sdk, s_s)):
                t0 = pc()
                fn()
                out.append(pc() - t0)
        res.latency("floor.http_python", "floor: HTTP server spawning /bin/true per request, Python http.client", f_s)
        res.latency("arl.sdk_sync", "ARL: exec true, Python SDK (sync)", s_s)
        res.latency(
            "arl.sdk_bash_lc", "ARL: exec `/bin/bash -l -c true`, Python SDK (what E2B's run sends)", timed(bash, n // 2 or 1, 5)
        )
        guard(res, [("arl.session_python", "ARL: shell-session command true (Python, HTTP)"),
                    ("arl.python_session", "ARL: Python-session snippet x += 1 (Python, HTTP)")],
              lambda: session_hook(res, node, sb.id, n))
    finally:
        sb.release()
        client.close()

    async def async_exec() -> list[float]:
        async with arl.AsyncClient(node.url) as ac:
            asb = await ac.sandbox("default")
            try:
                for _ in range(min(n, 200)):
                    await asb.exec(["true"])
                out = []
                for _ in range(n):
                    t0 = time.perf_counter()
                    await asb.exec(["true"])
                    out.append(time.perf_counter() - t0)
                return out
            finally:
                await asb.release()

    res.latency("arl.sdk_async", "ARL: exec true, Python SDK (asyncio)", asyncio.run(async_exec()))
    guard(res, [("arl.e2b_sdk", "ARL: E2B SDK commands.run('true'), E2B-compatible endpoint")], lambda: e2b_sdk(res, node, n))


def session_hook(res: Results, node: Node, sandbox_id: str, n: int) -> None:
    """Shell and Python sessions (`/v1/sandboxes/{id}/sessions`): measured when the daemon has
    the route. A shell session runs `true` (a builtin: no process); a Python session `x += 1`."""
    conn = http.client.HTTPConnection("127.0.0.1", node.port)
    base = f"/v1/sandboxes/{sandbox_id}/sessions"
    for key, label, kind, run_body in (
        ("arl.session_python", "ARL: shell-session command true (Python, HTTP)", "shell", {"code": "true"}),
        ("arl.python_session", "ARL: Python-session snippet x += 1 (Python, HTTP)", "python", {"code": "x = globals().get('x', 0) + 1"}),
    ):
        conn.request("POST", base, json.dumps({"kind": kind}), {"Content-Type": "application/json"})
        r = conn.getresponse()
        body = r.read()
        if r.status == 405 or (r.status == 404 and b"no route" in body):
            res.missing(key, label, f"not available in this build (POST /v1/sandboxes/{{id}}/sessions answered {r.status})")
            continue
        if r.status >= 300:
            res.missing(key, label, f"creating a {kind} session: {r.status} {body[:200]!r}")
            continue
        v = json.loads(body)
        sid = v.get("id") or v.get("session_id")
        call = http_caller(node.port, f"{base}/{sid}/run", json.dumps(run_body).encode())
        res.latency(key, label, timed(call, n, warmup=min(n, 100)))


def e2b_sdk(res: Results, node: Node, n: int) -> None:
    url = f"http://127.0.0.1:{node.e2b_port}"
    # The bench daemon has no token file: any key passes.
    os.environ.update(E2B_API_KEY="e2b_" + "0" * 40, E2B_API_URL=url, E2B_SANDBOX_URL=url)
    from e2b import Sandbox

    sbx = Sandbox.create(template="default")
    try:
        res.latency(
            "arl.e2b_sdk",
            "ARL: E2B SDK commands.run('true'), E2B-compatible endpoint",
            timed(lambda: sbx.commands.run("true"), n // 2 or 1, warmup=min(n // 2, 50)),
        )
    finally:
        sbx.kill()


# ---------------------------------------------------------------------------------------------
# Peers


def run_ok(cmd: list[str], timeout: float = 120) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])}...: rc {p.returncode}: {(p.stderr or p.stdout).strip()[:300]}")
    return p.stdout


def bubblewrap(res: Results, n: int) -> None:
    if not shutil.which("bwrap"):
        raise RuntimeError("bwrap not installed (scripts/setup-peers.sh)")
    cmd = ["bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--unshare-all", "--die-with-parent", "/bin/true"]
    res.latency(
        "peer.bwrap",
        "bubblewrap: a sandboxed /bin/true (new namespaces each call)",
        timed(lambda: subprocess.run(cmd, check=True), n, warmup=min(n, 20)),
    )


class ContainerdPeer:
    """A long-lived busybox container in containerd (namespace `arl-peers`), runc underneath."""

    def __init__(self) -> None:
        if not shutil.which("ctr") or not shutil.which("runc"):
            raise RuntimeError("ctr/runc not installed (scripts/setup-peers.sh)")
        if not CONTAINERD_TEST_TAR.exists():
            raise RuntimeError(f"{CONTAINERD_TEST_TAR} missing: run scripts/containerd.sh")
        self.id = f"arl-peer-{os.getpid()}"
        self.image = "docker.io/arl/test:latest"
        ctr = ["ctr", "-n", PEER_NS]
        run_ok([*ctr, "image", "import", str(CONTAINERD_TEST_TAR)])
        run_ok([*ctr, "run", "-d", "--null-io", self.image, self.id, "/bin/sleep", "1000000"])
        self.ctr = ctr

    def close(self) -> None:
        subprocess.run([*self.ctr, "task", "kill", "-s", "SIGKILL", self.id], capture_output=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if subprocess.run([*self.ctr, "task", "delete", self.id], capture_output=True).returncode == 0:
                break
            time.sleep(0.05)
        subprocess.run([*self.ctr, "container", "delete", self.id], capture_output=True)


def containerd_peers(res: Results, short: int) -> None:
    peer = ContainerdPeer()
    try:
        runc = ["runc", "--root", f"/run/containerd/runc/{PEER_NS}", "exec", peer.id, "/bin/true"]
        guard(res, [("peer.runc_exec", "runc exec into a containerd container")], lambda: res.latency(
            "peer.runc_exec", "runc exec /bin/true into a running container (runc CLI)",
            timed(lambda: run_ok(runc), short, warmup=min(short, 5))))
        counter = iter(range(1 << 30))

        def ctr_exec() -> None:
            run_ok([*peer.ctr, "task", "exec", "--exec-id", f"b{next(counter)}", peer.id, "/bin/true"])

        guard(res, [("peer.ctr_exec", "ctr task exec into a containerd container")], lambda: res.latency(
            "peer.ctr_exec", "ctr task exec /bin/true into a running container (containerd CLI)",
            timed(ctr_exec, short, warmup=min(short, 5))))
    finally:
        peer.close()


class Docker:
    """dockerd on the machine's containerd: the one running, or one started for the run."""

    def __init__(self) -> None:
        self.started: subprocess.Popen[bytes] | None = None
        self.cli = shutil.which("docker") or "/usr/bin/docker"
        if self.answers():
            return
        if not shutil.which("dockerd"):
            raise RuntimeError("dockerd not installed (scripts/setup-peers.sh installs docker.io)")
        log = open(Path(tempfile.gettempdir()) / "arl-bench-dockerd.log", "wb")
        self.started = subprocess.Popen(
            ["dockerd", "--containerd=/run/containerd/containerd.sock"], stdout=log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 30
        while not self.answers():
            if self.started.poll() is not None:
                raise RuntimeError(f"dockerd exited with {self.started.returncode} (see {log.name})")
            if time.monotonic() > deadline:
                self.close()
                raise RuntimeError("dockerd did not answer within 30 s")
            time.sleep(0.2)

    def answers(self) -> bool:
        return subprocess.run([self.cli, "info"], capture_output=True).returncode == 0

    def image(self, name: str, tarball: Path) -> None:
        if subprocess.run([self.cli, "image", "inspect", name], capture_output=True).returncode == 0:
            return
        if not tarball.exists():
            raise RuntimeError(f"{tarball} missing: run scripts/setup-peers.sh")
        run_ok([self.cli, "import", str(tarball), name], timeout=300)

    def close(self) -> None:
        if self.started is not None:
            self.started.terminate()
            try:
                self.started.wait(30)
            except subprocess.TimeoutExpired:
                self.started.kill()
                self.started.wait()
            self.started = None


class UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost")
        self.path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(self.path)
        self.sock = s


def docker_peers(res: Results, docker: Docker, short: int) -> None:
    docker.image(BUSYBOX_IMAGE, PEERS_WORK / "busybox.tar")
    name = f"arl-peer-{os.getpid()}"
    run_ok([docker.cli, "run", "-d", "--rm", "--network", "none", "--name", name, BUSYBOX_IMAGE, "/bin/sleep", "1000000"])
    try:
        guard(res, [("peer.docker_exec", "docker exec")], lambda: res.latency(
            "peer.docker_exec", "docker exec /bin/true into a running container (docker CLI)",
            timed(lambda: run_ok([docker.cli, "exec", name, "/bin/true"]), short, warmup=min(short, 5))))

        def api_exec() -> None:
            # What an SDK does: create the exec, start it attached, read its (empty) output to
            # the end, ask its exit code.
            c = UnixHTTP("/var/run/docker.sock")
            c.request("POST", f"/containers/{name}/exec", json.dumps({"Cmd": ["/bin/true"], "AttachStdout": True, "AttachStderr": True}),
                      {"Content-Type": "application/json"})
            r = c.getresponse()
            exec_id = json.loads(r.read())["Id"]
            c.request("POST", f"/exec/{exec_id}/start", json.dumps({"Detach": False, "Tty": False}), {"Content-Type": "application/json"})
            r = c.getresponse()
            r.read()
            c.close()
            c = UnixHTTP("/var/run/docker.sock")
            c.request("GET", f"/exec/{exec_id}/json")
            info = json.loads(c.getresponse().read())
            c.close()
            if info.get("ExitCode") != 0:
                raise RuntimeError(f"exec exit code {info.get('ExitCode')}")

        guard(res, [("peer.docker_api", "docker Engine API exec")], lambda: res.latency(
            "peer.docker_api", "docker exec /bin/true through the Engine API (no CLI; what docker-py does)",
            timed(api_exec, short, warmup=min(short, 5))))
    finally:
        subprocess.run([docker.cli, "rm", "-f", name], capture_output=True)


def swerex(res: Results, short: int, quick: bool, docker: Docker | None, docker_reason: str) -> None:
    """SWE-ReX's `execute` (a new process per command) and bash-session commands, with its
    local runtime (in-process, no isolation) and its docker deployment (a server in a container,
    over HTTP)."""
    try:
        from swerex.deployment.docker import DockerDeployment
        from swerex.deployment.local import LocalDeployment
        from swerex.runtime.abstract import BashAction, Command, CreateBashSessionRequest
    except ImportError as e:
        for key in ("local_execute", "local_session", "docker_execute", "docker_session"):
            res.missing(f"peer.swerex_{key}", f"SWE-ReX {key}", f"swe-rex not installed ({e}; scripts/setup-peers.sh)")
        return

    async def measure(deployment: Any, where: str, count: int) -> None:
        await deployment.start()
        try:
            rt = deployment.runtime

            async def loop(fn: Callable[[], Any], k: int, warm: int) -> list[float]:
                for _ in range(warm):
                    await fn()
                out = []
                for _ in range(k):
                    t0 = time.perf_counter()
                    await fn()
                    out.append(time.perf_counter() - t0)
                return out

            async def execute() -> None:
                r = await rt.execute(Command(command=["true"]))
                if r.exit_code != 0:
                    raise RuntimeError(f"exit code {r.exit_code}")

            res.latency(f"peer.swerex_{where}_execute", f"SWE-ReX {where}: execute(['true'])",
                        await loop(execute, count, min(count, 10)))
            await rt.create_session(CreateBashSessionRequest())

            async def session() -> None:
                await rt.run_in_session(BashAction(command="true"))

            res.latency(f"peer.swerex_{where}_session", f"SWE-ReX {where}: bash-session command `true`",
                        await loop(session, count, min(count, 5)))
        finally:
            await deployment.stop()

    guard(res, [("peer.swerex_local_execute", "SWE-ReX local: execute"), ("peer.swerex_local_session", "SWE-ReX local: bash session")],
          lambda: asyncio.run(measure(LocalDeployment(), "local", short)))
    if docker is None:
        for key in ("execute", "session"):
            res.missing(f"peer.swerex_docker_{key}", f"SWE-ReX docker: {key}", docker_reason)
        return

    def in_docker() -> None:
        if quick and not (PEERS_WORK / "swerex.tar").exists():
            raise RuntimeError("skipped in quick mode: its image (mmdebstrap, ~30 s) is built by scripts/setup-peers.sh without --no-swerex-image")
        docker.image(SWEREX_IMAGE, PEERS_WORK / "swerex.tar")
        asyncio.run(measure(DockerDeployment(image=SWEREX_IMAGE, pull="never", startup_timeout=120), "docker", short))

    guard(res, [("peer.swerex_docker_execute", "SWE-ReX docker: execute"), ("peer.swerex_docker_session", "SWE-ReX docker: bash session")],
          in_docker)


# ---------------------------------------------------------------------------------------------
# The table


# key -> (group, same-run floor key, ARL key to compare with)
REFERENCES: dict[str, tuple[str, str | None, str | None]] = {
    "floor.spawn_rust": ("floor", None, None),
    "floor.spawn_python": ("floor", None, None),
    "floor.http_rust": ("floor", None, None),
    "floor.http_python": ("floor", None, None),
    "floor.python_c": ("floor", None, None),
    "floor.live_interpreter": ("floor", None, None),
    "arl.exec_rust": ("ARL", "floor.http_rust", None),
    "arl.sdk_sync": ("ARL", "floor.http_python", None),
    "arl.sdk_async": ("ARL", "floor.http_python", "arl.sdk_sync"),
    "arl.sdk_bash_lc": ("ARL", "floor.http_python", "arl.sdk_sync"),
    "arl.e2b_sdk": ("ARL", "floor.http_python", "arl.sdk_bash_lc"),
    "arl.session_rust": ("ARL", "floor.http_rust", "arl.exec_rust"),
    "arl.session_python": ("ARL", "floor.spawn_python", "arl.sdk_sync"),
    "arl.python_session": ("ARL", "floor.live_interpreter", "arl.sdk_sync"),
    "arl.fork": ("ARL", None, "arl.new_process"),
    "arl.acquire": ("ARL", None, None),
    "arl.acquire_batch": ("ARL", None, None),
    "arl.acquire_burst": ("ARL", None, None),
    "arl.acquire_burst_makespan": ("ARL", None, None),
    "arl.new_process": ("ARL", None, None),
    "arl.new_containerd": ("ARL", None, "arl.new_process"),
    "floor.rate_1": ("throughput", None, None),
    "arl.rate_1": ("throughput", "floor.rate_1", None),
    "floor.rate_8": ("throughput", None, None),
    "arl.rate_8": ("throughput", "floor.rate_8", None),
    "floor.rate_64": ("throughput", None, None),
    "arl.rate_64": ("throughput", "floor.rate_64", None),
    "front_floor.rate_64": ("front", None, None),
    "front_1.rate_64": ("front", "front_floor.rate_64", None),
    "front_2.rate_64": ("front", "front_floor.rate_64", "front_1.rate_64"),
    "front_floor.exec_1": ("front", None, None),
    "front_1.exec_1": ("front", "front_floor.exec_1", None),
    "front_2.exec_1": ("front", "front_floor.exec_1", "front_1.exec_1"),
    "peer.runc_exec": ("peer", "floor.spawn_python", "arl.sdk_sync"),
    "peer.ctr_exec": ("peer", "floor.spawn_python", "arl.sdk_sync"),
    "peer.docker_exec": ("peer", "floor.spawn_python", "arl.sdk_sync"),
    "peer.docker_api": ("peer", "floor.http_python", "arl.sdk_sync"),
    "peer.bwrap": ("peer", "floor.spawn_python", "arl.sdk_sync"),
    "peer.swerex_local_execute": ("peer", "floor.spawn_python", "arl.sdk_sync"),
    "peer.swerex_local_session": ("peer", "floor.live_interpreter", "arl.sdk_sync"),
    "peer.swerex_docker_execute": ("peer", "floor.http_python", "arl.sdk_sync"),
    "peer.swerex_docker_session": ("peer", "floor.live_interpreter", "arl.sdk_sync"),
}
# Peers that isolate the command (SWE-ReX's local runtime does not).
ISOLATED_PEERS = ("peer.runc_exec", "peer.ctr_exec", "peer.docker_exec", "peer.docker_api", "peer.bwrap",
                  "peer.swerex_docker_execute", "peer.swerex_docker_session")
GROUP_TITLES = {"floor": "Floors", "ARL": "ARL", "throughput": "Throughput (exec `true`, one connection per client)",
                "front": "The HTTP front: 1 vs 2 threads (alternating rounds, same run)", "peer": "Peers"}


def ratio(res: Results, key: str, ref: str | None) -> str:
    """How many times the reference's cost this row's is (p50), or its rate (throughput)."""
    if ref is None or key not in res.rows or ref not in res.rows:
        return ""
    a, b = res.rows[key], res.rows[ref]
    if "rate_per_s" in a and "rate_per_s" in b:
        return f"{a['rate_per_s'] / b['rate_per_s']:.2f}×"
    return f"{a['p50_ms'] / b['p50_ms']:.2f}×"


def render(res: Results, meta: dict[str, Any]) -> str:
    m = meta["machine"]
    lines = [
        f"Machine: {m['cores']} cores, {m['cpu']}, Linux {m['kernel']}, {m['memory_gib']} GiB; Python {m['python']}; "
        f"{m['date']}. Load average (1 min): {meta['load'][0]:.2f} at the start, {meta['load'][-1]:.2f} at the end. "
        f"Daemon `{meta['binary']}`{' (quick mode: a few iterations, not meant to be read)' if meta['quick'] else ''}.",
        "",
        "| | measurement | p50 ms | p99 ms | rate /s | n | × floor | × ARL |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for group, title in GROUP_TITLES.items():
        for key, (g, floor_key, arl_key) in REFERENCES.items():
            if g != group:
                continue
            if key in res.rows:
                r = res.rows[key]
                rate = f"{r['rate_per_s']:.0f}" if "rate_per_s" in r else ""
                lines.append(
                    f"| {title} | {r['label']} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {rate} | {r['n']} | "
                    f"{ratio(res, key, floor_key)} | {ratio(res, key, arl_key)} |"
                )
            elif key in res.unavailable:
                u = res.unavailable[key]
                lines.append(f"| {title} | {u['label']} | — | — | | | not measured: {u['reason']} | |")
            title = ""
    lines.append("")
    lines += headline(res)
    return "\n".join(lines)


def headline(res: Results) -> list[str]:
    out = ["× floor: p50 over the matching same-run floor's p50 (for rates: rate over the floor's rate); "
           "× ARL: p50 over ARL's p50 for the same work (above 1: ARL is faster)."]
    sdk = res.rows.get("arl.sdk_sync")
    fl = res.rows.get("floor.http_python")
    if sdk and fl:
        out.append(f"- SDK exec `true` / Python HTTP floor (p50): **{sdk['p50_ms'] / fl['p50_ms']:.2f}×** (target ≤ 1.3×).")
    peers = [res.rows[k] for k in ISOLATED_PEERS if k in res.rows]
    if sdk and peers:
        fastest = min(peers, key=lambda r: r["p50_ms"])
        out.append(
            f"- Fastest isolated peer: {fastest['label']}, p50 {fastest['p50_ms']:.3f} ms: ARL's SDK exec is "
            f"**{fastest['p50_ms'] / sdk['p50_ms']:.1f}× faster** (target ≥ 2.5×)."
        )
    f1, f2, ff = (res.rows.get(k) for k in ("front_1.rate_64", "front_2.rate_64", "front_floor.rate_64"))
    if f1 and f2 and ff:
        out.append(
            f"- 64 clients: {f1['rate_per_s']:.0f}/s with one front thread ({f1['rate_per_s'] / ff['rate_per_s']:.2f}× the floor server), "
            f"{f2['rate_per_s']:.0f}/s with two ({f2['rate_per_s'] / ff['rate_per_s']:.2f}×; target ≥ 0.85×)."
        )
    e1, e2 = res.rows.get("front_1.exec_1"), res.rows.get("front_2.exec_1")
    if e1 and e2:
        out.append(f"- One client, exec p50: {e1['p50_ms']:.3f} ms with one front thread, {e2['p50_ms']:.3f} ms with two "
                   f"({(e2['p50_ms'] / e1['p50_ms'] - 1) * 100:+.1f} %; target ±3 %).")
    return out


def check(res: Results) -> list[str]:
    """What is wrong for `--check`: a row without a finite number, or an expected measurement
    that is missing without being allowed to."""
    problems = []
    for key in REFERENCES:
        if key in res.rows:
            r = res.rows[key]
            nums = [r.get("p50_ms"), r.get("p99_ms")] + ([r["rate_per_s"]] if "rate_per_s" in r else [])
            if r.get("n", 0) < 1 or not all(isinstance(x, (int, float)) and math.isfinite(x) and x >= 0 for x in nums):
                problems.append(f"{key}: no number ({r})")
        elif key in res.unavailable:
            if not key.startswith(MAY_BE_MISSING_PREFIXES):
                problems.append(f"{key}: not measured: {res.unavailable[key]['reason']}")
        else:
            problems.append(f"{key}: neither measured nor listed as unavailable")
    return problems


# ---------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few iterations of everything (CI)")
    ap.add_argument("--check", action="store_true", help="fail unless every measurement produced a number")
    ap.add_argument("--out", default=str(ROOT / "target" / "side-by-side"), help="where the JSON and markdown go")
    ap.add_argument("--rust-json", help="reuse the Rust half's JSON of an earlier run")
    ap.add_argument("--no-docker", action="store_true", help="skip the peers that need docker (listed with this reason)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("side_by_side: run as root (the daemon creates namespaces and cgroups)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    n = 30 if args.quick else 2000
    short = 5 if args.quick else 200  # the peers that start a CLI per call

    res = Results()
    load = [os.getloadavg()[0]]
    rust = rust_half(args, out)
    for row in rust["rows"]:
        res.add_row(row)
    for u in rust["unavailable"]:
        res.unavailable[u["key"]] = u
    load += [rust["load_before"][0], rust["load_after"][0]]

    tmp = Path(tempfile.mkdtemp(prefix="arl-side-by-side-"))
    tmp.chmod(0o755)  # the sandboxes' unprivileged uids traverse the state directory
    floor = subprocess.Popen([sys.executable, str(HERE / "sdk" / "floor_server.py"), str(fport := free_port())], stdout=subprocess.PIPE)
    node: Node | None = None
    docker: Docker | None = None
    try:
        assert floor.stdout is not None
        floor.stdout.readline()
        python_floors(res, n, short)
        node = Node(tmp)
        arl_python(res, node, n, fport)
        node.stop()
        node = None

        guard(res, [("peer.bwrap", "bubblewrap")], lambda: bubblewrap(res, short))
        guard(res, [("peer.runc_exec", "runc exec"), ("peer.ctr_exec", "ctr task exec")], lambda: containerd_peers(res, short))
        docker_reason = "skipped (--no-docker)"
        if not args.no_docker:
            try:
                docker = Docker()
            except Exception as e:  # noqa: BLE001 - reported as the docker peers' reason
                docker_reason = f"dockerd cannot start here: {e}"
        if docker is not None:
            guard(res, [("peer.docker_exec", "docker exec"), ("peer.docker_api", "docker Engine API exec")],
                  lambda: docker_peers(res, docker, short))
        else:
            for key, label in (("peer.docker_exec", "docker exec"), ("peer.docker_api", "docker Engine API exec")):
                res.missing(key, label, docker_reason)
        swerex(res, short, args.quick, docker, docker_reason)
    finally:
        if node is not None:
            node.stop()
        if docker is not None:
            docker.close()
        floor.terminate()
        floor.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
    load.append(os.getloadavg()[0])

    meta = {"machine": machine(), "quick": args.quick, "binary": os.path.relpath(arl_binary(), ROOT), "load": load,
            "rust_machine": rust.get("machine")}
    table = render(res, meta)
    print()
    print(table)
    (out / "side_by_side.md").write_text(table + "\n")
    (out / "side_by_side.json").write_text(json.dumps(
        {**meta, "rows": list(res.rows.values()), "unavailable": list(res.unavailable.values())}, indent=1))
    print(f"\nwrote {out / 'side_by_side.json'} and {out / 'side_by_side.md'}")
    if args.check:
        problems = check(res)
        for p in problems:
            print("CHECK FAILED:", p)
        if problems:
            return 1
        measured = sum(1 for k in REFERENCES if k in res.rows)
        print(f"side_by_side check: {measured} measured, {len(REFERENCES) - measured} listed with a reason")
    return 0


if __name__ == "__main__":
    sys.exit(main())
