"""E2B SDK benchmarks against an ARL node's E2B-compatible endpoint.

* `sbx.commands.run("true")` with the real `e2b` SDK: p50 and p99, against ARL's own SDK
  running the same command (`/bin/bash -l -c true`, which is what the E2B SDK sends) and bare
  `true`, in the same run, in interleaved blocks; the E2B SDK's own client cost is measured
  apart, as the difference to a raw keep-alive Connect request doing the same Start.
* `Sandbox.create()` from a warm pool: p50 end to end, and the server's share (a raw
  keep-alive `POST /v2/sandboxes`), so the SDK's client-side time shows apart.

Usage (from the repository root, as root, with `e2b` and the `arl` SDK installed):

    python benches/e2b/bench.py [--n 1000] [--write]

It starts its own daemon (``$ARL_BIN``, else ``target/<triple>/release/arl``, else the debug
build) on free ports. ``--write`` appends the results to benches/RESULTS.md.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

CONFIG = """
[pools.default]
min_idle = 2
max = 8

[pools.warm]
min_idle = 8
max = 16
reuse = "reset"
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stats(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    return {
        "n": len(s),
        "p50": statistics.median(s) * 1000,
        "p99": s[min(len(s) - 1, int(len(s) * 0.99))] * 1000,
    }


def timed(fn: Callable[[], object], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def machine() -> str:
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return f"{cpu}, {os.cpu_count()} vCPU; Linux {platform.release()}; load {os.getloadavg()[0]:.1f}"


def binary() -> Path:
    if os.environ.get("ARL_BIN"):
        return Path(os.environ["ARL_BIN"])
    for pattern in ("target/*/release/arl", "target/*/debug/arl"):
        found = next(ROOT.glob(pattern), None)
        if found:
            return found
    raise SystemExit("no arl binary: cargo build --release")


class RawEnvd:
    """A keep-alive Connect client doing what `commands.run` does, minus the SDK."""

    def __init__(self, port: int, sandbox_id: str, token: str) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port)
        self.headers = {
            "E2b-Sandbox-Id": sandbox_id,
            "E2b-Sandbox-Port": "49983",
            "X-Access-Token": token,
            "Content-Type": "application/connect+json",
            "Connect-Protocol-Version": "1",
            "Connect-Timeout-Ms": "60000",
        }

    def run(self, cmd: str) -> None:
        msg = json.dumps({"process": {"cmd": "/bin/bash", "args": ["-l", "-c", cmd]}, "stdin": False}).encode()
        self.conn.request("POST", "/process.Process/Start", body=struct.pack(">BI", 0, len(msg)) + msg, headers=self.headers)
        body = self.conn.getresponse().read()
        if b'"end"' not in body:
            raise RuntimeError(f"no end event: {body[:200]!r}")


class RawControl:
    def __init__(self, port: int, key: str) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port)
        self.headers = {"X-API-Key": key, "Content-Type": "application/json"}

    def create(self, template: str) -> str:
        self.conn.request("POST", "/v2/sandboxes", body=json.dumps({"templateID": template}).encode(), headers=self.headers)
        r = self.conn.getresponse()
        body = json.loads(r.read())
        if r.status != 201:
            raise RuntimeError(body)
        return body["sandboxID"]

    def kill(self, sandbox_id: str) -> None:
        self.conn.request("DELETE", f"/sandboxes/{sandbox_id}", headers=self.headers)
        self.conn.getresponse().read()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--creates", type=int, default=300)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()

    import arl
    import e2b
    from e2b import Sandbox
    from e2b_code_interpreter import Sandbox as CodeSandbox

    state = Path(tempfile.mkdtemp(prefix="arl-e2b-bench-"))
    state.chmod(0o755)
    (state / "config.toml").write_text(CONFIG)
    port, eport = free_port(), free_port()
    arl_bin = binary()
    proc = subprocess.Popen(
        [str(arl_bin), "node", "--listen", f"127.0.0.1:{port}", "--e2b-listen", f"127.0.0.1:{eport}",
         "--state-dir", str(state / "state"), "--cgroup-parent", f"arl-bench-{os.getpid()}",
         "--config", str(state / "config.toml"), "--uid-base", str(16777216 + (30 << 27))],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "ARL_LOG": "warn"},
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
                c.request("GET", "/readyz")
                if c.getresponse().status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("daemon not ready")
            time.sleep(0.05)
        url = f"http://127.0.0.1:{eport}"
        key = "e2b_" + "0" * 40  # the bench daemon has no token file: any key passes
        os.environ.update(E2B_API_KEY=key, E2B_API_URL=url, E2B_SANDBOX_URL=url)
        n = args.n
        print("machine:", machine(), "| daemon:", os.path.relpath(arl_bin, ROOT), "| e2b")

        sbx = Sandbox.create(template="default")
        client = arl.Client(f"http://127.0.0.1:{port}")
        sb = client.sandbox("default")
        raw = RawEnvd(eport, sbx.sandbox_id, sbx._envd_access_token or "")
        code = CodeSandbox.connect(sbx.sandbox_id)
        py = sb.open_session("python")

        e2b_s: list[float] = []
        raw_s: list[float] = []
        arl_same: list[float] = []
        arl_true: list[float] = []
        ci_run: list[float] = []
        arl_py: list[float] = []
        runs = [
            (lambda: sbx.commands.run("true"), e2b_s),
            (lambda: raw.run("true"), raw_s),
            (lambda: sb.exec(["/bin/bash", "-l", "-c", "true"]), arl_same),
            (lambda: sb.exec(["true"]), arl_true),
            (lambda: code.run_code("1"), ci_run),
            (lambda: py.run("1"), arl_py),
        ]
        for fn, _ in runs:
            timed(fn, 20)  # warm-up
        block = 50
        for _ in range(max(1, n // block)):
            for fn, out in runs:
                out.extend(timed(fn, block))
        r = {
            "e2b_run": stats(e2b_s),
            "raw_connect": stats(raw_s),
            "arl_same": stats(arl_same),
            "arl_true": stats(arl_true),
            "ci_run": stats(ci_run),
            "arl_py": stats(arl_py),
        }
        sbx.kill()
        sb.release()

        # -- Sandbox.create() from a warm pool (reuse = reset keeps it warm) ----------------
        control = RawControl(eport, key)
        sdk_create: list[float] = []
        raw_create: list[float] = []
        for i in range(args.creates):
            t = time.perf_counter()
            s = Sandbox.create(template="warm")
            sdk_create.append(time.perf_counter() - t)
            s.kill()
            t = time.perf_counter()
            sid = control.create("warm")
            raw_create.append(time.perf_counter() - t)
            control.kill(sid)
        r["sdk_create"] = stats(sdk_create)
        r["raw_create"] = stats(raw_create)
    finally:
        proc.terminate()
        proc.wait(60)
        shutil.rmtree(state, ignore_errors=True)

    ratio = r["e2b_run"]["p50"] / r["arl_same"]["p50"]
    lines = [
        "",
        f"## E2B SDK against the E2B-compatible endpoint ({time.strftime('%Y-%m-%d')})",
        "",
        f"Machine: {machine()}. Daemon: `{os.path.relpath(arl_bin, ROOT)}`. `e2b` {getattr(e2b, '__version__', '2.63.0')}, "
        f"plain HTTP/1.1 on loopback (`E2B_API_URL` = `E2B_SANDBOX_URL`). "
        f"{r['e2b_run']['n']} calls each, interleaved in blocks of 50, one sandbox (`benches/e2b/bench.py`).",
        "",
        "| what | p50 ms | p99 ms |",
        "|---|---|---|",
        f"| E2B SDK `sbx.commands.run(\"true\")` (runs `/bin/bash -l -c true`) | {r['e2b_run']['p50']:.3f} | {r['e2b_run']['p99']:.3f} |",
        f"| raw keep-alive Connect `Start` of the same (no SDK) | {r['raw_connect']['p50']:.3f} | {r['raw_connect']['p99']:.3f} |",
        f"| ARL SDK `sb.exec([\"/bin/bash\", \"-l\", \"-c\", \"true\"])` (the same command) | {r['arl_same']['p50']:.3f} | {r['arl_same']['p99']:.3f} |",
        f"| ARL SDK `sb.exec([\"true\"])` | {r['arl_true']['p50']:.3f} | {r['arl_true']['p99']:.3f} |",
        f"| E2B code interpreter `sbx.run_code(\"1\")` | {r['ci_run']['p50']:.3f} | {r['ci_run']['p99']:.3f} |",
        f"| ARL SDK Python session `run(\"1\")` (the same snippet) | {r['arl_py']['p50']:.3f} | {r['arl_py']['p99']:.3f} |",
        f"| E2B SDK `Sandbox.create(template=…)`, warm pool (`reuse = \"reset\"`) | {r['sdk_create']['p50']:.3f} | {r['sdk_create']['p99']:.3f} |",
        f"| raw keep-alive `POST /v2/sandboxes` (the server's share) | {r['raw_create']['p50']:.3f} | {r['raw_create']['p99']:.3f} |",
        "",
        f"Ratio E2B SDK run / ARL SDK exec of the same command (p50): **{ratio:.2f}×** (target ≤ 1.5×). "
        f"The E2B SDK's own client cost: {r['e2b_run']['p50'] - r['raw_connect']['p50']:.3f} ms per run "
        f"(SDK minus raw Connect), {r['sdk_create']['p50'] - r['raw_create']['p50']:.3f} ms per create "
        f"(SDK minus raw POST; target for create ≤ 5 ms end to end). "
        f"Code interpreter `run_code` / ARL Python session run (p50): "
        f"**{r['ci_run']['p50'] / r['arl_py']['p50']:.2f}×**.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.write:
        with open(ROOT / "benches" / "RESULTS.md", "a") as f:
            f.write(text)


if __name__ == "__main__":
    sys.exit(main())
