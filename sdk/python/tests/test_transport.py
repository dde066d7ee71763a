"""The transports' reading of response heads: the sync one over a real socket pair, the asyncio
one from a stream fed by hand."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator

import pytest

from arl._async_http import _read_head as _read_head_async
from arl._common import MAX_HEAD, MAX_HEADERS, ProtocolError, parse_head
from arl._sync_http import _Conn, _read_head

HEAD = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nX-Mixed-Case:  v \r\n\r\n"


@pytest.fixture
def pair() -> Iterator[tuple[_Conn, socket.socket]]:
    a, b = socket.socketpair()
    conn = _Conn(a)
    yield conn, b
    conn.close()
    b.close()


def test_a_head_read_in_one_piece(pair: tuple[_Conn, socket.socket]) -> None:
    conn, peer = pair
    peer.sendall(HEAD + b"hi" + HEAD)
    assert parse_head(_read_head(conn)) == (200, {"content-length": "2", "x-mixed-case": "v"})
    assert conn.file.read(2) == b"hi"  # the body is left where it was
    assert _read_head(conn) == HEAD


def test_a_head_that_arrives_in_pieces(pair: tuple[_Conn, socket.socket]) -> None:
    conn, peer = pair
    peer.sendall(HEAD[:20])
    assert conn.file.peek(1) == HEAD[:20]  # buffered: the next read of the head starts with half
    peer.sendall(HEAD[20:] + b"hi")
    assert _read_head(conn) == HEAD
    assert conn.file.read(2) == b"hi"


def test_bare_newlines_are_accepted_line_by_line(pair: tuple[_Conn, socket.socket]) -> None:
    conn, peer = pair
    peer.sendall(b"HTTP/1.1 204 No Content\nConnection: close\n\n")
    assert parse_head(_read_head(conn)) == (204, {"connection": "close"})
    # A CRLF CRLF in the body after such a head is not the head's end.
    peer.sendall(b"HTTP/1.1 200 OK\ncontent-length: 4\n\n\r\n\r\n")
    assert parse_head(_read_head(conn)) == (200, {"content-length": "4"})
    assert conn.file.read(4) == b"\r\n\r\n"


def test_a_closed_connection_is_end_of_file(pair: tuple[_Conn, socket.socket]) -> None:
    conn, peer = pair
    peer.close()
    with pytest.raises(EOFError):
        _read_head(conn)


def test_a_head_too_long_is_refused(pair: tuple[_Conn, socket.socket]) -> None:
    conn, peer = pair
    peer.sendall(b"HTTP/1.1 200 OK\r\n")
    conn.file.peek(1)
    line = b"x-filler: " + b"a" * 60000 + b"\r\n"

    def feed() -> None:
        try:
            for _ in range(6):
                peer.sendall(line)
        except OSError:
            pass  # the client gave up and closed: expected

    t = threading.Thread(target=feed)
    t.start()
    with pytest.raises(ProtocolError, match="too long"):
        _read_head(conn)
    conn.close()
    t.join()


@pytest.mark.parametrize(
    "raw",
    [
        b"SSH-2.0-OpenSSH_9.2\r\n\r\n",
        b"HTTP/1.1 2x0 OK\r\n\r\n",
        b"HTTP/1.1\r\n\r\n",
        "HTTP/1.1 2\u00b20 OK\r\n\r\n".encode("latin-1"),
        b"HTTP/1.1 200 OK\r\n" + b"x: y\r\n" * (MAX_HEADERS + 1) + b"\r\n",
    ],
)
def test_malformed_heads_are_protocol_errors(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_head(raw)


# -- the asyncio reader of heads, fed by hand ------------------------------------------------


def read_async(*parts: bytes) -> tuple[bytes, bytes]:
    """The head ``_async_http._read_head`` reads when the bytes arrive in these parts (each
    after the reader has waited for more), and what is left after it."""

    async def main() -> tuple[bytes, bytes]:
        r = asyncio.StreamReader(limit=MAX_HEAD)
        r.feed_data(parts[0])
        task = asyncio.ensure_future(_read_head_async(r))
        for p in parts[1:]:
            while not r._waiter and not task.done():  # type: ignore[attr-defined]  # until it waits
                await asyncio.sleep(0)
            if task.done():
                break
            r.feed_data(p)
        r.feed_eof()
        head = await task
        return head, await r.read()

    return asyncio.run(main())


def test_async_a_head_read_in_one_piece() -> None:
    assert read_async(HEAD + b"hi" + HEAD) == (HEAD, b"hi" + HEAD)
    assert read_async(b"HTTP/1.1 204 No Content\r\n\r\n" + HEAD) == (b"HTTP/1.1 204 No Content\r\n\r\n", HEAD)


def test_async_a_head_that_arrives_in_pieces() -> None:
    assert read_async(HEAD[:5], HEAD[5:20], HEAD[20:] + b"hi") == (HEAD, b"hi")
    assert read_async(HEAD[:17], HEAD[17:] + b"hi") == (HEAD, b"hi")  # the status line alone first


def test_async_bare_newlines_are_accepted_line_by_line() -> None:
    head, rest = read_async(b"HTTP/1.1 200 OK\ncontent-length: 4\n\n\r\n\r\n")
    assert parse_head(head) == (200, {"content-length": "4"}) and rest == b"\r\n\r\n"
    head, rest = read_async(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\n\r\n\r\n")  # mixed
    assert parse_head(head) == (200, {"content-length": "4"}) and rest == b"\r\n\r\n"


def test_async_a_closed_connection_is_end_of_file() -> None:
    with pytest.raises(EOFError):
        read_async(b"HTTP/1.1 200 OK\r\ncontent-")


def test_async_a_head_too_long_is_refused() -> None:
    with pytest.raises(ProtocolError, match="too long"):
        read_async(b"HTTP/1.1 200 OK\r\n", *[b"x-filler: " + b"a" * 60000 + b"\r\n"] * 6)
