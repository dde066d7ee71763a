"""Bearer tokens: a daemon started with --token-file."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

import arl

from conftest import Daemon

TOKENS = ["token-alice", "token-bob"]


@pytest.fixture(scope="module")
def auth_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("auth"), pools={"default": {"min_idle": 1, "max": 8}}, tokens=TOKENS).start()
    yield d
    d.cleanup()


def test_missing_or_wrong_token(auth_daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ARL_TOKEN", raising=False)
    for token in (None, "wrong"):
        with arl.Client(auth_daemon.url, token=token) as c:
            with pytest.raises(arl.AuthError) as ei:
                c.pools()
            assert ei.value.status == 401 and ei.value.code == "unauthorized" and not ei.value.retryable
            with pytest.raises(arl.AuthError):
                c.sandbox("default")
            assert c.healthy()  # open routes stay open


def test_token_owns_sandbox(auth_daemon: Daemon) -> None:
    alice = arl.Client(auth_daemon.url, token="token-alice")
    bob = arl.Client(auth_daemon.url, token="token-bob")
    with alice.sandbox("default") as sb:
        assert sb.exec(["echo", "mine"]).stdout == "mine\n"
        assert any(s.id == sb.id for s in alice.sandboxes())
        assert not any(s.id == sb.id for s in bob.sandboxes())
        stolen = arl.Sandbox(bob, sb._ep, sb.info)
        with pytest.raises(arl.AuthError) as ei:
            stolen.exec(["true"])
        assert ei.value.status == 403 and ei.value.code == "forbidden"
        with pytest.raises(arl.AuthError):
            stolen.read_file("x")
        with pytest.raises(arl.AuthError):
            stolen.release()
    alice.close()
    bob.close()


def test_token_from_env(auth_daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ARL_ENDPOINTS", auth_daemon.url)
    monkeypatch.setenv("ARL_TOKEN", "token-bob")

    async def main() -> None:
        async with arl.AsyncClient() as c:
            async with c.sandbox("default") as sb:
                assert (await sb.exec(["true"])).ok
        async with arl.AsyncClient(token="nope") as c:
            with pytest.raises(arl.AuthError):
                await c.sandbox("default")

    asyncio.run(main())
    with arl.Client() as c:
        assert c.pools()


def test_facade_api_key(auth_daemon: Daemon) -> None:
    with arl.SandboxSession(gateway_url=auth_daemon.url, api_key="token-alice") as s:
        r = s.execute([{"name": "hi", "command": ["echo", "hi"]}])
        assert r.results[0].output.stdout == "hi\n"
    with pytest.raises(arl.GatewayError) as ei:
        with arl.SandboxSession(gateway_url=auth_daemon.url, api_key="bad"):
            pass
    assert ei.value.status_code == 401

