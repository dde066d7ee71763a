"""Latency floor for `sb.exec(["true"])`: a minimal HTTP/1.1 (a thread per connection) keep-alive server
that spawns /bin/true per request (posix_spawn + waitpid) and answers with an ExecResult-sized
JSON body. Usage: floor_server.py PORT"""

import json
import os
import socket
import sys
import threading
import time


def serve(port: int) -> None:
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", port))
    ls.listen(16)
    print("ready", flush=True)
    while True:
        c, _ = ls.accept()
        threading.Thread(target=handle, args=(c,), daemon=True).start()


def handle(c: socket.socket) -> None:
    if True:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = b""
        while True:
            while b"\r\n\r\n" not in buf:
                d = c.recv(65536)
                if not d:
                    break
                buf += d
            if b"\r\n\r\n" not in buf:
                break
            head, _, buf = buf.partition(b"\r\n\r\n")
            n = 0
            for line in head.split(b"\r\n")[1:]:
                k, _, v = line.partition(b":")
                if k.strip().lower() == b"content-length":
                    n = int(v)
            while len(buf) < n:
                buf += c.recv(65536)
            buf = buf[n:]
            t0 = time.perf_counter()
            pid = os.posix_spawn("/bin/true", ["/bin/true"], {})
            _, status = os.waitpid(pid, 0)
            body = json.dumps({
                "stdout": "", "stderr": "", "exit_code": os.waitstatus_to_exitcode(status), "signal": None,
                "timed_out": False, "truncated": False, "duration_ms": (time.perf_counter() - t0) * 1000,
            }).encode()
            c.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        c.close()


if __name__ == "__main__":
    serve(int(sys.argv[1]))
