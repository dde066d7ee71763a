"""Facade for scripts written against the original ARL-Infra Python SDK.

``SandboxSession`` / ``AsyncSandboxSession`` (create, attach, execute steps, files, history,
context manager) and ``WarmPoolManager`` (create, get, list, scale, delete, wait for ready) are
mapped onto the node API, so such scripts run unchanged (``from arl import SandboxSession``).

Mapping:

* ``gateway_url`` -> node endpoints (comma-separated allowed), ``api_key`` -> token; when not
  given, ``ARL_ENDPOINTS`` / ``ARL_TOKEN``, then ``ARL_GATEWAY_URL`` / ``ARL_API_KEY``.
* A session is a sandbox. The pool is ``pool_ref`` if given, else the first positional argument
  (``image`` in recent versions, ``pool_ref`` in the first one) when a pool of that name
  exists, else ``profile`` when such a pool exists, else ``"default"``. Images are not pulled:
  the pool's spec decides what runs.
* ``execute(steps)`` runs ``Command`` steps as commands and ``FilePatch`` steps as file writes,
  in order, without stopping on a failing step (like the last original version; pass
  ``stop_on_failure=True`` for the first version's behaviour). Each step gets the request id
  ``<operation_id>-<index>``, so re-running ``execute`` with the same ``operation_id`` returns
  the recorded results instead of running the commands again.
* ``snapshot_id`` is the step's index in the session history (as in the original); restore,
  replay, fork, suspend and resume are not supported and raise :class:`UnsupportedOperation`.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import inspect
import json
import os
import re
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, BinaryIO, cast

from .aio import AsyncClient, AsyncSandbox
from .client import Client, Sandbox
from .errors import (
    ArlError,
    BadRequest,
    ChecksumMismatch,
    GatewayError,
    NotFound,
    PoolExhausted,
    PoolNotFound,
    PoolNotReadyError,
)
from .types import ExecResult, OutputChunk
from .types import PoolInfo as NodePoolInfo

__all__ = [
    "SandboxSession",
    "AsyncSandboxSession",
    "WarmPoolManager",
    "Command",
    "FilePatch",
    "StepRequest",
    "StepOutput",
    "StepResult",
    "ExecuteResponse",
    "SessionInfo",
    "UploadFileResponse",
    "WarmPoolInfo",
    "PoolInfo",
    "PoolCondition",
    "ResourceRequirements",
    "SessionNotInitializedError",
    "UnsupportedOperation",
    "GatewayError",
    "PoolNotReadyError",
]


class SessionNotInitializedError(ArlError):
    """The session has no sandbox (``create_sandbox()`` was not called or it was deleted)."""

    def __init__(self, message: str = "session not initialized: call create_sandbox() first") -> None:
        super().__init__(message, code="session_not_initialized")


class UnsupportedOperation(ArlError, NotImplementedError):
    """An original-SDK feature with no equivalent on the node API."""

    def __init__(self, what: str) -> None:
        super().__init__(f"{what} is not supported by ARL nodes", code="unsupported")


class _Model:
    """Minimal stand-in for the pydantic models of the original SDK."""

    def model_dump(self, **_: Any) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload,no-any-return]

    dict = model_dump

    def model_dump_json(self, **_: Any) -> str:
        return json.dumps(self.model_dump())


# -- steps -----------------------------------------------------------------------------------


@dataclass
class Command(_Model):
    """A command step: ``Command(name="test", command=["pytest", "-q"])``. A string command
    runs through ``/bin/sh -c``."""

    name: str = ""
    command: list[str] | str = field(default_factory=list)
    env: dict[str, str] | None = None
    work_dir: str | None = None
    timeout_seconds: float | None = None

    type = "Command"


#: The last original SDK called command steps ``StepRequest``.
StepRequest = Command


@dataclass
class FilePatch(_Model):
    """A file step: write ``content`` to ``path`` (relative to ``work_dir`` or the workspace)."""

    name: str = ""
    path: str = ""
    content: str | bytes = ""
    work_dir: str | None = None
    mode: int | None = None

    type = "FilePatch"


@dataclass
class StepOutput(_Model):
    stdout: str = ""
    stderr: str = ""
    exit_code: int = 0


@dataclass
class StepResult(_Model):
    index: int
    name: str
    output: StepOutput
    snapshot_id: str = ""
    duration_ms: float = 0.0
    timestamp: str | None = None
    input: dict[str, Any] | None = None
    timed_out: bool = False
    truncated: bool = False


@dataclass
class ExecuteResponse(_Model):
    session_id: str
    results: list[StepResult]
    total_duration_ms: float = 0.0
    operation_id: str | None = None

    # Aggregates in the style of the first SDK's Task status.
    @property
    def stdout(self) -> str:
        return "".join(r.output.stdout for r in self.results)

    @property
    def stderr(self) -> str:
        return "".join(r.output.stderr for r in self.results)

    @property
    def exit_code(self) -> int:
        return self.results[-1].output.exit_code if self.results else 0

    @property
    def state(self) -> str:
        return "Succeeded" if all(r.output.exit_code == 0 for r in self.results) else "Failed"


@dataclass
class SessionInfo(_Model):
    id: str
    sandbox_name: str
    namespace: str = "default"
    image: str | None = None
    profile: str = "default"
    pod_ip: str | None = None
    pod_name: str | None = None
    created_at: str | None = None
    status: str = "active"
    endpoint: str | None = None
    workspace: str = "/workspace"


@dataclass
class UploadFileResponse(_Model):
    path: str
    bytes_written: int
    sha256: str


@dataclass
class PoolCondition(_Model):
    type: str
    status: str
    reason: str = ""
    message: str = ""


@dataclass
class WarmPoolInfo(_Model):
    name: str
    namespace: str = "default"
    image: str | None = None
    profile: str = "default"
    replicas: int = 0
    ready_replicas: int = 0
    allocated_replicas: int = 0
    state: str = "running"
    conditions: list[PoolCondition] = field(default_factory=list)
    max_replicas: int = 0
    starting_replicas: int = 0
    endpoint: str | None = None


#: ``from arl.compat import PoolInfo`` gives the original's pool type (top-level ``arl.PoolInfo``
#: is the node API's).
PoolInfo = WarmPoolInfo


@dataclass
class ResourceRequirements(_Model):
    """Kubernetes-style resources: ``ResourceRequirements(limits={"cpu": "1", "memory": "1Gi"})``.
    Limits (else requests) become the pool's ``cpu_millis`` / ``memory_mb`` / ``disk_mb``."""

    requests: dict[str, str] | None = None
    limits: dict[str, str] | None = None

    def to_pool_fields(self) -> dict[str, int]:
        src = dict(self.requests or {})
        src.update(self.limits or {})
        out: dict[str, int] = {}
        if "cpu" in src:
            out["cpu_millis"] = _cpu_millis(str(src["cpu"]))
        if "memory" in src:
            out["memory_mb"] = _mebibytes(str(src["memory"]))
        if "ephemeral-storage" in src:
            out["disk_mb"] = _mebibytes(str(src["ephemeral-storage"]))
        return out


_UNITS = {
    "": 1, "k": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4,
    "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "Ti": 1024**4,
}


def _cpu_millis(q: str) -> int:
    q = q.strip()
    if q.endswith("m"):
        return max(1, int(float(q[:-1])))
    return max(1, int(float(q) * 1000))


def _mebibytes(q: str) -> int:
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kMGT]i?|)\s*", q)
    if not m:
        raise ValueError(f"invalid quantity {q!r}")
    return max(1, int(float(m.group(1)) * _UNITS[m.group(2)] // (1024 * 1024)))


def _normalize_step(step: Any) -> dict[str, Any]:
    if isinstance(step, (Command, FilePatch)):
        d = asdict(step)
        d["type"] = step.type
        return d
    if hasattr(step, "model_dump"):  # a pydantic StepRequest from the original SDK
        step = step.model_dump()
    if not isinstance(step, Mapping):
        raise TypeError(f"unsupported step {step!r}")
    s = dict(step)
    kind = s.get("type") or ("FilePatch" if "path" in s and "command" not in s else "Command")
    out: dict[str, Any] = {
        "type": kind,
        "name": s.get("name", ""),
        "env": s.get("env"),
        "work_dir": s.get("work_dir", s.get("workDir")),
    }
    if kind == "FilePatch":
        out["path"] = s.get("path", "")
        out["content"] = s.get("content", s.get("patch", ""))
        out["mode"] = s.get("mode")
    else:
        out["command"] = s.get("command") or []
        t = s.get("timeout_seconds", s.get("timeoutSeconds", s.get("timeout")))
        out["timeout_seconds"] = _seconds(t)
    return out


def _seconds(t: Any) -> float | None:
    if t is None or t == "":
        return None
    if isinstance(t, (int, float)):
        return float(t)
    m = re.fullmatch(r"\s*([0-9.]+)\s*(ms|s|m|h)?\s*", str(t))
    if not m:
        raise ValueError(f"invalid timeout {t!r}")
    return float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]


def _join(work_dir: str | None, path: str) -> str:
    if work_dir and not path.startswith("/"):
        return work_dir.rstrip("/") + "/" + path
    return path


def _now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat()


def _endpoints(gateway_url: str | None) -> str | None:
    if gateway_url:
        return gateway_url
    return os.environ.get("ARL_ENDPOINTS") or os.environ.get("ARL_GATEWAY_URL") or None


def _token(api_key: str | None) -> str | None:
    if api_key:
        return api_key
    return os.environ.get("ARL_TOKEN") or os.environ.get("ARL_API_KEY") or None


def _session_info(sb: Sandbox | AsyncSandbox, image: str | None) -> SessionInfo:
    i = sb.info
    created = None
    if i.created_at_ms:
        created = _dt.datetime.fromtimestamp(i.created_at_ms / 1000, _dt.timezone.utc).isoformat()
    host = sb._ep.host
    return SessionInfo(
        id=i.id, sandbox_name=i.id, image=image, profile=i.pool, pod_ip=host, created_at=created,
        status="active", endpoint=sb.endpoint, workspace=i.workspace,
    )


def _step_from_exec(idx: int, name: str, r: ExecResult, inp: dict[str, Any]) -> StepResult:
    return StepResult(
        index=idx, name=name, output=StepOutput(r.stdout, r.stderr, r.exit_code), snapshot_id=str(idx),
        duration_ms=r.duration * 1000.0, timestamp=_now_iso(), input=inp, timed_out=r.timed_out,
        truncated=r.truncated,
    )


def _pick_pool(names: set[str], pool_ref: str | None, image: str | None, profile: str | None) -> str:
    if pool_ref:
        return pool_ref
    for cand in (image, profile):
        if cand and cand in names:
            return cand
    return profile or "default"


def _chunks(content: Iterable[bytes] | BinaryIO) -> Iterable[bytes]:
    if hasattr(content, "read"):
        f = cast(BinaryIO, content)
        return iter(lambda: f.read(262144), b"")
    return content


def _chunk_iter(content: Iterable[bytes]) -> BinaryIO:
    spool = tempfile.SpooledTemporaryFile(max_size=8 << 20)
    for chunk in content:
        spool.write(chunk)
    spool.seek(0)
    return spool  # type: ignore[return-value]


# -- sync session ----------------------------------------------------------------------------


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


# -- async session ---------------------------------------------------------------------------


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


# -- warm pools ------------------------------------------------------------------------------


def _warmpool_info(p: NodePoolInfo, image: str | None = None) -> WarmPoolInfo:
    st = p.status
    conds = [PoolCondition("Ready", "True" if st.ready else "False")]
    if st.last_error:
        conds.append(PoolCondition("PodsFailing", "True", "CreateFailed", st.last_error))
    else:
        conds.append(PoolCondition("PodsFailing", "False"))
    return WarmPoolInfo(
        name=p.name, image=image or p.spec.rootfs, profile=p.name, replicas=p.spec.min_idle or 0,
        ready_replicas=st.idle, allocated_replicas=st.allocated,
        state="running" if st.ready else "starting", conditions=conds, max_replicas=p.spec.max or 0,
        starting_replicas=st.starting, endpoint=p.endpoint,
    )


_RATE_LIMIT = ("qps exceeded", "rate limit", "toomanyrequests", "429")


class WarmPoolManager:
    """Pool management in the style of the original SDK: ``replicas`` is the number of warm
    (idle) sandboxes each node keeps (``min_idle``); ``ready_replicas`` counts idle sandboxes."""

    def __init__(
        self,
        gateway_url: str = "",
        timeout: float = 300.0,
        api_key: str | None = None,
        namespace: str = "default",
        *,
        client: Client | None = None,
    ) -> None:
        self._client = client or Client(_endpoints(gateway_url), _token(api_key), timeout=min(timeout, 300.0))
        self._owns_client = client is None
        self.namespace = namespace
        self.timeout = timeout

    def create_warmpool(
        self,
        name: str,
        image: str | None = None,
        replicas: int = 2,
        profile: str | None = None,
        tools: Any = None,
        resources: ResourceRequirements | Mapping[str, Any] | None = None,
        workspace_dir: str = "/workspace",
        config_env: Any = None,
        image_locality: Any = None,
        *,
        max_replicas: int | None = None,
        env: Mapping[str, str] | None = None,
        **spec: Any,  # extra PoolSpec fields (runtime, reuse, network, rootfs, ...), or E1 args
    ) -> WarmPoolInfo:
        fields: dict[str, Any] = {"min_idle": int(replicas)}
        if max_replicas is not None:
            fields["max"] = int(max_replicas)
        if resources is not None:
            rr = resources if isinstance(resources, ResourceRequirements) else ResourceRequirements(**dict(resources))
            fields.update(rr.to_pool_fields())
        envs = dict(env or {})
        if config_env is not None:
            envs.update(_config_env_vars(config_env))
        if envs:
            fields["env"] = envs
        for k in ("runtime", "reuse", "memory_mb", "pids", "cpu_millis", "disk_mb", "network", "rootfs",
                  "idle_timeout_seconds", "max_lifetime_seconds", "max"):
            if k in spec and spec[k] is not None:
                fields[k] = spec[k]
        info = self._client.put_pool(name, fields)
        return _warmpool_info(info, image)

    def get_warmpool(self, name: str) -> WarmPoolInfo:
        return _warmpool_info(self._client.pool(name))

    def list_warmpools(self) -> list[WarmPoolInfo]:
        return [_warmpool_info(p) for p in self._client.pools()]

    def scale_warmpool(self, name: str, replicas: int, resources: ResourceRequirements | None = None) -> WarmPoolInfo:
        cur = self._client.pool(name)
        body = cur.spec.to_json()
        body["min_idle"] = int(replicas)
        if resources is not None:
            body.update(resources.to_pool_fields())
        return _warmpool_info(self._client.put_pool(name, body))

    def delete_warmpool(self, name: str) -> None:
        self._client.delete_pool(name)

    drain_warmpool = delete_warmpool
    destroy_warmpool = delete_warmpool

    def wait_for_ready(
        self, name: str, timeout: float = 300.0, poll_interval: float = 5.0, min_ready: int = 1
    ) -> WarmPoolInfo:
        """Wait until the pool has ``min_ready`` idle sandboxes. Raises
        :class:`PoolNotReadyError` after two consecutive polls reporting a creation error
        (registry rate limits excepted), else :class:`TimeoutError`."""
        deadline = time.monotonic() + timeout
        failing = 0
        info: WarmPoolInfo | None = None
        while True:
            info = self.get_warmpool(name)
            if info.ready_replicas >= min_ready:
                return info
            err = next((c for c in info.conditions if c.type == "PodsFailing" and c.status == "True"), None)
            if err is not None and not any(s in err.message.lower() for s in _RATE_LIMIT):
                failing += 1
                if failing >= 2:
                    raise PoolNotReadyError(name, f"pool {name} is failing: {err.message}", info.conditions)
            else:
                failing = 0
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"pool {name} not ready after {timeout}s: ready={info.ready_replicas} "
                    f"allocated={info.allocated_replicas} starting={info.starting_replicas}"
                )
            time.sleep(min(poll_interval, left))

    def wait_for_warmpool_ready(self, name: str, poll_interval: float = 2.0, timeout: float | None = None) -> WarmPoolInfo:
        """First-SDK name of :meth:`wait_for_ready`."""
        return self.wait_for_ready(name, timeout=timeout or self.timeout, poll_interval=poll_interval)

    def iter_logs(self, *a: Any, **k: Any) -> Iterator[Any]:
        raise UnsupportedOperation("pool logs")

    def get_logs(self, *a: Any, **k: Any) -> list[Any]:
        raise UnsupportedOperation("pool logs")

    def close(self) -> None:
        if self._owns_client:
            self._client.close()

    def __enter__(self) -> WarmPoolManager:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _config_env_vars(config_env: Any) -> dict[str, str]:
    if hasattr(config_env, "model_dump"):
        config_env = config_env.model_dump()
    out: dict[str, str] = {}
    if isinstance(config_env, Mapping):
        out.update({str(k): str(v) for k, v in (config_env.get("vars") or {}).items()})
        for ev in config_env.get("env_vars") or config_env.get("envVars") or []:
            if isinstance(ev, Mapping) and "name" in ev and "value" in ev:
                out[str(ev["name"])] = str(ev["value"])
    return out


