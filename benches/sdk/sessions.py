"""Session commands from the Python SDK against the same-run spawn floor.

    python benches/sdk/sessions.py [--n 2000]

Measures, interleaved in blocks so that drift hits all alike: the floor
``subprocess.run(['/bin/true'])`` in this interpreter, a shell-session command (``true``, a
built-in) and a Python-session snippet (``x += 1``) through ``LiveSession.run``, and an exec of
``/bin/true`` through ``Sandbox.exec`` for reference. Target (issue 15): both session p50s at
most 0.5x the floor's p50. Starts its own daemon (``$ARL_BIN`` or ``target/<triple>/release/arl``)
with the process runtime; root is required.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench import free_port, machine, wait_http  # noqa: E402

import arl  # noqa: E402

ROOT = HERE.parents[1]
BLOCKS = 10


def stats(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    n = len(s)
    return {
        "p50": s[n // 2],
        "p90": s[int(n * 0.90) - 1],
        "p99": s[max(0, int(n * 0.99) - 1)],
        "mean": sum(s) / n,
    }


def timed(fn: Callable[[], object], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000.0)
    return out


def line(name: str, s: dict[str, float]) -> str:
    return f"  {name:<34} p50={s['p50']:.3f} p90={s['p90']:.3f} p99={s['p99']:.3f} mean={s['mean']:.3f} ms"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000, help="timed calls per case (>= 1000)")
    args = ap.parse_args()
    n = max(1000, args.n)
    per_block = n // BLOCKS
    tmp = Path(tempfile.mkdtemp(prefix="arl-bench-"))
    tmp.chmod(0o755)
    binary = os.environ.get("ARL_BIN") or str(next(ROOT.glob("target/*/release/arl"), ROOT / "target" / "release" / "arl"))
    port = free_port()
    (tmp / "config.json").write_text(json.dumps({"pools": {"default": {"min_idle": 2, "max": 8}}}))
    (tmp / "state").mkdir()
    log = open(tmp / "daemon.log", "wb")
    daemon = subprocess.Popen(
        [binary, "node", "--listen", f"127.0.0.1:{port}", "--state-dir", str(tmp / "state"),
         "--config", str(tmp / "config.json"), "--cgroup-parent", f"arl-bench-{os.getpid()}"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        wait_http(port, "/readyz")
        print(f"machine: {machine()}; load {os.getloadavg()[0]:.2f}; daemon {os.path.basename(binary)}")
        client = arl.Client(f"http://127.0.0.1:{port}")
        with client.sandbox("default") as sb, sb.open_session("shell") as sh, sb.open_session("python") as py:
            py.run("x = 0")
            cases: dict[str, Callable[[], object]] = {
                "floor subprocess.run(['/bin/true'])": lambda: subprocess.run(["/bin/true"]),
                "shell session run('true')": lambda: sh.run("true"),
                "python session run('x += 1')": lambda: py.run("x += 1"),
                "sb.exec(['/bin/true'])": lambda: sb.exec(["/bin/true"]),
            }
            for fn in cases.values():
                timed(fn, 200)
            samples: dict[str, list[float]] = {k: [] for k in cases}
            for _ in range(BLOCKS):
                for name, fn in cases.items():
                    samples[name].extend(timed(fn, per_block))
            assert py.run("x").value == str(200 + BLOCKS * per_block)
        client.close()
        st = {k: stats(v) for k, v in samples.items()}
        floor = st["floor subprocess.run(['/bin/true'])"]["p50"]
        print(f"{BLOCKS * per_block} timed calls per case after 200 warm-up, interleaved in {BLOCKS} blocks:")
        for name, s in st.items():
            print(line(name, s) + f"  ({s['p50'] / floor:.2f}x floor)")
        for name in ("shell session run('true')", "python session run('x += 1')"):
            ratio = st[name]["p50"] / floor
            verdict = "MET" if ratio <= 0.5 else "MISSED"
            print(f"RESULT {name} p50 = {st[name]['p50']:.3f} ms = {ratio:.2f}x the floor (target <= 0.5x)  {verdict}")
    finally:
        daemon.terminate()
        try:
            daemon.wait(30)
        except subprocess.TimeoutExpired:
            daemon.kill()


if __name__ == "__main__":
    main()
