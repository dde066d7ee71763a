"""A small HTTP/1.1 client on asyncio streams: keep-alive pool per endpoint, Content-Length
and chunked bodies, streamed responses, connection-level retries."""

from __future__ import annotations

import asyncio
import socket
import ssl
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any, BinaryIO

from ._common import (
    Endpoint,
    RetryPolicy,
    body_framing,
    connection_error,
    is_retryable_status,
    loads,
    parse_head,
)
from .errors import ArlError, InfraError, error_from_response

Body = bytes | Callable[[], tuple[BinaryIO, int]] | None

_CONN_ERRORS = (OSError, EOFError, asyncio.LimitOverrunError, ValueError)

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


class _ReadTimeout(Exception):
    pass


class Response:
    """A response whose body is read by the caller (``read``, ``iter_chunks``)."""

    __slots__ = ("status", "headers", "_conn", "_length", "_chunked", "_chunk_left", "done", "keep_alive")

    def __init__(self, status: int, headers: dict[str, str], conn: _Conn) -> None:
        self.status = status
        self.headers = headers
        self._conn = conn
        self._length, self._chunked, self.keep_alive = body_framing(status, headers)
        self._chunk_left = 0
        self.done = self._length == 0

    async def read(self) -> bytes:
        if self.done:
            return b""
        r = self._conn.reader
        if self._length is not None:
            data = await r.readexactly(self._length)
            self.done = True
            return data
        if not self._chunked:
            data = await r.read()
            self.done = True
            self.keep_alive = False
            return data
        parts = []
        async for c in self.iter_chunks():
            parts.append(c)
        return b"".join(parts)

    async def read_some(self, n: int = 262144) -> bytes:
        """Return the next piece of body (``b""`` at the end)."""
        if self.done:
            return b""
        r = self._conn.reader
        if self._length is not None:
            if self._length == 0:
                self.done = True
                return b""
            data = await r.read(min(n, self._length))
            if not data:
                raise asyncio.IncompleteReadError(b"", self._length)
            self._length -= len(data)
            if self._length == 0:
                self.done = True
            return data
        if not self._chunked:
            data = await r.read(n)
            if not data:
                self.done = True
                self.keep_alive = False
            return data
        if self._chunk_left == 0:
            line = await r.readuntil(b"\r\n")
            size = int(line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                while (await r.readuntil(b"\r\n")) != b"\r\n":  # trailers
                    pass
                self.done = True
                return b""
            self._chunk_left = size
        data = await r.read(min(n, self._chunk_left))
        if not data:
            raise asyncio.IncompleteReadError(b"", self._chunk_left)
        self._chunk_left -= len(data)
        if self._chunk_left == 0:
            await r.readexactly(2)
        return data

    async def iter_chunks(self, n: int = 262144) -> AsyncIterator[bytes]:
        while True:
            data = await self.read_some(n)
            if not data:
                return
            yield data


class AsyncTransport:
    def __init__(
        self,
        token: str | None,
        *,
        connect_timeout: float = 5.0,
        retry_timeout: float = 10.0,
        max_idle: int = 512,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._auth = f"Authorization: Bearer {token}\r\n" if token else ""
        self.connect_timeout = connect_timeout
        self.retry_timeout = retry_timeout
        self.max_idle = max_idle
        self.ssl_context = ssl_context
        self._idle: dict[Endpoint, list[_Conn]] = {}
        self._hosts: dict[Endpoint, str] = {}
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None

    async def _get(self, ep: Endpoint) -> tuple[_Conn, bool]:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # connections belong to the loop that opened them
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
            reader, writer = await asyncio.open_connection(ep.host, ep.port, ssl=ctx, limit=1 << 20)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:  # pragma: no cover
                pass
        return _Conn(reader, writer), False

    def _put(self, ep: Endpoint, conn: _Conn) -> None:
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

    def _host(self, ep: Endpoint) -> str:
        h = self._hosts.get(ep)
        if h is None:
            host = f"[{ep.host}]" if ":" in ep.host else ep.host
            h = self._hosts[ep] = f"Host: {host}:{ep.port}\r\n"
        return h

    async def _attempt(
        self,
        conn: _Conn,
        ep: Endpoint,
        method: str,
        path: str,
        body: Body,
        headers: dict[str, str] | None,
        timeout: float,
    ) -> Response:
        head = f"{method} {path} HTTP/1.1\r\n{self._host(ep)}{self._auth}"
        if headers:
            for k, v in headers.items():
                head += f"{k}: {v}\r\n"
        w = conn.writer
        if body is None:
            if method in ("POST", "PUT"):
                head += "Content-Length: 0\r\n"
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
                raw = await conn.reader.readuntil(b"\r\n\r\n")
        except TimeoutError as e:
            raise _ReadTimeout() from e
        status, hdrs = parse_head(raw)
        if status == 100:  # pragma: no cover - we never send Expect
            return await self._attempt(conn, ep, method, path, None, headers, timeout)
        return Response(status, hdrs, conn)

    async def open(
        self,
        ep: Endpoint,
        method: str,
        path: str,
        body: Body = None,
        *,
        headers: dict[str, str] | None = None,
        timeout: float = 30.0,
        context: str = "",
        retry_timeout: float | None = None,
    ) -> Response:
        """Send a request; return the response with an unread body (finish with :meth:`done`)."""
        policy: RetryPolicy | None = None
        while True:
            conn: _Conn | None = None
            reused = False
            try:
                conn, reused = await self._get(ep)
                resp = await self._attempt(conn, ep, method, path, body, headers, timeout)
            except _ReadTimeout as e:
                if conn is not None:
                    conn.close()
                raise InfraError(
                    f"no response from {ep} within {timeout:.1f}s ({method} {path})",
                    code="timeout", retryable=True, endpoint=ep.url,
                ) from e
            except _CONN_ERRORS as e:
                if conn is not None:
                    conn.close()
                if reused:
                    continue
                if policy is None:
                    policy = RetryPolicy(self.retry_timeout if retry_timeout is None else retry_timeout)
                delay = policy.next_delay()
                if delay is None:
                    raise connection_error(e, ep.url) from e
                await asyncio.sleep(delay)
                continue
            if resp.status < 300:
                return resp
            try:
                async with _timeout(timeout):
                    raw = await resp.read()
            except (TimeoutError, *_CONN_ERRORS):
                raw = b""
                resp._conn.close()
            else:
                self.done(ep, resp)
            err = _error(resp.status, raw, context, ep)
            if is_retryable_status(err):
                if policy is None:
                    policy = RetryPolicy(self.retry_timeout if retry_timeout is None else retry_timeout)
                delay = policy.next_delay()
                if delay is not None:
                    await asyncio.sleep(delay)
                    continue
            raise err

    def done(self, ep: Endpoint, resp: Response) -> None:
        if resp.done and resp.keep_alive:
            self._put(ep, resp._conn)
        else:
            resp._conn.close()

    async def request(
        self,
        ep: Endpoint,
        method: str,
        path: str,
        body: Body = None,
        *,
        headers: dict[str, str] | None = None,
        timeout: float = 30.0,
        context: str = "",
        retry_timeout: float | None = None,
    ) -> tuple[int, bytes]:
        policy: RetryPolicy | None = None
        while True:
            resp = await self.open(
                ep, method, path, body, headers=headers, timeout=timeout, context=context,
                retry_timeout=retry_timeout,
            )
            try:
                async with _timeout(timeout):
                    data = await resp.read()
            except TimeoutError as e:
                resp._conn.close()
                raise InfraError(
                    f"response from {ep} stalled ({method} {path})", code="timeout", retryable=True,
                    endpoint=ep.url,
                ) from e
            except _CONN_ERRORS as e:
                resp._conn.close()
                if policy is None:
                    policy = RetryPolicy(self.retry_timeout if retry_timeout is None else retry_timeout)
                delay = policy.next_delay()
                if delay is None:
                    raise connection_error(e, ep.url) from e
                await asyncio.sleep(delay)
                continue
            self.done(ep, resp)
            return resp.status, data

    async def request_json(
        self,
        ep: Endpoint,
        method: str,
        path: str,
        body: bytes | None = None,
        *,
        timeout: float = 30.0,
        context: str = "",
        retry_timeout: float | None = None,
    ) -> Any:
        status, data = await self.request(
            ep, method, path, body, headers=_JSON if body is not None else None, timeout=timeout,
            context=context, retry_timeout=retry_timeout,
        )
        if status == 204 or not data:
            return None
        return loads(data)

    async def iter_lines(self, ep: Endpoint, resp: Response, timeout: float) -> AsyncIterator[bytes]:
        buf = b""
        ok = False
        try:
            while True:
                async with _timeout(timeout):
                    chunk = await resp.read_some(65536)
                if not chunk:
                    break
                buf += chunk
                if b"\n" in buf:
                    *lines, buf = buf.split(b"\n")
                    for line in lines:
                        if line.strip():
                            yield line
            if buf.strip():
                yield buf
            ok = True
        finally:
            if ok:
                self.done(ep, resp)
            else:
                resp._conn.close()


_JSON = {"Content-Type": "application/json"}


def _error(status: int, raw: bytes, context: str, ep: Endpoint) -> ArlError:
    try:
        body: Any = loads(raw) if raw else None
    except ValueError:
        body = raw.decode("utf-8", "replace")
    return error_from_response(status, body, context=context, endpoint=ep.url)
