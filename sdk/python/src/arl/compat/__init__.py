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

from ..errors import GatewayError, PoolNotReadyError
from .async_sessions import AsyncSandboxSession
from .errors import SessionNotInitializedError, UnsupportedOperation
from .models import (
    Command,
    ExecuteResponse,
    FilePatch,
    PoolCondition,
    PoolInfo,
    ResourceRequirements,
    SessionInfo,
    StepOutput,
    StepRequest,
    StepResult,
    UploadFileResponse,
    WarmPoolInfo,
)
from .pools import WarmPoolManager
from .sessions import SandboxSession

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
