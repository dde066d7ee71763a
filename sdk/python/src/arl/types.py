"""Plain data types returned by the SDK (dataclasses; no third-party dependencies)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "SnapshotInfo",
    "ExecResult",
    "OutputChunk",
    "SandboxInfo",
    "PoolSpec",
    "PoolStatus",
    "PoolInfo",
    "FileInfo",
    "LiveSessionInfo",
    "PythonError",
    "RunResult",
]


@dataclass(slots=True)
class ExecResult:
    """Outcome of one command. A non-zero ``exit_code`` is data, not an error.

    ``duration`` is in seconds (``duration_ms`` in milliseconds). ``exit_code`` is
    ``128 + signal`` when the process was killed by a signal (``signal`` is then set).
    ``truncated`` is ``True`` when stdout or stderr hit the output cap.
    ``oom_killed`` is ``True`` when the kernel's OOM killer ended the command (the
    sandbox itself lives on).
    """

    stdout: str
    stderr: str
    exit_code: int
    duration: float
    timed_out: bool = False
    truncated: bool = False
    signal: int | None = None
    oom_killed: bool = False

    @property
    def duration_ms(self) -> float:
        return self.duration * 1000.0

    @property
    def ok(self) -> bool:
        """``True`` when the command exited 0 and did not time out."""
        return self.exit_code == 0 and not self.timed_out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ExecResult:
        return cls(
            d.get("stdout") or "",
            d.get("stderr") or "",
            int(d.get("exit_code", -1)),
            float(d.get("duration_ms") or 0.0) / 1000.0,
            bool(d.get("timed_out", False)),
            bool(d.get("truncated", False)),
            d.get("signal"),
            bool(d.get("oom_killed", False)),
        )


@dataclass(slots=True)
class OutputChunk:
    """A piece of output produced by :meth:`Sandbox.stream`, in arrival order."""

    stream: Literal["stdout", "stderr"]
    data: str


@dataclass(slots=True)
class SandboxInfo:
    id: str
    pool: str
    state: str = "allocated"
    created_at_ms: int | None = None
    acquired_at_ms: int | None = None
    expires_at_ms: int | None = None
    labels: dict[str, str] = field(default_factory=dict)
    workspace: str = "/workspace"
    endpoint: str | None = None

    @classmethod
    def from_json(cls, d: dict[str, Any], endpoint: str | None = None) -> SandboxInfo:
        return cls(
            id=d["id"],
            pool=d.get("pool", ""),
            state=d.get("state", "allocated"),
            created_at_ms=d.get("created_at_ms"),
            acquired_at_ms=d.get("acquired_at_ms"),
            expires_at_ms=d.get("expires_at_ms"),
            labels=dict(d.get("labels") or {}),
            workspace=d.get("workspace") or "/workspace",
            endpoint=endpoint,
        )


@dataclass(slots=True)
class PoolSpec:
    """A pool's specification (``PUT /v1/pools/{name}``). ``None`` fields are left to the
    daemon's defaults."""

    runtime: str | None = None
    min_idle: int | None = None
    max: int | None = None
    reuse: str | None = None
    memory_mb: int | None = None
    pids: int | None = None
    cpu_millis: int | None = None
    disk_mb: int | None = None
    network: str | None = None
    rootfs: str | None = None
    env: dict[str, str] | None = None
    idle_timeout_seconds: int | None = None
    max_lifetime_seconds: int | None = None
    auto_pause_after_seconds: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    _FIELDS = (
        "runtime",
        "min_idle",
        "max",
        "reuse",
        "memory_mb",
        "pids",
        "cpu_millis",
        "disk_mb",
        "network",
        "rootfs",
        "env",
        "idle_timeout_seconds",
        "max_lifetime_seconds",
        "auto_pause_after_seconds",
    )

    def to_json(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self._FIELDS if getattr(self, k) is not None}
        out.update(self.extra)
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any] | None) -> PoolSpec:
        d = dict(d or {})
        kw = {k: d.pop(k) for k in cls._FIELDS if k in d}
        return cls(**kw, extra=d)


@dataclass(slots=True)
class SnapshotInfo:
    """A snapshot of a sandbox's files, kept on the node at ``endpoint``."""

    id: str
    pool: str
    sandbox: str
    parent: str | None = None
    bytes: int = 0
    created_at_ms: int | None = None
    forks: int = 0
    endpoint: str | None = None

    @classmethod
    def from_json(cls, d: dict[str, Any], endpoint: str | None = None) -> SnapshotInfo:
        return cls(
            id=d["id"],
            pool=d.get("pool", ""),
            sandbox=d.get("sandbox", ""),
            parent=d.get("parent"),
            bytes=int(d.get("bytes", 0)),
            created_at_ms=d.get("created_at_ms"),
            forks=int(d.get("forks", 0)),
            endpoint=endpoint,
        )


@dataclass(slots=True)
class PoolStatus:
    idle: int = 0
    allocated: int = 0
    paused: int = 0
    starting: int = 0
    total: int = 0
    ready: bool = False
    last_error: str | None = None
    #: Cluster mode: idle sandboxes of the pool on this node and its peers (``None`` outside).
    cluster_idle: int | None = None

    @classmethod
    def from_json(cls, d: dict[str, Any] | None) -> PoolStatus:
        d = d or {}
        return cls(
            idle=int(d.get("idle", 0)),
            allocated=int(d.get("allocated", 0)),
            paused=int(d.get("paused", 0)),
            starting=int(d.get("starting", 0)),
            total=int(d.get("total", 0)),
            ready=bool(d.get("ready", False)),
            last_error=d.get("last_error"),
            cluster_idle=None if d.get("cluster_idle") is None else int(d["cluster_idle"]),
        )


@dataclass(slots=True)
class PoolInfo:
    name: str
    spec: PoolSpec
    status: PoolStatus
    endpoint: str | None = None

    @classmethod
    def from_json(cls, d: dict[str, Any], endpoint: str | None = None) -> PoolInfo:
        return cls(
            name=d["name"],
            spec=PoolSpec.from_json(d.get("spec")),
            status=PoolStatus.from_json(d.get("status")),
            endpoint=endpoint,
        )


@dataclass(slots=True)
class FileInfo:
    path: str
    size: int
    sha256: str

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> FileInfo:
        return cls(d.get("path", ""), int(d.get("size", 0)), d.get("sha256", ""))


@dataclass(slots=True)
class PythonError:
    """An exception raised by a Python session's snippet."""

    ename: str
    evalue: str
    traceback: list[str] = field(default_factory=list)

    @classmethod
    def from_json(cls, d: dict[str, Any] | None) -> PythonError | None:
        if not d:
            return None
        return cls(str(d.get("ename", "")), str(d.get("evalue", "")), list(d.get("traceback") or []))


@dataclass(slots=True)
class RunResult:
    """Outcome of one command (shell) or snippet (Python) in a :class:`LiveSession`.

    ``exit_code``: the shell command's status (130 when a timeout interrupted it), or for
    Python 0, or 1 when the snippet raised (``error``). ``value`` is the ``repr`` of a
    snippet's final expression and ``data`` its rich representations by MIME type.
    ``session_ended`` says the session's process is gone (``exit``, or a command that would
    not stop); the session cannot run more.
    """

    stdout: str
    stderr: str
    exit_code: int
    duration: float
    timed_out: bool = False
    truncated: bool = False
    session_ended: bool = False
    value: str | None = None
    data: dict[str, Any] | None = None
    error: PythonError | None = None

    @property
    def duration_ms(self) -> float:
        return self.duration * 1000.0

    @property
    def ok(self) -> bool:
        """``True`` when it exited 0 (raised nothing) and did not time out."""
        return self.exit_code == 0 and not self.timed_out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RunResult:
        return cls(
            d.get("stdout") or "",
            d.get("stderr") or "",
            int(d.get("exit_code", -1)),
            float(d.get("duration_ms") or 0.0) / 1000.0,
            bool(d.get("timed_out", False)),
            bool(d.get("truncated", False)),
            bool(d.get("session_ended", False)),
            d.get("value"),
            d.get("data"),
            PythonError.from_json(d.get("error")),
        )


@dataclass(slots=True)
class LiveSessionInfo:
    """A persistent shell or Python session as the node reports it."""

    id: str
    kind: str
    pid: int = 0
    created_at_ms: int = 0
    runs: int = 0
    busy: bool = False

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LiveSessionInfo:
        return cls(
            str(d["id"]),
            str(d.get("kind", "")),
            int(d.get("pid", 0)),
            int(d.get("created_at_ms", 0)),
            int(d.get("runs", 0)),
            bool(d.get("busy", False)),
        )
