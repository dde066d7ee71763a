"""Connection-level failures are retried with the same request_id: a command never runs twice."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

import arl
from conftest import Daemon
from netutil import DropProxy

COUNT = "echo x >> /workspace/runs; wc -l < /workspace/runs"


@pytest.fixture()
def proxy(daemon: Daemon) -> Iterator[DropProxy]:
    p = DropProxy(daemon.port)
    yield p
    p.close()


def test_lost_response_is_retried_without_running_twice(proxy: DropProxy) -> None:
    with arl.Client(proxy.url, retry_timeout=5) as c, c.sandbox("default") as sb:
        proxy.drop_exec = 1
        r = sb.exec(COUNT)
        assert proxy.dropped == 1
        assert r.stdout.strip() == "1"  # the retry got the first run's result
        assert sb.exec(["cat", "/workspace/runs"]).stdout == "x\n"  # and it ran once


def test_lost_response_async(proxy: DropProxy) -> None:
    async def main() -> None:
        async with arl.AsyncClient(proxy.url, retry_timeout=5) as c:
            async with c.sandbox("default") as sb:
                proxy.drop_exec = 1
                r = await sb.exec(COUNT)
                assert proxy.dropped == 1 and r.stdout.strip() == "1"
                assert (await sb.exec(["cat", "/workspace/runs"])).stdout == "x\n"

    asyncio.run(main())


def test_stream_cut_midway_recovers_result(proxy: DropProxy) -> None:
    with arl.Client(proxy.url, retry_timeout=5) as c, c.sandbox("default") as sb:
        proxy.drop_exec = 1
        items = list(sb.stream("echo x >> /workspace/runs; echo first; sleep 0.3; echo second"))
        assert proxy.dropped == 1
        res = items[-1]
        assert isinstance(res, arl.ExecResult) and res.exit_code == 0
        out = "".join(i.data for i in items if isinstance(i, arl.OutputChunk) and i.stream == "stdout")
        assert out == "first\nsecond\n"
        assert sb.exec(["cat", "/workspace/runs"]).stdout == "x\n"


def test_stale_keepalive_after_restart(tmp_path: Path) -> None:
    d = Daemon(tmp_path / "n", pools={"default": {"min_idle": 2, "max": 8}}).start()
    try:
        c = arl.Client(d.url, retry_timeout=20)
        assert c.pools()  # leaves a keep-alive connection in the pool
        d.restart()
        assert c.pools()  # the dead connection is replaced transparently
        with c.sandbox("default") as sb:
            assert sb.exec(COUNT).stdout.strip() == "1"
        c.close()
    finally:
        d.stop()


def test_retry_while_daemon_restarts(tmp_path: Path) -> None:
    """The daemon is down when the request is sent; the SDK keeps retrying (same request_id)
    until the restarted daemon answers, and the command runs exactly once."""
    d = Daemon(tmp_path / "n", pools={"default": {"min_idle": 2, "max": 8}}).start()
    try:
        c = arl.Client(d.url, retry_timeout=30)
        ac_result: dict[str, object] = {}
        d.stop()

        def later() -> None:
            time.sleep(0.3)
            d.start()

        t = threading.Thread(target=later)
        t.start()
        t0 = time.monotonic()
        sb = c.sandbox("default")  # refused connections, retried until the node is back
        waited = time.monotonic() - t0
        t.join()
        assert waited >= 0.25
        ac_result["id"] = sb.id
        assert sb.exec(COUNT).stdout.strip() == "1"
        # Keep-alive connections die with the daemon; the exec after another restart is
        # retried on a fresh connection and still runs once (if the daemon kept the sandbox).
        d.restart()
        try:
            r = sb.exec(COUNT)
        except arl.SandboxNotFound:
            pytest.xfail("daemon does not adopt sandboxes across a restart")
        assert r.stdout.strip() == "2"
        sb.release()
        c.close()
    finally:
        d.stop()


def test_exec_retried_while_daemon_down(tmp_path: Path) -> None:
    d = Daemon(tmp_path / "n", pools={"default": {"min_idle": 2, "max": 8}}).start()
    try:
        c = arl.Client(d.url, retry_timeout=30)
        sb = c.sandbox("default")
        sb.exec(["true"])
        d.stop()
        t = threading.Thread(target=lambda: (time.sleep(0.3), d.start()))
        t.start()
        try:
            r = sb.exec(COUNT)
        except arl.SandboxNotFound:
            t.join()
            pytest.xfail("daemon does not adopt sandboxes across a restart")
        t.join()
        assert r.stdout.strip() == "1"
        assert sb.exec(["cat", "runs"]).stdout == "x\n"
        sb.release()
        c.close()
    finally:
        d.stop()
