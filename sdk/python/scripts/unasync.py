#!/usr/bin/env python3
"""Generates the synchronous client from the asyncio one, which is the single source.

    python sdk/python/scripts/unasync.py           # rewrite the generated files
    python sdk/python/scripts/unasync.py --check   # fail (exit 1, with a diff) when stale

Line by line: ``async def`` / ``async for`` / ``async with`` lose ``async``, ``await`` goes,
``__aenter__``-style methods and ``aclose`` take their sync names, ``AsyncFoo`` becomes ``Foo``,
``_async_*`` modules become ``_sync_*``, ``AsyncAcquiring[X]`` (awaited or entered with
``async with``) becomes ``X`` (what the sync client returns at once); a line ending in ``# unasync: async only`` is dropped.
Only the socket layer (``_async_http`` / ``_sync_http``) is written by hand per flavour; it
offers the same names to both (``sleep``, ``map_all``, ``acquiring``, ...). The output is
checked to hold no ``async``, ``await`` or asyncio name."""

from __future__ import annotations

import argparse
import ast
import difflib
import io
import re
import sys
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (source, generated), relative to the SDK's root.
FILES = [
    ("src/arl/_async_transport.py", "src/arl/_sync_transport.py"),
    ("src/arl/aio.py", "src/arl/client.py"),
]

DROP_MARK = "# unasync: async only"

# Applied in order to every line that is kept.
SUBS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(p), r)
    for p, r in [
        (r"\bAsyncGenerator\[(.+?), None\]", r"Generator[\1, None, None]"),
        (r"\bAsyncAcquiring\[(\w+)\]", r"\1"),  # the sync client returns what it acquired,
        (r"(^from .* import .*)\bAsyncAcquiring, ", r"\1"),  # so that type is not imported
        (r"\basync (def|for|with)\b", r"\1"),
        (r"\bawait ", ""),
        (r"\b__a(enter|exit|iter|next)__\b", r"__\1__"),
        (r"\baclose\b", "close"),
        (r"\bStopAsyncIteration\b", "StopIteration"),
        (r"\bAsync([A-Z]\w*)", r"\1"),
        (r"\b_async_(\w+)", r"_sync_\1"),
    ]
]

HEADER = "# Generated from {src} by scripts/unasync.py: do not edit; edit the source and run the script.\n"


def unasync(text: str, src_name: str) -> str:
    out = [HEADER.format(src=src_name)]
    for line in text.splitlines(keepends=True):
        if line.rstrip().endswith(DROP_MARK):
            continue
        for pat, rep in SUBS:
            line = pat.sub(rep, line)
        out.append(_sorted_import(line))
    result = _sorted_relative_imports("".join(out))
    leftovers = _async_names(result)
    if leftovers:
        raise SystemExit(f"unasync: {src_name} leaves asyncio names in the sync code: {', '.join(sorted(leftovers))}")
    return result


_IMPORT = re.compile(r"^(from \S+ import )([\w, ]+)$")


def _sorted_import(line: str) -> str:
    """A one-line ``from`` import with its names in isort's order again (renaming can break it:
    ``AsyncIterator, Iterable`` becomes ``Iterator, Iterable``)."""
    m = _IMPORT.match(line.rstrip("\n"))
    if m is None:
        return line
    names = [n.strip() for n in m.group(2).split(",")]
    names.sort(key=lambda n: (0 if n.isupper() else 1 if n[0].isupper() else 2, n))
    return m.group(1) + ", ".join(names) + "\n"


def _sorted_relative_imports(code: str) -> str:
    """The module's first run of ``from .x import ...`` statements ordered by module again
    (``._async_http`` sorts before ``._common``, ``._sync_http`` after it)."""
    body = ast.parse(code).body
    run = []
    for node in body:
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            run.append(node)
        elif run:
            break
    if len(run) < 2:
        return code
    lines = code.splitlines(keepends=True)
    start, end = run[0].lineno - 1, run[-1].end_lineno or run[-1].lineno
    stmts = ["".join(lines[n.lineno - 1 : n.end_lineno]) for n in run]
    if "".join(stmts) != "".join(lines[start:end]):  # something between them: leave as is
        return code
    order = sorted(range(len(run)), key=lambda i: (run[i].module or "", i))
    return "".join(lines[:start] + [stmts[i] for i in order] + lines[end:])


def _async_names(code: str) -> set[str]:
    """Names in the code (not in strings or comments) that only asyncio code has."""
    found = set()
    for tok in tokenize.generate_tokens(io.StringIO(code).readline):
        if tok.type == tokenize.NAME and (
            tok.string in ("async", "await", "asyncio") or re.match(r"Async[A-Z]|_async_", tok.string)
        ):
            found.add(tok.string)
    return found


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="fail when a generated file is stale, change nothing")
    ap.add_argument("--root", type=Path, default=ROOT, help="the SDK's root (default: this script's parent)")
    args = ap.parse_args(argv)
    stale = []
    for src, dst in FILES:
        source = (args.root / src).read_text()
        want = unasync(source, Path(src).name)
        path = args.root / dst
        have = path.read_text() if path.exists() else ""
        if have == want:
            continue
        if args.check:
            stale.append(dst)
            sys.stdout.writelines(
                difflib.unified_diff(have.splitlines(True), want.splitlines(True), f"{dst} (on disk)", f"{dst} (from {src})")
            )
        else:
            path.write_text(want)
            print(f"unasync: wrote {dst}")
    if stale:
        print(f"unasync: stale generated files: {', '.join(stale)}; run sdk/python/scripts/unasync.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
