"""A REAL `arl node` with its E2B-compatible endpoint, for the real PyPI `e2b` SDK.

The daemon runs as root with free ports, its own state directory, cgroup parent, uid range
and a token file holding two E2B-shaped API keys. The SDK is pointed at it the way a user
would do it, by environment variables only (`E2B_API_KEY`, `E2B_API_URL`, `E2B_SANDBOX_URL`),
set for the whole session.

The same tests run with more than one SDK generation, each from its own virtualenv (see
scripts/setup.sh): the installed `e2b` version is the generation. A test that cannot apply to
an older generation asserts what that generation gets instead (`sdk_below(...)`), with the reason.
"""

from __future__ import annotations

import http.client
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.version import Version

REPO_ROOT = Path(__file__).resolve().parents[2]

CONFIG = """
[pools.default]
min_idle = 2
max = 16
env = { POOL_VAR = "from-pool" }

[pools.work]
min_idle = 1
max = 4
"""


SDK = Version(version("e2b"))


def sdk_below(v: str) -> bool:
    """Whether the installed `e2b` SDK is older than `v`."""
    return SDK < Version(v)


# The code interpreter (`e2b-code-interpreter`) has no release for an older generation that
# reaches it over the one plain-HTTP URL: a file importing it is not collected (said at the end
# of the run).
CODE_INTERPRETER_SDK = "2.55.1"
CODE_INTERPRETER_REASON = (
    "e2b-code-interpreter reaches port 49999 through E2B_SANDBOX_URL from 2.11.0 on, "
    f"which needs e2b >= {CODE_INTERPRETER_SDK}"
)
collect_ignore = [
    name
    for name in ["test_code_interpreter.py"]
    if sdk_below(CODE_INTERPRETER_SDK) and (Path(__file__).parent / name).exists()
]


def pytest_report_header() -> str:
    return f"e2b SDK {SDK}"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    terminalreporter.write_line(f"e2b SDK {SDK}")
    for name in collect_ignore:
        terminalreporter.write_line(f"not collected with e2b {SDK}: {name}: {CODE_INTERPRETER_REASON}")


def arl_bin() -> Path:
    return Path(
        os.environ.get("ARL_BIN")
        or next(REPO_ROOT.glob("target/*/debug/arl"), REPO_ROOT / "target" / "debug" / "arl")
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cgroup_roots() -> list[Path]:
    roots = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        if right.split(" ")[0] in ("cgroup", "cgroup2"):
            roots.append(Path(left.split(" ")[4]))
    return roots


def e2b_key() -> str:
    """E2B's key shape (some SDK versions check it): `e2b_` and 40 hex digits."""
    return "e2b_" + os.urandom(20).hex()


class Node:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="arl-e2b-test-"))
        self.dir.chmod(0o755)
        self.port = free_port()
        self.e2b_port = free_port()
        self.key = e2b_key()
        self.other_key = e2b_key()
        (self.dir / "tokens").write_text(f"{self.key}\n{self.other_key}\n")
        (self.dir / "config.toml").write_text(CONFIG)
        self.cgroup_parent = f"arl-e2b-test-{os.urandom(4).hex()}"
        # A uid range of its own, clear of the ranges other test daemons use.
        self.uid_base = 16777216 + (29 << 27) + random.randrange(0, 1024) * 65536
        self.log_path = self.dir / "node.log"
        argv = [
            str(arl_bin()), "node",
            "--listen", f"127.0.0.1:{self.port}",
            "--e2b-listen", f"127.0.0.1:{self.e2b_port}",
            "--state-dir", str(self.dir / "state"),
            "--cgroup-parent", self.cgroup_parent,
            "--config", str(self.dir / "config.toml"),
            "--token-file", str(self.dir / "tokens"),
            "--uid-base", str(self.uid_base),
        ]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, "ARL_LOG": "warn"}, start_new_session=True,
            )
        deadline = time.monotonic() + 20
        while not self.ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"arl node exited with {self.proc.returncode}: {self.log()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"arl node not ready after 20 s: {self.log()}")
            time.sleep(0.02)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.e2b_port}"

    def ready(self) -> bool:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
            conn.request("GET", "/readyz")
            ok = conn.getresponse().status == 200
            conn.close()
            socket.create_connection(("127.0.0.1", self.e2b_port), timeout=5).close()
            return ok
        except OSError:
            return False

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for root in cgroup_roots():
            try:
                (root / self.cgroup_parent).rmdir()
            except OSError:
                pass
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def node(request: pytest.FixtureRequest) -> Iterator[Node]:
    n = Node()
    saved = {k: os.environ.get(k) for k in ("E2B_API_KEY", "E2B_API_URL", "E2B_SANDBOX_URL", "E2B_DOMAIN", "E2B_DEBUG")}
    os.environ.update(E2B_API_KEY=n.key, E2B_API_URL=n.url, E2B_SANDBOX_URL=n.url)
    os.environ.pop("E2B_DEBUG", None)
    os.environ.pop("E2B_DOMAIN", None)
    try:
        yield n
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        # A failed run keeps the daemon's word on it (its log goes with its directory).
        if request.session.testsfailed:
            capture = request.config.pluginmanager.getplugin("capturemanager")
            with capture.global_and_fixture_disabled():
                print(f"\n--- arl node log (last 4000 bytes) ---\n{n.log()}")
        n.stop()
