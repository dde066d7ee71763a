"""The original ARL-Infra SDK's documented examples, run through the facade."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

import arl
from arl import (
    AsyncSandboxSession,
    Command,
    FilePatch,
    ResourceRequirements,
    SandboxSession,
    WarmPoolManager,
)

from conftest import Daemon


def test_basic_example(daemon: Daemon, capsys: pytest.CaptureFixture[str]) -> None:
    with SandboxSession(image="python:3.12", gateway_url=daemon.url) as session:
        result = session.execute([{"name": "hello", "command": ["echo", "Hello, World!"]}])
        print(result.results[0].output.stdout)
        sid = session.session_id
    assert capsys.readouterr().out == "Hello, World!\n\n"
    assert result.results[0].output.exit_code == 0
    assert result.session_id == sid
    with arl.Client(daemon.url) as c:
        assert not any(s.id == sid for s in c.sandboxes())  # deleted on exit


def test_persistent_session_attach(daemon: Daemon) -> None:
    s = SandboxSession(image="python:3.12", gateway_url=daemon.url)
    info = s.create_sandbox()
    assert info.id == s.session_id and info.status == "active"
    s.execute([{"name": "w", "command": ["sh", "-c", "echo kept > state.txt"]}])
    sid = s.session_id
    s.close()  # detach: the sandbox stays

    s2 = SandboxSession.attach(sid, gateway_url=daemon.url)
    r = s2.execute([{"name": "r", "command": ["cat", "state.txt"]}])
    assert r.results[0].output.stdout == "kept\n"
    with s2:
        pass  # attached sessions are not deleted by the context manager
    s3 = SandboxSession.attach(sid, gateway_url=daemon.url)
    s3.delete_sandbox()
    s3.close()
    with pytest.raises(arl.SandboxNotFound):
        SandboxSession.attach(sid, gateway_url=daemon.url)


def test_streaming_example(daemon: Daemon, capsys: pytest.CaptureFixture[str]) -> None:
    with SandboxSession(image="python:3.12", gateway_url=daemon.url) as s:
        r = s.execute(
            [{"name": "loop", "command": ["sh", "-c", "for i in 1 2 3; do echo line $i; sleep 0.05; done"]}],
            on_output=lambda o, e: print(o or e, end=""),
        )
    assert capsys.readouterr().out == "line 1\nline 2\nline 3\n"
    assert r.results[0].output.stdout == "line 1\nline 2\nline 3\n"


def test_files_example(daemon: Daemon, tmp_path: Path) -> None:
    with SandboxSession(image="python:3.12", gateway_url=daemon.url) as s:
        up = s.upload_file("input.txt", "hello\n")
        assert up.bytes_written == 6 and up.path.endswith("input.txt")
        assert s.download_file("input.txt") == b"hello\n"
        s.upload_file("/workspace/raw.bin", b"\x00\x01")
        s.upload_file("chunks.txt", iter([b"a", b"b", b"c"]))
        assert s.download_file("chunks.txt") == b"abc"
        local = tmp_path / "local.txt"
        local.write_text("from disk\n")
        s.upload_path(str(local), "/workspace/copied.txt")
        s.download_path("/workspace/copied.txt", str(tmp_path / "sub" / "back.txt"))
        assert (tmp_path / "sub" / "back.txt").read_text() == "from disk\n"
        assert b"".join(s.iter_download("copied.txt", chunk_size=4)) == b"from disk\n"
        with pytest.raises(arl.ChecksumMismatch):
            s.upload_file("bad.txt", "x", sha256="0" * 64)


def test_steps_history_and_trajectory(daemon: Daemon) -> None:
    with SandboxSession(image="python:3.12", gateway_url=daemon.url) as s:
        r1 = s.execute([
            FilePatch(name="write", path="app.py", content="print('v1')\n"),
            Command(name="run", command=["python3", "app.py"]),
            {"name": "fail", "command": ["sh", "-c", "exit 2"]},
            {"name": "env", "command": ["sh", "-c", "echo $X; pwd"], "env": {"X": "1"}, "workDir": "/tmp"},
            {"name": "patch2", "type": "FilePatch", "path": "sub/f.txt", "content": "z", "workDir": "/workspace"},
        ])
        outs = [x.output for x in r1.results]
        assert [o.exit_code for o in outs] == [0, 0, 2, 0, 0]  # a failing step does not stop the rest
        assert outs[1].stdout == "v1\n" and outs[3].stdout == "1\n/tmp\n"
        assert r1.state == "Failed"
        snap = r1.results[1].snapshot_id
        assert snap == "1"
        r2 = s.execute([Command(name="again", command="cat sub/f.txt")], operation_id="op-1")
        assert r2.results[0].output.stdout == "z" and r2.results[0].index == 5
        assert s.execute([Command(name="again", command="cat sub/f.txt")], operation_id="op-1") is r2
        hist = s.get_history()
        assert [h.name for h in hist] == ["write", "run", "fail", "env", "patch2", "again"]
        lines = [json.loads(x) for x in s.export_trajectory().splitlines()]
        assert len(lines) == 6 and lines[1]["observation"]["stdout"] == "v1\n"
        with pytest.raises(arl.UnsupportedOperation):
            s.restore(snap)
        r3 = s.execute([Command(name="f", command=["false"]), Command(name="never", command=["true"])], stop_on_failure=True)
        assert len(r3.results) == 1
        r4 = s.execute([FilePatch(name="evil", path="../../etc/x", content="x")])
        assert r4.results[0].output.exit_code == 1 and "path_refused" in r4.results[0].output.stderr
        r5 = s.execute([{"name": "slow", "command": ["sleep", "5"], "timeout": "300ms"}])
        assert r5.results[0].timed_out


def test_warmpool_example(daemon: Daemon) -> None:
    manager = WarmPoolManager(gateway_url=daemon.url)
    info = manager.create_warmpool(
        name="python-pool",
        image="python:3.12",
        profile="python-pool",
        replicas=2,
        resources=ResourceRequirements(requests={"cpu": "250m", "memory": "256Mi"}, limits={"cpu": "500m", "memory": "512Mi"}),
    )
    assert info.name == "python-pool" and info.replicas == 2
    ready = manager.wait_for_ready("python-pool", timeout=30, poll_interval=0.05, min_ready=2)
    assert ready.ready_replicas >= 2
    node = arl.Client(daemon.url).pool("python-pool")
    assert node.spec.cpu_millis == 500 and node.spec.memory_mb == 512 and node.spec.min_idle == 2
    assert "python-pool" in [p.name for p in manager.list_warmpools()]
    assert manager.get_warmpool("python-pool").replicas == 2
    # The original's profile semantics: a session whose profile names the pool uses it.
    with SandboxSession(image="python:3.12", profile="python-pool", gateway_url=daemon.url) as s:
        assert s.sandbox.pool == "python-pool"
        assert s.execute([Command(name="py", command=["python3", "-c", "print(1+1)"])]).results[0].output.stdout == "2\n"
    # First-SDK style: the pool named positionally, with keep_alive and get_pool_status.
    s = SandboxSession("python-pool", gateway_url=daemon.url, keep_alive=True)
    with s:
        st = s.get_pool_status()
        assert st["allocated"] >= 1 and set(st) == {"total", "ready_idle", "allocated", "available"}
    assert s.session_id is not None  # keep_alive: not deleted
    s.delete_sandbox()
    assert manager.scale_warmpool("python-pool", 1).replicas == 1
    manager.delete_warmpool("python-pool")
    with pytest.raises(arl.NotFound):
        manager.get_warmpool("python-pool")
    with pytest.raises(TimeoutError):
        manager.create_warmpool(name="never-ready", replicas=0, max_replicas=1)
        manager.wait_for_ready("never-ready", timeout=0.3, poll_interval=0.05)
    manager.delete_warmpool("never-ready")
    manager.close()


def test_async_session(daemon: Daemon) -> None:
    async def main() -> None:
        async with AsyncSandboxSession(image="python:3.12", gateway_url=daemon.url) as s:
            seen: list[str] = []

            async def on_output(o: str, e: str) -> None:
                seen.append(o or e)

            r = await s.execute(
                [FilePatch(name="p", path="a.txt", content="A"), Command(name="c", command=["cat", "a.txt"])],
                on_output=on_output,
            )
            assert r.results[1].output.stdout == "A" and "".join(seen) == "A"
            up = await s.upload_file("b.txt", b"B")
            assert up.bytes_written == 1 and await s.download_file("b.txt") == b"B"
            assert len(await s.get_history()) == 2

    asyncio.run(main())
