"""Typed exceptions. Every error the SDK raises derives from :class:`ArlError`.

A command that exits with a non-zero code is *data* (``ExecResult.exit_code``), never an
exception. A command that runs into its timeout returns ``ExecResult(timed_out=True)``;
:class:`ExecTimeout` is raised only when the caller passes ``raise_on_timeout=True``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .types import ExecResult

__all__ = [
    "ArlError",
    "BadRequest",
    "PathRefused",
    "ChecksumMismatch",
    "PayloadTooLarge",
    "AuthError",
    "NotFound",
    "SandboxNotFound",
    "PoolNotFound",
    "RemoteFileNotFound",
    "PoolExhausted",
    "InfraError",
    "ExecTimeout",
    "PoolNotReadyError",
    "GatewayError",
]


class ArlError(Exception):
    """Base class of every SDK error.

    Attributes:
        code: the daemon's error code (``"not_found"``, ``"pool_exhausted"``, ...), or an
            SDK-side code such as ``"connection_failed"``.
        message: human-readable message.
        status: HTTP status, or ``None`` when no response was received.
        retryable: ``True`` when retrying later (or elsewhere) may succeed. Trainers can use it
            to mask infrastructure failures out of a batch.
        endpoint: the node endpoint the failing request went to, when known.
    """

    retryable_default = False

    def __init__(
        self,
        message: str,
        *,
        code: str = "error",
        status: int | None = None,
        retryable: bool | None = None,
        endpoint: str | None = None,
        alternatives: list[str] | None = None,
        body: Any = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status
        self.retryable = self.retryable_default if retryable is None else bool(retryable)
        self.endpoint = endpoint
        self.alternatives: list[str] = list(alternatives or [])
        self.body = body

    # Names used by the original ARL-Infra SDK's GatewayError.
    @property
    def status_code(self) -> int | None:
        return self.status

    @property
    def error(self) -> str:
        return self.code

    @property
    def detail(self) -> str:
        return self.message

    def __str__(self) -> str:
        where = f" [{self.status}]" if self.status is not None else ""
        return f"{self.code}{where}: {self.message}"

    def __reduce__(self) -> Any:  # keep errors picklable (multiprocessing trainers)
        return (
            _rebuild,
            (
                type(self),
                self.message,
                {
                    "code": self.code,
                    "status": self.status,
                    "retryable": self.retryable,
                    "endpoint": self.endpoint,
                    "alternatives": self.alternatives,
                },
            ),
        )


def _rebuild(cls: type[ArlError], message: str, kw: dict[str, Any]) -> ArlError:
    return cls(message, **kw)


class BadRequest(ArlError):
    """HTTP 400: the request was malformed or refused (``bad_request``)."""


class PathRefused(BadRequest):
    """HTTP 400 ``path_refused``: a file path leaves the sandbox's allowed root."""


class ChecksumMismatch(BadRequest):
    """HTTP 400 ``checksum_mismatch``, or a transferred file whose SHA-256 does not match."""


class PayloadTooLarge(BadRequest):
    """HTTP 413 ``payload_too_large``."""


class AuthError(ArlError):
    """HTTP 401 ``unauthorized`` (missing or wrong token) or 403 ``forbidden`` (the sandbox
    belongs to another token)."""


class NotFound(ArlError):
    """HTTP 404 ``not_found``."""


class SandboxNotFound(NotFound):
    """The sandbox does not exist (released, expired, or never existed on that node)."""


class PoolNotFound(NotFound):
    """The pool does not exist on the node."""


class RemoteFileNotFound(NotFound, FileNotFoundError):
    """The file does not exist inside the sandbox. Also a :class:`FileNotFoundError`."""


class PoolExhausted(ArlError):
    """HTTP 503 ``pool_exhausted`` on every node tried: no idle sandbox and the pool is at its
    maximum. Retryable. ``alternatives`` lists the endpoints the last daemon suggested."""

    retryable_default = True


class InfraError(ArlError):
    """Infrastructure failure: the node could not be reached, the sandbox's agent died
    (``sandbox_unavailable``), the node is draining, or an internal error. ``retryable`` tells
    whether the operation may succeed when retried (possibly with a new sandbox)."""


class ExecTimeout(ArlError, TimeoutError):
    """The command ran into its timeout and the caller asked for an exception
    (``raise_on_timeout=True``). ``result`` holds the partial :class:`~arl.ExecResult`."""

    def __init__(self, message: str, *, result: ExecResult | None = None, **kw: Any) -> None:
        kw.setdefault("code", "exec_timeout")
        super().__init__(message, **kw)
        self.result = result


class PoolNotReadyError(ArlError):
    """Raised by :meth:`arl.WarmPoolManager.wait_for_ready` when the pool keeps failing to
    start sandboxes (compatibility with the original SDK)."""

    def __init__(self, pool_name: str, message: str, conditions: list[Any] | None = None) -> None:
        super().__init__(message, code="pool_not_ready")
        self.pool_name = pool_name
        self.conditions = list(conditions or [])


#: The original ARL-Infra SDK raised ``GatewayError`` for HTTP errors; here every error is an
#: :class:`ArlError` with ``status_code`` / ``error`` / ``detail`` properties.
GatewayError = ArlError

_BY_CODE_400: dict[str, type[ArlError]] = {
    "path_refused": PathRefused,
    "checksum_mismatch": ChecksumMismatch,
}


def error_from_response(
    status: int,
    body: Any,
    *,
    context: str = "",
    endpoint: str | None = None,
) -> ArlError:
    """Build the typed exception for an error response.

    ``context`` is ``"sandbox"`` for routes under ``/v1/sandboxes/{id}``, ``"file"`` for file
    routes, ``"pool"`` for pool routes and acquisition.
    """
    err: dict[str, Any] = {}
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        err = body["error"]
    elif isinstance(body, dict) and isinstance(body.get("error"), str):
        err = {"code": body["error"], "message": body.get("detail", body["error"])}
    code = str(err.get("code") or _default_code(status))
    message = str(err.get("message") or (body if isinstance(body, str) and body else code))
    retryable = err.get("retryable")
    alternatives = err.get("alternatives") or []
    kw: dict[str, Any] = {
        "code": code,
        "status": status,
        "retryable": retryable,
        "endpoint": endpoint,
        "alternatives": alternatives,
        "body": body,
    }
    cls: type[ArlError]
    if status == 413 or code == "payload_too_large":
        cls = PayloadTooLarge
    elif status == 400:
        cls = _BY_CODE_400.get(code, BadRequest)
    elif status in (401, 403) or code in ("unauthorized", "forbidden"):
        cls = AuthError
    elif status == 404:
        low = message.lower()
        if context == "file" and ("no such file" in low or "sandbox" not in low):
            cls = RemoteFileNotFound
        elif context in ("sandbox", "file"):
            cls = SandboxNotFound
        elif context == "pool":
            cls = PoolNotFound
        else:
            cls = NotFound
    elif code == "pool_exhausted":
        cls = PoolExhausted
    elif status >= 500:
        cls = InfraError
        if retryable is None:
            kw["retryable"] = status in (502, 503, 504)
    else:
        cls = ArlError
    return cls(message, **kw)


def _default_code(status: int) -> str:
    return {
        400: "bad_request",
        401: "unauthorized",
        403: "forbidden",
        404: "not_found",
        413: "payload_too_large",
        500: "internal",
        503: "unavailable",
    }.get(status, f"http_{status}")
