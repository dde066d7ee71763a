"""The response-head parser against h11 as an oracle: thousands of heads, valid and invalid,
built from pieces; both must accept or refuse each one alike, and agree on the status, the
headers and how the body ends. Where the SDK is deliberately stricter it is said below."""

from __future__ import annotations

import random
from typing import Any

import h11
import pytest

from arl._common import ProtocolError, body_framing, parse_head

STATUS_OK = [
    b"HTTP/1.1 200 OK",
    b"HTTP/1.1 404 Not Found",
    b"HTTP/1.0 200 OK",
    b"HTTP/1.1 204",
    b"HTTP/1.1 200 ",
    b"HTTP/1.1 503 Service\tUnavailable",
    b"HTTP/1.1 304 Not Modified",
    b"HTTP/1.1 100 Continue",
    b"HTTP/1.1 103 Early Hints",
    b"HTTP/1.1 200 \x80\xff obs-text",
    b"HTTP/1.1 999 x",
]
STATUS_BAD = [
    b"HTTP/1.1 2000 OK",
    b"HTTP/1.1 20 OK",
    b"HTTP/1.1  200 OK",
    b"http/1.1 200 OK",
    b"HTTP/1.1 200 O\x00K",
    b"HTTP/1.1 200 O\rK",
    b"HTTP/1.1 200 O\x0bK",
    b"HTTP/1.1 099 Low",
    b"HTTP/1.1 2x0 OK",
    b"HTTP/11 200 OK",
    b"HTTP/1.1 200OK",
    b"SSH-2.0-OpenSSH_9.2",
    b" HTTP/1.1 200 OK",
]
# Accepted by h11 (any version digit.digit), refused here: a node speaks HTTP/1.x.
STATUS_OTHER_VERSION = [b"HTTP/2.0 200 OK", b"HTTP/0.9 200 OK"]

HEADER_OK = [
    b"Content-Type: application/json",
    b"x-a: 1",
    b"X-A: 2",
    b"x-a:",
    b"x-empty: ",
    b"Server:  hyper\t",
    b"x-obs: \x80\xfe",
    b"x-ctl: a\x01b\x7f",
    b"x-tab: a\tb  c",
    b"Connection: close",
    b"connection: keep-alive",
    b"Content-Length: 5",
    b"content-length: 0",
    b"Content-Length:  12 ",
    b"content-length: 007",
    b"Transfer-Encoding: chunked",
    b"transfer-encoding: Chunked",
    b"x-list: a, b",
    b"!#$%&'*+-.^_`|~09azAZ: tokens",
]
HEADER_BAD = [
    b"no colon",
    b"bad name: v",
    b"name : v",
    b": empty name",
    b"x-nul: a\x00b",
    b"x-vt: a\x0bb",
    b"x-ff: a\x0cb",
    b"x-cr: a\rb",
    b"Content-Length: 5x",
    b"Content-Length: -1",
    b"Content-Length: +5",
    b"content-length: 1 2",
    b"Content-Length: " + b"9" * 21,
    b"Content-Length: 5, 6",
    b"Transfer-Encoding: gzip",
    b"Transfer-Encoding: gzip, chunked",
    b"x(y): z",
    b"\x80name: v",
]
OBS_FOLD = [b"  continued", b"\tmore", b"   "]


def head_cases(n: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    cases = []
    for _ in range(n):
        r = rng.random()
        status = rng.choice(STATUS_OK if r < 0.85 else STATUS_BAD if r < 0.95 else STATUS_OTHER_VERSION)
        lines = [status]
        for _ in range(rng.randrange(0, 7)):
            r = rng.random()
            lines.append(rng.choice(HEADER_OK if r < 0.8 else HEADER_BAD if r < 0.9 else OBS_FOLD))
        ends = rng.choice(["crlf", "crlf", "lf", "mixed"])
        out = b""
        for line in lines + [b""]:
            out += line + (b"\r\n" if ends == "crlf" or (ends == "mixed" and rng.random() < 0.5) else b"\n")
        cases.append(out)
    return cases


def ours(raw: bytes) -> tuple[Any, ...]:
    try:
        status, headers = parse_head(raw)
        length, chunked, _ = body_framing(status, headers)
    except ProtocolError:
        return ("refused",)
    if "transfer-encoding" in headers:  # h11 gives it lower-cased
        headers["transfer-encoding"] = headers["transfer-encoding"].lower()
    if status < 200:
        return ("interim", status, headers)
    framing = "chunked" if chunked else ("length", length) if length is not None else "until close"
    return ("final", status, headers, framing)


def oracle(raw: bytes) -> tuple[Any, ...]:
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("Host", "node")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(raw)
    try:
        ev = conn.next_event()
    except h11.RemoteProtocolError:
        return ("refused",)
    assert isinstance(ev, (h11.Response, h11.InformationalResponse)), ev
    headers: dict[str, str] = {}
    for name, value in ev.headers:  # repeated headers joined, as RFC 9110 5.3 allows
        k, v = name.decode("latin-1"), value.decode("latin-1")
        headers[k] = headers[k] + ", " + v if k in headers else v
    if isinstance(ev, h11.InformationalResponse):
        return ("interim", ev.status_code, headers)
    reader = conn._reader  # how h11 will read the body
    kind = type(reader).__name__
    framing = {"ChunkedReader": "chunked", "Http10Reader": "until close"}.get(kind) or ("length", reader._length)
    return ("final", ev.status_code, headers, framing)


def stricter_on_purpose(raw: bytes) -> bool:
    """Heads h11 accepts and the SDK refuses, by design: a version other than HTTP/1.x, and a
    Content-Length given twice (h11 keeps one when the values are equal; RFC 9112 6.3 allows
    refusing, and two lengths are what response smuggling is made of)."""
    if not raw.startswith(b"HTTP/1."):
        return True
    lengths = [ln for ln in raw.replace(b"\r\n", b"\n").split(b"\n") if ln.lower().startswith(b"content-length:")]
    return len(lengths) > 1 or any(b"," in ln for ln in lengths)


@pytest.mark.parametrize("seed", range(4))
def test_heads_agree_with_h11(seed: int) -> None:
    cases = head_cases(1500, seed)
    verdicts = {"refused": 0, "interim": 0, "final": 0}
    for raw in cases:
        want, got = oracle(raw), ours(raw)
        verdicts[got[0]] += 1
        if got != want:
            assert got == ("refused",) and stricter_on_purpose(raw), f"{raw!r}: h11 {want}, SDK {got}"
    # The generator reaches every outcome, often.
    assert min(verdicts.values()) > 50, verdicts


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5,5\r\n\r\n",
        b"HTTP/2.0 200 OK\r\n\r\n",
    ],
)
def test_where_the_sdk_is_stricter_than_h11(raw: bytes) -> None:
    assert oracle(raw)[0] == "final"
    assert ours(raw) == ("refused",)


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n 6\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n continued\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
    ],
)
def test_both_refuse(raw: bytes) -> None:
    assert oracle(raw) == ours(raw) == ("refused",)


def test_folded_and_repeated_values() -> None:
    raw = b"HTTP/1.1 200 OK\r\nX-A: 1\r\nx-a: 2\r\n  more \r\nContent-Length: 3\r\n \r\n\r\n"
    assert ours(raw) == oracle(raw) == ("final", 200, {"x-a": "1, 2 more", "content-length": "3"}, ("length", 3))
