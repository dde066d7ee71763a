"""The sync transport's reading of response heads, over a real socket pair."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from arl._common import MAX_HEADERS, ProtocolError, parse_head
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
