# The Python session's helper, carried inside the agent and run as `python3 -c <this>`.
#
# Requests come one per line on a private duplicate of stdin, as JSON {"code", "marker"}; the
# real stdin becomes /dev/null so that the snippet (and what it starts) cannot read them. A
# snippet's output goes to the real stdout and stderr as it is written; when it is done, the
# marker and a JSON line (value, MIME bundle, error) follow on stdout, and the marker on
# stderr, so the agent knows both streams are complete.
#
# SIGINT raises KeyboardInterrupt only while a snippet runs: one that arrives between
# snippets (a timeout racing the end of its snippet) is dropped, never felt by the next one.
import ast
import base64
import builtins
import json
import linecache
import os
import signal
import sys
import traceback

_requests = os.fdopen(os.dup(0), "rb", buffering=0)
_null = os.open(os.devnull, os.O_RDONLY)
os.dup2(_null, 0)
os.close(_null)
sys.stdin = open(os.devnull)
# Output leaves line by line (a newline or a carriage return flushes, as on a terminal): a
# `print` is one event, not one per write, and progress lines still stream.
sys.stdout.reconfigure(line_buffering=True)
sys.stderr.reconfigure(line_buffering=True)

_running = False


def _on_sigint(signum, frame):
    if _running:
        raise KeyboardInterrupt


signal.signal(signal.SIGINT, _on_sigint)

_MIME = [
    ("text/html", "_repr_html_"),
    ("text/markdown", "_repr_markdown_"),
    ("text/latex", "_repr_latex_"),
    ("image/svg+xml", "_repr_svg_"),
    ("image/png", "_repr_png_"),
    ("image/jpeg", "_repr_jpeg_"),
    ("application/json", "_repr_json_"),
]
# Representations beyond this many bytes in all are left out of the bundle (the repr always
# stays); a repr, an exception's message and its traceback are cut at _MAX_REPR each, so the
# result line stays well within the agent's bound on it.
_MAX_MIME = 8 << 20
_MAX_REPR = 1 << 20
_globals = {"__name__": "__main__", "__builtins__": builtins}
_cells = 0


def _bundle(value):
    data = {}
    mimebundle = getattr(value, "_repr_mimebundle_", None)
    if callable(mimebundle):
        try:
            got = mimebundle()
            if isinstance(got, tuple):
                got = got[0]
            if isinstance(got, dict):
                data.update(got)
        except Exception:
            pass
    for mime, method in _MIME:
        if mime in data:
            continue
        fn = getattr(value, method, None)
        if not callable(fn) or isinstance(value, type):
            continue
        try:
            got = fn()
        except Exception:
            continue
        if got is None:
            continue
        if isinstance(got, tuple):
            got = got[0]
        data[mime] = got
    out = {}
    room = _MAX_MIME
    for mime, got in data.items():
        if isinstance(got, (bytes, bytearray)):
            got = base64.b64encode(bytes(got)).decode("ascii")
        try:
            text = json.dumps(got)
        except (TypeError, ValueError):
            continue
        if len(text) <= room:
            out[mime] = got
            room -= len(text)
    return out


def _cut(text):
    return text if len(text) <= _MAX_REPR else text[:_MAX_REPR] + "..."



def _error(exc):
    # Without the helper's own frames: the traceback is the snippet's.
    te = traceback.TracebackException(type(exc), exc, exc.__traceback__)
    te.stack = traceback.StackSummary.from_list([f for f in te.stack if f.filename != _HELPER])
    text = _cut("".join(te.format()).rstrip("\n")).split("\n")
    try:
        evalue = _cut(str(exc))
    except Exception:
        evalue = "<unprintable>"
    return {"ename": type(exc).__name__, "evalue": evalue, "traceback": text}


def _run(code):
    global _running, _cells
    _cells += 1
    name = "<cell-%d>" % _cells
    linecache.cache[name] = (len(code), None, code.splitlines(True), name)
    result = {"value": None, "data": None, "error": None}
    try:
        _running = True
        tree = ast.parse(code, name, "exec")
        last = None
        if tree.body and isinstance(tree.body[-1], ast.Expr):
            last = ast.Expression(tree.body.pop().value)
        exec(compile(tree, name, "exec"), _globals)
        if last is not None:
            value = eval(compile(last, name, "eval"), _globals)
            _running = False
            if value is not None:
                builtins._ = value
                text = _cut(repr(value))
                result["value"] = text
                bundle = _bundle(value)
                if bundle:
                    bundle["text/plain"] = text
                    result["data"] = bundle
        _running = False
    except BaseException as exc:  # SystemExit and KeyboardInterrupt are results too
        _running = False
        result["error"] = _error(exc)
    return result


def _write(fd, data):
    while data:
        n = os.write(fd, data)
        data = data[n:]


def _main():
    pending = b""
    while True:
        chunk = _requests.read(65536)
        if not chunk:
            return
        pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            req = json.loads(line)
            result = _run(req["code"])
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except Exception:
                    pass
            marker = req["marker"].encode()
            _write(1, marker + json.dumps(result).encode() + b"\n")
            _write(2, marker + b"\n")


_HELPER = _main.__code__.co_filename
_main()
