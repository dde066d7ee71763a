"""The sync and asyncio clients behave alike (the sync one is generated from the other): the
same scenarios, with a fake node sending raw bytes, run through both flavours."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from rawnode import Close, RawNode, chunked, json_reply

import arl
from arl._async_transport import AsyncTransport
from arl._common import Endpoint
from arl._sync_transport import Transport
from arl.types import SandboxInfo

FLAVOURS = ["sync", "async"]
CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\ntransfer-encoding: chunked\r\n\r\n"


@pytest.fixture
def node(request: pytest.FixtureRequest) -> Iterator[RawNode]:
    n = RawNode(request.param)
    yield n
    n.close()


def replies(*r: Any) -> Any:
    return pytest.mark.parametrize("node", [list(r)], indirect=True)


def get(flavour: str, url: str, *, timeout: float = 5.0, lines: bool = False) -> tuple[int, dict[str, str], Any]:
    """GET /x through the flavour's transport: status, headers, and the body (or its lines)."""
    ep = Endpoint.parse(url)
    if flavour == "sync":
        t = Transport(None, retry_timeout=0.3)
        try:
            resp = t.open(ep, "GET", "/x", timeout=timeout)
            if lines:
                return resp.status, resp.headers, list(t.iter_lines(ep, resp))
            status, data = resp.status, resp.read()
            t.done(ep, resp)
            return status, resp.headers, data
        finally:
            t.close()

    async def main() -> tuple[int, dict[str, str], Any]:
        t = AsyncTransport(None, retry_timeout=0.3)
        try:
            resp = await t.open(ep, "GET", "/x", timeout=timeout)
            if lines:
                return resp.status, resp.headers, [ln async for ln in t.iter_lines(ep, resp)]
            status, data = resp.status, await resp.read()
            t.done(ep, resp)
            return status, resp.headers, data
        finally:
            await t.close()

    return asyncio.run(main())


def request(flavour: str, url: str, *, timeout: float = 5.0) -> tuple[int, bytes]:
    """``Transport.request`` (whole body, retries, typed errors) of the flavour."""
    ep = Endpoint.parse(url)
    if flavour == "sync":
        t = Transport(None, retry_timeout=0.3)
        try:
            return t.request(ep, "GET", "/x", timeout=timeout)
        finally:
            t.close()

    async def main() -> tuple[int, bytes]:
        t = AsyncTransport(None, retry_timeout=0.3)
        try:
            return await t.request(ep, "GET", "/x", timeout=timeout)
        finally:
            await t.close()

    return asyncio.run(main())


def stream(flavour: str, url: str, cmd: str) -> list[Any]:
    """Everything ``Sandbox.stream`` yields for a sandbox ``sb-1`` on the node."""
    info = SandboxInfo.from_json({"id": "sb-1"}, url)
    if flavour == "sync":
        with arl.Client(url, retry_timeout=0.3) as c:
            return list(arl.Sandbox(c, Endpoint.parse(url), info).stream(cmd, request_id="rid-1"))

    async def main() -> list[Any]:
        async with arl.AsyncClient(url, retry_timeout=0.3) as c:
            return [i async for i in arl.AsyncSandbox(c, Endpoint.parse(url), info).stream(cmd, request_id="rid-1")]

    return asyncio.run(main())


def event(**kw: Any) -> bytes:
    return json.dumps(kw).encode() + b"\n"


RESULT = {"exit_code": 0, "stdout": "", "stderr": "", "duration_ms": 3, "timed_out": False}


# -- streamed lines ------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", FLAVOURS)
@replies(CHUNKED_HEAD + chunked(b"a\r\n", b"\n\nb", b"c\n", b"  \n", b"last"))
def test_lines_split_across_chunks(flavour: str, node: RawNode) -> None:
    # Blank lines are skipped, a line split over chunks is whole, the last needs no newline.
    assert get(flavour, node.url, lines=True)[2] == [b"a\r", b"bc", b"last"]


@pytest.mark.parametrize("flavour", FLAVOURS)
@replies(
    Close(CHUNKED_HEAD + chunked(event(type="stdout", data="first\n"))[:-5]),  # cut before the end
    json_reply(json.dumps(dict(RESULT, stdout="first\nsecond\n", stderr="e")).encode()),
)
def test_a_stream_cut_midway_is_recovered(flavour: str, node: RawNode) -> None:
    items = stream(flavour, node.url, "echo first; echo second")
    assert items[:-1] == [
        arl.OutputChunk("stdout", "first\n"),
        arl.OutputChunk("stdout", "second\n"),
        arl.OutputChunk("stderr", "e"),
    ]
    res = items[-1]
    assert isinstance(res, arl.ExecResult) and (res.stdout, res.stderr) == ("first\nsecond\n", "e")
    # Asked again with the same request_id, so the daemon answers without running it twice.
    assert len(node.requests) == 2 and all(b'"request_id":"rid-1"' in r for r in node.requests)


@pytest.mark.parametrize("flavour", FLAVOURS)
@replies(CHUNKED_HEAD + chunked(event(type="stdout", data="x")))
def test_a_stream_without_result_is_an_error(flavour: str, node: RawNode) -> None:
    with pytest.raises(arl.InfraError) as e:
        stream(flavour, node.url, "true")
    assert e.value.code == "incomplete_stream"


@pytest.mark.parametrize("flavour", FLAVOURS)
@replies(json_reply(b"{}"))
def test_a_stalled_stream_times_out(flavour: str, node: RawNode) -> None:
    node.replies = [node.stall(CHUNKED_HEAD + b"4\r\nab")]
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        get(flavour, node.url, timeout=0.3, lines=True)
    assert time.monotonic() - t0 < 5


@pytest.mark.parametrize("flavour", FLAVOURS)
@replies(json_reply(b"{}"))
def test_a_stalled_body_is_a_timeout_error(flavour: str, node: RawNode) -> None:
    node.replies = [node.stall(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")]
    with pytest.raises(arl.InfraError, match="stalled") as e:
        request(flavour, node.url, timeout=0.3)
    assert e.value.code == "timeout"


# -- response heads ------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", FLAVOURS)
@replies(b"HTTP/1.1 200 OK\ncontent-length: 2\nx-a: 1\n\nhi")
def test_a_head_with_bare_newlines(flavour: str, node: RawNode) -> None:
    assert get(flavour, node.url) == (200, {"content-length": "2", "x-a": "1"}, b"hi")


@pytest.mark.parametrize("flavour", FLAVOURS)
@replies(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n" + json_reply(b"{}"))
def test_interim_responses_are_skipped(flavour: str, node: RawNode) -> None:
    assert get(flavour, node.url)[::2] == (200, b"{}")


@pytest.mark.parametrize("flavour", FLAVOURS)
@replies(b"HTTP/1.1 200 OK\r\nx-a: 1\r\ncontent-length: 0\r\nX-A: 2\r\nx-a:\r\n\r\n")
def test_repeated_headers_are_kept(flavour: str, node: RawNode) -> None:
    assert get(flavour, node.url)[1]["x-a"] == "1, 2, "


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize(
    ("node", "message"),
    [
        ([b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 2\r\n\r\nhi"], "duplicated Content-Length"),
        ([b"HTTP/1.1 200 OK\r\ncontent-length: 2, 2\r\n\r\nhi"], "duplicated Content-Length"),
        ([b"HTTP/1.1 200 OK\r\ncontent-length: +2\r\n\r\nhi"], "malformed Content-Length"),
        ([b"HTTP/1.1 200 OK\r\ncontent-length: 0x2\r\n\r\nhi"], "malformed Content-Length"),
        ([b"HTTP/1.1 200 OK\r\ncontent-length:\r\n\r\nhi"], "malformed Content-Length"),
        ([b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\nhi"], "unsupported Transfer-Encoding"),
        ([b"HTTP/1.1 200 OK\r\nbad header\r\n\r\nhi"], "malformed header line"),
        ([b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhiXX0\r\n\r\n"], "chunk data not followed"),
        ([b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nhi\r\n0\r\n\r\n"], "bad chunk size"),
    ],
    indirect=["node"],
)
def test_a_malformed_response_is_a_clear_error_not_retried(flavour: str, node: RawNode, message: str) -> None:
    with pytest.raises(arl.InfraError, match=message) as e:
        request(flavour, node.url)
    assert (e.value.code, e.value.retryable) == ("protocol_error", False)
    assert len(node.requests) == 1
