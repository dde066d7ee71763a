"""The real PyPI `e2b` SDK (sync and async clients) against a real `arl node`."""

from __future__ import annotations

import asyncio
import http.client
import threading

import pytest
from e2b import (
    AsyncSandbox,
    AuthenticationException,
    CommandExitException,
    NotFoundException,
    Sandbox,
    SandboxException,
    TimeoutException,
)
from e2b.sandbox.sandbox_api import SandboxQuery

try:
    from e2b import FileNotFoundException
except ImportError:  # older generations (2.7) raise the plain NotFoundException for a missing file
    FileNotFoundException = NotFoundException

from conftest import Node, sdk_below


@pytest.fixture
def sbx(node: Node):
    sandbox = Sandbox.create(template="work", timeout=120)
    try:
        yield sandbox
    finally:
        sandbox.kill()


def test_create_with_template_envs_metadata_and_info(node: Node) -> None:
    tag = "t" + node.key[-8:]
    sandbox = Sandbox.create(envs={"FROM_CREATE": "yes"}, metadata={"run": tag}, timeout=60)
    try:
        assert sandbox.sandbox_id.isalnum() and sandbox.sandbox_id.islower()
        # `base` maps to the default pool: its env applies, under the sandbox's own.
        out = sandbox.commands.run("echo $FROM_CREATE $POOL_VAR")
        assert out.stdout == "yes from-pool\n"
        info = sandbox.get_info()
        assert info.sandbox_id == sandbox.sandbox_id
        assert info.template_id == "base"
        assert info.metadata == {"run": tag}
        assert sandbox.is_running()
        listed = Sandbox.list(query=SandboxQuery(metadata={"run": tag})).next_items()
        assert [s.sandbox_id for s in listed] == [sandbox.sandbox_id]
    finally:
        assert sandbox.kill() is True
    assert Sandbox.list(query=SandboxQuery(metadata={"run": tag})).next_items() == []
    assert not sandbox.is_running()
    # Killing it again: it is gone.
    assert Sandbox.kill(sandbox.sandbox_id) is False


def test_unknown_template_is_a_clean_error(node: Node) -> None:
    with pytest.raises(SandboxException, match="template"):
        Sandbox.create(template="no-such-pool")


def test_foreground_commands(sbx: Sandbox) -> None:
    r = sbx.commands.run("echo out; echo err >&2")
    assert (r.stdout, r.stderr, r.exit_code) == ("out\n", "err\n", 0)
    with pytest.raises(CommandExitException) as e:
        sbx.commands.run("echo partial; exit 3")
    assert e.value.exit_code == 3
    assert e.value.stdout == "partial\n"
    r = sbx.commands.run("pwd; echo $A", cwd="/tmp", envs={"A": "b c"})
    assert r.stdout == "/tmp\nb c\n"
    # Default working directory (the sandbox's home) and a large output.
    r = sbx.commands.run("pwd; head -c 3000000 /dev/zero | tr '\\0' x")
    assert r.stdout.startswith("/workspace\n")
    assert len(r.stdout) == len("/workspace\n") + 3_000_000


def test_command_timeout(sbx: Sandbox) -> None:
    with pytest.raises(TimeoutException):
        sbx.commands.run("sleep 30", timeout=1)


def test_background_commands_stream_wait_and_kill(sbx: Sandbox) -> None:
    seen: list[str] = []
    first_line = threading.Event()

    def on_stdout(line: str) -> None:
        seen.append(line)
        first_line.set()

    handle = sbx.commands.run("echo one; sleep 60", background=True)
    assert handle.pid > 1
    assert handle.pid in [p.pid for p in sbx.commands.list()]
    # The sync handle calls back while it is waited on: wait in a thread, kill once the
    # first line has streamed in (the command itself would run for a minute).
    outcome: list[BaseException] = []

    def wait() -> None:
        try:
            handle.wait(on_stdout=on_stdout)
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            outcome.append(e)

    waiter = threading.Thread(target=wait)
    waiter.start()
    assert first_line.wait(20), "no output streamed"
    assert handle.kill() is True
    waiter.join(20)
    assert not waiter.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], CommandExitException), outcome
    assert "".join(seen) == "one\n"
    assert handle.pid not in [p.pid for p in sbx.commands.list()]
    # A background command that finishes on its own.
    done = sbx.commands.run("sleep 0.2; echo two", background=True)
    result = done.wait()
    assert (result.stdout, result.exit_code) == ("two\n", 0)
    # Killing a process that no longer exists says so.
    assert sbx.commands.kill(done.pid) is False


def test_connect_to_a_running_command(sbx: Sandbox) -> None:
    handle = sbx.commands.run("sleep 0.5; echo late", background=True)
    again = sbx.commands.connect(handle.pid)
    assert again.wait().stdout == "late\n"


def test_files(sbx: Sandbox) -> None:
    sbx.files.write("notes/hello.txt", "hello e2b")
    assert sbx.files.read("notes/hello.txt") == "hello e2b"
    assert sbx.commands.run("cat /workspace/notes/hello.txt").stdout == "hello e2b"
    blob = bytes(range(256)) * 4
    sbx.files.write("/tmp/blob.bin", blob)
    assert bytes(sbx.files.read("/tmp/blob.bin", format="bytes")) == blob
    big = b"0123456789abcdef" * (1 << 20)  # 16 MiB
    sbx.files.write("big.bin", big)
    assert bytes(sbx.files.read("big.bin", format="bytes")) == big
    assert sbx.files.exists("notes/hello.txt")
    assert not sbx.files.exists("notes/missing.txt")
    names = sorted(e.name for e in sbx.files.list("notes"))
    assert names == ["hello.txt"]
    assert sbx.files.make_dir("a/b/c") is True
    assert sbx.files.make_dir("a/b/c") is False
    sbx.files.rename("notes/hello.txt", "a/b/c/moved.txt")
    assert sbx.files.read("a/b/c/moved.txt") == "hello e2b"
    info = sbx.files.get_info("a/b/c/moved.txt")
    assert (info.name, info.size) == ("moved.txt", 9)
    deep = sorted(e.path for e in sbx.files.list("a", depth=3))
    assert deep == ["/workspace/a/b", "/workspace/a/b/c", "/workspace/a/b/c/moved.txt"]
    sbx.files.remove("a")
    assert not sbx.files.exists("a/b/c/moved.txt")
    with pytest.raises(FileNotFoundException):
        sbx.files.read("a/b/c/moved.txt")


def test_timeout_list_and_kill(node: Node, sbx: Sandbox) -> None:
    sbx.set_timeout(30)
    end = sbx.get_info().end_at
    sbx.set_timeout(600)
    assert (sbx.get_info().end_at - end).total_seconds() > 500
    ids = [s.sandbox_id for s in Sandbox.list().next_items()]
    assert sbx.sandbox_id in ids


def test_connect_by_id(sbx: Sandbox) -> None:
    again = Sandbox.connect(sbx.sandbox_id)
    if sdk_below("2.26.0"):
        # Before e2b 2.26 a connected Sandbox leaves out the E2b-Sandbox-Id/-Port headers, so
        # its envd calls to the one E2B_SANDBOX_URL cannot be routed: a clean error, no answer
        # from the wrong place.
        with pytest.raises(SandboxException, match="unimplemented"):
            again.commands.run("echo connected")
        return
    assert again.commands.run("echo connected").stdout == "connected\n"


def test_unsupported_calls_are_clean_sdk_errors(sbx: Sandbox) -> None:
    # Control plane: pause is not served (501 → SandboxException, no retries); e2b 2.7 says beta_pause.
    with pytest.raises(SandboxException, match="not supported"):
        (sbx.pause if hasattr(sbx, "pause") else sbx.beta_pause)()
    # envd: writing to a running process's stdin is refused as `unimplemented`.
    handle = sbx.commands.run("sleep 30", background=True)
    try:
        with pytest.raises(SandboxException, match="(?i)unimplemented"):
            sbx.commands.send_stdin(handle.pid, "data")
    finally:
        handle.kill()


def test_two_keys_cannot_touch_each_others_sandboxes(node: Node, sbx: Sandbox) -> None:
    other = {"api_key": node.other_key}
    assert Sandbox.kill(sbx.sandbox_id, **other) is False
    with pytest.raises(NotFoundException):
        Sandbox.get_info(sbx.sandbox_id, **other)
    assert sbx.sandbox_id not in [s.sandbox_id for s in Sandbox.list(**other).next_items()]
    # envd traffic needs the sandbox's own access token.
    conn = http.client.HTTPConnection("127.0.0.1", node.e2b_port, timeout=10)
    conn.request(
        "POST", "/filesystem.Filesystem/Stat", body=b'{"path":"/"}',
        headers={"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": "49983",
                 "X-Access-Token": "not-the-token", "Content-Type": "application/json"},
    )
    assert conn.getresponse().status == 401
    conn.close()
    assert sbx.commands.run("echo still mine").stdout == "still mine\n"
    # A wrong key is refused outright.
    with pytest.raises(AuthenticationException):
        Sandbox.create(api_key="e2b_" + "0" * 40)


# SDKs 2.7 to 2.26 send this control-plane call with the E2b-Sandbox-Id/-Port headers too.
def test_connect_with_another_key_is_not_found(node: Node, sbx: Sandbox) -> None:
    with pytest.raises(NotFoundException):
        Sandbox.connect(sbx.sandbox_id, api_key=node.other_key)


def test_async_sandbox(node: Node) -> None:
    async def scenario() -> None:
        sandbox = await AsyncSandbox.create(template="work", envs={"X": "1"}, timeout=60)
        try:
            r = await sandbox.commands.run("echo $X; echo e >&2")
            assert (r.stdout, r.stderr) == ("1\n", "e\n")
            with pytest.raises(CommandExitException):
                await sandbox.commands.run("exit 4")
            chunks: list[str] = []
            streamed = asyncio.Event()

            def on_stdout(line: str) -> None:
                chunks.append(line)
                streamed.set()

            handle = await sandbox.commands.run(
                "echo bg; sleep 60", background=True, on_stdout=on_stdout
            )
            await asyncio.wait_for(streamed.wait(), 20)
            assert await handle.kill() is True
            with pytest.raises(CommandExitException):
                await handle.wait()
            assert chunks == ["bg\n"]
            await sandbox.files.write("x/y.txt", "async")
            assert await sandbox.files.read("x/y.txt") == "async"
            assert await sandbox.files.exists("x/y.txt")
            assert [e.name for e in await sandbox.files.list("x")] == ["y.txt"]
            await sandbox.files.rename("x/y.txt", "x/z.txt")
            await sandbox.files.remove("x/z.txt")
            assert not await sandbox.files.exists("x/z.txt")
            await sandbox.set_timeout(90)
            listed = await AsyncSandbox.list().next_items()
            assert sandbox.sandbox_id in [s.sandbox_id for s in listed]
        finally:
            assert await sandbox.kill() is True
        assert not await sandbox.is_running()

    asyncio.run(asyncio.wait_for(scenario(), 120))


def test_an_answer_before_the_body_leaves_the_connection_usable(node: Node) -> None:
    # A request the node refuses without needing its body (connect to an unknown sandbox),
    # whose body comes late in a write of its own: the connection must stay usable, or a
    # client that reuses it sees "server disconnected" (older SDKs do not retry).
    import socket
    import time

    body = b'{"timeout": 300}'
    head = (
        f"POST /sandboxes/0123456789abcdef/connect HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"X-API-Key: {node.key}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    again = f"GET /v2/sandboxes HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: {node.key}\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", node.e2b_port), timeout=10) as s:
        s.sendall(head)
        time.sleep(0.1)  # the body arrives after the head has been read and routed
        s.sendall(body)
        s.sendall(again)
        received = b""
        while received.count(b"HTTP/1.1 ") < 2:
            chunk = s.recv(65536)
            assert chunk, f"the node closed the connection: {received!r}"
            received += chunk
    first, second = received.split(b"HTTP/1.1 ")[1:3]
    assert first.startswith(b"404"), received
    assert second.startswith(b"200"), received
