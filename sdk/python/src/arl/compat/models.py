"""The original SDK's data types (steps, results, sessions, pools, resources), as dataclasses
with the pydantic methods scripts call on them."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any


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
