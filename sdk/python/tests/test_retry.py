"""Connection-level failures are retried with the same request_id: a command never runs twice."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

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
        d.cleanup()


def test_retry_while_daemon_restarts(tmp_path: Path) -> None:
    """The daemon is down when the request is sent; the SDK keeps retrying (same request_id)
    until the restarted daemon answers."""
    d = Daemon(tmp_path / "n", pools={"default": {"min_idle": 2, "max": 8}}).start()
    try:
        c = arl.Client(d.url, retry_timeout=30)
        assert c.pools()
        d.stop()
        t = threading.Thread(target=lambda: (time.sleep(0.3), d.start()))
        t.start()
        t0 = time.monotonic()
        sb = c.sandbox("default")  # refused connections, retried until the node is back
        waited = time.monotonic() - t0
        t.join()
        assert waited >= 0.25
        assert sb.exec(COUNT).stdout.strip() == "1"
        sb.release()
        c.close()
    finally:
        d.cleanup()


def test_exec_across_restart_never_runs_twice(tmp_path: Path) -> None:
    """An exec sent while the daemon restarts is retried on a fresh connection. The restarted
    daemon either kept the sandbox (the command then ran exactly once) or reclaimed it
    (SandboxNotFound: it never ran); it never runs twice."""
    d = Daemon(tmp_path / "n", pools={"default": {"min_idle": 2, "max": 8}}).start()
    try:
        c = arl.Client(d.url, retry_timeout=30)
        sb = c.sandbox("default")
        assert sb.exec(COUNT).stdout.strip() == "1"
        d.stop()
        t = threading.Thread(target=lambda: (time.sleep(0.3), d.start()))
        t.start()
        try:
            r = sb.exec(COUNT)
        except arl.SandboxNotFound:
            adopted = False
        else:
            adopted = True
            assert r.stdout.strip() == "2"
            assert sb.exec(["cat", "runs"]).stdout == "x\nx\n"
        finally:
            t.join()
        if not adopted:
            with c.sandbox("default") as fresh:  # the same client goes on working
                assert fresh.exec(COUNT).stdout.strip() == "1"
        sb.release()
        c.close()
    finally:
        d.cleanup()


def test_acquire_request_id_is_idempotent(client: arl.Client) -> None:
    from arl._common import dumps

    body = dumps({"pool": "default", "request_id": "acquire-once"})
    ep = client._cfg.endpoints[0]
    first = client._t.request_json(ep, "POST", "/v1/sandboxes", body)["sandboxes"][0]["id"]
    second = client._t.request_json(ep, "POST", "/v1/sandboxes", body)["sandboxes"][0]["id"]
    for sid in {first, second}:
        client.attach(sid).release()
    assert first == second


def test_keep_alive_is_reused(proxy: DropProxy) -> None:
    """Sequential calls share one keep-alive connection (sync and async)."""
    with arl.Client(proxy.url) as c:
        for _ in range(10):
            with c.sandbox("default") as sb:
                sb.exec(["true"])
                sb.write_files({"a": "b"})
                sb.read_file("a")
    assert proxy.connections == 1

    async def main() -> None:
        async with arl.AsyncClient(proxy.url) as ac:
            for _ in range(10):
                async with ac.sandbox("default") as sb:
                    await sb.exec(["true"])
                    await sb.write_files({"a": "b"})
                    await sb.read_file("a")

    asyncio.run(main())
    assert proxy.connections == 2
