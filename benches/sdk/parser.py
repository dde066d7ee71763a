"""The SDK's response-head parser against h11 (the parser its tests use as an oracle): CPU per
response for a typical daemon head, in one process, same run.

Usage (from the repository root, with the SDK and h11 installed in the interpreter):

    python benches/sdk/parser.py
"""

from __future__ import annotations

import platform
import statistics
import timeit

import h11

from arl._common import body_framing, parse_head

BODY = b'{"exit_code":0,"stdout":"","stderr":"","duration_ms":0.8,"timed_out":false,"truncated":false}'
HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
    b"date: Thu, 03 Dec 2026 08:40:00 GMT\r\n\r\n" % len(BODY)
)
REQUEST = h11.Request(method="POST", target="/v1/sandboxes/sb/exec", headers=[("Host", "node"), ("Content-Length", "0")])


def sdk() -> None:
    status, headers = parse_head(HEAD)
    body_framing(status, headers)


_conn = h11.Connection(h11.CLIENT)


def h11_cycle() -> None:
    """What h11 costs per request on a kept connection: the request out, the response in."""
    _conn.send(REQUEST)
    _conn.send(h11.EndOfMessage())
    _conn.receive_data(HEAD + BODY)
    while not isinstance(_conn.next_event(), h11.EndOfMessage):
        pass
    _conn.start_next_cycle()


def h11_head() -> None:
    """h11 parsing one head only (a fresh connection, as the tests' oracle does)."""
    c = h11.Connection(h11.CLIENT)
    c.send(REQUEST)
    c.send(h11.EndOfMessage())
    c.receive_data(HEAD)
    c.next_event()


def per_call_us(fn: object, number: int = 20000, repeat: int = 9) -> tuple[float, float]:
    runs = [t / number * 1e6 for t in timeit.repeat(fn, number=number, repeat=repeat)]  # type: ignore[arg-type]
    return min(runs), statistics.median(runs)


def main() -> None:
    print(f"Python {platform.python_version()}, h11 {h11.__version__}; µs per response (min / median of 9 runs)")
    base = per_call_us(sdk)
    for name, fn in [("SDK parse_head + body_framing", sdk), ("h11 request + response cycle", h11_cycle),
                     ("h11 one head, fresh connection", h11_head)]:
        lo, med = base if fn is sdk else per_call_us(fn)
        print(f"  {name:32s} {lo:7.2f} / {med:7.2f}   x{lo / base[0]:.1f}")


if __name__ == "__main__":
    main()
