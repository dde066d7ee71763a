"""Test helpers: a TCP proxy that can drop responses, and a fake node that is always full."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class DropProxy:
    """Relays TCP to an upstream port. While ``drop_exec`` > 0, the connection carrying the next
    exec request is cut after the daemon has answered (the answer is swallowed, or with
    ``pass_bytes`` only its first bytes are passed on), as if the network failed."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.lock = threading.Lock()
        self.drop_exec = 0
        self.pass_bytes = 0
        self.dropped = 0
        self.connections = 0
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._stop = True
        self.sock.close()

    def _accept(self) -> None:
        while not self._stop:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.connections += 1
            threading.Thread(target=self._handle, args=(c,), daemon=True).start()

    def _handle(self, c: socket.socket) -> None:
        try:
            u = socket.create_connection(("127.0.0.1", self.upstream_port))
        except OSError:
            c.close()
            return
        state = {"armed": False}

        def c2u() -> None:
            try:
                while True:
                    data = c.recv(65536)
                    if not data:
                        break
                    with self.lock:
                        if self.drop_exec > 0 and b"/exec" in data:
                            state["armed"] = True
                    u.sendall(data)
            except OSError:
                pass
            finally:
                try:
                    u.shutdown(socket.SHUT_WR)
                except OSError:
                    pass

        def u2c() -> None:
            try:
                while True:
                    data = u.recv(65536)
                    if not data:
                        break
                    if state["armed"]:
                        with self.lock:
                            self.drop_exec -= 1
                            self.dropped += 1
                        if self.pass_bytes:
                            c.sendall(data[: self.pass_bytes])
                        break
                    c.sendall(data)
            except OSError:
                pass
            finally:
                for s in (c, u):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    s.close()

        threading.Thread(target=c2u, daemon=True).start()
        threading.Thread(target=u2c, daemon=True).start()


class FullNode:
    """A fake node that answers every acquisition with a 503 (``pool_exhausted``, or
    ``draining`` as a cordoned node does) and the given alternatives, and reports no idle
    capacity."""

    def __init__(self, alternatives: list[str], code: str = "pool_exhausted") -> None:
        alts = alternatives
        self.hits = 0
        outer = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a: Any) -> None:
                pass

            def _send(self, status: int, obj: Any) -> None:
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path.startswith("/v1/pools"):
                    self._send(200, {"pools": [{"name": "default", "spec": {}, "status": {"idle": 0, "allocated": 1, "starting": 0, "total": 1, "ready": True, "last_error": None}}]})
                else:
                    self._send(200, {"status": "ok"})

            def do_POST(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(n)
                outer.hits += 1
                self._send(503, {"error": {"code": code, "message": "no idle sandbox", "retryable": True, "alternatives": alts}})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class ScriptedNode:
    """A fake node answering POST/PUT/DELETE requests with a script of (status, json) replies
    (the last one repeats); GET /v1/pools reports one idle sandbox. Records request bodies."""

    def __init__(self, script: list[tuple[int, Any]]) -> None:
        self.script = list(script)
        self.bodies: list[bytes] = []
        outer = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a: Any) -> None:
                pass

            def _send(self, status: int, obj: Any) -> None:
                data = b"" if obj is None else json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._send(200, {"pools": [{"name": "default", "spec": {}, "status": {"idle": 1, "allocated": 0, "starting": 0, "total": 1, "ready": True, "last_error": None}}]})

            def _scripted(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                outer.bodies.append(self.rfile.read(n))
                status, body = outer.script.pop(0) if len(outer.script) > 1 else outer.script[0]
                self._send(status, body)

            do_POST = do_PUT = do_DELETE = _scripted

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
