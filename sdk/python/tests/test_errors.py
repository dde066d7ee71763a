"""Every error type, raised from real daemon responses where the daemon can produce them."""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import signal
import time

import pytest

import arl

from conftest import Daemon
from netutil import ScriptedNode

SANDBOX = {"id": "sb-fake", "pool": "default", "state": "allocated", "created_at_ms": 1, "acquired_at_ms": 1,
           "expires_at_ms": None, "labels": {}, "workspace": "/workspace"}
RESULT = {"stdout": "ok\n", "stderr": "", "exit_code": 0, "signal": None, "timed_out": False, "truncated": False,
          "duration_ms": 1.0}


def test_hierarchy() -> None:
    for cls in (arl.SandboxNotFound, arl.PoolNotFound, arl.RemoteFileNotFound, arl.PoolExhausted, arl.AuthError,
                arl.InfraError, arl.ExecTimeout, arl.BadRequest, arl.PathRefused, arl.ChecksumMismatch,
                arl.PayloadTooLarge, arl.PoolNotReadyError):
        assert issubclass(cls, arl.ArlError)
    assert arl.GatewayError is arl.ArlError
    e = arl.PoolExhausted("full", code="pool_exhausted", status=503, alternatives=["http://h:1"])
    e2 = pickle.loads(pickle.dumps(e))
    assert type(e2) is arl.PoolExhausted and e2.alternatives == ["http://h:1"] and e2.retryable
    assert (e2.status_code, e2.error, e2.detail) == (503, "pool_exhausted", "full")


def test_payload_too_large(sb: arl.Sandbox, daemon: Daemon) -> None:
    with pytest.raises(arl.PayloadTooLarge) as ei:
        sb.exec(["cat"], stdin="x" * (17 << 20))
    assert ei.value.status == 413 and isinstance(ei.value, arl.BadRequest)

    async def main() -> None:
        async with arl.AsyncClient(daemon.url) as c:
            s = await c.attach(sb.id)
            with pytest.raises(arl.PayloadTooLarge):
                await s.exec(["cat"], stdin="x" * (17 << 20))

    asyncio.run(main())
    assert sb.exec(["echo", "still fine"]).stdout == "still fine\n"


def _kill_agent(daemon: Daemon, sandbox_id: str) -> None:
    meta = json.loads((daemon.state_dir / "sandboxes" / sandbox_id / "meta.json").read_text())
    os.kill(meta["pid"], signal.SIGKILL)


def test_sandbox_unavailable(client: arl.Client, daemon: Daemon) -> None:
    sb = client.sandbox("default")
    _kill_agent(daemon, sb.id)
    time.sleep(0.05)
    with pytest.raises((arl.InfraError, arl.SandboxNotFound)) as ei:
        sb.exec(["true"])
    if isinstance(ei.value, arl.InfraError):
        assert ei.value.code == "sandbox_unavailable" and ei.value.retryable and ei.value.status == 503
    sb.release()


def test_sandbox_dies_mid_exec(client: arl.Client, daemon: Daemon) -> None:
    import threading

    sb = client.sandbox("default")
    t = threading.Timer(0.3, _kill_agent, args=(daemon, sb.id))
    t.start()
    with pytest.raises(arl.InfraError) as ei:
        sb.exec(["sleep", "5"])
    t.join()
    assert ei.value.code == "sandbox_unavailable" and ei.value.retryable
    sb.release()


def test_draining_is_retried_with_same_request_id() -> None:
    node = ScriptedNode([
        (201, {"sandboxes": [SANDBOX]}),
        (503, {"error": {"code": "draining", "message": "node is draining", "retryable": True}}),
        (503, {"error": {"code": "draining", "message": "node is draining", "retryable": True}}),
        (200, RESULT),
    ])
    try:
        with arl.Client(node.url, retry_timeout=5) as c:
            sb = c.sandbox()
            assert sb.exec(["true"]).stdout == "ok\n"
        ids = {json.loads(b)["request_id"] for b in node.bodies[1:]}
        assert len(node.bodies) == 4 and len(ids) == 1
    finally:
        node.close()


def test_overloaded_is_retried_and_released_is_final() -> None:
    node = ScriptedNode([
        (201, {"sandboxes": [SANDBOX]}),
        (503, {"error": {"code": "overloaded", "message": "too many connections", "retryable": True}}),
        (200, RESULT),
        (410, {"error": {"code": "released", "message": "released while it ran", "retryable": False}}),
    ])
    try:
        with arl.Client(node.url, retry_timeout=5) as c:
            sb = c.sandbox()
            assert sb.exec(["true"]).stdout == "ok\n"
            with pytest.raises(arl.ArlError) as ei:
                sb.exec(["true"])
        assert (ei.value.status, ei.value.code, ei.value.retryable) == (410, "released", False)
        assert len(node.bodies) == 4, "overloaded retried once, released not at all"
    finally:
        node.close()


def test_draining_and_internal_raise_infra_error() -> None:
    node = ScriptedNode([
        (201, {"sandboxes": [SANDBOX]}),
        (503, {"error": {"code": "draining", "message": "node is draining", "retryable": True}}),
        (500, {"error": {"code": "internal", "message": "boom", "retryable": False}}),
    ])
    try:
        with arl.Client(node.url, retry_timeout=0) as c:
            sb = c.sandbox()
            with pytest.raises(arl.InfraError) as ei:
                sb.exec(["true"])
            assert ei.value.code == "draining" and ei.value.retryable
            with pytest.raises(arl.InfraError) as ei:
                sb.exec(["true"])
            assert ei.value.code == "internal" and not ei.value.retryable and ei.value.status == 500

        async def main() -> None:
            async with arl.AsyncClient(node.url, retry_timeout=0) as c:
                sb = arl.AsyncSandbox(c, c._cfg.endpoints[0], arl.SandboxInfo(**SANDBOX))
                with pytest.raises(arl.InfraError) as ei:
                    await sb.exec(["true"])
                assert ei.value.code == "internal"

        asyncio.run(main())
    finally:
        node.close()


def test_stream_error_event() -> None:
    """An NDJSON `error` event becomes the matching typed exception."""
    from arl._common import StreamAssembler

    asm = StreamAssembler()
    with pytest.raises(arl.InfraError) as ei:
        asm.feed({"type": "error", "error": {"code": "sandbox_unavailable", "message": "gone", "retryable": True}}, "http://x:1")
    assert ei.value.retryable and ei.value.status == 503
    with pytest.raises(arl.SandboxNotFound):
        asm.feed({"type": "error", "error": {"code": "not_found", "message": "sandbox sb-x not found"}}, "http://x:1")
