"""asyncio client: :class:`AsyncClient` and :class:`AsyncSandbox` (same methods as the sync
ones, as coroutines)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
from collections import deque
from collections.abc import AsyncIterator, Generator, Iterable, Mapping
from typing import Any, BinaryIO

from ._async_http import AsyncTransport
from ._common import (
    Config,
    Endpoint,
    PoolView,
    StreamAssembler,
    acquire_body,
    check_timeout,
    dumps,
    exec_body,
    exec_read_timeout,
    file_query,
    files_body,
    loads,
    new_request_id,
    resolve_config,
)
from .client import _best_error, _HashingReader, _mode, _verify
from .errors import ArlError, AuthError, InfraError, NotFound, PoolExhausted, PoolNotFound, SandboxNotFound
from .types import ExecResult, FileInfo, OutputChunk, PoolInfo, PoolSpec, SandboxInfo

__all__ = ["AsyncClient", "AsyncSandbox", "AsyncSandboxList"]

_NDJSON = {"Content-Type": "application/json", "Accept": "application/x-ndjson"}
_OCTET = {"Content-Type": "application/octet-stream"}


class AsyncClient:
    """asyncio twin of :class:`arl.Client`. Create it inside a running event loop (or at least
    use it from a single loop) and ``await client.aclose()`` at the end, or use
    ``async with AsyncClient() as client``."""

    def __init__(
        self,
        endpoints: str | Iterable[str] | None = None,
        token: str | None = None,
        *,
        node_ip: str | None = None,
        local_endpoint: str | None = None,
        timeout: float = 30.0,
        connect_timeout: float = 5.0,
        retry_timeout: float = 10.0,
        pool_cache_ttl: float = 1.0,
    ) -> None:
        self._cfg: Config = resolve_config(endpoints, token, node_ip=node_ip, local_endpoint=local_endpoint)
        self.timeout = timeout
        self.retry_timeout = retry_timeout
        self._t = AsyncTransport(self._cfg.token, connect_timeout=connect_timeout, retry_timeout=retry_timeout)
        self._view = PoolView(pool_cache_ttl)

    @property
    def endpoints(self) -> list[str]:
        return [e.url for e in self._cfg.endpoints]

    @property
    def local_endpoint(self) -> str | None:
        return self._cfg.local.url if self._cfg.local else None

    async def aclose(self) -> None:
        await self._t.close()

    close = aclose

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    def _ep(self, endpoint: str | None) -> Endpoint:
        return Endpoint.parse(endpoint) if endpoint else self._cfg.endpoints[0]

    async def healthy(self, endpoint: str | None = None) -> bool:
        try:
            st, _ = await self._t.request(self._ep(endpoint), "GET", "/healthz", timeout=self.timeout, retry_timeout=0)
            return st == 200
        except ArlError:
            return False

    async def ready(self, endpoint: str | None = None) -> bool:
        try:
            st, _ = await self._t.request(self._ep(endpoint), "GET", "/readyz", timeout=self.timeout, retry_timeout=0)
            return st == 200
        except ArlError:
            return False

    async def pools(self, endpoint: str | None = None) -> list[PoolInfo]:
        eps = [self._ep(endpoint)] if endpoint else self._cfg.endpoints

        async def one(ep: Endpoint) -> list[PoolInfo]:
            d = await self._t.request_json(ep, "GET", "/v1/pools", timeout=self.timeout, context="pool")
            items = d.get("pools", [])
            self._view.update(ep, items)
            return [PoolInfo.from_json(p, ep.url) for p in items]

        out: list[PoolInfo] = []
        for part in await asyncio.gather(*(one(ep) for ep in eps)):
            out.extend(part)
        return out

    async def pool(self, name: str, endpoint: str | None = None) -> PoolInfo:
        for p in await self.pools(endpoint):
            if p.name == name:
                return p
        raise PoolNotFound(f"pool {name!r} not found", code="not_found", status=404)

    async def put_pool(
        self, name: str, spec: PoolSpec | Mapping[str, Any] | None = None, *, endpoint: str | None = None, **fields: Any
    ) -> PoolInfo:
        body: dict[str, Any] = spec.to_json() if isinstance(spec, PoolSpec) else dict(spec or {})
        body.update({k: v for k, v in fields.items() if v is not None})
        data = dumps(body)
        eps = [self._ep(endpoint)] if endpoint else self._cfg.endpoints
        first: PoolInfo | None = None
        for ep in eps:
            d = await self._t.request_json(ep, "PUT", f"/v1/pools/{name}", data, timeout=self.timeout, context="pool")
            info = PoolInfo.from_json(d, ep.url)
            first = first or info
        assert first is not None
        return first

    async def delete_pool(self, name: str, *, endpoint: str | None = None, missing_ok: bool = False) -> None:
        eps = [self._ep(endpoint)] if endpoint else self._cfg.endpoints
        for ep in eps:
            try:
                await self._t.request(ep, "DELETE", f"/v1/pools/{name}", timeout=self.timeout, context="pool")
            except NotFound:
                if not missing_ok:
                    raise

    def sandbox(
        self,
        pool: str = "default",
        *,
        env: Mapping[str, str] | None = None,
        ttl: float | None = None,
        idle_timeout: float | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> _Acquire:
        """Acquire a sandbox: ``sb = await client.sandbox("default")``, or
        ``async with client.sandbox("default") as sb:`` to release it on exit."""
        return _Acquire(self, pool, env, ttl, idle_timeout, labels)

    acquire = sandbox

    def acquire_many(
        self,
        pool: str,
        n: int,
        *,
        env: Mapping[str, str] | None = None,
        ttl: float | None = None,
        idle_timeout: float | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> _AcquireMany:
        """Acquire ``n`` sandboxes: ``sbs = await client.acquire_many(pool, n)``, or
        ``async with client.acquire_many(pool, n) as sbs:`` to release them all on exit."""
        if n < 1:
            raise ValueError("n must be >= 1")
        return _AcquireMany(self, pool, n, env, ttl, idle_timeout, labels)

    async def _acquire(
        self,
        pool: str,
        count: int,
        env: Mapping[str, str] | None,
        ttl: float | None,
        idle_timeout: float | None,
        labels: Mapping[str, str] | None,
    ) -> list[AsyncSandbox]:
        body = dumps(acquire_body(pool, count, env, ttl, idle_timeout, labels, new_request_id()))
        eps = self._cfg.endpoints
        tried: set[Endpoint] = set()
        pending: deque[Endpoint] = deque()
        errors: list[ArlError] = []
        ranked = False
        if len(eps) == 1:  # hot path: nothing to choose
            try:
                d = await self._t.request_json(eps[0], "POST", "/v1/sandboxes", body, timeout=self.timeout, context="pool")
                return [AsyncSandbox(self, eps[0], SandboxInfo.from_json(s, eps[0].url)) for s in d["sandboxes"]]
            except PoolExhausted as e:
                if not e.alternatives:
                    raise
                errors.append(e)
                tried.add(eps[0])
                pending.extend(Endpoint.parse(a) for a in e.alternatives)
                ranked = True  # only the daemon's alternatives are left to try
        elif self._cfg.local is not None:
            pending.append(self._cfg.local)
        while True:
            if not pending and not ranked:
                await self._refresh_view([e for e in eps if e not in tried])
                pending.extend(e for e in self._view.order(eps, pool, None) if e not in tried)
                ranked = True
            while pending and pending[0] in tried:
                pending.popleft()
            if not pending:
                break
            ep = pending.popleft()
            tried.add(ep)
            last = not pending and ranked
            try:
                d = await self._t.request_json(
                    ep, "POST", "/v1/sandboxes", body, timeout=self.timeout, context="pool",
                    retry_timeout=None if last else 0.0,
                )
            except PoolExhausted as e:
                errors.append(e)
                alts = [Endpoint.parse(a) for a in e.alternatives]
                pending.extendleft(a for a in reversed(alts) if a not in tried)
                continue
            except (InfraError, PoolNotFound) as e:
                errors.append(e)
                continue
            self._view.took(ep, pool, count)
            return [AsyncSandbox(self, ep, SandboxInfo.from_json(s, ep.url)) for s in d["sandboxes"]]
        raise _best_error(errors, pool)

    async def _refresh_view(self, eps: list[Endpoint]) -> None:
        async def one(ep: Endpoint) -> None:
            try:
                d = await self._t.request_json(ep, "GET", "/v1/pools", timeout=min(self.timeout, 2.0), retry_timeout=0.0)
                self._view.update(ep, d.get("pools", []))
            except AuthError:
                raise
            except ArlError:
                self._view.update(ep, None)

        await asyncio.gather(*(one(ep) for ep in self._view.stale(eps)))

    async def attach(self, sandbox_id: str, endpoint: str | None = None) -> AsyncSandbox:
        eps = [self._ep(endpoint)] if endpoint else self._cfg.endpoints
        errors: list[ArlError] = []
        for ep in eps:
            try:
                d = await self._t.request_json(ep, "GET", f"/v1/sandboxes/{sandbox_id}", timeout=self.timeout, context="sandbox")
                return AsyncSandbox(self, ep, SandboxInfo.from_json(d, ep.url))
            except (NotFound, InfraError) as e:
                errors.append(e)
        raise next((e for e in errors if isinstance(e, NotFound)), errors[0])

    async def sandboxes(self, endpoint: str | None = None) -> list[SandboxInfo]:
        eps = [self._ep(endpoint)] if endpoint else self._cfg.endpoints
        out: list[SandboxInfo] = []
        for ep in eps:
            d = await self._t.request_json(ep, "GET", "/v1/sandboxes", timeout=self.timeout)
            out.extend(SandboxInfo.from_json(s, ep.url) for s in d.get("sandboxes", []))
        return out


class _Acquire:
    """Awaitable and async context manager returned by :meth:`AsyncClient.sandbox`."""

    __slots__ = ("_c", "_args", "_sb")

    def __init__(self, client: AsyncClient, *args: Any) -> None:
        self._c = client
        self._args = args
        self._sb: AsyncSandbox | None = None

    async def _get(self) -> AsyncSandbox:
        return (await self._c._acquire(self._args[0], 1, *self._args[1:]))[0]

    def __await__(self) -> Generator[Any, None, AsyncSandbox]:
        return self._get().__await__()

    async def __aenter__(self) -> AsyncSandbox:
        self._sb = await self._get()
        return self._sb

    async def __aexit__(self, et: Any, ev: Any, tb: Any) -> None:
        if self._sb is not None:
            await self._sb.__aexit__(et, ev, tb)


class _AcquireMany:
    """Awaitable and async context manager returned by :meth:`AsyncClient.acquire_many`."""

    __slots__ = ("_c", "_args", "_sbs")

    def __init__(self, client: AsyncClient, *args: Any) -> None:
        self._c = client
        self._args = args
        self._sbs: AsyncSandboxList | None = None

    async def _get(self) -> AsyncSandboxList:
        c = self._c
        pool, n, *rest = self._args
        try:
            return AsyncSandboxList(await c._acquire(pool, n, *rest))
        except PoolExhausted:
            if len(c._cfg.endpoints) == 1 or n == 1:
                raise
        # No single node has n idle: gather them one by one across the nodes (all or nothing).
        got = AsyncSandboxList()
        try:
            for _ in range(n):
                got.append((await c._acquire(pool, 1, *rest))[0])
        except BaseException:
            await got.release_all(raise_errors=False)
            raise
        return got

    def __await__(self) -> Generator[Any, None, AsyncSandboxList]:
        return self._get().__await__()

    async def __aenter__(self) -> AsyncSandboxList:
        self._sbs = await self._get()
        return self._sbs

    async def __aexit__(self, et: Any, ev: Any, tb: Any) -> None:
        if self._sbs is not None:
            await self._sbs.__aexit__(et, ev, tb)


class AsyncSandbox:
    """asyncio twin of :class:`arl.Sandbox`."""

    __slots__ = ("_c", "_t", "_ep", "info", "_base", "_exec_path", "_released")

    def __init__(self, client: AsyncClient, ep: Endpoint, info: SandboxInfo) -> None:
        self._c = client
        self._t = client._t
        self._ep = ep
        self.info = info
        self._base = f"/v1/sandboxes/{info.id}"
        self._exec_path = self._base + "/exec"
        self._released = False

    @property
    def id(self) -> str:
        return self.info.id

    @property
    def pool(self) -> str:
        return self.info.pool

    @property
    def endpoint(self) -> str:
        return self._ep.url

    @property
    def workspace(self) -> str:
        return self.info.workspace

    @property
    def released(self) -> bool:
        return self._released

    def __repr__(self) -> str:
        return f"AsyncSandbox(id={self.id!r}, pool={self.pool!r}, endpoint={self.endpoint!r})"

    async def __aenter__(self) -> AsyncSandbox:
        return self

    async def __aexit__(self, et: Any, ev: Any, tb: Any) -> None:
        if et is None:
            await self.release()
        else:
            try:
                await self.release()
            except (ArlError, asyncio.CancelledError):
                pass

    async def exec(
        self,
        cmd: list[str] | tuple[str, ...] | str,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        stdin: str | bytes | None = None,
        max_output_bytes: int | None = None,
        request_id: str | None = None,
        raise_on_timeout: bool = False,
    ) -> ExecResult:
        """See :meth:`arl.Sandbox.exec`."""
        body = dumps(exec_body(cmd, env, cwd, timeout, stdin, max_output_bytes, request_id or new_request_id()))
        d = await self._t.request_json(
            self._ep, "POST", self._exec_path, body, timeout=exec_read_timeout(timeout), context="sandbox"
        )
        r = ExecResult.from_json(d)
        if raise_on_timeout:
            check_timeout(r, True, cmd)
        return r

    async def stream(
        self,
        cmd: list[str] | tuple[str, ...] | str,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        stdin: str | bytes | None = None,
        max_output_bytes: int | None = None,
        request_id: str | None = None,
        raise_on_timeout: bool = False,
    ) -> AsyncIterator[OutputChunk | ExecResult]:
        """See :meth:`arl.Sandbox.stream`: ``async for item in sb.stream(...)``."""
        rid = request_id or new_request_id()
        body = dumps(exec_body(cmd, env, cwd, timeout, stdin, max_output_bytes, rid))
        rt = exec_read_timeout(timeout)
        asm = StreamAssembler()
        resp = await self._t.open(self._ep, "POST", self._exec_path, body, headers=_NDJSON, timeout=rt, context="sandbox")
        lines = self._t.iter_lines(self._ep, resp, rt).__aiter__()
        broken: BaseException | None = None
        try:
            while True:
                try:
                    line = await lines.__anext__()
                    item = asm.feed(loads(line), self._ep.url)
                except StopAsyncIteration:
                    break
                except (OSError, EOFError, ValueError, asyncio.LimitOverrunError) as e:
                    broken = e
                    break
                if item is None:
                    continue
                if isinstance(item, ExecResult):
                    check_timeout(item, raise_on_timeout, cmd)
                yield item
        finally:
            await lines.aclose()  # type: ignore[attr-defined]
        if asm.result is not None:
            return
        if broken is None:
            raise InfraError(
                f"stream from {self._ep} ended without a result", code="incomplete_stream", retryable=True,
                endpoint=self._ep.url,
            )
        d = await self._t.request_json(self._ep, "POST", self._exec_path, body, timeout=rt, context="sandbox")
        for item in asm.recover(ExecResult.from_json(d)):
            if isinstance(item, ExecResult):
                check_timeout(item, raise_on_timeout, cmd)
            yield item

    async def write_files(self, files: Mapping[str, str | bytes], *, mode: int | None = None) -> list[FileInfo]:
        d = await self._t.request_json(
            self._ep, "POST", self._base + "/files", dumps(files_body(files, mode)),
            timeout=self._c.timeout, context="file",
        )
        return [FileInfo.from_json(f) for f in d.get("files", [])]

    async def write_file(self, path: str, data: str | bytes | BinaryIO, *, mode: int | None = None) -> FileInfo:
        if isinstance(data, str):
            data = data.encode()
        if isinstance(data, (bytes, bytearray, memoryview)):
            raw = bytes(data)
            q = file_query(path, mode=_mode(mode), sha256=hashlib.sha256(raw).hexdigest())
            d = await self._t.request_json(self._ep, "PUT", self._base + "/files" + q, raw, timeout=self._c.timeout, context="file")
            return FileInfo.from_json(d)
        return await self._put_stream(path, data, mode)

    async def _put_stream(self, path: str, f: BinaryIO, mode: int | None) -> FileInfo:
        if not f.seekable():
            raise ValueError("write_file needs a seekable file object (or use upload())")
        start = f.tell()
        f.seek(0, os.SEEK_END)
        length = f.tell() - start
        hasher: list[Any] = []

        def body() -> tuple[BinaryIO, int]:
            f.seek(start)
            h = hashlib.sha256()
            hasher[:] = [h]
            return _HashingReader(f, h, close=False), length  # type: ignore[return-value]

        _, raw = await self._t.request(
            self._ep, "PUT", self._base + "/files" + file_query(path, mode=_mode(mode)), body,
            headers=_OCTET, timeout=max(self._c.timeout, 300.0), context="file",
        )
        info = FileInfo.from_json(loads(raw))
        _verify(info, hasher[0].hexdigest(), path)
        return info

    async def upload(self, local: str | os.PathLike[str], remote: str, *, mode: int | None = None) -> FileInfo:
        if mode is None:
            mode = os.stat(local).st_mode & 0o777
        with open(local, "rb") as f:
            return await self._put_stream(remote, f, mode)

    async def read_file(self, path: str) -> bytes:
        _, data = await self._t.request(self._ep, "GET", self._base + "/files" + file_query(path), timeout=self._c.timeout, context="file")
        return data

    async def read_text(self, path: str, encoding: str = "utf-8") -> str:
        return (await self.read_file(path)).decode(encoding)

    async def iter_file(self, path: str, chunk_size: int = 262144) -> AsyncIterator[bytes]:
        timeout = max(self._c.timeout, 300.0)
        resp = await self._t.open(self._ep, "GET", self._base + "/files" + file_query(path), timeout=timeout, context="file")
        ok = False
        try:
            while True:
                chunk = await resp.read_some(chunk_size)
                if not chunk:
                    break
                yield chunk
            ok = True
        finally:
            if ok:
                self._t.done(self._ep, resp)
            else:
                resp._conn.close()

    async def download(self, remote: str, local: str | os.PathLike[str]) -> int:
        local = os.fspath(local)
        parent = os.path.dirname(os.path.abspath(local))
        os.makedirs(parent, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".arl-", dir=parent)
        n = 0
        try:
            with os.fdopen(fd, "wb") as out:
                async for chunk in self.iter_file(remote):
                    out.write(chunk)
                    n += len(chunk)
            os.replace(tmp, local)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        return n

    async def delete_file(self, path: str, *, missing_ok: bool = False) -> None:
        try:
            await self._t.request(self._ep, "DELETE", self._base + "/files" + file_query(path), timeout=self._c.timeout, context="file")
        except NotFound:
            if not missing_ok:
                raise

    async def refresh(self) -> SandboxInfo:
        d = await self._t.request_json(self._ep, "GET", self._base, timeout=self._c.timeout, context="sandbox")
        self.info = SandboxInfo.from_json(d, self._ep.url)
        return self.info

    async def reset(self) -> SandboxInfo:
        d = await self._t.request_json(self._ep, "POST", self._base + "/reset", b"{}", timeout=max(self._c.timeout, 60.0), context="sandbox")
        if d:
            self.info = SandboxInfo.from_json(d, self._ep.url)
        return self.info

    async def release(self) -> None:
        if self._released:
            return
        try:
            await self._t.request(self._ep, "DELETE", self._base, timeout=self._c.timeout, context="sandbox")
        except SandboxNotFound:
            pass
        except InfraError as e:
            if e.code != "sandbox_unavailable":  # a dead sandbox has nothing left to release
                raise
        self._released = True


class AsyncSandboxList(list):  # type: ignore[type-arg]
    """A list of :class:`AsyncSandbox`; ``async with`` releases them all (concurrently)."""

    async def __aenter__(self) -> AsyncSandboxList:
        return self

    async def __aexit__(self, et: Any, ev: Any, tb: Any) -> None:
        await self.release_all(raise_errors=et is None)

    async def release_all(self, *, raise_errors: bool = True) -> None:
        res = await asyncio.gather(*(sb.release() for sb in self), return_exceptions=True)
        errs = [r for r in res if isinstance(r, BaseException)]
        if errs and raise_errors:
            raise errs[0]
