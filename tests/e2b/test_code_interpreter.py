"""The real PyPI `e2b-code-interpreter` SDK against a real `arl node`: `run_code` on the
node's persistent Python (and shell) sessions, streamed output, results, errors, contexts."""

from __future__ import annotations

import asyncio
import http.client
import time

import pytest
from e2b import NotFoundException, SandboxException
from e2b_code_interpreter import AsyncSandbox, Sandbox

from conftest import Node


@pytest.fixture
def code(node: Node):
    # E2B's code-interpreter template maps to the node's default pool.
    sandbox = Sandbox.create(timeout=120)
    try:
        yield sandbox
    finally:
        sandbox.kill()


def test_state_persists_and_results_errors_and_counts_come_back(code: Sandbox) -> None:
    first = code.run_code("x = 41\nprint('hello')\nx + 1")
    assert first.logs.stdout == ["hello\n"]
    assert first.text == "42"
    assert first.error is None
    second = code.run_code("import sys\nprint('warn', file=sys.stderr)\nx * 2")
    assert (second.text, second.logs.stderr) == ("82", ["warn\n"])
    assert second.execution_count == first.execution_count + 1
    failed = code.run_code("1 / 0")
    assert failed.error is not None
    assert failed.error.name == "ZeroDivisionError"
    assert "division by zero" in failed.error.value
    assert "ZeroDivisionError" in failed.error.traceback
    assert failed.results == []
    # A statement has no value, so no result.
    assert code.run_code("y = 1").results == []


def test_rich_results_fill_the_sdks_formats(code: Sandbox) -> None:
    r = code.run_code(
        "class Table:\n"
        "    def _repr_html_(self): return '<table></table>'\n"
        "    def __repr__(self): return 'Table()'\n"
        "Table()"
    )
    [result] = r.results
    assert result.is_main_result
    assert result.html == "<table></table>"
    assert result.text == "Table()"
    assert "html" in list(result.formats())


def test_output_streams_to_callbacks_as_it_is_produced(code: Sandbox) -> None:
    seen: list[tuple[float, str]] = []
    started = time.monotonic()
    code.run_code(
        "import time\nprint('a', flush=True)\ntime.sleep(0.5)\nprint('b', flush=True)",
        on_stdout=lambda m: seen.append((time.monotonic() - started, m.line)),
    )
    assert [line for _, line in seen] == ["a\n", "b\n"]
    assert seen[1][0] - seen[0][0] >= 0.4, f"streamed, not batched: {seen}"


def test_envs_last_for_one_execution(code: Sandbox) -> None:
    r = code.run_code("import os\nos.environ.get('RUN_VAR')", envs={"RUN_VAR": "it's set"})
    assert r.text == "\"it's set\""
    assert code.run_code("os.environ.get('RUN_VAR')").results == []
    # The pool's environment reaches the interpreter too.
    assert code.run_code("os.environ.get('POOL_VAR')").text == "'from-pool'"


def test_a_timeout_interrupts_and_the_context_lives_on(code: Sandbox) -> None:
    code.run_code("kept = 'yes'")
    with pytest.raises(Exception, match="(?i)timeout"):
        code.run_code("import time\nwhile True: time.sleep(0.05)", timeout=1)
    # The client's timeout interrupted the loop; the next execution waits for it, not 24 h.
    r = code.run_code("kept", timeout=30)
    assert r.text == "'yes'"


def test_contexts_are_separate_interpreters(code: Sandbox) -> None:
    ctx = code.create_code_context(cwd="/tmp")
    assert (ctx.language, ctx.cwd) == ("python", "/tmp")
    code.run_code("v = 'default'")
    code.run_code("v = 'mine'", context=ctx)
    assert code.run_code("v").text == "'default'"
    assert code.run_code("v", context=ctx).text == "'mine'"
    assert code.run_code("import os; os.getcwd()", context=ctx).text == "'/tmp'"
    assert ctx.id in [c.id for c in code.list_code_contexts()]
    code.restart_code_context(ctx)
    restarted = code.run_code("'v' in globals()", context=ctx)
    assert restarted.text == "False"
    code.remove_code_context(ctx)
    assert ctx.id not in [c.id for c in code.list_code_contexts()]
    with pytest.raises(NotFoundException):
        code.run_code("1", context=ctx)


def test_bash_runs_in_a_shell_session(code: Sandbox) -> None:
    r = code.run_code("cd /tmp && export K=v && echo $PWD", language="bash")
    assert r.logs.stdout == ["/tmp\n"]
    assert code.run_code("echo $K $PWD", language="bash").logs.stdout == ["v /tmp\n"]
    failed = code.run_code("exit_status() { return 3; }; exit_status", language="bash")
    assert failed.error is not None and failed.error.value == "3"


def test_unsupported_languages_and_bad_requests_are_clean_errors(node: Node, code: Sandbox) -> None:
    with pytest.raises(SandboxException, match="501.*javascript"):
        code.run_code("1", language="javascript")
    headers = {"E2b-Sandbox-Id": code.sandbox_id, "E2b-Sandbox-Port": "49999",
               "Content-Type": "application/json"}

    def post(path: str, body: bytes, token: str | None) -> tuple[int, str]:
        conn = http.client.HTTPConnection("127.0.0.1", node.e2b_port, timeout=10)
        try:
            conn.request("POST", path, body=body,
                         headers={**headers, **({"X-Access-Token": token} if token else {})})
            r = conn.getresponse()
            return r.status, r.read().decode()
        finally:
            conn.close()

    # `/execute` needs the sandbox's access token; a wrong one is refused everywhere.
    assert post("/execute", b'{"code": "1"}', None)[0] == 401
    assert post("/contexts", b"{}", "not-the-token")[0] == 401
    token = code._envd_access_token
    assert post("/execute", b"{not json", token)[0] == 400
    status, body = post("/execute", b'{"code": "1", "context_id": "nope"}', token)
    assert (status, "nope" in body) == (404, True)
    assert post("/execute", b'{"code": "1", "context_id": "x", "language": "python"}', token)[0] == 400
    assert post("/execute", b'{"code": "1", "env_vars": {"1BAD": "x"}}', token)[0] == 400
    assert post("/execute", b'{"code": "a\\u0000b"}', token)[0] == 400
    # None of it hurt the default context.
    assert code.run_code("40 + 2").text == "42"


def test_async_run_code(node: Node) -> None:
    async def scenario() -> None:
        sandbox = await AsyncSandbox.create(timeout=60)
        try:
            out: list[str] = []
            r = await sandbox.run_code("n = 6\nprint(n)\nn * 7", on_stdout=lambda m: out.append(m.line))
            assert (r.text, out) == ("42", ["6\n"])
            ctx = await sandbox.create_code_context()
            await sandbox.run_code("n = 0", context=ctx)
            assert (await sandbox.run_code("n")).text == "6"
        finally:
            await sandbox.kill()

    asyncio.run(asyncio.wait_for(scenario(), 120))
