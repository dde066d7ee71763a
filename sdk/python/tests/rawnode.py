"""A fake node speaking raw bytes: each request it receives is answered with the next scripted
reply (the last one repeats), so tests can send heads and bodies no real server would."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass

# A reply: bytes to send, or a function given the connection's socket that sends what it wants.
Reply = bytes | Callable[[socket.socket], None]


@dataclass
class Close:
    """A reply after which the node closes the connection."""

    data: bytes


class RawNode:
    def __init__(self, replies: list[Reply | Close]) -> None:
        self.replies = list(replies)
        self.requests: list[bytes] = []
        self.release = threading.Event()  # ends stalls (see ``stall``)
        self._lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.sock.close()
        for c in self._conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()

    def stall(self, data: bytes) -> Callable[[socket.socket], None]:
        """A reply that sends ``data`` and then nothing more until the node is closed."""

        def send(s: socket.socket) -> None:
            s.sendall(data)
            self.release.wait(30)

        return send

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self._conns.append(c)
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c: socket.socket) -> None:
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = c.recv(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    k, _, v = line.partition(b":")
                    if k.strip().lower() == b"content-length":
                        length = int(v)
                while len(buf) < length:
                    data = c.recv(65536)
                    if not data:
                        return
                    buf += data
                body, buf = buf[:length], buf[length:]
                with self._lock:
                    self.requests.append(head + b"\r\n\r\n" + body)
                    reply = self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]
                if isinstance(reply, Close):
                    c.sendall(reply.data)
                    return
                if isinstance(reply, bytes):
                    c.sendall(reply)
                else:
                    reply(c)
        except OSError:
            return
        finally:
            c.close()


def json_reply(body: bytes, status: str = "200 OK") -> bytes:
    return b"HTTP/1.1 " + status.encode() + b"\r\ncontent-type: application/json\r\ncontent-length: " + str(
        len(body)
    ).encode() + b"\r\n\r\n" + body


def chunked(*parts: bytes) -> bytes:
    """A chunked body of these chunks, with the last (empty) one."""
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts if p) + b"0\r\n\r\n"
