# Generated from _async_transport.py by scripts/unasync.py: do not edit; edit the source and run the script.
"""Requests to a node over HTTP/1.1 keep-alive connections: connection-level retries (the same
body, so the same request_id), error responses turned into typed errors, streamed bodies."""

from __future__ import annotations

import ssl
from collections.abc import Generator
from typing import Any

from ._common import (
    Endpoint,
    ProtocolError,
    RetryPolicy,
    connection_error,
    is_retryable_status,
    loads,
    protocol_error,
)
from ._sync_http import CONN_ERRORS, Body, ConnectionPool, ReadTimeout, Response, exchange, sleep
from .errors import ArlError, InfraError, error_from_response

__all__ = ["Transport", "Response"]

_JSON = {"Content-Type": "application/json"}


class Transport:
    """Sends requests to endpoints over pooled keep-alive connections."""

    def __init__(
        self,
        token: str | None,
        *,
        connect_timeout: float = 5.0,
        retry_timeout: float = 10.0,
        max_idle: int | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._auth = f"Authorization: Bearer {token}\r\n" if token else ""
        self.retry_timeout = retry_timeout
        self._pool = ConnectionPool(connect_timeout=connect_timeout, ssl_context=ssl_context, max_idle=max_idle)
        self._hosts: dict[Endpoint, str] = {}

    def close(self) -> None:
        """Close the idle connections."""
        self._pool.close()

    def _head(self, ep: Endpoint, method: str, path: str, body: Body, headers: dict[str, str] | None) -> str:
        """A request's head up to (without) its Content-Length and empty line."""
        h = self._hosts.get(ep)
        if h is None:
            host = f"[{ep.host}]" if ":" in ep.host else ep.host
            h = self._hosts[ep] = f"Host: {host}:{ep.port}\r\n"
        head = f"{method} {path} HTTP/1.1\r\n{h}{self._auth}"
        if headers:
            for k, v in headers.items():
                head += f"{k}: {v}\r\n"
        if body is None and method in ("POST", "PUT"):
            head += "Content-Length: 0\r\n"
        return head

    def _retry_policy(self, retry_timeout: float | None) -> RetryPolicy:
        return RetryPolicy(self.retry_timeout if retry_timeout is None else retry_timeout)

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
    ) -> Response:
        """Send a request and return the response with its body unread (each read of it waits
        at most ``timeout``). Raises the typed error for a non-2xx status. The caller finishes
        with :meth:`done` (body read to its end) or ``resp.close()``."""
        head = self._head(ep, method, path, body, headers)
        policy: RetryPolicy | None = None
        while True:
            conn: Any = None
            reused = False
            try:
                conn, reused = self._pool.get(ep)
                resp = exchange(conn, head, body, timeout)
            except ReadTimeout as e:
                if conn is not None:
                    conn.close()
                raise InfraError(
                    f"no response from {ep} within {timeout:.1f}s ({method} {path})",
                    code="timeout", retryable=True, endpoint=ep.url,
                ) from e
            except ProtocolError as e:
                if conn is not None:
                    conn.close()
                raise protocol_error(e, ep.url) from e
            except CONN_ERRORS as e:
                if conn is not None:
                    conn.close()
                if reused:  # a stale keep-alive connection: retry at once on a fresh one
                    continue
                if policy is None:
                    policy = self._retry_policy(retry_timeout)
                delay = policy.next_delay()
                if delay is None:
                    raise connection_error(e, ep.url) from e
                sleep(delay)
                continue
            if resp.status < 300:
                return resp
            try:
                raw = resp.read()
            except CONN_ERRORS:
                raw = b""
                resp.close()
            else:
                self.done(ep, resp)
            err = _error(resp.status, raw, context, ep)
            # A node that names alternatives is sent away from, not waited for.
            if is_retryable_status(err) and not err.alternatives:
                if policy is None:
                    policy = self._retry_policy(retry_timeout)
                delay = policy.next_delay()
                if delay is not None:
                    sleep(delay)
                    continue
            raise err

    def done(self, ep: Endpoint, resp: Response) -> None:
        """Give back the connection of a response read to its end (or drop it)."""
        if resp.done and resp.keep_alive:
            self._pool.put(ep, resp)
        else:
            resp.close()

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
            resp = self.open(
                ep, method, path, body, headers=headers, timeout=timeout, context=context,
                retry_timeout=retry_timeout,
            )
            try:
                data = resp.read()
            except TimeoutError as e:
                resp.close()
                raise InfraError(
                    f"response from {ep} stalled ({method} {path})", code="timeout", retryable=True,
                    endpoint=ep.url,
                ) from e
            except ProtocolError as e:
                resp.close()
                raise protocol_error(e, ep.url) from e
            except CONN_ERRORS as e:
                resp.close()
                if policy is None:
                    policy = self._retry_policy(retry_timeout)
                delay = policy.next_delay()
                if delay is None:
                    raise connection_error(e, ep.url) from e
                sleep(delay)
                continue
            self.done(ep, resp)
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
            ep, method, path, body, headers=_JSON if body is not None else None, timeout=timeout,
            context=context, retry_timeout=retry_timeout,
        )
        if status == 204 or not data:
            return None
        return loads(data)

    def iter_lines(self, ep: Endpoint, resp: Response) -> Generator[bytes, None, None]:
        """The non-blank lines of a streamed body as they arrive (the last one may lack its
        newline); each read waits at most the request's timeout. The connection is given back
        when the body was read to its end, else closed."""
        buf = b""
        ok = False
        try:
            while True:
                chunk = resp.read_some(65536)
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
                resp.close()


def _error(status: int, raw: bytes, context: str, ep: Endpoint) -> ArlError:
    try:
        body: Any = loads(raw) if raw else None
    except ValueError:
        body = raw.decode("utf-8", "replace")
    return error_from_response(status, body, context=context, endpoint=ep.url)
