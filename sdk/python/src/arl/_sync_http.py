"""Synchronous HTTP/1.1 transport: ``http.client`` with a keep-alive connection pool per
endpoint, TCP_NODELAY, connection-level retries (same request body, so the same request_id)."""

from __future__ import annotations

import http.client
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Generator
from typing import Any, BinaryIO

from ._common import Endpoint, RetryPolicy, connection_error, is_retryable_status, loads
from .errors import ArlError, InfraError, error_from_response

# A body is bytes, or a callable returning (readable file object, length) for streamed uploads;
# the callable is invoked once per attempt so that a retry resends from the start.
Body = bytes | Callable[[], tuple[BinaryIO, int]] | None

_CONN_ERRORS = (OSError, http.client.HTTPException)


class _HTTPConnection(http.client.HTTPConnection):
    def connect(self) -> None:
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _HTTPSConnection(http.client.HTTPSConnection):
    def connect(self) -> None:
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _ReadTimeout(Exception):
    pass


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
        self.auth = f"Bearer {token}" if token else None
        self.connect_timeout = connect_timeout
        self.retry_timeout = retry_timeout
        self.max_idle = max_idle
        self.ssl_context = ssl_context
        self._idle: dict[Endpoint, list[http.client.HTTPConnection]] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._pid = os.getpid()

    # -- connection pool -------------------------------------------------------------------

    def _get(self, ep: Endpoint) -> tuple[http.client.HTTPConnection, bool]:
        with self._lock:
            if self._pid != os.getpid():  # forked: the parent's sockets are not ours to use
                self._idle.clear()
                self._pid = os.getpid()
            lst = self._idle.get(ep)
            if lst:
                return lst.pop(), True
        conn: http.client.HTTPConnection
        if ep.scheme == "https":
            conn = _HTTPSConnection(ep.host, ep.port, timeout=self.connect_timeout, context=self.ssl_context)
        else:
            conn = _HTTPConnection(ep.host, ep.port, timeout=self.connect_timeout)
        return conn, False

    def _put(self, ep: Endpoint, conn: http.client.HTTPConnection) -> None:
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

    def _attempt(
        self,
        conn: http.client.HTTPConnection,
        method: str,
        path: str,
        body: Body,
        headers: dict[str, str] | None,
        timeout: float,
    ) -> http.client.HTTPResponse:
        if conn.sock is None:
            conn.timeout = self.connect_timeout
            conn.connect()
        conn.sock.settimeout(timeout)
        conn.putrequest(method, path, skip_accept_encoding=True)
        if self.auth:
            conn.putheader("Authorization", self.auth)
        if headers:
            for k, v in headers.items():
                conn.putheader(k, v)
        if body is None:
            if method in ("POST", "PUT"):
                conn.putheader("Content-Length", "0")
            conn.endheaders()
        elif isinstance(body, bytes):
            conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
        else:
            f, length = body()
            try:
                conn.putheader("Content-Length", str(length))
                conn.endheaders()
                while True:
                    chunk = f.read(262144)
                    if not chunk:
                        break
                    conn.send(chunk)
            finally:
                f.close()
        try:
            return conn.getresponse()
        except TimeoutError as e:
            raise _ReadTimeout(str(e)) from e

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
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """Send a request and return the connection and the response with an unread body.

        Raises the typed error for a non-2xx status. The caller must finish with
        :meth:`done` (body fully read) or close the connection."""
        policy: RetryPolicy | None = None
        while True:
            conn, reused = self._get(ep)
            try:
                resp = self._attempt(conn, method, path, body, headers, timeout)
            except _ReadTimeout as e:
                conn.close()
                raise InfraError(
                    f"no response from {ep} within {timeout:.1f}s ({method} {path})",
                    code="timeout",
                    retryable=True,
                    endpoint=ep.url,
                ) from e
            except _CONN_ERRORS as e:
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

    def done(self, ep: Endpoint, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse) -> None:
        if resp.will_close or not resp.isclosed():
            conn.close()
        else:
            self._put(ep, conn)

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

    def iter_lines(
        self, ep: Endpoint, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse
    ) -> Generator[bytes, None, None]:
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
