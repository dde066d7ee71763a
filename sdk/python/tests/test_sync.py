"""Every method of the synchronous client against a real daemon."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

import arl


def test_health_and_pools(client: arl.Client) -> None:
    assert client.healthy()
    assert client.ready()
    pools = {p.name: p for p in client.pools()}
    assert "default" in pools
    p = pools["default"]
    assert p.spec.max == 96
    assert p.status.ready
    assert p.endpoint == client.endpoints[0]
    assert client.pool("default").name == "default"
    with pytest.raises(arl.PoolNotFound):
        client.pool("no-such-pool")


def test_exec_argv_and_shell(sb: arl.Sandbox) -> None:
    r = sb.exec(["echo", "hello"])
    assert r == arl.ExecResult("hello\n", "", 0, r.duration, False, False, None)
    assert r.ok and r.duration > 0
    r = sb.exec("echo out; echo err >&2; exit 3")
    assert (r.stdout, r.stderr, r.exit_code, r.ok) == ("out\n", "err\n", 3, False)


def test_exec_env_cwd_stdin(sb: arl.Sandbox) -> None:
    assert sb.exec("echo $FOO", env={"FOO": "bar"}).stdout == "bar\n"
    sb.exec(["mkdir", "-p", "sub/dir"])
    assert sb.exec(["pwd"], cwd="/workspace/sub/dir").stdout == "/workspace/sub/dir\n"
    assert sb.exec(["pwd"]).stdout == "/workspace\n"
    assert sb.exec(["cat"], stdin="text in").stdout == "text in"
    r = sb.exec(["python3", "-c", "import sys; print(sys.stdin.buffer.read().hex())"], stdin=b"\x00\xff")
    assert r.stdout == "00ff\n"


def test_exec_nonzero_exit_is_data(sb: arl.Sandbox) -> None:
    r = sb.exec(["false"])
    assert r.exit_code == 1 and not r.timed_out


def test_exec_timeout(sb: arl.Sandbox) -> None:
    r = sb.exec(["sleep", "10"], timeout=0.3)
    assert r.timed_out and not r.ok
    assert r.duration < 5
    with pytest.raises(arl.ExecTimeout) as ei:
        sb.exec(["sleep", "10"], timeout=0.3, raise_on_timeout=True)
    assert ei.value.result is not None and ei.value.result.timed_out
    assert isinstance(ei.value, arl.ArlError) and isinstance(ei.value, TimeoutError)


def test_exec_signal_and_truncation(sb: arl.Sandbox) -> None:
    r = sb.exec("kill -9 $$")
    assert r.exit_code == 137 and r.signal == 9
    r = sb.exec(["python3", "-c", "print('x' * 5000)"], max_output_bytes=100)
    assert r.truncated and len(r.stdout) <= 100


def test_exec_request_id_runs_once(sb: arl.Sandbox) -> None:
    cmd = "echo x >> count; wc -l < count"
    a = sb.exec(cmd, request_id="rid-once-1")
    b = sb.exec(cmd, request_id="rid-once-1")
    assert a.stdout.strip() == "1" and b.stdout.strip() == "1"
    assert sb.exec(cmd).stdout.strip() == "2"


def test_stream(sb: arl.Sandbox) -> None:
    items = list(sb.stream("echo one; sleep 0.2; echo two >&2; sleep 0.2; echo three; exit 4"))
    chunks = [i for i in items if isinstance(i, arl.OutputChunk)]
    result = items[-1]
    assert isinstance(result, arl.ExecResult)
    assert all(isinstance(i, arl.OutputChunk) for i in items[:-1])
    assert "".join(c.data for c in chunks if c.stream == "stdout") == "one\nthree\n"
    assert "".join(c.data for c in chunks if c.stream == "stderr") == "two\n"
    assert result.exit_code == 4
    assert result.stdout == "one\nthree\n" and result.stderr == "two\n"
    assert len(chunks) >= 3  # output arrived in pieces, not as one blob


def test_stream_timeout(sb: arl.Sandbox) -> None:
    items = list(sb.stream(["sleep", "10"], timeout=0.3))
    assert isinstance(items[-1], arl.ExecResult) and items[-1].timed_out
    with pytest.raises(arl.ExecTimeout):
        list(sb.stream(["sleep", "10"], timeout=0.3, raise_on_timeout=True))


def test_write_files_and_read(sb: arl.Sandbox) -> None:
    infos = sb.write_files({"a.txt": "héllo", "bin/b.bin": b"\x00\x01\x02", "/tmp/t.txt": "tmp"})
    assert len(infos) == 3
    by_size = sorted(i.size for i in infos)
    assert by_size == [3, 3, 6]
    assert sb.read_file("a.txt") == "héllo".encode()
    assert sb.read_file("/workspace/bin/b.bin") == b"\x00\x01\x02"
    assert sb.read_text("/tmp/t.txt") == "tmp"
    infos = sb.write_files({"run.sh": "#!/bin/sh\necho ran\n"}, mode=0o755)
    assert sb.exec(["./run.sh"]).stdout == "ran\n"


def test_write_file_read_delete(sb: arl.Sandbox) -> None:
    info = sb.write_file("w/one.txt", "payload")
    assert info.size == 7 and info.sha256 == hashlib.sha256(b"payload").hexdigest()
    assert info.path.endswith("w/one.txt")
    assert sb.read_file("w/one.txt") == b"payload"
    sb.write_file("x.sh", b"#!/bin/sh\necho x\n", mode=0o755)
    assert sb.exec(["./x.sh"]).stdout == "x\n"
    sb.delete_file("w/one.txt")
    with pytest.raises(arl.RemoteFileNotFound):
        sb.read_file("w/one.txt")
    with pytest.raises(FileNotFoundError):
        sb.read_file("w/one.txt")
    with pytest.raises(arl.RemoteFileNotFound):
        sb.read_file("sandbox-notes.txt")  # a file name mentioning "sandbox" is still a file
    sb.delete_file("w/one.txt", missing_ok=True)
    with pytest.raises(arl.NotFound):
        sb.delete_file("w/one.txt")


def test_upload_download_streaming(sb: arl.Sandbox, tmp_path: Path) -> None:
    src = tmp_path / "big.bin"
    size = 8 * 1024 * 1024 + 123
    with open(src, "wb") as f:
        for _ in range(size // 65536):
            f.write(os.urandom(65536))
        f.write(os.urandom(size % 65536))
    os.chmod(src, 0o750)
    info = sb.upload(src, "data/big.bin")
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    assert info.size == size and info.sha256 == digest
    assert sb.exec(["stat", "-c", "%a", "data/big.bin"]).stdout.strip() == "750"
    assert sb.exec(["sha256sum", "data/big.bin"]).stdout.split()[0] == digest
    dst = tmp_path / "out" / "big.bin"
    n = sb.download("data/big.bin", dst)
    assert n == size and hashlib.sha256(dst.read_bytes()).hexdigest() == digest
    chunks = list(sb.iter_file("data/big.bin", chunk_size=1 << 20))
    assert len(chunks) > 1 and sum(map(len, chunks)) == size
    with pytest.raises(arl.RemoteFileNotFound):
        sb.download("nope.bin", tmp_path / "nope.bin")
    assert not (tmp_path / "nope.bin").exists()


def test_file_object_upload(sb: arl.Sandbox, tmp_path: Path) -> None:
    p = tmp_path / "f.txt"
    p.write_bytes(b"abc" * 1000)
    with open(p, "rb") as f:
        info = sb.write_file("f.txt", f)
    assert info.size == 3000
    assert sb.read_file("f.txt") == b"abc" * 1000


def test_path_refused(sb: arl.Sandbox) -> None:
    with pytest.raises(arl.PathRefused) as ei:
        sb.write_file("../../etc/evil", "x")
    assert ei.value.status == 400 and ei.value.code == "path_refused"
    with pytest.raises(arl.PathRefused):
        sb.write_files({"../escape.txt": "x"})
    sb.exec(["ln", "-s", "/etc", "link"])
    with pytest.raises(arl.PathRefused):
        sb.write_file("link/evil", "x")


def test_checksum_mismatch(sb: arl.Sandbox) -> None:
    from arl._common import file_query

    with pytest.raises(arl.ChecksumMismatch) as ei:
        sb._t.request(sb._ep, "PUT", sb._base + "/files" + file_query("c.txt", sha256="0" * 64), b"data", context="file")
    assert ei.value.code == "checksum_mismatch" and ei.value.status == 400


def test_bad_request(sb: arl.Sandbox) -> None:
    with pytest.raises(arl.BadRequest) as ei:
        sb._t.request_json(sb._ep, "POST", sb._exec_path, b'{"nonsense": true}', context="sandbox")
    assert ei.value.status == 400
    with pytest.raises(ValueError):
        sb.exec([])


def test_reset(sb: arl.Sandbox) -> None:
    sb.write_files({"keep.txt": "x", "/tmp/t": "y"})
    sb.exec("sleep 100 >/dev/null 2>&1 &")
    info = sb.reset()
    assert info.id == sb.id
    with pytest.raises(arl.RemoteFileNotFound):
        sb.read_file("keep.txt")
    with pytest.raises(arl.RemoteFileNotFound):
        sb.read_file("/tmp/t")
    r = sb.exec("ps -eo comm | grep -c '^sleep$' || true")
    assert r.stdout.strip() == "0"
    assert sb.exec(["echo", "after"]).stdout == "after\n"


def test_pause_thaws_on_the_next_call(client: arl.Client, sb: arl.Sandbox) -> None:
    sb.write_files({"/tmp/p": "kept"})
    assert sb.pause().id == sb.id
    sb.pause()  # idempotent
    assert client.pool("default").status.paused == 1
    # Any call that needs the sandbox thaws it first, transparently.
    assert sb.exec("cat /tmp/p").stdout == "kept"
    assert client.pool("default").status.paused == 0
    sb.pause()
    assert sb.resume().id == sb.id
    sb.resume()
    assert client.pool("default").status.paused == 0


def test_auto_pause_option(client: arl.Client) -> None:
    info = client.put_pool("auto-pause-pool", min_idle=0, max=1, auto_pause_after_seconds=60)
    try:
        assert info.spec.auto_pause_after_seconds == 60
        assert client.pool("auto-pause-pool").spec.auto_pause_after_seconds == 60
        with pytest.raises(arl.BadRequest):
            client.put_pool("auto-pause-pool", min_idle=0, max=1, auto_pause_after_seconds=0)
    finally:
        client.delete_pool("auto-pause-pool", missing_ok=True)


def test_snapshot_and_fork(client: arl.Client, sb: arl.Sandbox) -> None:
    sb.write_files({"state.txt": "parent"})
    snap = sb.snapshot()
    assert isinstance(snap, arl.SnapshotInfo)
    assert snap.id.startswith("snap-") and snap.sandbox == sb.id and snap.pool == "default"
    assert snap.bytes > 0 and snap.endpoint == sb.endpoint
    assert snap.id in {s.id for s in client.snapshots()}
    with client.fork(snap, 2, env={"FORKED": "yes"}, labels={"branch": "b"}) as forks:
        assert len(forks) == 2 and len({f.id for f in forks}) == 2
        for f in forks:
            assert f.read_file("state.txt") == b"parent"
            assert f.exec("echo $FORKED").stdout == "yes\n"
            assert f.info.labels.get("branch") == "b"
        forks[0].write_files({"state.txt": "child"})
        assert forks[1].read_file("state.txt") == b"parent"
        assert sb.read_file("state.txt") == b"parent"
        assert next(s for s in client.snapshots() if s.id == snap.id).forks == 2
        # In use: refused while its forks live.
        with pytest.raises(arl.ArlError) as ei:
            client.delete_snapshot(snap)
        assert ei.value.status == 409 and ei.value.code == "conflict"
    client.delete_snapshot(snap)
    assert snap.id not in {s.id for s in client.snapshots()}
    client.delete_snapshot(snap, missing_ok=True)
    with pytest.raises(arl.NotFound):
        client.delete_snapshot(snap)
    # Straight from the live sandbox: the snapshot on the way is not listed.
    with sb.fork() as live:
        assert len(live) == 1 and live[0].read_file("state.txt") == b"parent"
        assert client.snapshots() == []
    with pytest.raises(arl.BadRequest):
        sb.fork(0)


def test_release_and_context_manager(client: arl.Client) -> None:
    with client.sandbox("default") as sb:
        sid = sb.id
        assert sb.info.pool == "default" and sb.workspace == "/workspace"
        assert any(s.id == sid for s in client.sandboxes())
        assert sb.refresh().id == sid
    assert sb.released
    assert not any(s.id == sid for s in client.sandboxes())
    with pytest.raises(arl.SandboxNotFound):
        sb.exec(["true"])
    sb.release()  # idempotent
    with pytest.raises(arl.SandboxNotFound):
        client.attach(sid)


def test_context_manager_releases_on_error(client: arl.Client) -> None:
    with pytest.raises(ZeroDivisionError):
        with client.sandbox("default") as sb:
            sid = sb.id
            raise ZeroDivisionError
    assert not any(s.id == sid for s in client.sandboxes())


def test_attach(client: arl.Client) -> None:
    with client.sandbox("default") as sb:
        sb.write_files({"f": "1"})
        other = client.attach(sb.id)
        assert other.id == sb.id and other.endpoint == sb.endpoint
        assert other.read_file("f") == b"1"


def test_acquire_env_labels_ttl(client: arl.Client) -> None:
    with client.sandbox("default", env={"ACQ": "yes"}, ttl=120, labels={"episode": "7"}) as sb:
        assert sb.exec("echo $ACQ").stdout == "yes\n"
        assert sb.info.labels.get("episode") == "7"
        assert sb.info.expires_at_ms is not None and sb.info.expires_at_ms > sb.info.acquired_at_ms


def test_acquire_many(client: arl.Client) -> None:
    with client.acquire_many("default", 3) as sbs:
        assert len(sbs) == 3 and len({s.id for s in sbs}) == 3
        for s in sbs:
            assert s.exec(["echo", s.id]).stdout == s.id + "\n"
        ids = {s.id for s in sbs}
    live = {s.id for s in client.sandboxes()}
    assert not (ids & live)


def test_pool_crud(client: arl.Client) -> None:
    name = "crud-pool"
    info = client.put_pool(name, arl.PoolSpec(min_idle=1, max=3, memory_mb=256))
    assert info.name == name and info.spec.max == 3 and info.spec.memory_mb == 256
    info = client.put_pool(name, min_idle=0, max=2)
    assert info.spec.max == 2
    assert any(p.name == name for p in client.pools())
    with client.sandbox(name) as s:
        assert s.pool == name
        assert s.exec(["true"]).exit_code == 0
    client.delete_pool(name)
    assert not any(p.name == name for p in client.pools())
    with pytest.raises(arl.PoolNotFound):
        client.sandbox(name)
    client.delete_pool(name, missing_ok=True)
    with pytest.raises(arl.BadRequest):
        client.put_pool("bad-pool", min_idle=5, max=1)


def test_pool_exhausted(client: arl.Client) -> None:
    with client.sandbox("tiny") as first:
        with pytest.raises(arl.PoolExhausted) as ei:
            client.sandbox("tiny")
        e = ei.value
        assert e.retryable and e.status == 503 and e.code == "pool_exhausted"
        assert isinstance(e.alternatives, list)
        assert first.exec(["true"]).ok


def test_pool_max_respected_with_count(client: arl.Client) -> None:
    deadline = time.monotonic() + 20
    while client.pool("tiny").status.idle < 1:  # its one sandbox is warm
        assert time.monotonic() < deadline
        time.sleep(0.02)
    with pytest.raises(arl.PoolExhausted):
        sbs = client.acquire_many("tiny", 2)
        sbs.release_all()


def test_unknown_pool(client: arl.Client) -> None:
    with pytest.raises(arl.PoolNotFound) as ei:
        client.sandbox("nope-pool")
    assert ei.value.status == 404 and isinstance(ei.value, arl.NotFound)


def test_unknown_sandbox(client: arl.Client) -> None:
    with pytest.raises(arl.SandboxNotFound):
        client.attach("sb-does-not-exist")
    fake = arl.Sandbox(client, client._cfg.endpoints[0], arl.SandboxInfo(id="sb-does-not-exist", pool="default"))
    with pytest.raises(arl.SandboxNotFound):
        fake.exec(["true"])
    with pytest.raises(arl.SandboxNotFound):
        fake.read_file("x")
    fake.release()  # already gone counts as released


def test_unreachable_endpoint() -> None:
    from conftest import free_port

    c = arl.Client(f"http://127.0.0.1:{free_port()}", retry_timeout=0.3)
    with pytest.raises(arl.InfraError) as ei:
        c.sandbox("default")
    assert ei.value.retryable and ei.value.status is None and ei.value.code == "connection_failed"
    assert not c.healthy()


def test_threads_share_a_client(client: arl.Client) -> None:
    from concurrent.futures import ThreadPoolExecutor

    def episode(i: int) -> str:
        with client.sandbox("default") as s:
            return s.exec(["echo", str(i)]).stdout

    with ThreadPoolExecutor(8) as ex:
        out = list(ex.map(episode, range(16)))
    assert out == [f"{i}\n" for i in range(16)]


def test_env_configuration(daemon, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("ARL_ENDPOINTS", daemon.url)
    monkeypatch.delenv("ARL_TOKEN", raising=False)
    monkeypatch.delenv("ARL_NODE_IP", raising=False)
    with arl.Client() as c:
        assert c.endpoints == [daemon.url]
        with c.sandbox() as s:
            assert s.exec(["true"]).ok


def test_fork_safe(client: arl.Client) -> None:
    with client.sandbox("default") as sb:
        assert sb.exec(["true"]).ok  # a pooled keep-alive connection now exists
        pid = os.fork()
        if pid == 0:  # child: must open its own connection
            code = 0
            try:
                code = 0 if sb.exec(["echo", "child"]).stdout == "child\n" else 1
            except BaseException:
                code = 2
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert sb.exec(["echo", "parent"]).stdout == "parent\n"  # the parent's connection is intact


def test_concurrent_execs_in_one_sandbox(sb: arl.Sandbox) -> None:
    from concurrent.futures import ThreadPoolExecutor

    def run(i: int) -> str:
        return sb.exec(["echo", str(i)]).stdout

    with ThreadPoolExecutor(4) as ex:
        out = list(ex.map(run, range(100)))
    assert out == [f"{i}\n" for i in range(100)]
