"""The README's code blocks and the examples run against a real daemon."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT, Daemon

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def _run(args: list[str], daemon: Daemon, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ARL_ENDPOINTS": daemon.url}
    env.pop("ARL_TOKEN", None)
    env.pop("ARL_NODE_IP", None)
    p = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)
    assert p.returncode == 0, f"stdout:\n{p.stdout}\nstderr:\n{p.stderr}"
    return p


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block(index: int, daemon: Daemon) -> None:
    _run([sys.executable, "-c", BLOCKS[index]], daemon)


def test_readme_has_blocks() -> None:
    assert len(BLOCKS) >= 5


def test_example_quickstart(daemon: Daemon) -> None:
    out = _run([sys.executable, "examples/quickstart.py"], daemon).stdout
    assert "hello from /workspace" in out and "exit code: 3" in out and "timed out: True" in out


def test_example_rollout(daemon: Daemon) -> None:
    out = _run([sys.executable, "examples/rollout.py", "--episodes", "48", "--concurrency", "16"], daemon).stdout
    assert out.startswith("48 episodes") and "masked 0" in out


def test_example_seed_session(daemon: Daemon) -> None:
    out = _run([sys.executable, "examples/seed_session.py"], daemon).stdout
    assert out.startswith("Hello, World!\n") and "patched" in out and "exit codes: [0, 0]" in out
