"""Nearest-node routing across several real daemons."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

import arl
from arl._common import Endpoint, resolve_config

from conftest import Daemon, free_port
from netutil import FullNode


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, Daemon]]:
    a = Daemon(tmp_path_factory.mktemp("a"), pools={"default": {"min_idle": 1, "max": 8}, "solo": {"min_idle": 1, "max": 1}}).start()
    b = Daemon(tmp_path_factory.mktemp("b"), pools={"default": {"min_idle": 4, "max": 8}, "solo": {"min_idle": 1, "max": 1}}).start()
    yield a, b
    a.cleanup()
    b.cleanup()


def wait_idle(url: str, pool: str, n: int, timeout: float = 20) -> None:
    c = arl.Client(url)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if c.pool(pool).status.idle >= n:
            c.close()
            return
        time.sleep(0.05)
    raise AssertionError(f"{url} never reached {n} idle in {pool}")


def test_resolve_config(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("ARL_ENDPOINTS", "ARL_TOKEN", "ARL_NODE_IP", "ARL_NODE_PORT"):
        monkeypatch.delenv(k, raising=False)
    cfg = resolve_config()
    assert [e.url for e in cfg.endpoints] == ["http://127.0.0.1:8420"] and cfg.token is None and cfg.local is None
    monkeypatch.setenv("ARL_ENDPOINTS", "http://10.0.0.1:8420, 10.0.0.2:9000")
    monkeypatch.setenv("ARL_TOKEN", "t")
    monkeypatch.setenv("ARL_NODE_IP", "10.0.0.2")
    cfg = resolve_config()
    assert [e.url for e in cfg.endpoints] == ["http://10.0.0.1:8420", "http://10.0.0.2:9000"]
    assert cfg.local == Endpoint.parse("http://10.0.0.2:9000") and cfg.token == "t"
    monkeypatch.setenv("ARL_NODE_IP", "10.0.0.3")
    cfg = resolve_config()
    assert cfg.local is not None and cfg.local.url == "http://10.0.0.3:8420" and cfg.endpoints[0] == cfg.local
    cfg = resolve_config(["http://h:1"], "x", local_endpoint="http://h:1")
    assert cfg.local == Endpoint.parse("http://h:1") and len(cfg.endpoints) == 1


def test_local_node_first(two_nodes: tuple[Daemon, Daemon]) -> None:
    a, b = two_nodes
    with arl.Client([a.url, b.url], local_endpoint=a.url) as c:
        assert c.local_endpoint == a.url
        with c.sandbox("default") as sb:
            assert sb.endpoint == a.url
    with arl.Client([b.url, a.url], local_endpoint=a.url) as c:
        with c.sandbox("default") as sb:
            assert sb.endpoint == a.url


def test_most_idle_node(two_nodes: tuple[Daemon, Daemon]) -> None:
    a, b = two_nodes
    wait_idle(b.url, "default", 4)
    with arl.Client([a.url, b.url]) as c:  # no local node: b has more idle sandboxes
        with c.sandbox("default") as sb:
            assert sb.endpoint == b.url


def test_exhausted_node_falls_back(two_nodes: tuple[Daemon, Daemon]) -> None:
    a, b = two_nodes
    wait_idle(a.url, "solo", 1)
    wait_idle(b.url, "solo", 1)
    with arl.Client([a.url, b.url], local_endpoint=a.url) as c:
        with c.sandbox("solo") as s1, c.sandbox("solo") as s2:
            assert {s1.endpoint, s2.endpoint} == {a.url, b.url}
            assert s2.exec(["true"]).ok
            with pytest.raises(arl.PoolExhausted):
                c.sandbox("solo")


def test_alternatives_followed(two_nodes: tuple[Daemon, Daemon]) -> None:
    _, b = two_nodes
    full = FullNode([b.url])
    try:
        with arl.Client(full.url) as c:
            with c.sandbox("default") as sb:
                assert sb.endpoint == b.url and full.hits == 1
                assert sb.exec(["echo", "moved"]).stdout == "moved\n"

        async def main() -> None:
            async with arl.AsyncClient(full.url) as ac:
                async with ac.sandbox("default") as sb:
                    assert sb.endpoint == b.url

        asyncio.run(main())
        empty = FullNode([])
        try:
            with arl.Client(empty.url) as c:
                with pytest.raises(arl.PoolExhausted) as ei:
                    c.sandbox("default")
                assert ei.value.alternatives == []
        finally:
            empty.close()
    finally:
        full.close()


def test_a_cordoned_node_sends_clients_to_its_alternatives_at_once(two_nodes: tuple[Daemon, Daemon]) -> None:
    _, b = two_nodes
    cordoned = FullNode([b.url], code="draining")
    try:
        started = time.monotonic()
        with arl.Client(cordoned.url) as c:
            with c.sandbox("default") as sb:
                assert sb.endpoint == b.url
                assert sb.exec(["echo", "moved"]).stdout == "moved\n"
        # Not retried there: a draining node that names alternatives is left at once.
        assert cordoned.hits == 1
        assert time.monotonic() - started < 5
        alone = FullNode([], code="draining")
        try:
            with arl.Client(alone.url, retry_timeout=0.2) as c:
                with pytest.raises(arl.InfraError) as ei:
                    c.sandbox("default")
            assert ei.value.code == "draining" and alone.hits >= 2, "without alternatives it is retried"
        finally:
            alone.close()
    finally:
        cordoned.close()


def test_dead_node_skipped(two_nodes: tuple[Daemon, Daemon]) -> None:
    a, _ = two_nodes
    dead = f"http://127.0.0.1:{free_port()}"
    with arl.Client([dead, a.url], local_endpoint=dead, retry_timeout=2) as c:
        t0 = time.monotonic()
        with c.sandbox("default") as sb:
            assert sb.endpoint == a.url
        assert time.monotonic() - t0 < 2


def test_async_routing(two_nodes: tuple[Daemon, Daemon]) -> None:
    a, b = two_nodes
    wait_idle(b.url, "default", 4)

    async def main() -> None:
        async with arl.AsyncClient([a.url, b.url], local_endpoint=a.url) as c:
            async with c.sandbox("default") as sb:
                assert sb.endpoint == a.url
        async with arl.AsyncClient([a.url, b.url]) as c:
            async with c.sandbox("default") as sb:
                assert sb.endpoint == b.url
            pools = await c.pools()
            assert {p.endpoint for p in pools} == {a.url, b.url}

    asyncio.run(main())




def test_acquire_many_spans_nodes(two_nodes: tuple[Daemon, Daemon]) -> None:
    a, b = two_nodes
    wait_idle(a.url, "solo", 1)
    wait_idle(b.url, "solo", 1)
    with arl.Client([a.url, b.url]) as c:
        with c.acquire_many("solo", 2) as sbs:  # one per node: no node has 2
            assert {s.endpoint for s in sbs} == {a.url, b.url}
        with pytest.raises(arl.PoolExhausted):
            c.acquire_many("solo", 3)
        wait_idle(a.url, "solo", 1)
        wait_idle(b.url, "solo", 1)
        assert c.sandboxes() == []  # nothing leaked by the failed attempt

    async def main() -> None:
        async with arl.AsyncClient([a.url, b.url]) as ac:
            async with ac.acquire_many("solo", 2) as sbs:
                assert {s.endpoint for s in sbs} == {a.url, b.url}

    asyncio.run(main())
