"""Persistent sessions and the trajectory through the SDK (sync and asyncio) against a real
daemon."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import pytest

import arl


@pytest.fixture(scope="module", autouse=True)
def _pool_refilled(daemon) -> Iterator[None]:  # type: ignore[no-untyped-def]
    """The daemon is shared: leave its pools as full as they were found (later tests expect a
    ready pool), waiting on their status, not on a clock."""
    yield
    client = arl.Client(daemon.url)
    deadline = time.monotonic() + 60
    while not all(p.status.ready for p in client.pools()):
        assert time.monotonic() < deadline, "the pools never refilled"
        time.sleep(0.05)
    client.close()


def test_shell_session_keeps_state_and_separates_streams(sb: arl.Sandbox) -> None:
    with sb.open_session("shell") as sh:
        assert sh.kind == "shell"
        r = sh.run("cd /tmp; export A=1; f() { echo \"f:$1\"; }")
        assert r.ok and r.stdout == ""
        r = sh.run("pwd; f x; echo $A >&2; false")
        assert (r.stdout, r.stderr, r.exit_code, r.ok) == ("/tmp\nf:x\n", "1\n", 1, False)
        r = sh.run("sleep 30", timeout=0.3)
        assert r.timed_out and r.exit_code == 130 and not r.session_ended
        assert sh.run("echo $A").stdout == "1\n"
        items = list(sh.stream("echo one; echo two >&2"))
        result = items[-1]
        assert isinstance(result, arl.RunResult)
        assert (result.stdout, result.stderr, result.exit_code) == ("one\n", "two\n", 0)
        assert [c.data for c in items[:-1] if isinstance(c, arl.OutputChunk) and c.stream == "stdout"] == ["one\n"]
        assert [s.id for s in sb.sessions()] == [sh.id]
        assert sh.refresh().runs == 5
    assert sb.sessions() == []


def test_python_session_values_errors_and_interrupts(sb: arl.Sandbox) -> None:
    with sb.open_session("python") as py:
        assert py.run("x = 41").value is None
        r = py.run("x + 1")
        assert r.value == "42" and r.exit_code == 0 and r.error is None
        r = py.run("raise ValueError('bad')")
        assert r.exit_code == 1 and r.error is not None
        assert (r.error.ename, r.error.evalue) == ("ValueError", "bad")
        assert r.error.traceback[-1] == "ValueError: bad"
        r = py.run("while True:\n    x += 0", timeout=0.3)
        assert r.timed_out and r.error is not None and r.error.ename == "KeyboardInterrupt"
        assert py.run("x").value == "41"


def test_bad_session_requests(sb: arl.Sandbox) -> None:
    with pytest.raises(arl.BadRequest):
        sb.open_session("ruby")
    sh = sb.open_session("shell")
    sh.close()
    sh.close()  # idempotent
    with pytest.raises(arl.NotFound):
        sh.run("true")


def test_trajectory_lists_actions_in_order(sb: arl.Sandbox) -> None:
    sb.exec("echo hi")
    sb.write_files({"a.txt": "abc"})
    with sb.open_session("shell") as sh:
        sh.run("echo there")
    steps = sb.trajectory()
    assert [s["action"] for s in steps] == ["exec", "file_write", "session_open", "session_run", "session_close"]
    assert [s["seq"] for s in steps] == [1, 2, 3, 4, 5]
    assert steps[0]["stdout"] == "hi\n" and steps[3]["stdout"] == "there\n"
    assert steps[1]["input"] == "/workspace/a.txt" and steps[1]["bytes"] == 3
    json.dumps(steps)  # plain JSON values


def test_async_sessions(daemon) -> None:  # type: ignore[no-untyped-def]
    async def main() -> tuple[str | None, str, list[str]]:
        async with arl.AsyncClient(daemon.url) as c:
            async with c.sandbox("default") as sb:
                async with await sb.open_session("python") as py:
                    await py.run("import math")
                    value = (await py.run("math.factorial(5)")).value
                    chunks = [i async for i in py.stream("print('streamed')")]
                    assert isinstance(chunks[-1], arl.RunResult)
                    assert chunks[-1].stdout == "streamed\n"
                async with await sb.open_session("shell") as sh:
                    out = (await sh.run("echo $((6 * 7))")).stdout
                steps = await sb.trajectory()
                return value, out, [s["action"] for s in steps]

    value, out, actions = asyncio.run(main())
    assert (value, out) == ("120", "42\n")
    assert actions.count("session_run") == 4
