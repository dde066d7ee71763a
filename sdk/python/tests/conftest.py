"""Fixtures that run a REAL `arl node` daemon (process runtime) for the SDK tests.

The binary is ``$ARL_BIN`` or ``target/<target>/debug/arl`` at the repository root (found from this
file's location). Each daemon gets a free port, a temporary state directory and a config file;
it is stopped with SIGTERM (then SIGKILL after a grace period) at the end.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import arl

REPO_ROOT = Path(__file__).resolve().parents[3]
READY_TIMEOUT = float(os.environ.get("ARL_TEST_READY_TIMEOUT", "60"))
TEST_TIMEOUT = int(os.environ.get("ARL_TEST_TIMEOUT", "120"))

# Pools every test daemon starts with. "default" is large enough for 64 concurrent sandboxes.
DEFAULT_POOLS: dict[str, dict[str, Any]] = {
    "default": {"min_idle": 8, "max": 96},
    "tiny": {"min_idle": 1, "max": 1},
}


def arl_bin() -> Path:
    p = Path(os.environ.get("ARL_BIN") or next(REPO_ROOT.glob("target/*/debug/arl"), REPO_ROOT / "target" / "debug" / "arl"))
    if not p.is_file():
        raise RuntimeError(f"daemon binary not found at {p}: build it with `cargo build` or set ARL_BIN")
    return p


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_instances = 0


def write_config(path: Path, pools: dict[str, dict[str, Any]]) -> None:
    path.write_text(json.dumps({"pools": pools}))


class Daemon:
    """One `arl node` process."""

    def __init__(
        self,
        workdir: Path,
        *,
        pools: dict[str, dict[str, Any]] | None = None,
        tokens: list[str] | None = None,
        port: int | None = None,
        extra_args: list[str] | None = None,
    ) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # The state dir must be traversable by the sandboxes' unprivileged host uids, and
        # pytest's tmp root (/tmp/pytest-of-USER) is mode 0700: keep it directly under /tmp.
        self.state_dir = Path(tempfile.mkdtemp(prefix="arl-test-state-"))
        self.state_dir.chmod(0o755)
        self.config = workdir / "config.json"
        write_config(self.config, DEFAULT_POOLS if pools is None else pools)
        self.tokens = list(tokens or [])
        self.token_file: Path | None = None
        if tokens:
            self.token_file = workdir / "tokens"
            self.token_file.write_text("\n".join(tokens) + "\n")
        self.extra_args = list(extra_args or [])
        self.log_path = workdir / "daemon.log"
        # Daemons that run side by side need their own cgroup parent: a starting daemon reclaims
        # every sandbox it finds under its parent. Distinct uid ranges keep them apart too.
        global _instances
        _instances += 1
        self.cgroup_parent = f"arl-test-{os.getpid()}-{_instances}"
        self.uid_base = 16777216 + (_instances % 28) * (1 << 27)
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def argv(self) -> list[str]:
        a = [
            str(arl_bin()), "node",
            "--listen", f"127.0.0.1:{self.port}",
            "--state-dir", str(self.state_dir),
            "--config", str(self.config),
            "--cgroup-parent", self.cgroup_parent,
            "--uid-base", str(self.uid_base),
        ]
        if self.token_file is not None:
            a += ["--token-file", str(self.token_file)]
        return a + self.extra_args

    def start(self) -> Daemon:
        self.starts += 1
        log = open(self.log_path, "ab")
        log.write(f"\n=== start #{self.starts}: {' '.join(self.argv())}\n".encode())
        log.flush()
        self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.wait_ready()
        return self

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
                c.request("GET", "/readyz")
                st = c.getresponse().status
                c.close()
                if st == 200 and self.pools_warm():
                    return
            except OSError:
                pass
            time.sleep(0.02)
        raise RuntimeError(f"daemon not ready after {timeout}s:\n{self.log_tail()}")

    def pools_warm(self) -> bool:
        """Every configured pool has reached its min_idle (keeps tests from measuring cold
        starts). /readyz alone answers 200 before the first sandboxes exist."""
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
        try:
            c.request("GET", "/v1/pools", headers={"Authorization": f"Bearer {self.tokens[0]}"} if self.tokens else {})
            r = c.getresponse()
            if r.status != 200:
                return False
            pools = json.loads(r.read())["pools"]
        finally:
            c.close()
        return all(p["status"]["idle"] >= p["spec"]["min_idle"] for p in pools)

    def stop(self, sig: int = signal.SIGTERM, grace: float = 15.0) -> None:
        p = self.proc
        if p is None or p.poll() is not None:
            return
        p.send_signal(sig)
        try:
            p.wait(grace)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)

    def cleanup(self) -> None:
        """Stop the daemon and remove its (now empty) cgroup directories."""
        self.stop()
        root = Path("/sys/fs/cgroup")
        for d in [root / self.cgroup_parent, *root.glob(f"*/{self.cgroup_parent}")]:
            try:
                d.rmdir()
            except OSError:
                pass
        shutil.rmtree(self.state_dir, ignore_errors=True)

    def kill(self) -> None:
        self.stop(signal.SIGKILL, grace=5)

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


@pytest.fixture(scope="session")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("node")).start()
    yield d
    d.cleanup()


@pytest.fixture()
def client(daemon: Daemon) -> Iterator[arl.Client]:
    c = arl.Client(daemon.url, retry_timeout=5.0)
    yield c
    c.close()


@pytest.fixture()
def sb(client: arl.Client) -> Iterator[arl.Sandbox]:
    with client.sandbox("default") as s:
        yield s


@pytest.fixture(autouse=True)
def _bounded_time(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail (rather than hang) a test that runs longer than ARL_TEST_TIMEOUT seconds."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum: int, frame: Any) -> None:
        raise TimeoutError(f"test exceeded {TEST_TIMEOUT}s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(TEST_TIMEOUT)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> None:
    # Show the daemon's log tail next to a failure.
    if call.excinfo is not None and call.when == "call":
        for name in ("daemon", "auth_daemon", "restart_daemon"):
            d = getattr(item, "funcargs", {}).get(name)
            if isinstance(d, Daemon):
                item.add_report_section("call", f"{name} log", d.log_tail())
