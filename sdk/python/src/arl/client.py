# Generated from aio.py by scripts/unasync.py: do not edit; edit the source and run the script.
"""The client: :class:`Client`, :class:`Sandbox` and :class:`SandboxList`."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, BinaryIO

from ._common import (
    Config,
    Endpoint,
    HashingReader,
    PoolView,
    StreamAssembler,
    acquire_body,
    best_error,
    check_timeout,
    dumps,
    exec_body,
    exec_read_timeout,
    file_query,
    files_body,
    fork_body,
    loads,
    mode_str,
    new_request_id,
    resolve_config,
    verify_checksum,
)
from ._sync_http import CANCELLED, CONN_ERRORS, acquiring, map_all, map_settled
from ._sync_transport import Transport
from .errors import ArlError, AuthError, InfraError, NotFound, PoolExhausted, PoolNotFound, SandboxNotFound
from .types import ExecResult, FileInfo, LiveSessionInfo, OutputChunk, PoolInfo, PoolSpec, RunResult, SandboxInfo, SnapshotInfo

__all__ = ["Client", "Sandbox", "SandboxList", "LiveSession"]

_NDJSON = {"Content-Type": "application/json", "Accept": "application/x-ndjson"}
_OCTET = {"Content-Type": "application/octet-stream"}
# What a release on the way out of an exception may raise without hiding that exception.
_QUIET_ON_EXIT: tuple[type[BaseException], ...] = (ArlError, *CANCELLED)


class Client:
    """Client of one or more ARL nodes.

    Args:
        endpoints: node URLs (list or comma-separated string). Default: ``ARL_ENDPOINTS``, else
            ``http://127.0.0.1:8420``.
        token: bearer token. Default: ``ARL_TOKEN``.
        node_ip: IP of the node this process runs on (default ``ARL_NODE_IP``); its endpoint is
            tried first when acquiring.
        local_endpoint: the local node's URL, overriding ``node_ip``.
        timeout: HTTP read timeout in seconds for requests other than exec (exec waits for the
            command's own timeout plus a margin).
        retry_timeout: how long connection-level failures are retried (same request_id).
        pool_cache_ttl: seconds the idle counts of other nodes are cached for routing.

    Each request takes its own keep-alive connection from the client's pool: the synchronous
    client can be shared by many threads; the asyncio one is used from one event loop. Close
    it at the end (``with Client() as client:``).
    """

    def __init__(
        self,
        endpoints: str | Iterable[str] | None = None,
        token: str | None = None,
        *,
        node_ip: str | None = None,
        local_endpoint: str | None = None,
        timeout: float = 30.0,
        connect_timeout: float = 5.0,
        retry_timeout: float = 10.0,
        pool_cache_ttl: float = 1.0,
    ) -> None:
        self._cfg: Config = resolve_config(endpoints, token, node_ip=node_ip, local_endpoint=local_endpoint)
        self.timeout = timeout
        self.retry_timeout = retry_timeout
        self._t = Transport(self._cfg.token, connect_timeout=connect_timeout, retry_timeout=retry_timeout)
        self._view = PoolView(pool_cache_ttl)

    # -- configuration -------------------------------------------------------------------------

    @property
    def endpoints(self) -> list[str]:
        return [e.url for e in self._cfg.endpoints]

    @property
    def local_endpoint(self) -> str | None:
        return self._cfg.local.url if self._cfg.local else None

    def close(self) -> None:
        """Close pooled connections. Sandboxes stay allocated."""
        self._t.close()


    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _ep(self, endpoint: str | None) -> Endpoint:
        return Endpoint.parse(endpoint) if endpoint else self._cfg.endpoints[0]

    # -- health and pools ----------------------------------------------------------------------

    def healthy(self, endpoint: str | None = None) -> bool:
        """``GET /healthz`` on one endpoint (default: the first)."""
        try:
            st, _ = self._t.request(self._ep(endpoint), "GET", "/healthz", timeout=self.timeout, retry_timeout=0)
            return st == 200
        except ArlError:
            return False

    def ready(self, endpoint: str | None = None) -> bool:
        """``GET /readyz``: ``True`` once the node's pools are initialised."""
        try:
            st, _ = self._t.request(self._ep(endpoint), "GET", "/readyz", timeout=self.timeout, retry_timeout=0)
            return st == 200
        except ArlError:
            return False

    def pools(self, endpoint: str | None = None) -> list[PoolInfo]:
        """Pools of every endpoint (or of one), each tagged with its ``endpoint``."""
        eps = [self._ep(endpoint)] if endpoint else self._cfg.endpoints

        def one(ep: Endpoint) -> list[PoolInfo]:
            d = self._t.request_json(ep, "GET", "/v1/pools", timeout=self.timeout, context="pool")
            items = d.get("pools", [])
            self._view.update(ep, items)
            return [PoolInfo.from_json(p, ep.url) for p in items]

        out: list[PoolInfo] = []
        for part in map_all(one, eps):
            out.extend(part)
        return out

    def pool(self, name: str, endpoint: str | None = None) -> PoolInfo:
        """One pool by name (first endpoint that has it); :class:`PoolNotFound` otherwise."""
        for p in self.pools(endpoint):
            if p.name == name:
                return p
        raise PoolNotFound(f"pool {name!r} not found", code="not_found", status=404)

    def put_pool(
        self, name: str, spec: PoolSpec | Mapping[str, Any] | None = None, *, endpoint: str | None = None, **fields: Any
    ) -> PoolInfo:
        """Create or update a pool (``PUT /v1/pools/{name}``) on every endpoint (or on one).
        ``spec`` fields may also be given as keyword arguments. Returns the first node's view."""
        body: dict[str, Any] = spec.to_json() if isinstance(spec, PoolSpec) else dict(spec or {})
        body.update({k: v for k, v in fields.items() if v is not None})
        data = dumps(body)
        eps = [self._ep(endpoint)] if endpoint else self._cfg.endpoints
        first: PoolInfo | None = None
        for ep in eps:
            d = self._t.request_json(ep, "PUT", f"/v1/pools/{name}", data, timeout=self.timeout, context="pool")
            info = PoolInfo.from_json(d, ep.url)
            first = first or info
        assert first is not None
        return first

    def delete_pool(self, name: str, *, endpoint: str | None = None, missing_ok: bool = False) -> None:
        """``DELETE /v1/pools/{name}`` on every endpoint (or on one)."""
        eps = [self._ep(endpoint)] if endpoint else self._cfg.endpoints
        for ep in eps:
            try:
                self._t.request(ep, "DELETE", f"/v1/pools/{name}", timeout=self.timeout, context="pool")
            except NotFound:
                if not missing_ok:
                    raise

    # -- sandboxes -----------------------------------------------------------------------------

    def sandbox(
        self,
        pool: str = "default",
        *,
        env: Mapping[str, str] | None = None,
        ttl: float | None = None,
        idle_timeout: float | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> Sandbox:
        """Acquire a warm sandbox from ``pool``; ``with`` releases it on exit::

            with client.sandbox("default") as sb:
                print((sb.exec(["echo", "hi"])).stdout)

        ``env`` is applied to every command; ``ttl`` (seconds) bounds the sandbox's lifetime;
        ``idle_timeout`` releases it after that long without requests.
        """
        return acquiring(self._acquire_one(pool, env, ttl, idle_timeout, labels))

    acquire = sandbox

    def acquire_many(
        self,
        pool: str,
        n: int,
        *,
        env: Mapping[str, str] | None = None,
        ttl: float | None = None,
        idle_timeout: float | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> SandboxList:
        """Acquire ``n`` sandboxes with one request to the best node; when no single node can
        provide them all, they are gathered one by one across the nodes (all or nothing).
        Returns a list; ``with`` releases them all on exit."""
        if n < 1:
            raise ValueError("n must be >= 1")
        return acquiring(self._acquire_many(pool, n, env, ttl, idle_timeout, labels))

    def _acquire_one(
        self,
        pool: str,
        env: Mapping[str, str] | None,
        ttl: float | None,
        idle_timeout: float | None,
        labels: Mapping[str, str] | None,
    ) -> Sandbox:
        return (self._acquire(pool, 1, env, ttl, idle_timeout, labels))[0]

    def _acquire_many(
        self,
        pool: str,
        n: int,
        env: Mapping[str, str] | None,
        ttl: float | None,
        idle_timeout: float | None,
        labels: Mapping[str, str] | None,
    ) -> SandboxList:
        try:
            return SandboxList(self._acquire(pool, n, env, ttl, idle_timeout, labels))
        except PoolExhausted:
            if len(self._cfg.endpoints) == 1 or n == 1:
                raise
        # No single node has n idle: gather them one by one across the nodes (all or nothing).
        got = SandboxList()
        try:
            for _ in range(n):
                got.append(self._acquire_one(pool, env, ttl, idle_timeout, labels))
        except BaseException:
            got.release_all(raise_errors=False)
            raise
        return got

    def _acquire(
        self,
        pool: str,
        count: int,
        env: Mapping[str, str] | None,
        ttl: float | None,
        idle_timeout: float | None,
        labels: Mapping[str, str] | None,
    ) -> list[Sandbox]:
        body = dumps(acquire_body(pool, count, env, ttl, idle_timeout, labels, new_request_id()))
        eps = self._cfg.endpoints
        tried: set[Endpoint] = set()
        pending: deque[Endpoint] = deque()
        errors: list[ArlError] = []
        ranked = False
        if len(eps) == 1:  # hot path: nothing to choose
            try:
                d = self._t.request_json(eps[0], "POST", "/v1/sandboxes", body, timeout=self.timeout, context="pool")
                return [Sandbox(self, eps[0], SandboxInfo.from_json(s, eps[0].url)) for s in d["sandboxes"]]
            except (PoolExhausted, InfraError) as e:
                # Exhausted, or the node is cordoned or draining: its peers with idle
                # sandboxes are named, if it knows any.
                if not e.alternatives:
                    raise
                errors.append(e)
                tried.add(eps[0])
                pending.extend(Endpoint.parse(a) for a in e.alternatives)
                ranked = True  # only the daemon's alternatives are left to try
        elif self._cfg.local is not None:
            pending.append(self._cfg.local)
        while True:
            if not pending and not ranked:
                self._refresh_view([e for e in eps if e not in tried])
                pending.extend(e for e in self._view.order(eps, pool, None) if e not in tried)
                ranked = True
            while pending and pending[0] in tried:
                pending.popleft()
            if not pending:
                break
            ep = pending.popleft()
            tried.add(ep)
            last = not pending and ranked
            try:
                d = self._t.request_json(
                    ep, "POST", "/v1/sandboxes", body, timeout=self.timeout, context="pool",
                    retry_timeout=None if last else 0.0,
                )
            except (PoolExhausted, InfraError) as e:
                errors.append(e)
                alts = [Endpoint.parse(a) for a in e.alternatives]
                pending.extendleft(a for a in reversed(alts) if a not in tried)
                continue
            except PoolNotFound as e:
                errors.append(e)
                continue
            self._view.took(ep, pool, count)
            return [Sandbox(self, ep, SandboxInfo.from_json(s, ep.url)) for s in d["sandboxes"]]
        raise best_error(errors, pool)

    def _refresh_view(self, eps: list[Endpoint]) -> None:
        def one(ep: Endpoint) -> None:
            try:
                d = self._t.request_json(ep, "GET", "/v1/pools", timeout=min(self.timeout, 2.0), retry_timeout=0.0)
                self._view.update(ep, d.get("pools", []))
            except AuthError:
                raise
            except ArlError:
                self._view.update(ep, None)

        map_all(one, self._view.stale(eps))

    def attach(self, sandbox_id: str, endpoint: str | None = None) -> Sandbox:
        """Return a handle to an existing sandbox (looked up on ``endpoint``, else on every
        endpoint in turn)."""
        eps = [self._ep(endpoint)] if endpoint else self._cfg.endpoints
        errors: list[ArlError] = []
        for ep in eps:
            try:
                d = self._t.request_json(ep, "GET", f"/v1/sandboxes/{sandbox_id}", timeout=self.timeout, context="sandbox")
                return Sandbox(self, ep, SandboxInfo.from_json(d, ep.url))
            except (NotFound, InfraError) as e:
                errors.append(e)
        raise next((e for e in errors if isinstance(e, NotFound)), errors[0])

    def sandboxes(self, endpoint: str | None = None) -> list[SandboxInfo]:
        """The caller's sandboxes on every endpoint (or on one)."""
        eps = [self._ep(endpoint)] if endpoint else self._cfg.endpoints
        out: list[SandboxInfo] = []
        for ep in eps:
            d = self._t.request_json(ep, "GET", "/v1/sandboxes", timeout=self.timeout)
            out.extend(SandboxInfo.from_json(s, ep.url) for s in d.get("sandboxes", []))
        return out


    # -- snapshots -------------------------------------------------------------------------------

    def snapshots(self, endpoint: str | None = None) -> list[SnapshotInfo]:
        """The caller's snapshots on every endpoint (or on one)."""
        eps = [self._ep(endpoint)] if endpoint else self._cfg.endpoints
        out: list[SnapshotInfo] = []
        for ep in eps:
            d = self._t.request_json(ep, "GET", "/v1/snapshots", timeout=self.timeout)
            out.extend(SnapshotInfo.from_json(s, ep.url) for s in d.get("snapshots", []))
        return out

    def delete_snapshot(self, snapshot: SnapshotInfo, *, missing_ok: bool = False) -> None:
        """Delete a snapshot (refused while a fork of it is live)."""
        ep = self._ep(snapshot.endpoint)
        try:
            self._t.request(ep, "DELETE", f"/v1/snapshots/{snapshot.id}", timeout=self.timeout, context="snapshot")
        except NotFound:
            if not missing_ok:
                raise

    def fork(
        self,
        snapshot: SnapshotInfo,
        count: int = 1,
        *,
        env: Mapping[str, str] | None = None,
        labels: Mapping[str, str] | None = None,
        ttl: float | None = None,
        idle_timeout: float | None = None,
    ) -> SandboxList:
        """``count`` new sandboxes whose files start as the snapshot's (on its node)."""
        ep = self._ep(snapshot.endpoint)
        body = fork_body(count, env, labels, ttl, idle_timeout)
        d = self._t.request_json(ep, "POST", f"/v1/snapshots/{snapshot.id}/fork", body, timeout=max(self.timeout, 60.0), context="snapshot")
        return SandboxList(Sandbox(self, ep, SandboxInfo.from_json(s, ep.url)) for s in d["sandboxes"])


class Sandbox:
    """A sandbox acquired from a node. All calls go to the node that holds it.

    ``with`` releases it on exit. ``id``, ``pool``, ``endpoint`` and ``info`` describe it.
    """

    __slots__ = ("_c", "_t", "_ep", "info", "_base", "_exec_path", "_released")

    def __init__(self, client: Client, ep: Endpoint, info: SandboxInfo) -> None:
        self._c = client
        self._t = client._t
        self._ep = ep
        self.info = info
        self._base = f"/v1/sandboxes/{info.id}"
        self._exec_path = self._base + "/exec"
        self._released = False

    @property
    def id(self) -> str:
        return self.info.id

    @property
    def pool(self) -> str:
        return self.info.pool

    @property
    def endpoint(self) -> str:
        return self._ep.url

    @property
    def workspace(self) -> str:
        return self.info.workspace

    @property
    def released(self) -> bool:
        return self._released

    def __repr__(self) -> str:
        return f"Sandbox(id={self.id!r}, pool={self.pool!r}, endpoint={self.endpoint!r})"

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, et: Any, ev: Any, tb: Any) -> None:
        if et is None:
            self.release()
        else:
            try:
                self.release()
            except _QUIET_ON_EXIT:
                pass  # keep the original exception

    # -- commands ------------------------------------------------------------------------------

    def exec(
        self,
        cmd: list[str] | tuple[str, ...] | str,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        stdin: str | bytes | None = None,
        max_output_bytes: int | None = None,
        request_id: str | None = None,
        raise_on_timeout: bool = False,
    ) -> ExecResult:
        """Run a command and wait for it.

        ``cmd`` is an argv list, or a string run by ``/bin/sh -c``. ``timeout`` is in seconds
        (daemon default 60 s); a command that runs into it is killed and its result has
        ``timed_out=True`` (an :class:`ExecTimeout` is raised instead only with
        ``raise_on_timeout=True``). A non-zero exit code is returned, never raised.
        Connection failures are retried with the same ``request_id``: the command runs once.
        """
        body = dumps(exec_body(cmd, env, cwd, timeout, stdin, max_output_bytes, request_id or new_request_id()))
        d = self._t.request_json(
            self._ep, "POST", self._exec_path, body, timeout=exec_read_timeout(timeout), context="sandbox"
        )
        r = ExecResult.from_json(d)
        if raise_on_timeout:
            check_timeout(r, True, cmd)
        return r

    def stream(
        self,
        cmd: list[str] | tuple[str, ...] | str,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        stdin: str | bytes | None = None,
        max_output_bytes: int | None = None,
        request_id: str | None = None,
        raise_on_timeout: bool = False,
    ) -> Iterator[OutputChunk | ExecResult]:
        """Run a command, yielding :class:`OutputChunk` items as output arrives and finally the
        :class:`ExecResult` (whose stdout/stderr hold the whole output)::

            for item in sb.stream("make test"):
                if isinstance(item, arl.OutputChunk):
                    print(item.data, end="")
                else:
                    result = item

        A stream cut midway is recovered: the same ``request_id`` is asked again and the
        output not yet delivered follows, then the result.
        """
        body = dumps(exec_body(cmd, env, cwd, timeout, stdin, max_output_bytes, request_id or new_request_id()))
        rt = exec_read_timeout(timeout)
        asm = StreamAssembler()
        resp = self._t.open(self._ep, "POST", self._exec_path, body, headers=_NDJSON, timeout=rt, context="sandbox")
        lines = self._t.iter_lines(self._ep, resp)
        broken: BaseException | None = None
        try:
            while True:
                try:
                    line = lines.__next__()
                    item = asm.feed(loads(line), self._ep.url)
                except StopIteration:
                    break
                except CONN_ERRORS as e:
                    broken = e
                    break
                if item is None:
                    continue
                if isinstance(item, ExecResult):
                    check_timeout(item, raise_on_timeout, cmd)
                yield item
        finally:
            lines.close()
        if asm.result is not None:
            return
        if broken is None:
            raise InfraError(
                f"stream from {self._ep} ended without a result", code="incomplete_stream", retryable=True,
                endpoint=self._ep.url,
            )
        # The connection dropped mid-stream: fetch the result of the same request_id (the
        # daemon returns the first run's result instead of running the command again).
        d = self._t.request_json(self._ep, "POST", self._exec_path, body, timeout=rt, context="sandbox")
        for item in asm.recover(ExecResult.from_json(d)):
            if isinstance(item, ExecResult):
                check_timeout(item, raise_on_timeout, cmd)
            yield item

    # -- sessions and trajectory ---------------------------------------------------------------

    def open_session(
        self, kind: str = "shell", *, env: Mapping[str, str] | None = None, cwd: str | None = None
    ) -> LiveSession:
        """Start a persistent session: ``"shell"`` (a ``/bin/sh`` whose cwd, variables,
        functions and background jobs persist) or ``"python"`` (a live interpreter whose
        variables persist). ``with`` closes it on exit::

            with sb.open_session("python") as py:
                py.run("x = 41")
                print((py.run("x + 1")).value)   # '42'
        """
        body: dict[str, Any] = {"kind": kind}
        if env:
            body["env"] = dict(env)
        if cwd is not None:
            body["cwd"] = cwd
        d = self._t.request_json(
            self._ep, "POST", self._base + "/sessions", dumps(body), timeout=self._c.timeout, context="sandbox",
            retry_timeout=0.0,
        )
        return LiveSession(self, LiveSessionInfo.from_json(d))

    def sessions(self) -> list[LiveSessionInfo]:
        """The sandbox's live sessions, oldest first."""
        d = self._t.request_json(self._ep, "GET", self._base + "/sessions", timeout=self._c.timeout, context="sandbox")
        return [LiveSessionInfo.from_json(s) for s in d.get("sessions", [])]

    def trajectory(self) -> list[dict[str, Any]]:
        """What was done in the sandbox during this lease (execs, session commands, file
        writes; timings, exit codes, output previews), oldest first: the parsed JSON lines of
        ``GET /v1/sandboxes/{id}/trajectory``."""
        _, data = self._t.request(self._ep, "GET", self._base + "/trajectory", timeout=self._c.timeout, context="sandbox")
        return [loads(line) for line in data.splitlines() if line.strip()]

    # -- files ---------------------------------------------------------------------------------

    def write_files(self, files: Mapping[str, str | bytes], *, mode: int | None = None) -> list[FileInfo]:
        """Write several files in one request (``str`` as UTF-8, ``bytes`` as-is). Relative
        paths are relative to the workspace. ``mode`` (e.g. ``0o755``) applies to all."""
        d = self._t.request_json(
            self._ep, "POST", self._base + "/files", dumps(files_body(files, mode)),
            timeout=self._c.timeout, context="file",
        )
        return [FileInfo.from_json(f) for f in d.get("files", [])]

    def write_file(self, path: str, data: str | bytes | BinaryIO, *, mode: int | None = None) -> FileInfo:
        """Write one file with a raw upload (checksum-verified by the daemon for str/bytes).
        ``data`` may be a binary file object, which is streamed (it must be seekable to be
        retried)."""
        if isinstance(data, str):
            data = data.encode()
        if isinstance(data, (bytes, bytearray, memoryview)):
            raw = bytes(data)
            q = file_query(path, mode=mode_str(mode), sha256=hashlib.sha256(raw).hexdigest())
            d = self._t.request_json(self._ep, "PUT", self._base + "/files" + q, raw, timeout=self._c.timeout, context="file")
            return FileInfo.from_json(d)
        return self._put_stream(path, data, mode)

    def _put_stream(self, path: str, f: BinaryIO, mode: int | None) -> FileInfo:
        if not f.seekable():
            raise ValueError("write_file needs a seekable file object (or use upload())")
        start = f.tell()
        f.seek(0, os.SEEK_END)
        length = f.tell() - start
        hasher: list[Any] = []

        def body() -> tuple[BinaryIO, int]:
            f.seek(start)
            h = hashlib.sha256()
            hasher[:] = [h]
            return HashingReader(f, h), length  # type: ignore[return-value]

        _, raw = self._t.request(
            self._ep, "PUT", self._base + "/files" + file_query(path, mode=mode_str(mode)), body,
            headers=_OCTET, timeout=max(self._c.timeout, 300.0), context="file",
        )
        info = FileInfo.from_json(loads(raw))
        verify_checksum(info, hasher[0].hexdigest(), path)
        return info

    def upload(self, local: str | os.PathLike[str], remote: str, *, mode: int | None = None) -> FileInfo:
        """Stream a local file into the sandbox without reading it into memory; keeps the
        local permission bits unless ``mode`` is given. The SHA-256 is checked end to end."""
        if mode is None:
            mode = os.stat(local).st_mode & 0o777
        with open(local, "rb") as f:
            return self._put_stream(remote, f, mode)

    def read_file(self, path: str) -> bytes:
        """Return a file's content."""
        _, data = self._t.request(self._ep, "GET", self._base + "/files" + file_query(path), timeout=self._c.timeout, context="file")
        return data

    def read_text(self, path: str, encoding: str = "utf-8") -> str:
        return (self.read_file(path)).decode(encoding)

    def iter_file(self, path: str, chunk_size: int = 262144) -> Iterator[bytes]:
        """Yield a file's content in chunks as it is received."""
        resp = self._t.open(
            self._ep, "GET", self._base + "/files" + file_query(path), timeout=max(self._c.timeout, 300.0), context="file"
        )
        ok = False
        try:
            while True:
                chunk = resp.read_some(chunk_size)
                if not chunk:
                    break
                yield chunk
            ok = True
        finally:
            if ok:
                self._t.done(self._ep, resp)
            else:
                resp.close()

    def download(self, remote: str, local: str | os.PathLike[str]) -> int:
        """Stream a file from the sandbox to ``local`` (written to a temporary file in the same
        directory, then renamed into place). Returns the number of bytes."""
        local = os.fspath(local)
        parent = os.path.dirname(os.path.abspath(local))
        os.makedirs(parent, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".arl-", dir=parent)
        n = 0
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in self.iter_file(remote):
                    out.write(chunk)
                    n += len(chunk)
            os.replace(tmp, local)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        return n

    def delete_file(self, path: str, *, missing_ok: bool = False) -> None:
        try:
            self._t.request(self._ep, "DELETE", self._base + "/files" + file_query(path), timeout=self._c.timeout, context="file")
        except NotFound:
            if not missing_ok:
                raise

    # -- lifecycle -----------------------------------------------------------------------------

    def refresh(self) -> SandboxInfo:
        """Re-read the sandbox's info from the node."""
        d = self._t.request_json(self._ep, "GET", self._base, timeout=self._c.timeout, context="sandbox")
        self.info = SandboxInfo.from_json(d, self._ep.url)
        return self.info

    def reset(self) -> SandboxInfo:
        """Kill every process in the sandbox and wipe /workspace and /tmp."""
        d = self._t.request_json(self._ep, "POST", self._base + "/reset", b"{}", timeout=max(self._c.timeout, 60.0), context="sandbox")
        if d:
            self.info = SandboxInfo.from_json(d, self._ep.url)
        return self.info

    def pause(self) -> SandboxInfo:
        """Freeze every process of the sandbox (no CPU; memory and files kept). The next call
        that needs the sandbox (exec, files, reset) thaws it first, transparently."""
        d = self._t.request_json(self._ep, "POST", self._base + "/pause", b"", timeout=self._c.timeout, context="sandbox")
        self.info = SandboxInfo.from_json(d, self._ep.url)
        return self.info

    def resume(self) -> SandboxInfo:
        """Thaw a paused sandbox (a no-op when it runs)."""
        d = self._t.request_json(self._ep, "POST", self._base + "/resume", b"", timeout=self._c.timeout, context="sandbox")
        self.info = SandboxInfo.from_json(d, self._ep.url)
        return self.info

    def snapshot(self) -> SnapshotInfo:
        """Snapshot the sandbox's files (not its processes); fork from it with
        :meth:`Client.fork`."""
        d = self._t.request_json(self._ep, "POST", self._base + "/snapshots", b"", timeout=max(self._c.timeout, 60.0), context="sandbox")
        return SnapshotInfo.from_json(d, self._ep.url)

    def fork(
        self,
        count: int = 1,
        *,
        env: Mapping[str, str] | None = None,
        labels: Mapping[str, str] | None = None,
        ttl: float | None = None,
        idle_timeout: float | None = None,
    ) -> SandboxList:
        """``count`` new sandboxes that start with this one's files and env (not its
        processes); this one is unaffected."""
        body = fork_body(count, env, labels, ttl, idle_timeout)
        d = self._t.request_json(self._ep, "POST", self._base + "/fork", body, timeout=max(self._c.timeout, 60.0), context="sandbox")
        return SandboxList(Sandbox(self._c, self._ep, SandboxInfo.from_json(s, self._ep.url)) for s in d["sandboxes"])

    def release(self) -> None:
        """Give the sandbox back (idempotent; a sandbox already gone or dead counts as released)."""
        if self._released:
            return
        try:
            self._t.request(self._ep, "DELETE", self._base, timeout=self._c.timeout, context="sandbox")
        except SandboxNotFound:
            pass
        except InfraError as e:
            if e.code != "sandbox_unavailable":  # a dead sandbox has nothing left to release
                raise
        self._released = True


class LiveSession:
    """A persistent shell or Python session in a sandbox (see :meth:`Sandbox.open_session`).
    One command at a time; state carries over from one to the next."""

    __slots__ = ("_sb", "info", "_path")

    def __init__(self, sandbox: Sandbox, info: LiveSessionInfo) -> None:
        self._sb = sandbox
        self.info = info
        self._path = f"{sandbox._base}/sessions/{info.id}"

    @property
    def id(self) -> str:
        return self.info.id

    @property
    def kind(self) -> str:
        return self.info.kind

    def __repr__(self) -> str:
        return f"LiveSession(id={self.id!r}, kind={self.kind!r}, sandbox={self._sb.id!r})"

    def __enter__(self) -> LiveSession:
        return self

    def __exit__(self, et: Any, ev: Any, tb: Any) -> None:
        try:
            self.close()
        except _QUIET_ON_EXIT:
            if et is None:
                raise

    def run(self, code: str, *, timeout: float | None = None, max_output_bytes: int | None = None) -> RunResult:
        """Run a shell command line or a Python snippet and wait for it. ``timeout`` (seconds,
        default 60) interrupts it with SIGINT (then kills it); the session stays usable.
        Never retried: a command runs at most once."""
        d = self._sb._t.request_json(
            self._sb._ep, "POST", self._path + "/run", dumps(_run_body(code, timeout, max_output_bytes)),
            timeout=exec_read_timeout(timeout) + 5.0, context="sandbox", retry_timeout=0.0,
        )
        return RunResult.from_json(d)

    def stream(
        self, code: str, *, timeout: float | None = None, max_output_bytes: int | None = None
    ) -> Iterator[OutputChunk | RunResult]:
        """Like :meth:`run`, yielding :class:`OutputChunk` items as output arrives and finally
        the :class:`RunResult` (whose stdout/stderr hold the whole output)."""
        ep = self._sb._ep
        resp = self._sb._t.open(
            ep, "POST", self._path + "/run", dumps(_run_body(code, timeout, max_output_bytes)), headers=_NDJSON,
            timeout=exec_read_timeout(timeout) + 5.0, context="sandbox", retry_timeout=0.0,
        )
        asm = StreamAssembler()
        lines = self._sb._t.iter_lines(ep, resp)
        try:
            for line in lines:
                event = loads(line)
                if event.get("type") == "result":
                    r = RunResult.from_json(event)
                    r.stdout = "".join(asm.stdout) + r.stdout
                    r.stderr = "".join(asm.stderr) + r.stderr
                    yield r
                    return
                item = asm.feed(event, ep.url)
                if item is not None:
                    yield item
        finally:
            lines.close()
        raise InfraError(f"stream from {ep} ended without a result", code="incomplete_stream", retryable=True, endpoint=ep.url)

    def refresh(self) -> LiveSessionInfo:
        """Re-read the session's info (``runs``, ``busy``)."""
        d = self._sb._t.request_json(self._sb._ep, "GET", self._path, timeout=self._sb._c.timeout, context="sandbox")
        self.info = LiveSessionInfo.from_json(d)
        return self.info

    def close(self) -> None:
        """End the session and everything it started (idempotent)."""
        try:
            self._sb._t.request(self._sb._ep, "DELETE", self._path, timeout=self._sb._c.timeout, context="sandbox")
        except NotFound:
            pass


def _run_body(code: str, timeout: float | None, max_output_bytes: int | None) -> dict[str, Any]:
    body: dict[str, Any] = {"code": code}
    if timeout is not None:
        body["timeout_ms"] = max(1, int(timeout * 1000))
    if max_output_bytes is not None:
        body["max_output_bytes"] = max_output_bytes
    return body


class SandboxList(list):  # type: ignore[type-arg]
    """A list of :class:`Sandbox`; ``with`` releases them all on exit."""

    def __enter__(self) -> SandboxList:
        return self

    def __exit__(self, et: Any, ev: Any, tb: Any) -> None:
        self.release_all(raise_errors=et is None)

    def release_all(self, *, raise_errors: bool = True) -> None:
        """Release every sandbox (concurrently under asyncio); with ``raise_errors``, the first
        failure is raised once all were tried."""
        errs = [r for r in map_settled(_release, self) if isinstance(r, BaseException)]
        if errs and raise_errors:
            raise errs[0]


def _release(sb: Sandbox) -> None:
    sb.release()
