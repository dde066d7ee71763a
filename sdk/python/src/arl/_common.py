"""Pieces shared by the sync and async clients: configuration, endpoints, request bodies,
routing decisions and retry policy. No I/O happens here."""

from __future__ import annotations

import base64
import json
import os
import random
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

from .errors import ArlError, ChecksumMismatch, ExecTimeout, InfraError, PoolExhausted, PoolNotFound
from .types import ExecResult, FileInfo

DEFAULT_ENDPOINT = "http://127.0.0.1:8420"
DEFAULT_PORT = 8420
# Extra seconds the HTTP read waits beyond a command's own timeout.
EXEC_READ_MARGIN = 30.0
DEFAULT_EXEC_TIMEOUT = 60.0

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_loads = json.loads


def dumps(obj: Any) -> bytes:
    return _dumps(obj).encode()


def loads(data: bytes | str) -> Any:
    # Decoding here spares json.loads its encoding detection (the node always sends UTF-8).
    if not isinstance(data, str):
        data = bytes(data).decode("utf-8", "surrogatepass")
    return _loads(data)


def new_request_id() -> str:
    return os.urandom(12).hex()


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A node endpoint, e.g. ``http://10.0.0.5:8420``."""

    url: str
    scheme: str
    host: str
    port: int

    def __hash__(self) -> int:
        # The URL determines the rest; a str caches its hash, a tuple of four fields does not.
        return hash(self.url)

    @classmethod
    def parse(cls, raw: str) -> Endpoint:
        s = raw.strip()
        if not s:
            raise ValueError("empty endpoint")
        if "://" not in s:
            s = "http://" + s
        parts = urlsplit(s)
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"unsupported endpoint scheme in {raw!r}")
        host = parts.hostname or "127.0.0.1"
        port = parts.port or (443 if parts.scheme == "https" else DEFAULT_PORT)
        h = f"[{host}]" if ":" in host else host
        return cls(f"{parts.scheme}://{h}:{port}", parts.scheme, host, port)

    def __str__(self) -> str:
        return self.url


@dataclass(slots=True)
class Config:
    endpoints: list[Endpoint]
    token: str | None
    local: Endpoint | None


def resolve_config(
    endpoints: str | Iterable[str] | None = None,
    token: str | None = None,
    *,
    node_ip: str | None = None,
    local_endpoint: str | None = None,
) -> Config:
    """Resolve endpoints, token and the local node.

    Order: explicit arguments, then ``ARL_ENDPOINTS`` / ``ARL_TOKEN`` / ``ARL_NODE_IP``, then
    ``http://127.0.0.1:8420`` without a token. The local node is ``local_endpoint`` if given,
    else the endpoint whose host equals the node IP; when the node IP matches no endpoint,
    ``http://NODE_IP:PORT`` is added (``PORT`` = ``ARL_NODE_PORT`` or 8420).
    """
    if endpoints is None:
        endpoints = os.environ.get("ARL_ENDPOINTS") or None
    if isinstance(endpoints, str):
        raw = [e for e in endpoints.split(",") if e.strip()]
    elif endpoints is None:
        raw = []
    else:
        raw = [e for e in endpoints if e and e.strip()]
    if token is None:
        token = os.environ.get("ARL_TOKEN") or None
    if node_ip is None:
        node_ip = os.environ.get("ARL_NODE_IP") or None
    eps: list[Endpoint] = []
    for r in raw:
        ep = Endpoint.parse(r)
        if ep not in eps:
            eps.append(ep)
    local: Endpoint | None = None
    if local_endpoint:
        local = Endpoint.parse(local_endpoint)
    elif node_ip:
        for ep in eps:
            if ep.host == node_ip:
                local = ep
                break
        else:
            port = int(os.environ.get("ARL_NODE_PORT") or DEFAULT_PORT)
            local = Endpoint.parse(f"http://{node_ip}:{port}")
    if local is not None and local not in eps:
        eps.insert(0, local)
    if not eps:
        eps = [Endpoint.parse(DEFAULT_ENDPOINT)]
    return Config(eps, token, local)


# Most header lines accepted in one response head.
MAX_HEADERS = 100
# Longest status line or header line accepted from a node (and the sync read buffer's size).
MAX_LINE = 65536
# Longest response head.
MAX_HEAD = 256 * 1024
# Most digits of a Content-Length (as h11: more than a billion terabytes is not a length).
_MAX_LENGTH_DIGITS = 20


class ProtocolError(ValueError):
    """The peer does not speak HTTP/1.1 as expected."""


# A whole response head (lines ended by CRLF): status line, header fields or obs-fold
# continuation lines, the empty line. Field names are tokens; the status line's reason and
# field values hold no NUL, CR, LF, VT or FF (RFC 9112; the same rules as h11). One match in C
# checks a head far faster than a check per line in Python.
_TCHAR = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]"
_TEXT = rb"[^\x00\n\r\x0b\x0c]"
_HEAD_RE = re.compile(
    rb"HTTP/1\.[0-9] [0-9]{3}(?: " + _TEXT + rb"*)?\r\n"
    rb"(?:(?:" + _TCHAR + rb"+:|[ \t])" + _TEXT + rb"*\r\n)*"
    rb"\r\n"
)


def parse_head(raw: bytes) -> tuple[int, dict[str, str]]:
    """The status and headers (names lower-cased) of a response head: the status line and the
    header lines, each ending in CRLF (or a bare LF), and the empty line.

    A header repeated keeps every value, joined by ", " in order (RFC 9110 5.3); a repeated
    Content-Length is refused (as is a malformed one, see :func:`body_framing`), since two
    lengths leave the body's end in doubt. Continuation lines (obs-fold) join the previous
    value with a space."""
    if _HEAD_RE.fullmatch(raw) is None:
        if b"\n" in raw.replace(b"\r\n", b""):  # bare LF line ends: make them CRLF, check again
            raw = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        if _HEAD_RE.fullmatch(raw) is None:
            raise ProtocolError(_head_fault(raw))
    text = raw.decode("latin-1")
    lines = text.split("\r\n")
    if len(lines) > MAX_HEADERS + 3:  # status line, headers, and the two ends of the empty line
        raise ProtocolError("too many response headers")
    if "\r\n " in text or "\r\n\t" in text:
        hdrs = _folded_fields(lines[1:-2])
    else:
        hdrs = {}
        for ln in lines[1:-2]:
            k, _, v = ln.partition(":")
            k = k.lower()
            v = v.strip(" \t")
            if k in hdrs:
                if k == "content-length":
                    raise ProtocolError(f"duplicated Content-Length: {hdrs[k]!r} and {v!r}")
                hdrs[k] += ", " + v
            else:
                hdrs[k] = v
    status = int(lines[0][9:12])
    if status < 100:
        raise ProtocolError(f"status code {status} out of range")
    return status, hdrs


def _folded_fields(lines: list[str]) -> dict[str, str]:
    """The header fields of a head with continuation lines (obs-fold), each replaced by a space
    as h11 does: the folded value is stripped once, at its end."""
    hdrs: dict[str, str] = {}
    last = ""  # the last field's name,
    last_line = ""  # its line,
    before: str | None = None  # the values of that name before it,
    folded: str | None = None  # and its value as received with its continuation lines
    for ln in lines:
        if ln[0] in " \t":
            if not last:
                raise ProtocolError("response head starts with a continuation line")
            if folded is None:
                folded = last_line.partition(":")[2].lstrip(" \t")
            folded += " " + ln.lstrip(" \t")
            v = folded.strip(" \t")
            hdrs[last] = v if before is None else before + ", " + v
            continue
        k, _, v = ln.partition(":")
        k = k.lower()
        v = v.strip(" \t")
        before = hdrs.get(k)
        if before is None:
            hdrs[k] = v
        elif k == "content-length":
            raise ProtocolError(f"duplicated Content-Length: {before!r} and {v!r}")
        else:
            hdrs[k] = before + ", " + v
        last, last_line, folded = k, ln, None
    return hdrs


def _head_fault(raw: bytes) -> str:
    """What is wrong with a head that the head pattern refused (for the error message)."""
    lines = raw.split(b"\r\n")
    first = lines[0]
    if not re.fullmatch(rb"HTTP/1\.[0-9] [0-9]{3}(?: " + _TEXT + rb"*)?", first):
        return f"not an HTTP/1.1 status line: {first[:40]!r}"
    if not raw.endswith(b"\r\n\r\n"):
        return "response head does not end with an empty line"
    for ln in lines[1:-2]:
        if not re.fullmatch(_TCHAR + rb"+:" + _TEXT + rb"*|[ \t]" + _TEXT + rb"*", ln):
            return f"malformed header line: {ln[:60]!r}"
    return "malformed response head"  # pragma: no cover - every refusal is one of the above


def body_framing(status: int, headers: dict[str, str]) -> tuple[int | None, bool, bool]:
    """How an HTTP/1.1 response's body ends: (its length, or None; chunked; keep-alive after it).
    ``headers`` have lower-case names. A Content-Length that is not a decimal number (or that
    lists several values) and a transfer coding other than chunked are refused."""
    te = headers.get("transfer-encoding")
    chunked = False
    if te is not None:
        if te.lower() != "chunked":
            raise ProtocolError(f"unsupported Transfer-Encoding: {te[:40]!r}")
        chunked = True
    cl = headers.get("content-length")
    length: int | None = None
    if cl is not None:
        if not (cl.isascii() and cl.isdigit() and len(cl) <= _MAX_LENGTH_DIGITS):
            if "," in cl:
                raise ProtocolError(f"duplicated Content-Length: {cl[:40]!r}")
            raise ProtocolError(f"malformed Content-Length: {cl[:40]!r}")
        if not chunked:  # with both, chunked framing decides (RFC 9112 6.3)
            length = int(cl)
    if status in (204, 304) or 100 <= status < 200:
        length = 0
        chunked = False
    keep_alive = headers.get("connection", "").lower() != "close" and (chunked or length is not None)
    return length, chunked, keep_alive


def chunk_size(line: bytes) -> int:
    """The size on a chunk's size line (``1a;ext=v\\r\\n``)."""
    digits = line.split(b";", 1)[0].strip(b" \t\r\n")
    if not digits or len(digits) > 16 or digits.strip(b"0123456789abcdefABCDEF"):
        raise ProtocolError(f"bad chunk size line: {line[:40]!r}")
    return int(digits, 16)


def file_query(path: str, **params: Any) -> str:
    q = "?path=" + quote(path, safe="/")
    for k, v in params.items():
        if v is not None:
            q += f"&{k}={quote(str(v), safe='')}"
    return q


def exec_body(
    cmd: list[str] | tuple[str, ...] | str,
    env: Mapping[str, str] | None,
    cwd: str | None,
    timeout: float | None,
    stdin: str | bytes | None,
    max_output_bytes: int | None,
    request_id: str,
) -> dict[str, Any]:
    if isinstance(cmd, str):
        body: dict[str, Any] = {"shell": cmd}
    else:
        body = {"cmd": list(cmd)}
        if not body["cmd"]:
            raise ValueError("cmd must not be empty")
    if env:
        body["env"] = dict(env)
    if cwd is not None:
        body["cwd"] = cwd
    if timeout is not None:
        body["timeout_ms"] = max(1, int(timeout * 1000))
    if stdin is not None:
        if isinstance(stdin, str):
            body["stdin"] = stdin
        else:
            body["stdin_b64"] = base64.b64encode(stdin).decode()
    if max_output_bytes is not None:
        body["max_output_bytes"] = int(max_output_bytes)
    body["request_id"] = request_id
    return body


def exec_read_timeout(timeout: float | None) -> float:
    return (DEFAULT_EXEC_TIMEOUT if timeout is None else timeout) + EXEC_READ_MARGIN


def check_timeout(result: ExecResult, raise_on_timeout: bool, cmd: Any) -> ExecResult:
    if raise_on_timeout and result.timed_out:
        raise ExecTimeout(f"command timed out: {cmd!r}", result=result)
    return result


def files_body(files: Mapping[str, str | bytes], mode: int | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, content in files.items():
        if isinstance(content, str):
            item: Any = content if mode is None else {"content": content, "encoding": "utf8"}
        elif isinstance(content, (bytes, bytearray, memoryview)):
            item = {"content": base64.b64encode(content).decode(), "encoding": "base64"}
        else:
            raise TypeError(f"file content for {path!r} must be str or bytes")
        if mode is not None:
            item["mode"] = mode
        out[path] = item
    return {"files": out}


def acquire_body(
    pool: str,
    count: int,
    env: Mapping[str, str] | None,
    ttl: float | None,
    idle_timeout: float | None,
    labels: Mapping[str, str] | None,
    request_id: str,
) -> dict[str, Any]:
    body: dict[str, Any] = {"pool": pool, "count": count, "request_id": request_id}
    if env:
        body["env"] = dict(env)
    if labels:
        body["labels"] = dict(labels)
    if ttl is not None:
        body["ttl_seconds"] = max(1, int(round(ttl)))
    if idle_timeout is not None:
        body["idle_timeout_seconds"] = max(1, int(round(idle_timeout)))
    return body


def fork_body(
    count: int,
    env: Mapping[str, str] | None,
    labels: Mapping[str, str] | None,
    ttl: float | None,
    idle_timeout: float | None,
) -> bytes:
    body: dict[str, Any] = {"count": count}
    if env:
        body["env"] = dict(env)
    if labels:
        body["labels"] = dict(labels)
    if ttl is not None:
        body["ttl_seconds"] = max(1, int(round(ttl)))
    if idle_timeout is not None:
        body["idle_timeout_seconds"] = max(1, int(round(idle_timeout)))
    return dumps(body)


class StreamAssembler:
    """Turns NDJSON exec events into :class:`OutputChunk` / :class:`ExecResult`, keeping the
    output so the final result carries the complete stdout/stderr (like ``exec``)."""

    __slots__ = ("stdout", "stderr", "result", "out_len", "err_len")

    def __init__(self) -> None:
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self.out_len = 0
        self.err_len = 0
        self.result: ExecResult | None = None

    def feed(self, event: dict[str, Any], endpoint: str) -> Any:
        from .errors import error_from_response
        from .types import OutputChunk

        t = event.get("type")
        if t == "stdout":
            d = event.get("data") or ""
            self.stdout.append(d)
            self.out_len += len(d)
            return OutputChunk("stdout", d)
        if t == "stderr":
            d = event.get("data") or ""
            self.stderr.append(d)
            self.err_len += len(d)
            return OutputChunk("stderr", d)
        if t == "result":
            r = ExecResult.from_json(event)
            # The result event carries empty stdout/stderr; give back what was streamed.
            r.stdout = "".join(self.stdout) + r.stdout
            r.stderr = "".join(self.stderr) + r.stderr
            self.result = r
            return r
        if t == "error":
            err = event.get("error") or {}
            status = _status_for_code(str(err.get("code", "internal")))
            raise error_from_response(status, {"error": err}, context="sandbox", endpoint=endpoint)
        return None

    def recover(self, full: ExecResult) -> list[Any]:
        """After a dropped stream, turn the complete result fetched again (same request_id)
        into the chunks not yet delivered, then the result."""
        from .types import OutputChunk

        out: list[Any] = []
        if len(full.stdout) > self.out_len:
            out.append(OutputChunk("stdout", full.stdout[self.out_len :]))
        if len(full.stderr) > self.err_len:
            out.append(OutputChunk("stderr", full.stderr[self.err_len :]))
        self.result = full
        out.append(full)
        return out


def _status_for_code(code: str) -> int:
    return {
        "bad_request": 400,
        "path_refused": 400,
        "checksum_mismatch": 400,
        "unauthorized": 401,
        "forbidden": 403,
        "not_found": 404,
        "method_not_allowed": 405,
        "released": 410,
        "payload_too_large": 413,
        "not_supported": 501,
        "pool_exhausted": 503,
        "sandbox_unavailable": 503,
        "overloaded": 503,
        "draining": 503,
    }.get(code, 500)


class RetryPolicy:
    """Connection-level failures (refused, reset, closed before a response) are retried with
    the same request_id until ``retry_timeout`` seconds have passed, with jittered exponential
    backoff. A failure on a reused keep-alive connection is retried at once."""

    __slots__ = ("deadline", "delay", "attempt")

    def __init__(self, retry_timeout: float) -> None:
        self.deadline = time.monotonic() + retry_timeout
        self.delay = 0.02
        self.attempt = 0

    def next_delay(self) -> float | None:
        """Seconds to wait before the next attempt, or ``None`` when out of time."""
        self.attempt += 1
        now = time.monotonic()
        if now >= self.deadline:
            return None
        d = min(self.delay, self.deadline - now)
        self.delay = min(self.delay * 2, 1.0)
        return d * (0.5 + random.random() / 2)


def connection_error(exc: BaseException, endpoint: str) -> InfraError:
    return InfraError(
        f"cannot reach {endpoint}: {type(exc).__name__}: {exc}",
        code="connection_failed",
        retryable=True,
        endpoint=endpoint,
    )


def is_retryable_status(err: ArlError) -> bool:
    """A 503 ``draining`` or ``overloaded`` means the request was not executed: safe to retry
    (same request_id)."""
    return err.status == 503 and err.code in ("draining", "overloaded")


class PoolView:
    """Cached idle counts per (endpoint, pool), used to pick the node with the most idle
    capacity. Entries expire after ``ttl`` seconds; a successful acquisition lowers the cached
    count so concurrent acquisitions spread over the nodes."""

    def __init__(self, ttl: float = 1.0) -> None:
        self.ttl = ttl
        self._at: dict[Endpoint, float] = {}
        self._idle: dict[Endpoint, dict[str, int]] = {}

    def stale(self, eps: Iterable[Endpoint]) -> list[Endpoint]:
        now = time.monotonic()
        return [e for e in eps if now - self._at.get(e, -1e9) > self.ttl]

    def update(self, ep: Endpoint, pools: list[dict[str, Any]] | None) -> None:
        self._at[ep] = time.monotonic()
        if pools is None:  # unreachable: rank it last for a while
            self._idle[ep] = {}
            return
        self._idle[ep] = {
            p["name"]: int((p.get("status") or {}).get("idle", 0)) for p in pools if "name" in p
        }

    def took(self, ep: Endpoint, pool: str, n: int) -> None:
        d = self._idle.get(ep)
        if d is not None and pool in d:
            d[pool] = max(0, d[pool] - n)

    def order(self, eps: list[Endpoint], pool: str, local: Endpoint | None) -> list[Endpoint]:
        def idle(e: Endpoint) -> int:
            return self._idle.get(e, {}).get(pool, -1)

        # Stable sort: among equal idle counts, the configured order wins.
        ranked = sorted((e for e in eps if e != local), key=idle, reverse=True)
        return ([local] if local is not None and local in eps else []) + ranked


def candidate_order(
    cfg: Config, view: PoolView, pool: str, tried: set[Endpoint]
) -> list[Endpoint]:
    return [e for e in view.order(cfg.endpoints, pool, cfg.local) if e not in tried]


def protocol_error(exc: ProtocolError, endpoint: str) -> InfraError:
    """A response that is not HTTP/1.1 as expected: not retried (the node would answer the
    same way again)."""
    return InfraError(
        f"bad response from {endpoint}: {exc}", code="protocol_error", retryable=False, endpoint=endpoint
    )


def best_error(errors: list[ArlError], pool: str) -> ArlError:
    """The error to raise when no node could provide a sandbox: the most telling one."""
    for cls in (PoolExhausted, InfraError, PoolNotFound):
        for e in reversed(errors):
            if isinstance(e, cls):
                return e
    return PoolExhausted(f"no node could provide a sandbox from pool {pool!r}", code="pool_exhausted", status=503)


class HashingReader:
    """A file object's reader that feeds what it reads to a hash (uploads checked end to end)."""

    __slots__ = ("_f", "_h")

    def __init__(self, f: Any, h: Any) -> None:
        self._f = f
        self._h = h

    def read(self, n: int = -1) -> bytes:
        b: bytes = self._f.read(n)
        if b:
            self._h.update(b)
        return b

    def close(self) -> None:
        """Leaves the file open: the caller owns it (a retry reads it again)."""


def mode_str(mode: int | None) -> str | None:
    return None if mode is None else format(mode, "o")


def verify_checksum(info: FileInfo, digest: str, path: str) -> None:
    if info.sha256 and info.sha256 != digest:
        raise ChecksumMismatch(
            f"checksum mismatch for {path}: sent {digest}, node stored {info.sha256}",
            code="checksum_mismatch",
        )
