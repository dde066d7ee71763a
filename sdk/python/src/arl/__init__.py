"""ARL Python SDK: isolated sandboxes with near-zero latency, straight from the node daemons.

Sync::

    import arl
    client = arl.Client()                       # ARL_ENDPOINTS / ARL_TOKEN
    with client.sandbox("default") as sb:
        r = sb.exec(["python3", "-c", "print(6*7)"])
        print(r.stdout, r.exit_code)

Async::

    async with arl.AsyncClient() as client:
        async with client.sandbox("default") as sb:
            r = await sb.exec("echo hi")
"""

from .aio import AsyncClient, AsyncLiveSession, AsyncSandbox, AsyncSandboxList
from .client import Client, LiveSession, Sandbox, SandboxList
from .compat import (
    AsyncSandboxSession,
    Command,
    ExecuteResponse,
    FilePatch,
    ResourceRequirements,
    SandboxSession,
    SessionInfo,
    SessionNotInitializedError,
    StepOutput,
    StepRequest,
    StepResult,
    UnsupportedOperation,
    UploadFileResponse,
    WarmPoolInfo,
    WarmPoolManager,
)
from .errors import (
    ArlError,
    AuthError,
    BadRequest,
    ChecksumMismatch,
    ExecTimeout,
    GatewayError,
    InfraError,
    NotFound,
    PathRefused,
    PayloadTooLarge,
    PoolExhausted,
    PoolNotFound,
    PoolNotReadyError,
    RemoteFileNotFound,
    SandboxNotFound,
)
from .types import (
    ExecResult,
    FileInfo,
    LiveSessionInfo,
    OutputChunk,
    PoolInfo,
    PoolSpec,
    PoolStatus,
    PythonError,
    RunResult,
    SandboxInfo,
    SnapshotInfo,
)

__version__ = "0.1.0"

__all__ = [
    "Client",
    "Sandbox",
    "SandboxList",
    "AsyncClient",
    "AsyncSandbox",
    "AsyncSandboxList",
    "LiveSession",
    "AsyncLiveSession",
    "LiveSessionInfo",
    "RunResult",
    "PythonError",
    "ExecResult",
    "OutputChunk",
    "SandboxInfo",
    "SnapshotInfo",
    "PoolInfo",
    "PoolSpec",
    "PoolStatus",
    "FileInfo",
    "ArlError",
    "AuthError",
    "BadRequest",
    "PathRefused",
    "ChecksumMismatch",
    "PayloadTooLarge",
    "NotFound",
    "SandboxNotFound",
    "PoolNotFound",
    "RemoteFileNotFound",
    "PoolExhausted",
    "InfraError",
    "ExecTimeout",
    "GatewayError",
    "PoolNotReadyError",
    "SandboxSession",
    "AsyncSandboxSession",
    "WarmPoolManager",
    "WarmPoolInfo",
    "Command",
    "FilePatch",
    "StepRequest",
    "StepOutput",
    "StepResult",
    "ExecuteResponse",
    "SessionInfo",
    "UploadFileResponse",
    "ResourceRequirements",
    "SessionNotInitializedError",
    "UnsupportedOperation",
]
