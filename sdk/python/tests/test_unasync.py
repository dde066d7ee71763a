"""The generator of the sync client (scripts/unasync.py): its rules, and its staleness check."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

SDK = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("unasync", SDK / "scripts" / "unasync.py")
assert _spec is not None and _spec.loader is not None
unasync = importlib.util.module_from_spec(_spec)
sys.modules["unasync"] = unasync
_spec.loader.exec_module(unasync)

SOURCE = '''"""About :class:`AsyncThing`."""
from collections.abc import AsyncGenerator, AsyncIterator, Iterable
from ._async_http import AsyncPool, sleep
from ._async_http import AsyncAcquiring  # unasync: async only


class AsyncThing:
    async def __aenter__(self) -> AsyncThing:
        return self

    async def aclose(self) -> None:
        await self._pool.aclose()

    close = aclose  # unasync: async only

    def get(self) -> AsyncAcquiring[AsyncThing]:
        return acquiring(self._get())

    async def lines(self) -> AsyncGenerator[bytes, None]:
        async with self._lock:
            async for x in self._it:
                yield x

    async def first(self, it: AsyncIterator[bytes]) -> bytes:
        try:
            return await it.__anext__()
        except StopAsyncIteration:
            await sleep(1)
            return b""
'''

EXPECTED = '''"""About :class:`Thing`."""
from collections.abc import Generator, Iterable, Iterator
from ._sync_http import Pool, sleep


class Thing:
    def __enter__(self) -> Thing:
        return self

    def close(self) -> None:
        self._pool.close()


    def get(self) -> Thing:
        return acquiring(self._get())

    def lines(self) -> Generator[bytes, None, None]:
        with self._lock:
            for x in self._it:
                yield x

    def first(self, it: Iterator[bytes]) -> bytes:
        try:
            return it.__next__()
        except StopIteration:
            sleep(1)
            return b""
'''


def test_the_rules() -> None:
    out = unasync.unasync(SOURCE, "thing.py")
    header, _, body = out.partition("\n")
    assert header.startswith("# Generated from thing.py by scripts/unasync.py")
    assert body == EXPECTED


def test_asyncio_left_in_the_output_is_refused() -> None:
    with pytest.raises(SystemExit, match="asyncio"):
        unasync.unasync("import asyncio\nx = asyncio.get_running_loop()\n", "bad.py")
    # Words in strings and comments are text, not code.
    unasync.unasync('"""Runs under asyncio."""  # or asyncio\n', "ok.py")


def test_the_generated_files_are_fresh() -> None:
    assert unasync.main(["--check"]) == 0


def test_a_stale_generated_file_fails_the_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copytree(SDK / "src", tmp_path / "src")
    src = tmp_path / "src" / "arl" / "aio.py"
    src.write_text(src.read_text().replace("async def healthy(", "async def is_healthy("))
    assert unasync.main(["--check", "--root", str(tmp_path)]) == 1
    assert "+    def is_healthy(" in capsys.readouterr().out
    # Regenerating makes it fresh; the generated file then has the change.
    assert unasync.main(["--root", str(tmp_path)]) == 0
    assert unasync.main(["--check", "--root", str(tmp_path)]) == 0
    assert "def is_healthy(" in (tmp_path / "src" / "arl" / "client.py").read_text()
