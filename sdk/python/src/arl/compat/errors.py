"""Errors of the original SDK with no equivalent among :mod:`arl.errors`."""

from __future__ import annotations

from ..errors import ArlError


class SessionNotInitializedError(ArlError):
    """The session has no sandbox (``create_sandbox()`` was not called or it was deleted)."""

    def __init__(self, message: str = "session not initialized: call create_sandbox() first") -> None:
        super().__init__(message, code="session_not_initialized")


class UnsupportedOperation(ArlError, NotImplementedError):
    """An original-SDK feature with no equivalent on the node API."""

    def __init__(self, what: str) -> None:
        super().__init__(f"{what} is not supported by ARL nodes", code="unsupported")
