"""``AsyncSandboxSession``: the asyncio twin of :class:`~arl.compat.SandboxSession`."""

from __future__ import annotations

import asyncio
import inspect
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from typing import Any, BinaryIO, cast

from ..aio import AsyncClient, AsyncSandbox
from ..errors import ArlError, BadRequest, ChecksumMismatch, NotFound, PoolExhausted
from ..types import ExecResult, OutputChunk
from ._shared import (
    _chunk_iter,
    _chunks,
    _endpoints,
    _join,
    _normalize_step,
    _now_iso,
    _pick_pool,
    _session_info,
    _step_from_exec,
    _token,
)
from .errors import SessionNotInitializedError
from .models import Command, ExecuteResponse, FilePatch, SessionInfo, StepOutput, StepResult, UploadFileResponse


class AsyncSandboxSession:
    """asyncio twin of :class:`SandboxSession` (``async with``, ``await s.execute(...)``)."""

    def __init__(
        self,
        image: str | None = None,
        *,
        pool_ref: str | None = None,
        profile: str | None = "default",
        gateway_url: str = "",
        timeout: float = 300.0,
        idle_timeout_seconds: int | None = None,
        allocation_timeout_seconds: int | None = None,
        max_lifetime_seconds: int | None = None,
        api_key: str | None = None,
        namespace: str = "default",
        keep_alive: bool = False,
        env: Mapping[str, str] | None = None,
        client: AsyncClient | None = None,
        **_ignored: Any,
    ) -> None:
        self._client = client or AsyncClient(_endpoints(gateway_url), _token(api_key), timeout=min(timeout, 300.0))
        self._owns_client = client is None
        self._image = image
        self._pool_ref = pool_ref
        self._profile = profile
        self.namespace = namespace
        self.timeout = timeout
        self.idle_timeout_seconds = idle_timeout_seconds
        self.allocation_timeout_seconds = allocation_timeout_seconds
        self.max_lifetime_seconds = max_lifetime_seconds
        self.keep_alive = keep_alive
        self._env = dict(env or {})
        self._sb: AsyncSandbox | None = None
        self._info: SessionInfo | None = None
        self._delete_on_exit = not keep_alive
        self._history: list[StepResult] = []
        self._ops: dict[str, ExecuteResponse] = {}

    @property
    def session_id(self) -> str | None:
        return self._sb.id if self._sb else None

    @property
    def session_info(self) -> SessionInfo | None:
        return self._info

    @property
    def sandbox(self) -> AsyncSandbox:
        if self._sb is None:
            raise SessionNotInitializedError()
        return self._sb

    @classmethod
    async def attach(
        cls, session_id: str, gateway_url: str = "", timeout: float = 300.0, api_key: str | None = None, **kw: Any
    ) -> AsyncSandboxSession:
        s = cls(gateway_url=gateway_url, timeout=timeout, api_key=api_key, **kw)
        s._sb = await s._client.attach(session_id)
        s._info = _session_info(s._sb, None)
        s._delete_on_exit = False
        return s

    async def _resolve_pool(self) -> str:
        if self._pool_ref:
            return self._pool_ref
        try:
            names = {p.name for p in await self._client.pools()}
        except ArlError:
            names = set()
        return _pick_pool(names, None, self._image, self._profile)

    async def create_sandbox(self) -> SessionInfo:
        if self._sb is not None:
            assert self._info is not None
            return self._info
        pool = await self._resolve_pool()
        deadline = time.monotonic() + float(self.allocation_timeout_seconds or self.timeout)
        delay = 0.05
        labels = {"namespace": self.namespace}
        if self._image:
            labels["image"] = self._image[:63]
        while True:
            try:
                self._sb = await self._client.sandbox(
                    pool, env=self._env or None, ttl=self.max_lifetime_seconds,
                    idle_timeout=self.idle_timeout_seconds, labels=labels,
                )
                break
            except PoolExhausted:
                if time.monotonic() + delay > deadline:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
        self._info = _session_info(self._sb, self._image)
        return self._info

    async def _require(self) -> AsyncSandbox:
        if self._sb is None:
            await self.create_sandbox()
        assert self._sb is not None
        return self._sb

    async def delete_sandbox(self) -> None:
        if self._sb is not None:
            await self._sb.release()
            self._sb = None
            self._info = None

    async def execute(
        self,
        steps: Sequence[Command | FilePatch | Mapping[str, Any]],
        trace_id: str | None = None,
        operation_id: str | None = None,
        on_output: Callable[[str, str], Any] | None = None,
        recover: bool = True,
        recover_timeout: float | None = None,
        *,
        stop_on_failure: bool = False,
    ) -> ExecuteResponse:
        sb = await self._require()
        op = operation_id or uuid.uuid4().hex
        if op in self._ops:
            return self._ops[op]
        t0 = time.perf_counter()
        results: list[StepResult] = []
        for i, raw in enumerate(steps):
            st = _normalize_step(raw)
            idx = len(self._history)
            name = st["name"] or f"step-{i}"
            if st["type"] == "FilePatch":
                path = _join(st.get("work_dir"), st["path"])
                ts = time.perf_counter()
                try:
                    await sb.write_files({path: st["content"]}, mode=st.get("mode"))
                    out = StepOutput("", "", 0)
                except (BadRequest, NotFound) as e:
                    out = StepOutput("", str(e), 1)
                res = StepResult(idx, name, out, str(idx), (time.perf_counter() - ts) * 1000.0, _now_iso(),
                                 {"type": "FilePatch", "path": path})
            else:
                cmd = st["command"]
                kw: dict[str, Any] = dict(env=st.get("env") or None, cwd=st.get("work_dir"),
                                          timeout=st.get("timeout_seconds"), request_id=f"{op}-{i}")
                r: ExecResult | None = None
                if on_output is None:
                    r = await sb.exec(cmd, **kw)
                else:
                    async for item in sb.stream(cmd, **kw):
                        if isinstance(item, OutputChunk):
                            ret = on_output(item.data, "") if item.stream == "stdout" else on_output("", item.data)
                            if inspect.isawaitable(ret):
                                await ret
                        else:
                            r = item
                if r is None:
                    raise ArlError("stream ended without a result", code="incomplete_stream")
                res = _step_from_exec(idx, name, r, {"type": "Command", "command": cmd})
            results.append(res)
            self._history.append(res)
            if stop_on_failure and res.output.exit_code != 0:
                break
        resp = ExecuteResponse(sb.id, results, (time.perf_counter() - t0) * 1000.0, op)
        self._ops[op] = resp
        return resp

    async def upload_file(self, path: str, content: str | bytes | Iterable[bytes] | BinaryIO, sha256: str | None = None) -> UploadFileResponse:
        sb = await self._require()
        if isinstance(content, (str, bytes, bytearray)):
            info = await sb.write_file(path, content)
        elif hasattr(content, "read") and cast(BinaryIO, content).seekable():
            info = await sb.write_file(path, cast(BinaryIO, content))
        else:
            with _chunk_iter(_chunks(content)) as f:
                info = await sb.write_file(path, f)
        if sha256 and sha256.lower() != info.sha256:
            raise ChecksumMismatch(f"checksum mismatch for {path}", code="checksum_mismatch", status=400)
        return UploadFileResponse(info.path, info.size, info.sha256)

    async def download_file(self, path: str) -> bytes:
        return await (await self._require()).read_file(path)

    async def iter_download(self, path: str, chunk_size: int = 1 << 20) -> AsyncIterator[bytes]:
        sb = await self._require()
        async for chunk in sb.iter_file(path, chunk_size):
            yield chunk

    async def upload_path(self, local_path: str | os.PathLike[str], remote_path: str, sha256: str | None = None) -> UploadFileResponse:
        info = await (await self._require()).upload(local_path, remote_path)
        if sha256 and sha256.lower() != info.sha256:
            raise ChecksumMismatch(f"checksum mismatch for {remote_path}", code="checksum_mismatch", status=400)
        return UploadFileResponse(info.path, info.size, info.sha256)

    async def download_path(self, remote_path: str, local_path: str | os.PathLike[str]) -> None:
        await (await self._require()).download(remote_path, local_path)

    async def get_history(self) -> list[StepResult]:
        return list(self._history)

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    close = aclose

    async def __aenter__(self) -> AsyncSandboxSession:
        await self._require()
        return self

    async def __aexit__(self, et: Any, ev: Any, tb: Any) -> None:
        try:
            if self._delete_on_exit:
                try:
                    await self.delete_sandbox()
                except ArlError:
                    if et is None:
                        raise
        finally:
            await self.aclose()
