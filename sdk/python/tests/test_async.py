"""The asyncio client against a real daemon (tests drive their own event loop)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

import arl


def run(fn: Callable[[arl.AsyncClient], Awaitable[Any]], url: str, **kw: Any) -> Any:
    async def main() -> Any:
        kw.setdefault("retry_timeout", 5.0)
        async with arl.AsyncClient(url, **kw) as c:
            return await fn(c)

    return asyncio.run(main())


def test_async_pools_and_health(daemon) -> None:  # type: ignore[no-untyped-def]
    async def body(c: arl.AsyncClient) -> None:
        assert await c.healthy() and await c.ready()
        names = {p.name for p in await c.pools()}
        assert {"default", "tiny"} <= names
        assert (await c.pool("default")).status.ready
        with pytest.raises(arl.PoolNotFound):
            await c.pool("nope")

    run(body, daemon.url)


def test_async_exec(daemon) -> None:  # type: ignore[no-untyped-def]
    async def body(c: arl.AsyncClient) -> None:
        async with c.sandbox("default") as sb:
            r = await sb.exec(["echo", "hi"])
            assert (r.stdout, r.exit_code) == ("hi\n", 0)
            r = await sb.exec("echo $A; pwd; cat; exit 5", env={"A": "b"}, cwd="/tmp", stdin="in")
            assert (r.stdout, r.exit_code) == ("b\n/tmp\nin", 5)
            r = await sb.exec(["sleep", "5"], timeout=0.2)
            assert r.timed_out
            with pytest.raises(arl.ExecTimeout):
                await sb.exec(["sleep", "5"], timeout=0.2, raise_on_timeout=True)
            a = await sb.exec("echo x >> n; wc -l < n", request_id="async-rid")
            b = await sb.exec("echo x >> n; wc -l < n", request_id="async-rid")
            assert a.stdout == b.stdout == "1\n"

    run(body, daemon.url)


def test_async_stream(daemon) -> None:  # type: ignore[no-untyped-def]
    async def body(c: arl.AsyncClient) -> None:
        sb = await c.sandbox("default")
        try:
            items = [i async for i in sb.stream("echo a; sleep 0.2; echo b >&2; sleep 0.2; echo c")]
            res = items[-1]
            assert isinstance(res, arl.ExecResult) and res.exit_code == 0
            assert res.stdout == "a\nc\n" and res.stderr == "b\n"
            assert len(items) >= 4
            # Chunks arrive while the command still runs.
            t0 = time.monotonic()
            first_at = None
            async for _item in sb.stream("echo early; sleep 0.5; echo late"):
                if first_at is None:
                    first_at = time.monotonic() - t0
            assert first_at is not None and first_at < 0.45
            items = [i async for i in sb.stream(["sleep", "5"], timeout=0.2)]
            assert items[-1].timed_out  # type: ignore[union-attr]
        finally:
            await sb.release()

    run(body, daemon.url)


def test_async_files(daemon, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    src = tmp_path / "in.bin"
    src.write_bytes(os.urandom(3 * 1024 * 1024 + 7))
    digest = hashlib.sha256(src.read_bytes()).hexdigest()

    async def body(c: arl.AsyncClient) -> None:
        async with c.sandbox("default") as sb:
            infos = await sb.write_files({"a.py": "print('a')", "b.bin": b"\xff"})
            assert len(infos) == 2
            assert (await sb.exec(["python3", "a.py"])).stdout == "a\n"
            info = await sb.write_file("c.txt", "ccc", mode=0o600)
            assert info.size == 3
            assert await sb.read_file("c.txt") == b"ccc"
            assert await sb.read_text("b.bin", "latin-1") == "\xff"
            info = await sb.upload(src, "up/in.bin")
            assert info.sha256 == digest
            with open(src, "rb") as f:
                info = await sb.write_file("up/again.bin", f)
            assert info.sha256 == digest
            chunks = [c async for c in sb.iter_file("up/again.bin", chunk_size=1 << 20)]
            assert len(chunks) > 1 and hashlib.sha256(b"".join(chunks)).hexdigest() == digest
            n = await sb.download("up/in.bin", tmp_path / "out.bin")
            assert n == src.stat().st_size
            assert hashlib.sha256((tmp_path / "out.bin").read_bytes()).hexdigest() == digest
            await sb.delete_file("c.txt")
            with pytest.raises(arl.RemoteFileNotFound):
                await sb.read_file("c.txt")
            with pytest.raises(arl.PathRefused):
                await sb.write_file("../../x", "y")
            await sb.reset()
            with pytest.raises(arl.RemoteFileNotFound):
                await sb.read_file("a.py")
            assert (await sb.refresh()).id == sb.id

    run(body, daemon.url)


def test_async_lifecycle_and_errors(daemon) -> None:  # type: ignore[no-untyped-def]
    async def body(c: arl.AsyncClient) -> None:
        async with c.acquire_many("default", 4) as sbs:
            assert len({s.id for s in sbs}) == 4
            other = await c.attach(sbs[0].id)
            assert other.id == sbs[0].id
            listed = {s.id for s in await c.sandboxes()}
            assert {s.id for s in sbs} <= listed
        listed = {s.id for s in await c.sandboxes()}
        assert not ({s.id for s in sbs} & listed)
        with pytest.raises(arl.SandboxNotFound):
            await sbs[0].exec(["true"])
        with pytest.raises(arl.PoolNotFound):
            await c.sandbox("nope")
        async with c.sandbox("tiny"):
            with pytest.raises(arl.PoolExhausted):
                await c.sandbox("tiny")
        p = await c.put_pool("async-pool", min_idle=0, max=2)
        assert p.spec.max == 2
        await c.delete_pool("async-pool")
        with pytest.raises(arl.PoolNotFound):
            await c.delete_pool("async-pool")

    run(body, daemon.url)


def test_async_pause_snapshot_fork(daemon) -> None:  # type: ignore[no-untyped-def]
    async def body(c: arl.AsyncClient) -> None:
        async with c.sandbox("default") as sb:
            await sb.write_files({"f.txt": "one"})
            assert (await sb.pause()).id == sb.id
            assert (await c.pool("default")).status.paused == 1
            assert (await sb.exec("cat f.txt")).stdout == "one"  # thawed on the way
            await sb.pause()
            await sb.resume()
            assert (await c.pool("default")).status.paused == 0
            snap = await sb.snapshot()
            assert snap.sandbox == sb.id and snap.id in {s.id for s in await c.snapshots()}
            async with await c.fork(snap, 2) as forks:
                assert [await f.read_file("f.txt") for f in forks] == [b"one", b"one"]
                await forks[0].write_files({"f.txt": "two"})
                assert await forks[1].read_file("f.txt") == b"one"
                assert await sb.read_file("f.txt") == b"one"
            async with await sb.fork(env={"X": "1"}) as live:
                assert (await live[0].exec("cat f.txt; echo $X")).stdout == "one1\n"
            await c.delete_snapshot(snap)
            assert await c.snapshots() == []
            with pytest.raises(arl.NotFound):
                await c.delete_snapshot(snap)

    run(body, daemon.url)


def test_async_unreachable() -> None:
    from conftest import free_port

    async def body(c: arl.AsyncClient) -> None:
        with pytest.raises(arl.InfraError) as ei:
            await c.sandbox("default")
        assert ei.value.retryable

    run(body, f"http://127.0.0.1:{free_port()}", retry_timeout=0.3)


def test_64_concurrent_sandboxes(daemon) -> None:  # type: ignore[no-untyped-def]
    N = 64

    async def episode(c: arl.AsyncClient, i: int) -> str:
        async with c.sandbox("default") as sb:
            await sb.write_files({"solution.py": f"def f():\n    return {i}\n",
                                  "test_solution.py": f"from solution import f\nassert f() == {i}\nprint('ok {i}')\n"})
            r = await sb.exec(["python3", "test_solution.py"], timeout=30)
            assert r.exit_code == 0, r.stderr
            for _ in range(5):
                assert (await sb.exec(["true"])).ok
            return r.stdout

    async def body(c: arl.AsyncClient) -> None:
        t0 = time.monotonic()
        out = await asyncio.gather(*(episode(c, i) for i in range(N)))
        assert out == [f"ok {i}\n" for i in range(N)]
        assert time.monotonic() - t0 < 90
        live = await c.sandboxes()
        assert len(live) == 0

    run(body, daemon.url)


def test_client_survives_a_new_event_loop(daemon) -> None:  # type: ignore[no-untyped-def]
    c = arl.AsyncClient(daemon.url)

    async def once() -> str:
        async with c.sandbox("default") as sb:
            return (await sb.exec(["echo", "ok"])).stdout

    assert asyncio.run(once()) == "ok\n"
    assert asyncio.run(once()) == "ok\n"  # pooled connections of the first loop are not reused
