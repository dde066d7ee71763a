"""What the sessions and the pool manager share: the original SDK's step forms normalised,
defaults from the environment, results and session info built from the node API's."""

from __future__ import annotations

import datetime as _dt
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import asdict
from typing import Any, BinaryIO, cast

from ..aio import AsyncSandbox
from ..client import Sandbox
from ..types import ExecResult
from .models import Command, FilePatch, SessionInfo, StepOutput, StepResult


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
