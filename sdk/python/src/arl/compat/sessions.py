"""``SandboxSession``: a sandbox session in the style of the original SDK."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict
from typing import Any, BinaryIO, cast

from ..client import Client, Sandbox
from ..errors import ArlError, BadRequest, ChecksumMismatch, NotFound, PoolExhausted, PoolNotFound
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
from .errors import SessionNotInitializedError, UnsupportedOperation
from .models import Command, ExecuteResponse, FilePatch, SessionInfo, StepOutput, StepResult, UploadFileResponse


class SandboxSession:
    """A sandbox session in the style of the original SDK.

    Example (unchanged from the original README)::

        with SandboxSession(image="python:3.12", gateway_url="http://127.0.0.1:8420") as s:
            r = s.execute([{"name": "hello", "command": ["echo", "Hello, World!"]}])
            print(r.results[0].output.stdout)
    """

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
        client: Client | None = None,
        **_ignored: Any,  # mode, devbox, private_containers, iroh_addr, allow_internet, ...
    ) -> None:
        self._client = client or Client(_endpoints(gateway_url), _token(api_key), timeout=min(timeout, 300.0))
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
        self._sb: Sandbox | None = None
        self._info: SessionInfo | None = None
        self._delete_on_exit = not keep_alive
        self._history: list[StepResult] = []
        self._ops: dict[str, ExecuteResponse] = {}

    # properties of the original
    @property
    def session_id(self) -> str | None:
        return self._sb.id if self._sb else None

    @property
    def sandbox_name(self) -> str | None:
        return self.session_id

    @property
    def session_info(self) -> SessionInfo | None:
        return self._info

    @property
    def sandbox(self) -> Sandbox:
        """The underlying :class:`arl.Sandbox` (for the new API's methods)."""
        if self._sb is None:
            raise SessionNotInitializedError()
        return self._sb

    @property
    def image(self) -> str | None:
        return self._image

    @image.setter
    def image(self, v: str | None) -> None:
        self._image = v

    @property
    def profile(self) -> str | None:
        return self._profile

    @profile.setter
    def profile(self, v: str | None) -> None:
        self._profile = v

    @property
    def pool_ref(self) -> str:
        return self._sb.pool if self._sb else self._resolve_pool()

    @classmethod
    def attach(
        cls, session_id: str, gateway_url: str = "", timeout: float = 300.0, api_key: str | None = None, **kw: Any
    ) -> SandboxSession:
        """Attach to an existing sandbox; the context manager will not delete it."""
        s = cls(gateway_url=gateway_url, timeout=timeout, api_key=api_key, **kw)
        s._sb = s._client.attach(session_id)
        s._info = _session_info(s._sb, None)
        s._delete_on_exit = False
        return s

    def _resolve_pool(self) -> str:
        if self._pool_ref:
            return self._pool_ref
        try:
            names = {p.name for p in self._client.pools()}
        except ArlError:
            names = set()
        return _pick_pool(names, None, self._image, self._profile)

    def create_sandbox(self) -> SessionInfo:
        """Acquire a sandbox (waits up to ``allocation_timeout_seconds``, default ``timeout``,
        while the pool is exhausted)."""
        if self._sb is not None:
            assert self._info is not None
            return self._info
        pool = self._resolve_pool()
        deadline = time.monotonic() + float(self.allocation_timeout_seconds or self.timeout)
        delay = 0.05
        labels = {"namespace": self.namespace}
        if self._image:
            labels["image"] = self._image[:63]
        while True:
            try:
                self._sb = self._client.sandbox(
                    pool, env=self._env or None, ttl=self.max_lifetime_seconds,
                    idle_timeout=self.idle_timeout_seconds, labels=labels,
                )
                break
            except PoolExhausted:
                if time.monotonic() + delay > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
        self._info = _session_info(self._sb, self._image)
        return self._info

    def _require(self) -> Sandbox:
        if self._sb is None:
            self.create_sandbox()
        assert self._sb is not None
        return self._sb

    def delete_sandbox(self) -> None:
        if self._sb is not None:
            self._sb.release()
            self._sb = None
            self._info = None

    def execute(
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
        """Run the steps in order and return every step's result."""
        sb = self._require()
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
                res = self._file_step(sb, idx, name, st)
            else:
                res = self._command_step(sb, idx, name, st, f"{op}-{i}", on_output)
            results.append(res)
            self._history.append(res)
            if stop_on_failure and res.output.exit_code != 0:
                break
        resp = ExecuteResponse(sb.id, results, (time.perf_counter() - t0) * 1000.0, op)
        self._ops[op] = resp
        return resp

    def _file_step(self, sb: Sandbox, idx: int, name: str, st: dict[str, Any]) -> StepResult:
        path = _join(st.get("work_dir"), st["path"])
        t0 = time.perf_counter()
        try:
            sb.write_files({path: st["content"]}, mode=st.get("mode"))
            out = StepOutput("", "", 0)
        except (BadRequest, NotFound) as e:
            out = StepOutput("", str(e), 1)
        return StepResult(idx, name, out, str(idx), (time.perf_counter() - t0) * 1000.0, _now_iso(),
                          {"type": "FilePatch", "path": path})

    def _command_step(
        self, sb: Sandbox, idx: int, name: str, st: dict[str, Any], rid: str,
        on_output: Callable[[str, str], Any] | None,
    ) -> StepResult:
        cmd = st["command"]
        kw: dict[str, Any] = dict(env=st.get("env") or None, cwd=st.get("work_dir"),
                                  timeout=st.get("timeout_seconds"), request_id=rid)
        r: ExecResult | None = None
        if on_output is None:
            r = sb.exec(cmd, **kw)
        else:
            for item in sb.stream(cmd, **kw):
                if isinstance(item, OutputChunk):
                    if item.stream == "stdout":
                        on_output(item.data, "")
                    else:
                        on_output("", item.data)
                else:
                    r = item
        if r is None:
            raise ArlError("stream ended without a result", code="incomplete_stream")
        return _step_from_exec(idx, name, r, {"type": "Command", "command": cmd})

    # files ----------------------------------------------------------------------------------

    def upload_file(
        self, path: str, content: str | bytes | Iterable[bytes] | BinaryIO, sha256: str | None = None
    ) -> UploadFileResponse:
        sb = self._require()
        if isinstance(content, (str, bytes, bytearray)):
            info = sb.write_file(path, content)
        elif hasattr(content, "read") and cast(BinaryIO, content).seekable():
            info = sb.write_file(path, cast(BinaryIO, content))
        else:
            with _chunk_iter(_chunks(content)) as f:
                info = sb.write_file(path, f)
        if sha256 and sha256.lower() != info.sha256:
            raise ChecksumMismatch(f"checksum mismatch for {path}", code="checksum_mismatch", status=400)
        return UploadFileResponse(info.path, info.size, info.sha256)

    def download_file(self, path: str) -> bytes:
        return self._require().read_file(path)

    def iter_download(self, path: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        return self._require().iter_file(path, chunk_size)

    def upload_path(self, local_path: str | os.PathLike[str], remote_path: str, sha256: str | None = None) -> UploadFileResponse:
        info = self._require().upload(local_path, remote_path)
        if sha256 and sha256.lower() != info.sha256:
            raise ChecksumMismatch(f"checksum mismatch for {remote_path}", code="checksum_mismatch", status=400)
        return UploadFileResponse(info.path, info.size, info.sha256)

    def download_path(self, remote_path: str, local_path: str | os.PathLike[str]) -> None:
        self._require().download(remote_path, local_path)

    # history --------------------------------------------------------------------------------

    def get_history(self) -> list[StepResult]:
        return list(self._history)

    def export_trajectory(self) -> str:
        lines = []
        for r in self._history:
            lines.append(json.dumps({
                "session_id": self.session_id, "step": r.index, "action": r.input,
                "observation": asdict(r.output), "snapshot_id": r.snapshot_id, "timestamp": r.timestamp,
            }))
        return "\n".join(lines) + ("\n" if lines else "")

    # first-SDK helpers ----------------------------------------------------------------------

    def get_pool_status(self) -> dict[str, int]:
        pool = self.pool_ref
        infos = [p for p in self._client.pools() if p.name == pool]
        if not infos:
            raise PoolNotFound(f"pool {pool!r} not found", code="not_found", status=404)
        idle = sum(p.status.idle for p in infos)
        return {
            "total": sum(p.status.total for p in infos),
            "ready_idle": idle,
            "allocated": sum(p.status.allocated for p in infos),
            "available": idle,
        }

    def restore(self, *a: Any, **k: Any) -> Any:
        raise UnsupportedOperation("restore")

    def replay_from(self, *a: Any, **k: Any) -> Any:
        raise UnsupportedOperation("replay_from")

    def suspend(self) -> None:
        raise UnsupportedOperation("suspend")

    def resume(self) -> None:
        raise UnsupportedOperation("resume")

    def get_execute_operation(self, operation_id: str) -> ExecuteResponse:
        try:
            return self._ops[operation_id]
        except KeyError:
            raise NotFound(f"operation {operation_id} not found", code="not_found", status=404) from None

    # lifecycle ------------------------------------------------------------------------------

    def close(self) -> None:
        """Detach: close connections, leave the sandbox allocated."""
        if self._owns_client:
            self._client.close()

    def __enter__(self) -> SandboxSession:
        self._require()
        return self

    def __exit__(self, et: Any, ev: Any, tb: Any) -> None:
        try:
            if self._delete_on_exit:
                try:
                    self.delete_sandbox()
                except ArlError:
                    if et is None:
                        raise
        finally:
            self.close()
