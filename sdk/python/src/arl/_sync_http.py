"""Synchronous HTTP/1.1 transport: a small client on blocking sockets (the sync twin of
``_async_http``): keep-alive pool per endpoint, TCP_NODELAY, Content-Length and chunked
bodies, streamed responses, connection-level retries (same request body, so the same
request_id).

Not ``http.client``: it parses every response's headers with the ``email`` package, which costs
about 0.1 ms per call, a tenth of a whole ``exec`` round trip."""

from __future__ import annotations

import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Generator
from typing import Any, BinaryIO

from ._common import (
    Endpoint,
    ProtocolError,
    RetryPolicy,
    body_framing,
    connection_error,
    is_retryable_status,
    loads,
    parse_head,
)
from .errors import ArlError, InfraError, error_from_response

# A body is bytes, or a callable returning (readable file object, length) for streamed uploads;
# the callable is invoked once per attempt so that a retry resends from the start.
Body = bytes | Callable[[], tuple[BinaryIO, int]] | None

# Longest status line or header line accepted from a node (and the read buffer's size).
_MAX_LINE = 65536
# Longest response head read line by line (when it did not arrive in one piece).
_MAX_HEAD = 256 * 1024


_CONN_ERRORS = (OSError, EOFError, ValueError)


class _Conn:
    __slots__ = ("sock", "file", "timeout")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.file = sock.makefile("rb", buffering=_MAX_LINE)
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


class _ReadTimeout(Exception):
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
        if size > _MAX_HEAD:
            raise ProtocolError("response head too long")
        lines.append(line)
        if not line:
            return b"\r\n".join(lines) + b"\r\n"


def _readline(conn: _Conn) -> bytes:
    line = conn.file.readline(_MAX_LINE + 1)
    if not line:
        raise EOFError("connection closed by the node")
    if len(line) > _MAX_LINE:
        raise ProtocolError("header line too long")
    return line


class Response:
    """A response whose body is read by the caller (``read``, ``read1``)."""

    __slots__ = ("status", "headers", "_conn", "_length", "_chunked", "_chunk_left", "done", "keep_alive")

    def __init__(self, status: int, headers: dict[str, str], conn: _Conn) -> None:
        self.status = status
        self.headers = headers
        self._conn = conn
        self._length, self._chunked, self.keep_alive = body_framing(status, headers)
        self._chunk_left = 0
        self.done = self._length == 0

    def read(self, n: int | None = None) -> bytes:
        """The rest of the body, or (with ``n``) up to ``n`` bytes of it (``b""`` at the end)."""
        if n is not None:
            return self.read1(n)
        if self.done:
            return b""
        if self._length is not None:
            data = self._conn.file.read(self._length)
            if len(data) < self._length:
                raise EOFError("connection closed in the middle of a response")
            self.done = True
            return data
        parts = []
        while True:
            data = self.read1(262144)
            if not data:
                return b"".join(parts)
            parts.append(data)

    def read1(self, n: int = 262144) -> bytes:
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
            try:
                size = int(_readline(self._conn).split(b";", 1)[0].strip(), 16)
            except ValueError as e:
                raise ProtocolError(f"bad chunk size: {e}") from e
            if size == 0:
                while _readline(self._conn) != b"\r\n":  # trailers
                    pass
                self.done = True
                return b""
            self._chunk_left = size
        data = f.read1(min(n, self._chunk_left))
        if not data:
            raise EOFError("connection closed in the middle of a chunk")
        self._chunk_left -= len(data)
        if self._chunk_left == 0 and f.read(2) != b"\r\n":
            raise ProtocolError("chunk not followed by CRLF")
        return data


class SyncTransport:
    def __init__(
        self,
        token: str | None,
        *,
        connect_timeout: float = 5.0,
        retry_timeout: float = 10.0,
        max_idle: int = 64,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._auth = f"Authorization: Bearer {token}\r\n" if token else ""
        self.connect_timeout = connect_timeout
        self.retry_timeout = retry_timeout
        self.max_idle = max_idle
        self.ssl_context = ssl_context
        self._idle: dict[Endpoint, list[_Conn]] = {}
        self._hosts: dict[Endpoint, str] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._pid = os.getpid()

    # -- connection pool -------------------------------------------------------------------

    def _get(self, ep: Endpoint) -> tuple[_Conn, bool]:
        with self._lock:
            if self._pid != os.getpid():  # forked: the parent's sockets are not ours to use
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

    def _put(self, ep: Endpoint, conn: _Conn) -> None:
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

    # -- requests ------------------------------------------------------------------------------

    def _host(self, ep: Endpoint) -> str:
        h = self._hosts.get(ep)
        if h is None:
            host = f"[{ep.host}]" if ":" in ep.host else ep.host
            h = self._hosts[ep] = f"Host: {host}:{ep.port}\r\n"
        return h

    def _attempt(
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
        sock = conn.sock
        conn.set_timeout(timeout)
        if body is None:
            if method in ("POST", "PUT"):
                head += "Content-Length: 0\r\n"
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
        try:
            status, hdrs = parse_head(_read_head(conn))
        except TimeoutError as e:
            raise _ReadTimeout(str(e)) from e
        return Response(status, hdrs, conn)

    def open(
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
    ) -> tuple[_Conn, Response]:
        """Send a request and return the connection and the response with an unread body.

        Raises the typed error for a non-2xx status. The caller must finish with
        :meth:`done` (body fully read) or close the connection."""
        policy: RetryPolicy | None = None
        while True:
            conn: _Conn | None = None
            reused = False
            try:
                conn, reused = self._get(ep)
                resp = self._attempt(conn, ep, method, path, body, headers, timeout)
            except _ReadTimeout as e:
                if conn is not None:
                    conn.close()
                raise InfraError(
                    f"no response from {ep} within {timeout:.1f}s ({method} {path})",
                    code="timeout",
                    retryable=True,
                    endpoint=ep.url,
                ) from e
            except _CONN_ERRORS as e:
                if conn is not None:
                    conn.close()
                if reused:  # a stale keep-alive connection: retry at once on a fresh one
                    continue
                if policy is None:
                    policy = RetryPolicy(self.retry_timeout if retry_timeout is None else retry_timeout)
                delay = policy.next_delay()
                if delay is None:
                    raise connection_error(e, ep.url) from e
                time.sleep(delay)
                continue
            status = resp.status
            if status < 300:
                return conn, resp
            try:
                raw = resp.read()
            except _CONN_ERRORS:
                raw = b""
                conn.close()
            else:
                self.done(ep, conn, resp)
            err = _error(status, raw, context, ep)
            if is_retryable_status(err):
                if policy is None:
                    policy = RetryPolicy(self.retry_timeout if retry_timeout is None else retry_timeout)
                delay = policy.next_delay()
                if delay is not None:
                    time.sleep(delay)
                    continue
            raise err

    def done(self, ep: Endpoint, conn: _Conn, resp: Response) -> None:
        if resp.keep_alive and resp.done:
            self._put(ep, conn)
        else:
            conn.close()

    def request(
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
        """Send a request and read the whole response body. A connection that drops while
        the body is read is retried like a failed send."""
        policy: RetryPolicy | None = None
        while True:
            conn, resp = self.open(
                ep, method, path, body, headers=headers, timeout=timeout, context=context,
                retry_timeout=retry_timeout,
            )
            try:
                data = resp.read()
            except TimeoutError as e:
                conn.close()
                raise InfraError(
                    f"response from {ep} stalled ({method} {path})",
                    code="timeout",
                    retryable=True,
                    endpoint=ep.url,
                ) from e
            except _CONN_ERRORS as e:
                conn.close()
                if policy is None:
                    policy = RetryPolicy(self.retry_timeout if retry_timeout is None else retry_timeout)
                delay = policy.next_delay()
                if delay is None:
                    raise connection_error(e, ep.url) from e
                time.sleep(delay)
                continue
            self.done(ep, conn, resp)
            return resp.status, data

    def request_json(
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
        status, data = self.request(
            ep,
            method,
            path,
            body,
            headers=_JSON if body is not None else None,
            timeout=timeout,
            context=context,
            retry_timeout=retry_timeout,
        )
        if status == 204 or not data:
            return None
        return loads(data)

    def iter_lines(self, ep: Endpoint, conn: _Conn, resp: Response) -> Generator[bytes, None, None]:
        """Yield complete lines of a streamed (chunked) body as they arrive."""
        buf = b""
        ok = False
        try:
            while True:
                chunk = resp.read1(65536)
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
                self.done(ep, conn, resp)
            else:
                conn.close()


_JSON = {"Content-Type": "application/json"}


def _error(status: int, raw: bytes, context: str, ep: Endpoint) -> ArlError:
    try:
        body: Any = loads(raw) if raw else None
    except ValueError:
        body = raw.decode("utf-8", "replace")
    return error_from_response(status, body, context=context, endpoint=ep.url)
