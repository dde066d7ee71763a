"""The asyncio client's socket layer, written by hand: connections on asyncio streams
(TCP_NODELAY, a keep-alive pool per endpoint, tied to the event loop that opened them), sending
a request, reading a response head and its body (Content-Length, chunked, or to the
connection's end), and the few primitives the client needs (sleep, running calls concurrently,
an acquisition that is awaited or entered).

The code above this layer is the source the synchronous client is generated from
(``scripts/unasync.py``); ``_sync_http`` offers the same names."""

from __future__ import annotations

import asyncio
import socket
import ssl
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Generator, Iterable
from typing import Any, BinaryIO, Generic, Protocol, TypeVar

from ._common import MAX_HEAD, MAX_LINE, Endpoint, ProtocolError, body_framing, chunk_size, parse_head

__all__ = [
    "AsyncAcquiring",
    "AsyncConnectionPool",
    "Body",
    "CANCELLED",
    "CONN_ERRORS",
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

# What a broken connection raises here (a timeout is an OSError too).
CONN_ERRORS: tuple[type[BaseException], ...] = (OSError, EOFError, ValueError, asyncio.LimitOverrunError)
# Exceptions that mean "the caller gave up".
CANCELLED: tuple[type[BaseException], ...] = (asyncio.CancelledError,)

sleep = asyncio.sleep

if sys.version_info >= (3, 11):
    _timeout = asyncio.timeout
else:  # pragma: no cover - Python 3.10
    import contextlib

    @contextlib.asynccontextmanager
    async def _timeout(delay: float) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        fired = False

        def _fire() -> None:
            nonlocal fired
            fired = True
            task.cancel()

        h = loop.call_later(delay, _fire)
        try:
            yield
        except asyncio.CancelledError:
            if fired:
                raise TimeoutError() from None
            raise
        finally:
            h.cancel()


async def map_all(fn: Callable[[T], Awaitable[R]], items: Iterable[T]) -> list[R]:
    """``fn`` of every item, run concurrently; results in order."""
    return list(await asyncio.gather(*(fn(x) for x in items)))


async def map_settled(fn: Callable[[T], Awaitable[Any]], items: Iterable[T]) -> list[Any]:
    """``fn`` of every item, run concurrently: each one's result or the exception it raised."""
    return list(await asyncio.gather(*(fn(x) for x in items), return_exceptions=True))


class _AsyncContext(Protocol):
    async def __aenter__(self) -> Any: ...

    async def __aexit__(self, et: Any, ev: Any, tb: Any) -> None: ...


C = TypeVar("C", bound=_AsyncContext)


class AsyncAcquiring(Generic[C]):
    """An acquisition under way: ``await`` it for the value, or enter it with ``async with``
    to have the value released on exit."""

    __slots__ = ("_coro", "_value")

    def __init__(self, coro: Coroutine[Any, Any, C]) -> None:
        self._coro = coro
        self._value: C | None = None

    def __await__(self) -> Generator[Any, None, C]:
        return self._coro.__await__()

    async def __aenter__(self) -> C:
        self._value = await self._coro
        return self._value

    async def __aexit__(self, et: Any, ev: Any, tb: Any) -> None:
        if self._value is not None:
            await self._value.__aexit__(et, ev, tb)


def acquiring(coro: Coroutine[Any, Any, C]) -> AsyncAcquiring[C]:
    return AsyncAcquiring(coro)


class ReadTimeout(Exception):
    """No response head within the request's timeout."""


class _Conn:
    __slots__ = ("reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def close(self) -> None:
        try:
            self.writer.close()
        except Exception:  # pragma: no cover
            pass

    def usable(self) -> bool:
        return not self.writer.is_closing() and not self.reader.at_eof()


async def _readline(r: asyncio.StreamReader) -> bytes:
    try:
        line = await r.readuntil(b"\n")
    except asyncio.LimitOverrunError as e:
        raise ProtocolError("header line too long") from e
    except asyncio.IncompleteReadError as e:
        raise EOFError("connection closed by the node") from e
    if len(line) > MAX_LINE:
        raise ProtocolError("header line too long")
    return line


async def _read_head(r: asyncio.StreamReader) -> bytes:
    """A response's head, through its empty line, its lines ended by CRLF (bare LF accepted).

    Once the status line is in, the rest of the head is usually buffered already and is taken in
    one piece (line by line costs ~5 us more per response); that peeks at the stream's buffer,
    a CPython detail: where it is missing, or the head is not whole yet, lines are read one by
    one."""
    first = await _readline(r)
    buf = getattr(r, "_buffer", None)
    if first.endswith(b"\r\n") and isinstance(buf, bytearray):
        if buf.startswith(b"\r\n"):  # no header fields
            return first + await r.readexactly(2)
        end = buf.find(b"\r\n\r\n", 0, MAX_HEAD)
        # (A head that ends lines with bare LF ends before that, maybe: read it line by line.)
        if end >= 0 and buf.find(b"\n\n", 0, end) < 0:
            return first + await r.readexactly(end + 4)
    lines = [first.rstrip(b"\r\n")]
    size = len(lines[0]) + 2
    while True:
        line = (await _readline(r)).rstrip(b"\r\n")
        size += len(line) + 2
        if size > MAX_HEAD:
            raise ProtocolError("response head too long")
        lines.append(line)
        if not line:
            return b"\r\n".join(lines) + b"\r\n"


class Response:
    """A response whose body is read by the caller (``read``, ``read_some``). Each read waits
    at most the request's timeout."""

    __slots__ = ("status", "headers", "_conn", "_timeout", "_length", "_chunked", "_chunk_left", "done", "keep_alive")

    def __init__(self, status: int, headers: dict[str, str], conn: _Conn, timeout: float) -> None:
        self.status = status
        self.headers = headers
        self._conn = conn
        self._timeout = timeout
        self._length, self._chunked, self.keep_alive = body_framing(status, headers)
        self._chunk_left = 0
        self.done = self._length == 0

    def close(self) -> None:
        """Drop the connection (a body not read to its end leaves it unusable)."""
        self._conn.close()

    async def read(self) -> bytes:
        """The rest of the body."""
        if self.done:
            return b""
        async with _timeout(self._timeout):
            r = self._conn.reader
            if self._length is not None:
                data = await r.readexactly(self._length)
                self.done = True
                return data
            parts: list[bytes] = []
            while True:
                data = await self._read_some(262144)
                if not data:
                    return b"".join(parts)
                parts.append(data)

    async def read_some(self, n: int = 262144) -> bytes:
        """The next piece of body as it arrives (``b""`` at the end)."""
        if self.done:
            return b""
        async with _timeout(self._timeout):
            return await self._read_some(n)

    async def _read_some(self, n: int) -> bytes:
        r = self._conn.reader
        if self._length is not None:
            data = await r.read(min(n, self._length))
            if not data:
                raise EOFError("connection closed in the middle of a response")
            self._length -= len(data)
            self.done = self._length == 0
            return data
        if not self._chunked:  # delimited by the connection's end
            data = await r.read(n)
            if not data:
                self.done = True
                self.keep_alive = False
            return data
        if self._chunk_left == 0:
            size = chunk_size(await _readline(r))
            if size == 0:
                while (await _readline(r)) not in (b"\r\n", b"\n"):  # trailers
                    pass
                self.done = True
                return b""
            self._chunk_left = size
        data = await r.read(min(n, self._chunk_left))
        if not data:
            raise EOFError("connection closed in the middle of a chunk")
        self._chunk_left -= len(data)
        if self._chunk_left == 0 and (await _readline(r)) not in (b"\r\n", b"\n"):
            raise ProtocolError("chunk data not followed by a line end")
        return data


async def exchange(conn: _Conn, head: str, body: Body, timeout: float) -> Response:
    """Send a request (``head`` without its Content-Length and empty line) and read the final
    response's head; interim 1xx responses are skipped."""
    w = conn.writer
    if body is None:
        w.write((head + "\r\n").encode())
    elif isinstance(body, bytes):
        w.write((head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body)
    else:
        f, length = body()
        try:
            w.write((head + f"Content-Length: {length}\r\n\r\n").encode())
            while True:
                chunk = f.read(262144)
                if not chunk:
                    break
                w.write(chunk)
                await w.drain()
        finally:
            f.close()
    try:
        async with _timeout(timeout):
            while True:
                status, hdrs = parse_head(await _read_head(conn.reader))
                if not 100 <= status < 200:
                    return Response(status, hdrs, conn, timeout)
    except TimeoutError as e:
        raise ReadTimeout() from e


class AsyncConnectionPool:
    """Idle keep-alive connections per endpoint. Connections belong to the event loop that
    opened them: used from another loop, the pool starts afresh."""

    def __init__(self, *, connect_timeout: float, ssl_context: ssl.SSLContext | None, max_idle: int | None) -> None:
        self.connect_timeout = connect_timeout
        self.ssl_context = ssl_context
        self.max_idle = 512 if max_idle is None else max_idle
        self._idle: dict[Endpoint, list[_Conn]] = {}
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None

    async def get(self, ep: Endpoint) -> tuple[_Conn, bool]:
        """A connection to ``ep`` and whether it was reused (a reused one may turn out stale)."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._idle.clear()
            self._loop = loop
        lst = self._idle.get(ep)
        while lst:
            c = lst.pop()
            if c.usable():
                return c, True
            c.close()
        ctx: Any = None
        if ep.scheme == "https":
            ctx = self.ssl_context or ssl.create_default_context()
        async with _timeout(self.connect_timeout):
            reader, writer = await asyncio.open_connection(ep.host, ep.port, ssl=ctx, limit=MAX_HEAD)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:  # pragma: no cover
                pass
        return _Conn(reader, writer), False

    def put(self, ep: Endpoint, resp: Response) -> None:
        """Keep the connection of a response read to its end for the next request."""
        conn = resp._conn
        if self._closed:
            conn.close()
            return
        lst = self._idle.setdefault(ep, [])
        if len(lst) < self.max_idle:
            lst.append(conn)
        else:
            conn.close()

    async def close(self) -> None:
        self._closed = True
        conns = [c for lst in self._idle.values() for c in lst]
        self._idle.clear()
        for c in conns:
            c.close()
        for c in conns:
            try:
                await c.writer.wait_closed()
            except Exception:
                pass
