"""The synchronous client's socket layer, written by hand: connections on blocking sockets
(TCP_NODELAY, a keep-alive pool per endpoint, thread- and fork-safe), sending a request,
reading a response head and its body (Content-Length, chunked, or to the connection's end),
and the few primitives the generated code needs (sleep, running calls one after another).

Everything above this layer (retries, error mapping, the client) is generated from the asyncio
source by ``scripts/unasync.py``; this module and ``_async_http`` offer the same names.

Not ``http.client``: it parses every response's headers with the ``email`` package, which costs
about 0.1 ms per call, a tenth of a whole ``exec`` round trip."""

from __future__ import annotations

import io
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, BinaryIO, TypeVar, cast

from ._common import MAX_HEAD, MAX_LINE, Endpoint, ProtocolError, body_framing, chunk_size, parse_head

__all__ = [
    "Body",
    "CANCELLED",
    "CONN_ERRORS",
    "ConnectionPool",
    "ReadTimeout",
    "Response",
    "acquiring",
    "exchange",
    "map_all",
    "map_settled",
    "sleep",
]

T = TypeVar("T")
R = TypeVar("R")

# A body is bytes, or a callable returning (readable file object, length) for streamed uploads;
# the callable is invoked once per attempt so that a retry resends from the start.
Body = bytes | Callable[[], tuple[BinaryIO, int]] | None

# What a broken connection raises here (a socket timeout is an OSError too).
CONN_ERRORS: tuple[type[BaseException], ...] = (OSError, EOFError, ValueError)
# Exceptions that mean "the caller gave up" (none without an event loop).
CANCELLED: tuple[type[BaseException], ...] = ()

sleep = time.sleep


def map_all(fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """``fn`` of every item, in order (the asyncio twin runs them concurrently)."""
    return [fn(x) for x in items]


def map_settled(fn: Callable[[T], Any], items: Iterable[T]) -> list[Any]:
    """``fn`` of every item, each one's result or the exception it raised."""
    out: list[Any] = []
    for x in items:
        try:
            out.append(fn(x))
        except Exception as e:
            out.append(e)
    return out


def acquiring(value: T) -> T:
    """The acquired value itself (the asyncio twin wraps an acquisition to be awaited or
    entered with ``async with``)."""
    return value


class ReadTimeout(Exception):
    """No response head within the request's timeout."""


class _Conn:
    __slots__ = ("sock", "file", "timeout")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.file = cast(io.BufferedReader, sock.makefile("rb", buffering=MAX_LINE))
        self.timeout = sock.gettimeout()

    def set_timeout(self, timeout: float) -> None:
        if timeout != self.timeout:  # a system call each time otherwise
            self.sock.settimeout(timeout)
            self.timeout = timeout

    def close(self) -> None:
        try:
            self.file.close()
            self.sock.close()
        except OSError:  # pragma: no cover
            pass


def _read_head(conn: _Conn) -> bytes:
    """A response's head, through its empty line. Usually the whole head is in the first read
    and is taken in one piece; else it is read line by line."""
    f = conn.file
    buffered = f.peek(1)  # at most one read from the socket
    end = buffered.find(b"\r\n\r\n")
    # (A head that ends lines with bare LF ends before that, maybe: read it line by line.)
    if end >= 0 and buffered.find(b"\n\n", 0, end) < 0:
        return f.read(end + 4)
    if not buffered:
        raise EOFError("connection closed by the node")
    lines = []
    size = 0
    while True:
        line = _readline(conn).rstrip(b"\r\n")
        size += len(line) + 2
        if size > MAX_HEAD:
            raise ProtocolError("response head too long")
        lines.append(line)
        if not line:
            return b"\r\n".join(lines) + b"\r\n"


def _readline(conn: _Conn) -> bytes:
    line = conn.file.readline(MAX_LINE + 1)
    if not line:
        raise EOFError("connection closed by the node")
    if len(line) > MAX_LINE:
        raise ProtocolError("header line too long")
    return line


class Response:
    """A response whose body is read by the caller (``read``, ``read_some``). Each read waits
    at most the request's timeout (the socket's)."""

    __slots__ = ("status", "headers", "_conn", "_length", "_chunked", "_chunk_left", "done", "keep_alive")

    def __init__(self, status: int, headers: dict[str, str], conn: _Conn) -> None:
        self.status = status
        self.headers = headers
        self._conn = conn
        self._length, self._chunked, self.keep_alive = body_framing(status, headers)
        self._chunk_left = 0
        self.done = self._length == 0

    def close(self) -> None:
        """Drop the connection (a body not read to its end leaves it unusable)."""
        self._conn.close()

    def read(self) -> bytes:
        """The rest of the body."""
        if self.done:
            return b""
        if self._length is not None:
            data = self._conn.file.read(self._length)
            if len(data) < self._length:
                raise EOFError("connection closed in the middle of a response")
            self.done = True
            return data
        parts: list[bytes] = []
        while True:
            data = self.read_some(262144)
            if not data:
                return b"".join(parts)
            parts.append(data)

    def read_some(self, n: int = 262144) -> bytes:
        """The next piece of body as it arrives (``b""`` at the end)."""
        if self.done:
            return b""
        f = self._conn.file
        if self._length is not None:
            data = f.read1(min(n, self._length))
            if not data:
                raise EOFError("connection closed in the middle of a response")
            self._length -= len(data)
            self.done = self._length == 0
            return data
        if not self._chunked:  # delimited by the connection's end
            data = f.read1(n)
            if not data:
                self.done = True
                self.keep_alive = False
            return data
        if self._chunk_left == 0:
            size = chunk_size(_readline(self._conn))
            if size == 0:
                while _readline(self._conn) not in (b"\r\n", b"\n"):  # trailers
                    pass
                self.done = True
                return b""
            self._chunk_left = size
        data = f.read1(min(n, self._chunk_left))
        if not data:
            raise EOFError("connection closed in the middle of a chunk")
        self._chunk_left -= len(data)
        if self._chunk_left == 0 and _readline(self._conn) not in (b"\r\n", b"\n"):
            raise ProtocolError("chunk data not followed by a line end")
        return data


def exchange(conn: _Conn, head: str, body: Body, timeout: float) -> Response:
    """Send a request (``head`` without its Content-Length and empty line) and read the final
    response's head; interim 1xx responses are skipped."""
    sock = conn.sock
    conn.set_timeout(timeout)
    if body is None:
        sock.sendall((head + "\r\n").encode())
    elif isinstance(body, bytes):
        sock.sendall((head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body)
    else:
        f, length = body()
        try:
            sock.sendall((head + f"Content-Length: {length}\r\n\r\n").encode())
            while True:
                chunk = f.read(262144)
                if not chunk:
                    break
                sock.sendall(chunk)
        finally:
            f.close()
    while True:
        try:
            status, hdrs = parse_head(_read_head(conn))
        except TimeoutError as e:
            raise ReadTimeout(str(e)) from e
        if not 100 <= status < 200:
            return Response(status, hdrs, conn)


class ConnectionPool:
    """Idle keep-alive connections per endpoint, shared by threads; a forked child starts
    with none (the parent's sockets are not its to use)."""

    def __init__(self, *, connect_timeout: float, ssl_context: ssl.SSLContext | None, max_idle: int | None) -> None:
        self.connect_timeout = connect_timeout
        self.ssl_context = ssl_context
        self.max_idle = 64 if max_idle is None else max_idle
        self._idle: dict[Endpoint, list[_Conn]] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._pid = os.getpid()

    def get(self, ep: Endpoint) -> tuple[_Conn, bool]:
        """A connection to ``ep`` and whether it was reused (a reused one may turn out stale)."""
        with self._lock:
            if self._pid != os.getpid():
                self._idle.clear()
                self._pid = os.getpid()
            lst = self._idle.get(ep)
            if lst:
                return lst.pop(), True
        sock = socket.create_connection((ep.host, ep.port), timeout=self.connect_timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if ep.scheme == "https":
                ctx = self.ssl_context or ssl.create_default_context()
                sock = ctx.wrap_socket(sock, server_hostname=ep.host)
        except BaseException:
            sock.close()
            raise
        return _Conn(sock), False

    def put(self, ep: Endpoint, resp: Response) -> None:
        """Keep the connection of a response read to its end for the next request."""
        conn = resp._conn
        with self._lock:
            if not self._closed:
                lst = self._idle.setdefault(ep, [])
                if len(lst) < self.max_idle:
                    lst.append(conn)
                    return
        conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns = [c for lst in self._idle.values() for c in lst]
            self._idle.clear()
        for c in conns:
            c.close()
