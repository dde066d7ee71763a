"""Contract test: a REAL `arl node` daemon checked against docs/openapi.yaml.

The daemon binary is ``$ARL_BIN`` or ``target/<target>/debug/arl`` at the repository root (found from
this file's location); it runs as root with a free port, its own state directory, cgroup parent
and token file, and is stopped with SIGTERM at the end.

Every response the tests receive is checked against the spec: its status must be documented
for the operation, its media type must be one the spec lists for that status, and its body must
validate against the schema (each line of an NDJSON stream against the line schema). Objects in
responses may not carry properties the spec does not name (the check closes every response
object schema that does not say otherwise). Error bodies must carry a code the spec allows for
that status. The last test checks that every documented (operation, status, error code) was
seen, so the spec cannot list what the daemon never does and the tests cannot skip a route.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import http.client
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import threading
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

REPO_ROOT = Path(__file__).resolve().parents[2]
SPEC_PATH = REPO_ROOT / "docs" / "openapi.yaml"
SPEC_URI = "urn:arl:openapi"
NDJSON = "application/x-ndjson"
METHODS = ("get", "put", "post", "delete", "patch", "head", "options", "trace")

# (method, path template, status) pairs the spec documents but no client can provoke on purpose.
UNREACHABLE = {
    # `internal` needs a broken host (cgroup freezer, an unexpected errno, a task panic).
    ("post", "/v1/sandboxes/{id}/exec", "500"),
    ("get", "/v1/sandboxes/{id}/files", "500"),
    ("put", "/v1/sandboxes/{id}/files", "500"),
    ("post", "/v1/sandboxes/{id}/files", "500"),
    ("delete", "/v1/sandboxes/{id}/files", "500"),
    ("post", "/v1/sandboxes/{id}/pause", "500"),
    ("post", "/v1/sandboxes/{id}/resume", "500"),
    # Every runtime built in today can pause; a runtime without a freezer answers 501.
    ("post", "/v1/sandboxes/{id}/pause", "501"),
    ("post", "/v1/sandboxes/{id}/resume", "501"),
    ("post", "/v1/sandboxes/{id}/sessions", "500"),
    ("post", "/v1/sandboxes/{id}/sessions/{sid}/run", "500"),
    # Snapshots: `internal` needs a broken host (a copy that fails midway); every runtime built
    # in can snapshot and fork, and every node keeps snapshots, so `not_supported` never comes.
    ("post", "/v1/sandboxes/{id}/snapshots", "500"),
    ("post", "/v1/sandboxes/{id}/fork", "500"),
    ("post", "/v1/snapshots/{id}/fork", "500"),
    ("post", "/v1/sandboxes/{id}/snapshots", "501"),
    ("post", "/v1/sandboxes/{id}/fork", "501"),
    ("post", "/v1/snapshots/{id}/fork", "501"),
    ("get", "/v1/snapshots", "501"),
    ("get", "/v1/snapshots/{id}", "501"),
    ("delete", "/v1/snapshots/{id}", "501"),
}

# (method, path template, status, error code) documented but provoked elsewhere: a node none of
# whose pools can create sandboxes (tests/http_conformance.rs makes one).
UNREACHABLE_CODES = {
    # A run while another holds the session (tests/sessions.rs provokes it with a long run),
    # and a ninth open terminal in one sandbox (a bound, not provoked by a test yet).
    ("post", "/v1/sandboxes/{id}/sessions/{sid}/run", "409", "conflict"),
    ("get", "/v1/sandboxes/{id}/pty", "409", "conflict"),
    ("get", "/readyz", "503", "sandbox_unavailable"),
    # A file over 4 GiB: too large to send in a test (a full disk is 507, tested).
    ("put", "/v1/sandboxes/{id}/files", "413", "payload_too_large"),
    # A fork whose sandbox cannot be created: the pool's sandboxes are made the same way, so a
    # snapshot of that pool cannot be taken in the first place.
    ("post", "/v1/sandboxes/{id}/fork", "503", "sandbox_unavailable"),
    ("post", "/v1/snapshots/{id}/fork", "503", "sandbox_unavailable"),
}

# Operations that start new work: a draining node refuses them with `503 draining`.
NEW_WORK = {
    ("put", "/v1/pools/{name}"),
    ("post", "/v1/sandboxes"),
    ("post", "/v1/sandboxes/{id}/exec"),
    ("put", "/v1/sandboxes/{id}/files"),
    ("post", "/v1/sandboxes/{id}/files"),
    ("post", "/v1/sandboxes/{id}/reset"),
    ("post", "/v1/sandboxes/{id}/pause"),
    ("post", "/v1/sandboxes/{id}/resume"),
    ("post", "/v1/sandboxes/{id}/sessions"),
    ("post", "/v1/sandboxes/{id}/sessions/{sid}/run"),
    ("post", "/v1/sandboxes/{id}/snapshots"),
    ("post", "/v1/sandboxes/{id}/fork"),
    ("post", "/v1/snapshots/{id}/fork"),
}


# --------------------------------------------------------------------------------------------
# The contract: the spec, response validation, coverage
# --------------------------------------------------------------------------------------------


def _close_objects(node: Any) -> None:
    """Sets `additionalProperties: false` on every object schema that names properties and does
    not say otherwise. allOf members and if/then/else branches are left open (they only add
    constraints to a closed base)."""
    if isinstance(node, dict):
        if "properties" in node and "additionalProperties" not in node:
            node["additionalProperties"] = False
        for key, value in node.items():
            if key in ("allOf", "if", "then", "else"):
                continue
            if key == "properties" and isinstance(value, dict):
                for sub in value.values():
                    _close_objects(sub)
            else:
                _close_objects(value)
    elif isinstance(node, list):
        for item in node:
            _close_objects(item)


def _pointer(*parts: str) -> str:
    return "".join("/" + p.replace("~", "~0").replace("/", "~1") for p in parts)


@dataclass
class Resp:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def content_type(self) -> str | None:
        return self.headers.get("content-type")

    def json(self) -> Any:
        return json.loads(self.body)

    def lines(self) -> list[Any]:
        return [json.loads(line) for line in self.body.decode().splitlines() if line.strip()]


@dataclass
class Contract:
    spec: dict[str, Any]
    seen: set[tuple[str, str, str, str | None]] = field(default_factory=set)

    def __post_init__(self) -> None:
        closed = copy.deepcopy(self.spec)
        _close_objects(closed)
        self.closed_registry = Registry().with_resource(
            SPEC_URI, Resource.from_contents(closed, default_specification=DRAFT202012)
        )
        self.open_registry = Registry().with_resource(
            SPEC_URI, Resource.from_contents(self.spec, default_specification=DRAFT202012)
        )

    def _resolve(self, obj: dict[str, Any], base: str) -> tuple[dict[str, Any], str]:
        """Follows a local `$ref` of a response/requestBody object; returns it and its pointer."""
        while "$ref" in obj:
            ref = obj["$ref"]
            assert ref.startswith("#/"), ref
            base = ref[1:]
            obj = self.spec
            for part in ref[2:].split("/"):
                obj = obj[part.replace("~1", "/").replace("~0", "~")]
        return obj, base

    def validator(self, pointer: str, closed: bool = True) -> Draft202012Validator:
        registry = self.closed_registry if closed else self.open_registry
        return Draft202012Validator({"$ref": f"{SPEC_URI}#{pointer}"}, registry=registry)

    def schema_errors(self, pointer: str, value: Any, closed: bool = True) -> list[str]:
        return [
            f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in self.validator(pointer, closed).iter_errors(value)
        ]

    def operation(self, method: str, template: str) -> dict[str, Any]:
        ops = self.spec["paths"].get(template)
        assert ops is not None, f"path {template} is not in the spec"
        op = ops.get(method.lower())
        assert op is not None, f"{method} {template} is not in the spec"
        return op

    def check_request(self, method: str, template: str, body: Any, valid: bool) -> None:
        """Checks that the spec agrees with the daemon about a JSON request body."""
        op = self.operation(method, template)
        base = _pointer("paths", template, method.lower(), "requestBody")
        req, base = self._resolve(op["requestBody"], base)
        pointer = base + _pointer("content", "application/json", "schema")
        errors = self.schema_errors(pointer, body, closed=False)
        if valid:
            assert not errors, f"{method} {template}: the daemon accepted {body!r} but the spec refuses it: {errors}"
        else:
            assert errors, f"{method} {template}: the daemon refused {body!r} but the spec allows it"

    def check_response(self, method: str, template: str, resp: Resp) -> Any:
        """Validates a response against the spec; returns the parsed body (JSON, NDJSON lines,
        or bytes)."""
        what = f"{method.upper()} {template} -> {resp.status}"
        op = self.operation(method, template)
        status = str(resp.status)
        assert status in op["responses"], (
            f"{what}: status not documented (documented: {sorted(op['responses'])}); body {resp.body[:300]!r}"
        )
        response, base = self._resolve(op["responses"][status], _pointer("paths", template, method.lower(), "responses", status))
        for name, header in (response.get("headers") or {}).items():
            if header.get("required"):
                assert name.lower() in resp.headers, f"{what}: required header {name} missing"
        content = response.get("content")
        code = None
        if not content:
            assert resp.body == b"", f"{what}: the spec documents no body but got {resp.body[:300]!r}"
            assert resp.content_type is None, f"{what}: no body documented but Content-Type {resp.content_type}"
            parsed: Any = None
        else:
            assert resp.content_type, f"{what}: no Content-Type"
            media = resp.content_type.split(";")[0].strip().lower()
            assert media in content, f"{what}: Content-Type {resp.content_type} not documented ({sorted(content)})"
            pointer = base + _pointer("content", media, "schema")
            if media == "application/json":
                try:
                    parsed = resp.json()
                except ValueError as e:
                    raise AssertionError(f"{what}: body is not JSON: {resp.body[:300]!r}") from e
                errors = self.schema_errors(pointer, parsed)
                assert not errors, f"{what}: body does not match the spec: {errors}\nbody: {parsed}"
                if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
                    code = parsed["error"].get("code")
            elif media == NDJSON:
                assert resp.body.endswith(b"\n"), f"{what}: NDJSON stream does not end with a newline"
                parsed = []
                for n, line in enumerate(resp.body.decode().split("\n")[:-1]):
                    try:
                        event = json.loads(line)
                    except ValueError as e:
                        raise AssertionError(f"{what}: NDJSON line {n} is not JSON: {line!r}") from e
                    errors = self.schema_errors(pointer, event)
                    assert not errors, f"{what}: NDJSON line {n} does not match the spec: {errors}\nline: {line}"
                    parsed.append(event)
            elif media == "text/plain":
                parsed = resp.body.decode()
            else:
                parsed = resp.body
        self.seen.add((method.lower(), template, status, code))
        return parsed

    def documented(self) -> dict[tuple[str, str, str], set[str | None]]:
        """Every documented (method, path, status) with the error codes its schema allows."""
        out: dict[tuple[str, str, str], set[str | None]] = {}
        for template, ops in self.spec["paths"].items():
            for method, op in ops.items():
                if method not in METHODS:
                    continue
                for status, response in op["responses"].items():
                    response, _ = self._resolve(response, "")
                    codes: set[str | None] = set()
                    for media in (response.get("content") or {}).values():
                        codes |= self._error_codes(media["schema"])
                    out[(method, template, status)] = codes or {None}
        return out

    def _error_codes(self, schema: dict[str, Any]) -> set[str | None]:
        for member in schema.get("allOf", []):
            code = member.get("properties", {}).get("error", {}).get("properties", {}).get("code")
            if code:
                return set(code["enum"]) if "enum" in code else {code["const"]}
        return set()


# --------------------------------------------------------------------------------------------
# The daemon and a small HTTP client
# --------------------------------------------------------------------------------------------


def arl_bin() -> Path:
    return Path(os.environ.get("ARL_BIN") or next(REPO_ROOT.glob("target/*/debug/arl"), REPO_ROOT / "target" / "debug" / "arl"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cgroup_roots() -> list[Path]:
    roots = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        if right.split(" ")[0] in ("cgroup", "cgroup2"):
            roots.append(Path(left.split(" ")[4]))
    return roots


CONFIG = """
[pools.default]
min_idle = 2
max = 16
env = { POOL_VAR = "from-pool", POOL_ONLY = "pool" }

[pools.tiny]
min_idle = 0
max = 1
"""


class Node:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="arl-api-test-"))
        self.dir.chmod(0o755)
        self.port = free_port()
        self.token = "tok-a-" + os.urandom(8).hex()
        self.other_token = "tok-b-" + os.urandom(8).hex()
        (self.dir / "tokens").write_text(f"{self.token}\n{self.other_token}\n")
        (self.dir / "config.toml").write_text(CONFIG)
        self.cgroup_parent = f"arl-api-test-{os.urandom(4).hex()}"
        # A uid range of its own, clear of the ranges other test daemons use.
        self.uid_base = 16777216 + (28 << 27) + random.randrange(0, 1024) * 65536
        self.log_path = self.dir / "node.log"
        argv = [
            str(arl_bin()), "node",
            "--listen", f"127.0.0.1:{self.port}",
            "--state-dir", str(self.dir / "state"),
            "--cgroup-parent", self.cgroup_parent,
            "--config", str(self.dir / "config.toml"),
            "--token-file", str(self.dir / "tokens"),
            "--uid-base", str(self.uid_base),
            # Small snapshot bounds, so that tests reach them.
            "--max-snapshots", "2",
            "--snapshot-mb", "1",
        ]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, "ARL_LOG": "warn"}, start_new_session=True,
            )
        deadline = time.monotonic() + 20
        while True:
            try:
                if self.request("GET", "/readyz", token=None).status == 200:
                    break
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"arl node exited with {self.proc.returncode}: {self.log()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"arl node not ready after 20 s: {self.log()}")
            time.sleep(0.02)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def terminate(self) -> int | None:
        """SIGTERM and wait for the exit; SIGKILL after 30 s. Returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def stop(self) -> None:
        self.terminate()
        for root in cgroup_roots():
            try:
                (root / self.cgroup_parent).rmdir()
            except OSError:
                pass
        shutil.rmtree(self.dir, ignore_errors=True)

    def connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        *,
        token: str | None = "",
        headers: dict[str, str] | None = None,
    ) -> Resp:
        """One request on a fresh connection. `token=""` means the default token, None none."""
        hdrs = dict(headers or {})
        if token == "":
            token = self.token
        if token is not None:
            hdrs["Authorization"] = f"Bearer {token}"
        conn = self.connection()
        try:
            conn.putrequest(method, path)
            for k, v in hdrs.items():
                conn.putheader(k, v)
            if body is not None or method in ("POST", "PUT"):
                conn.putheader("Content-Length", str(len(body or b"")))
            conn.endheaders()
            try:
                if body:
                    conn.sock.sendall(body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the daemon answered early (413) and closed: read its answer
            r = conn.getresponse()
            data = r.read()
            return Resp(r.status, {k.lower(): v for k, v in r.getheaders()}, data)
        finally:
            conn.close()


@pytest.fixture(scope="module")
def contract() -> Contract:
    return Contract(yaml.safe_load(SPEC_PATH.read_text()))


@pytest.fixture(scope="module")
def node() -> Iterator[Node]:
    if os.geteuid() != 0:
        pytest.skip("the process runtime needs root")
    if not arl_bin().is_file():
        pytest.fail(f"daemon binary not found at {arl_bin()}: build it with `cargo build` or set ARL_BIN")
    n = Node()
    try:
        yield n
    finally:
        n.stop()


@dataclass
class Api:
    """Requests against the node, each response checked against the contract."""

    node: Node
    contract: Contract

    def call(
        self,
        method: str,
        template: str,
        *,
        id: str | None = None,
        name: str | None = None,
        sid: str = "shell-1",
        query: dict[str, str] | None = None,
        json_body: Any = None,
        raw: bytes | None = None,
        token: str | None = "",
        headers: dict[str, str] | None = None,
        expect: int | None = None,
        code: str | None = None,
        valid_request: bool | None = None,
    ) -> Any:
        """Sends, validates against the spec, checks `expect`/`code`; returns the parsed body.
        `valid_request` (with `json_body`) also checks that the spec agrees the body is valid."""
        path = template.replace("{id}", urllib.parse.quote(id or "", safe="")).replace(
            "{name}", urllib.parse.quote(name or "", safe="")
        ).replace("{sid}", urllib.parse.quote(sid, safe=""))
        if query:
            path += "?" + urllib.parse.urlencode(query)
        body = raw
        hdrs = dict(headers or {})
        if json_body is not None:
            body = json.dumps(json_body).encode()
            hdrs.setdefault("Content-Type", "application/json")
            if valid_request is not None:
                self.contract.check_request(method, template, json_body, valid_request)
        resp = self.node.request(method, path, body, token=token, headers=hdrs)
        parsed = self.contract.check_response(method, template, resp)
        if expect is not None:
            assert resp.status == expect, f"{method} {path}: expected {expect}, got {resp.status}: {resp.body[:500]!r}"
        if code is not None:
            assert parsed["error"]["code"] == code, f"{method} {path}: expected code {code}, got {parsed}"
        self.last = resp
        return parsed

    # Shorthands
    def acquire(self, pool: str = "default", **kw: Any) -> str:
        body = self.call("POST", "/v1/sandboxes", json_body={"pool": pool, **kw}, expect=201, valid_request=True)
        return str(body["sandboxes"][0]["id"])

    def release(self, sid: str) -> None:
        self.call("DELETE", "/v1/sandboxes/{id}", id=sid, expect=204)

    def exec(self, sid: str, req: dict[str, Any], expect: int = 200, **kw: Any) -> Any:
        return self.call("POST", "/v1/sandboxes/{id}/exec", id=sid, json_body=req, expect=expect, **kw)

    def sh(self, sid: str, script: str) -> Any:
        return self.exec(sid, {"shell": script}, valid_request=True)


@pytest.fixture(scope="module")
def api(node: Node, contract: Contract) -> Api:
    return Api(node, contract)


@pytest.fixture
def sandbox(api: Api) -> Iterator[str]:
    sid = api.acquire("default")
    yield sid
    api.node.request("DELETE", f"/v1/sandboxes/{sid}")


def sandbox_operations(contract: Contract) -> list[tuple[str, str]]:
    return [
        (m, p) for p, ops in contract.spec["paths"].items() if p.startswith("/v1/sandboxes/{id}")
        for m in ops if m in METHODS
    ]


# A harmless, valid request for every sandbox-scoped operation.
SAMPLE: dict[tuple[str, str], dict[str, Any]] = {
    ("post", "/v1/sandboxes/{id}/exec"): {"json_body": {"cmd": ["true"]}},
    ("put", "/v1/sandboxes/{id}/files"): {"query": {"path": "sample.txt"}, "raw": b"x"},
    ("get", "/v1/sandboxes/{id}/files"): {"query": {"path": "sample.txt"}},
    ("delete", "/v1/sandboxes/{id}/files"): {"query": {"path": "sample.txt"}},
    ("post", "/v1/sandboxes/{id}/files"): {"json_body": {"files": {"sample.txt": "x"}}},
    ("post", "/v1/sandboxes/{id}/sessions"): {"json_body": {"kind": "shell"}},
    ("post", "/v1/sandboxes/{id}/sessions/{sid}/run"): {"json_body": {"code": "true"}},
    ("post", "/v1/sandboxes/{id}/fork"): {"json_body": {"count": 1}},
    ("post", "/v1/snapshots/{id}/fork"): {"json_body": {"count": 1}},
}


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


def test_spec_is_valid_openapi() -> None:
    from openapi_spec_validator import validate

    spec = yaml.safe_load(SPEC_PATH.read_text())
    validate(spec)
    assert spec["openapi"].startswith("3.1")
    # Every error code of the enum appears in some documented error response, except those any
    # path may answer (an undeclared method, the connection cap), which the description covers.
    codes = set(spec["components"]["schemas"]["ErrorCode"]["enum"]) - {"method_not_allowed", "overloaded"}
    documented = set().union(*Contract(spec).documented().values()) - {None}
    assert documented == codes, f"codes never documented on a route: {codes - documented}"


def test_health_routes(api: Api) -> None:
    assert api.call("GET", "/healthz", token=None, expect=200) == {"status": "ok"}
    assert api.call("GET", "/readyz", token=None, expect=200) == {"status": "ready"}
    # Open even with a wrong token.
    api.call("GET", "/healthz", token="not-a-token", expect=200)
    text = api.call("GET", "/metrics", token=None, expect=200)
    assert api.last.content_type == "text/plain; version=0.0.4"
    for metric in ("arl_http_request_seconds", "arl_sandbox_create_seconds", "arl_sandboxes"):
        assert f"# TYPE {metric} " in text, metric


def test_every_v1_route_needs_a_token(api: Api, contract: Contract) -> None:
    for template, ops in contract.spec["paths"].items():
        if not template.startswith("/v1/"):
            continue
        for method in ops:
            if method not in METHODS:
                continue
            for token in (None, "wrong-token"):
                body = api.call(method.upper(), template, id="sb-0000000000000000", name="default",
                                query={"path": "x"}, token=token, expect=401, code="unauthorized")
                assert body["error"]["message"] == ("missing bearer token" if token is None else "invalid bearer token")
    # Not a bearer scheme.
    api.call("GET", "/v1/pools", headers={"Authorization": f"Basic {api.node.token}"}, token=None, expect=401)
    # Routing runs before authentication: an unknown /v1 route without a token is 404, and an
    # undeclared method 405 (neither says anything about sandboxes).
    r = api.node.request("GET", "/v1/no-such-route", token=None)
    assert r.status == 404
    r = api.node.request("PATCH", "/v1/pools", token=None)
    assert r.status == 405


def test_unknown_routes_and_methods(api: Api, contract: Contract, sandbox: str) -> None:
    for method, path in [
        ("GET", "/no-such-route"),
        ("GET", "/v1/no-such-route"),
        ("GET", f"/v1/sandboxes/{sandbox}/nothing"),
    ]:
        r = api.node.request(method, path)
        assert r.status == 404, (method, path, r)
        assert r.content_type == "application/json"
        errors = contract.schema_errors("/components/responses/NotFound/content/application~1json/schema", r.json())
        assert not errors, errors
    # A known path with a method it does not take: 405, and `Allow` lists the spec's methods.
    for method, template in [
        ("POST", "/healthz"),
        ("POST", "/v1/pools/{name}"),
        ("PATCH", "/v1/sandboxes/{id}/files"),
        ("GET", "/v1/sandboxes/{id}/reset"),
        ("PUT", "/v1/sandboxes/{id}"),
    ]:
        path = template.replace("{name}", "default").replace("{id}", sandbox)
        r = api.node.request(method, path)
        assert r.status == 405, (method, path, r)
        assert r.json()["error"]["code"] == "method_not_allowed"
        declared = {m.upper() for m in contract.spec["paths"][template] if m in METHODS}
        assert set(r.headers["allow"].split(", ")) == declared, (path, r.headers)
    # Trailing slashes are ignored.
    r = api.node.request("GET", "/v1/pools/")
    assert r.status == 200


def test_pools(api: Api) -> None:
    pools = api.call("GET", "/v1/pools", expect=200)["pools"]
    names = [p["name"] for p in pools]
    assert names == sorted(names) and {"default", "tiny"} <= set(names)
    view = api.call("GET", "/v1/pools/{name}", name="default", expect=200)
    assert view["spec"]["env"] == {"POOL_VAR": "from-pool", "POOL_ONLY": "pool"}
    api.call("GET", "/v1/pools/{name}", name="no-such-pool", expect=404, code="not_found")

    spec = {"min_idle": 0, "max": 3, "memory_mb": 128, "reuse": "reset", "env": {"A": "1"}, "idle_timeout_seconds": 60,
            "auto_pause_after_seconds": 30}
    view = api.call("PUT", "/v1/pools/{name}", name="api-test", json_body=spec, expect=200, valid_request=True)
    assert view["name"] == "api-test"
    assert view["spec"]["memory_mb"] == 128 and view["spec"]["reuse"] == "reset"
    assert view["spec"]["auto_pause_after_seconds"] == 30 and view["status"]["paused"] == 0
    # A PUT replaces the whole spec: omitted fields go back to their defaults.
    view = api.call("PUT", "/v1/pools/{name}", name="api-test", json_body={"min_idle": 0, "max": 2},
                    expect=200, valid_request=True)
    assert view["spec"]["memory_mb"] == 512 and view["spec"]["reuse"] == "destroy" and view["spec"]["env"] == {}
    assert view["spec"]["idle_timeout_seconds"] is None
    # Every field optional: an empty spec is the default spec.
    api.contract.check_request("PUT", "/v1/pools/{name}", {}, valid=True)

    for name, body in [
        ("Bad_Name", {}),                           # invalid name
        ("api-test", {"min_idle": 5, "max": 3}),    # min_idle > max
        ("api-test", {"max": 0}),
        ("api-test", {"memory_mb": 8}),
        ("api-test", {"rootfs": "relative/dir"}),
        ("api-test", {"auto_pause_after_seconds": 0}),
    ]:
        api.call("PUT", "/v1/pools/{name}", name=name, json_body=body, expect=400, code="bad_request")
    for body in [{"maxx": 3}, {"runtime": "vm"}, {"max": -1}, {"network": "bridge"}, {"env": {"A": 1}}]:
        api.call("PUT", "/v1/pools/{name}", name="api-test", json_body=body, expect=400, code="bad_request",
                 valid_request=False)
    api.call("PUT", "/v1/pools/{name}", name="api-test", raw=b"{not json", expect=400, code="bad_request")
    api.call("PUT", "/v1/pools/{name}", name="api-test", raw=b" " * ((1 << 20) + 1), expect=413,
             code="payload_too_large")

    api.call("DELETE", "/v1/pools/{name}", name="api-test", expect=204)
    api.call("DELETE", "/v1/pools/{name}", name="api-test", expect=404, code="not_found")
    api.call("GET", "/v1/pools/{name}", name="api-test", expect=404, code="not_found")


def test_acquire_list_get_release(api: Api, contract: Contract) -> None:
    req = {"pool": "default", "env": {"LEASE_VAR": "lease"}, "labels": {"task": "t1"}, "ttl_seconds": 600,
           "idle_timeout_seconds": 600, "count": 2}
    body = api.call("POST", "/v1/sandboxes", json_body=req, expect=201, valid_request=True)
    sbs = body["sandboxes"]
    assert len(sbs) == 2
    for sb in sbs:
        assert sb["state"] == "allocated" and sb["pool"] == "default" and sb["labels"] == {"task": "t1"}
        assert sb["workspace"] == "/workspace" and sb["id"].startswith("sb-")
        assert sb["expires_at_ms"] == sb["acquired_at_ms"] + 600_000
    ids = sorted(sb["id"] for sb in sbs)

    listed = api.call("GET", "/v1/sandboxes", expect=200)["sandboxes"]
    assert [s["id"] for s in listed] == sorted(s["id"] for s in listed)
    assert set(ids) <= {s["id"] for s in listed}
    # Another token sees none of them, and may not touch them.
    other = api.call("GET", "/v1/sandboxes", token=api.node.other_token, expect=200)["sandboxes"]
    assert not set(ids) & {s["id"] for s in other}
    api.call("GET", "/v1/sandboxes/{id}", id=ids[0], token=api.node.other_token, expect=403, code="forbidden")

    got = api.call("GET", "/v1/sandboxes/{id}", id=ids[0], expect=200)
    assert got["id"] == ids[0] and got["labels"] == {"task": "t1"}

    for sid in ids:
        api.release(sid)
    api.call("GET", "/v1/sandboxes/{id}", id=ids[0], expect=404, code="not_found")
    api.call("DELETE", "/v1/sandboxes/{id}", id=ids[0], expect=404, code="not_found")

    # Acquire errors.
    api.call("POST", "/v1/sandboxes", json_body={"pool": "no-such-pool"}, expect=404, code="not_found",
             valid_request=True)
    for bad in [{"pool": "default", "count": 0}, {"pool": "default", "count": 1025},
                {"pool": "default", "bogus": 1}, {}, {"pool": "default", "count": "1"},
                {"pool": "default", "labels": {str(i): "x" for i in range(65)}}]:
        api.call("POST", "/v1/sandboxes", json_body=bad, expect=400, code="bad_request", valid_request=False)
    api.call("POST", "/v1/sandboxes", json_body={"pool": "default", "env": {"A=B": "x"}}, expect=400,
             code="bad_request")
    api.call("POST", "/v1/sandboxes", raw=b"{bad json", expect=400, code="bad_request")
    api.call("POST", "/v1/sandboxes", raw=b" " * ((1 << 20) + 1), expect=413, code="payload_too_large")


def test_pool_exhausted(api: Api) -> None:
    sid = api.acquire("tiny")
    try:
        err = api.call("POST", "/v1/sandboxes", json_body={"pool": "tiny"}, expect=503, code="pool_exhausted")
        assert err["error"]["retryable"] is True
        assert "alternatives" not in err["error"]
        # All or nothing: asking for more than the pool can hold takes none.
        status = api.call("GET", "/v1/pools/{name}", name="tiny", expect=200)["status"]
        assert status["allocated"] == 1 and status["total"] == 1
    finally:
        api.release(sid)
    api.call("POST", "/v1/sandboxes", json_body={"pool": "tiny", "count": 2}, expect=503, code="pool_exhausted")


def test_acquire_create_failure(api: Api) -> None:
    api.call("PUT", "/v1/pools/{name}", name="api-broken",
             json_body={"min_idle": 0, "max": 1, "rootfs": "/nonexistent/arl-api-test-rootfs"}, expect=200)
    try:
        err = api.call("POST", "/v1/sandboxes", json_body={"pool": "api-broken"}, expect=503,
                       code="sandbox_unavailable")
        assert err["error"]["retryable"] is True
        status = api.call("GET", "/v1/pools/{name}", name="api-broken", expect=200)["status"]
        assert status["last_error"] and status["allocated"] == 0
    finally:
        api.call("DELETE", "/v1/pools/{name}", name="api-broken", expect=204)


def test_exec_json(api: Api, sandbox: str) -> None:
    r = api.exec(sandbox, {"shell": "echo out; echo err >&2; exit 3"}, valid_request=True)
    assert (r["stdout"], r["stderr"], r["exit_code"], r["signal"], r["timed_out"], r["truncated"]) == (
        "out\n", "err\n", 3, None, False, False)
    assert r["duration_ms"] >= 0
    r = api.exec(sandbox, {"cmd": ["sh", "-c", "kill -TERM $$"]}, valid_request=True)
    assert (r["exit_code"], r["signal"]) == (128 + 15, 15)
    r = api.exec(sandbox, {"cmd": ["sleep", "5"], "timeout_ms": 200}, valid_request=True)
    assert (r["timed_out"], r["exit_code"], r["signal"]) == (True, 137, 9)
    r = api.exec(sandbox, {"cmd": ["/no/such/program"]}, valid_request=True)
    assert r["exit_code"] == 127 and "not found" in r["stderr"]
    r = api.exec(sandbox, {"shell": "head -c 100 /dev/zero | tr '\\0' a; head -c 50 /dev/zero | tr '\\0' b >&2",
                           "max_output_bytes": 10}, valid_request=True)
    assert (r["stdout"], r["stderr"], r["truncated"], r["exit_code"]) == ("a" * 10, "b" * 10, True, 0)
    r = api.exec(sandbox, {"cmd": ["cat"], "stdin": "text in"}, valid_request=True)
    assert r["stdout"] == "text in"
    r = api.exec(sandbox, {"cmd": ["cat"], "stdin_b64": base64.b64encode(b"\x00bin").decode()}, valid_request=True)
    assert r["stdout"] == "\x00bin"
    api.sh(sandbox, "mkdir -p sub")
    r = api.exec(sandbox, {"cmd": ["pwd"], "cwd": "sub"}, valid_request=True)
    assert r["stdout"] == "/workspace/sub\n"
    r = api.exec(sandbox, {"cmd": ["pwd"], "cwd": "/tmp", "env": {}, "request_id": None, "shell": None},
                 valid_request=True)
    assert r["stdout"] == "/tmp\n"

    # Errors. The spec's schema catches the structural ones; the rest are semantic.
    api.exec(sandbox, {"shell": "true", "bogus": 1}, expect=400, code="bad_request", valid_request=False)
    api.exec(sandbox, {"cmd": "true"}, expect=400, code="bad_request", valid_request=False)
    api.exec(sandbox, {"cmd": []}, expect=400, code="bad_request", valid_request=False)
    api.exec(sandbox, {"shell": "true", "timeout_ms": -1}, expect=400, code="bad_request", valid_request=False)
    for bad in [{}, {"cmd": ["true"], "shell": "true"}, {"shell": "true", "cwd": "no-such-dir"},
                {"cmd": ["cat"], "stdin": "a", "stdin_b64": "YQ=="}, {"cmd": ["cat"], "stdin_b64": "%%%"},
                {"cmd": ["env"], "env": {"A=B": "x"}}]:
        api.exec(sandbox, bad, expect=400, code="bad_request")
    api.call("POST", "/v1/sandboxes/{id}/exec", id=sandbox, raw=b'{"shell": ', expect=400, code="bad_request")
    api.call("POST", "/v1/sandboxes/{id}/exec", id=sandbox, raw=b" " * ((16 << 20) + 1), expect=413,
             code="payload_too_large")


def test_exec_late_bound_env(api: Api) -> None:
    sid = api.acquire("default", env={"LEASE_VAR": "lease", "POOL_VAR": "lease-wins"})
    try:
        r = api.exec(sid, {"shell": 'echo "$POOL_ONLY $POOL_VAR $LEASE_VAR $EXEC_VAR"',
                           "env": {"EXEC_VAR": "exec", "LEASE_VAR": "exec-wins"}}, valid_request=True)
        assert r["stdout"] == "pool lease-wins exec-wins exec\n"
    finally:
        api.release(sid)


def test_exec_request_id_idempotency(api: Api, sandbox: str) -> None:
    req = {"shell": "echo run >> /tmp/runs; wc -l < /tmp/runs", "request_id": "once"}
    first = api.exec(sandbox, req, valid_request=True)
    assert first["stdout"].strip() == "1"
    # Same id: the first reply, nothing run again (even with another body).
    assert api.exec(sandbox, req) == first
    assert api.exec(sandbox, {"shell": "echo other", "request_id": "once"}) == first
    assert api.sh(sandbox, "wc -l < /tmp/runs")["stdout"].strip() == "1"
    # A new id runs.
    assert api.exec(sandbox, {**req, "request_id": "twice"})["stdout"].strip() == "2"
    # A reply too large to keep (over 256 KiB) is not replayed: the retry is a conflict.
    big = {"shell": "head -c 300000 /dev/zero | tr '\\0' a", "request_id": "big"}
    assert len(api.exec(sandbox, big)["stdout"]) == 300000
    api.exec(sandbox, big, expect=409, code="conflict")


def test_exec_ndjson_stream(api: Api, sandbox: str) -> None:
    ndjson = {"Accept": NDJSON}
    events = api.exec(sandbox, {"shell": "echo one; echo two >&2; echo three; exit 4"}, headers=ndjson,
                      valid_request=True)
    assert api.last.content_type == NDJSON
    assert [e["type"] for e in events][-1] == "result"
    assert sum(e["type"] in ("result", "error") for e in events) == 1
    out = "".join(e["data"] for e in events if e["type"] == "stdout")
    err = "".join(e["data"] for e in events if e["type"] == "stderr")
    assert (out, err) == ("one\nthree\n", "two\n")
    result = events[-1]
    assert (result["exit_code"], result["stdout"], result["stderr"]) == (4, "", "")

    events = api.exec(sandbox, {"cmd": ["sleep", "5"], "timeout_ms": 100}, headers=ndjson)
    assert (events[-1]["timed_out"], events[-1]["exit_code"], events[-1]["signal"]) == (True, 137, 9)
    events = api.exec(sandbox, {"shell": "head -c 100 /dev/zero | tr '\\0' a", "max_output_bytes": 7},
                      headers=ndjson)
    assert "".join(e.get("data", "") for e in events) == "a" * 7 and events[-1]["truncated"] is True

    # Errors the sandbox's agent finds arrive in a 200 stream as one `error` event.
    events = api.exec(sandbox, {"shell": "pwd", "cwd": "no-such-dir"}, headers=ndjson)
    assert api.last.content_type == NDJSON
    assert [e["type"] for e in events] == ["error"] and events[0]["error"]["code"] == "bad_request"
    # Errors the daemon finds are ordinary JSON errors.
    api.exec(sandbox, {"shell": "true", "cmd": ["true"]}, headers=ndjson, expect=400, code="bad_request")
    assert api.last.content_type == "application/json"
    api.call("POST", "/v1/sandboxes/{id}/exec", id=sandbox, raw=b"nope", headers=ndjson, expect=400)


def paused_in(api: Api, pool: str) -> int:
    return int(api.call("GET", "/v1/pools/{name}", name=pool, expect=200)["status"]["paused"])


def test_pause_resume(api: Api, sandbox: str) -> None:
    api.sh(sandbox, "echo kept > /tmp/p")
    for _ in range(2):  # idempotent
        info = api.call("POST", "/v1/sandboxes/{id}/pause", id=sandbox, expect=200)
        assert info["id"] == sandbox
    assert paused_in(api, "default") == 1
    assert api.call("GET", "/v1/sandboxes/{id}", id=sandbox, expect=200)["id"] == sandbox
    assert paused_in(api, "default") == 1
    # Every route that needs the sandbox's agent thaws it first, transparently.
    assert api.sh(sandbox, "cat /tmp/p")["stdout"] == "kept\n"
    assert paused_in(api, "default") == 0
    api.call("POST", "/v1/sandboxes/{id}/pause", id=sandbox, expect=200)
    events = api.exec(sandbox, {"cmd": ["cat", "/tmp/p"]}, headers={"Accept": NDJSON})
    assert events[-1]["exit_code"] == 0 and "kept" in "".join(e.get("data", "") for e in events)
    api.call("POST", "/v1/sandboxes/{id}/pause", id=sandbox, expect=200)
    assert api.call("GET", "/v1/sandboxes/{id}/files", id=sandbox, query={"path": "/tmp/p"}, expect=200) == b"kept\n"
    api.call("POST", "/v1/sandboxes/{id}/pause", id=sandbox, expect=200)
    api.call("POST", "/v1/sandboxes/{id}/reset", id=sandbox, expect=200)
    api.call("POST", "/v1/sandboxes/{id}/pause", id=sandbox, expect=200)
    for _ in range(2):
        info = api.call("POST", "/v1/sandboxes/{id}/resume", id=sandbox, expect=200)
        assert info["id"] == sandbox
    assert paused_in(api, "default") == 0
    assert api.sh(sandbox, "echo back")["stdout"] == "back\n"


def wait_gone(api: Api, snapshot: str) -> None:
    deadline = time.monotonic() + 10
    while api.node.request("GET", f"/v1/snapshots/{snapshot}").status != 404:
        assert time.monotonic() < deadline, f"snapshot {snapshot} never went"
        time.sleep(0.02)


def test_snapshots_and_forks(api: Api) -> None:
    parent = api.acquire("default", env={"FROM": "parent"})
    try:
        api.sh(parent, "echo snap > /workspace/f")
        snap = api.call("POST", "/v1/sandboxes/{id}/snapshots", id=parent, expect=201)
        sid = snap["id"]
        assert sid.startswith("snap-") and snap["sandbox"] == parent and snap["pool"] == "default"
        assert snap["forks"] == 0 and snap["bytes"] > 0 and "parent" not in snap
        assert api.call("GET", "/v1/snapshots/{id}", id=sid, expect=200)["id"] == sid
        assert [s["id"] for s in api.call("GET", "/v1/snapshots", expect=200)["snapshots"]] == [sid]
        assert api.call("GET", "/v1/snapshots", token=api.node.other_token, expect=200)["snapshots"] == []
        for method, template, kw in [("GET", "/v1/snapshots/{id}", {}), ("DELETE", "/v1/snapshots/{id}", {}),
                                     ("POST", "/v1/snapshots/{id}/fork", {"json_body": {"count": 1}})]:
            api.call(method, template, id=sid, token=api.node.other_token, expect=403, code="forbidden", **kw)
            api.call(method, template, id="snap-0000000000000000", expect=404, code="not_found", **kw)

        req = {"count": 2, "env": {"X": "1"}, "labels": {"branch": "b"}, "ttl_seconds": 600}
        forks = api.call("POST", "/v1/snapshots/{id}/fork", id=sid, json_body=req, expect=201,
                         valid_request=True)["sandboxes"]
        assert len(forks) == 2
        for f in forks:
            assert f["state"] == "allocated" and f["pool"] == "default" and f["labels"] == {"branch": "b"}
            assert f["expires_at_ms"] == f["acquired_at_ms"] + 600_000
        assert api.sh(forks[0]["id"], "cat f; echo $FROM $X")["stdout"] == "snap\nparent 1\n"
        api.sh(forks[0]["id"], "echo changed > f")
        assert api.sh(forks[1]["id"], "cat f")["stdout"] == "snap\n"
        assert api.sh(parent, "cat f")["stdout"] == "snap\n"
        # No body: one fork.
        forks += api.call("POST", "/v1/snapshots/{id}/fork", id=sid, expect=201)["sandboxes"]
        assert api.call("GET", "/v1/snapshots/{id}", id=sid, expect=200)["forks"] == 3
        api.call("DELETE", "/v1/snapshots/{id}", id=sid, expect=409, code="conflict")

        # A snapshot of a fork stacks on its parent's; this node keeps at most 2.
        second = api.call("POST", "/v1/sandboxes/{id}/snapshots", id=forks[0]["id"], expect=201)
        assert second["parent"] == sid
        api.call("POST", "/v1/sandboxes/{id}/snapshots", id=parent, expect=409, code="conflict")
        api.call("POST", "/v1/sandboxes/{id}/fork", id=parent, expect=409, code="conflict")
        api.call("DELETE", "/v1/snapshots/{id}", id=second["id"], expect=204)
        for f in forks:
            api.release(f["id"])
        api.call("DELETE", "/v1/snapshots/{id}", id=sid, expect=204)
        api.call("DELETE", "/v1/snapshots/{id}", id=sid, expect=404, code="not_found")

        # Straight from a live sandbox: the snapshot taken on the way is not listed.
        live = api.call("POST", "/v1/sandboxes/{id}/fork", id=parent, json_body={"count": 1}, expect=201,
                        valid_request=True)["sandboxes"]
        assert api.sh(live[0]["id"], "cat f")["stdout"] == "snap\n"
        assert api.call("GET", "/v1/snapshots", expect=200)["snapshots"] == []
        api.release(live[0]["id"])

        for bad in [{"count": 0}, {"count": 1025}, {"bogus": 1}, {"count": "1"},
                    {"labels": {str(i): "x" for i in range(65)}}]:
            api.call("POST", "/v1/sandboxes/{id}/fork", id=parent, json_body=bad, expect=400, code="bad_request",
                     valid_request=False)
            api.call("POST", "/v1/snapshots/{id}/fork", id="snap-0000000000000000", json_body=bad, expect=400,
                     code="bad_request", valid_request=False)
        api.call("POST", "/v1/sandboxes/{id}/fork", id=parent, json_body={"env": {"A=B": "x"}}, expect=400,
                 code="bad_request")
        api.call("POST", "/v1/sandboxes/{id}/fork", id=parent, raw=b"{bad json", expect=400, code="bad_request")
        api.call("POST", "/v1/sandboxes/{id}/fork", id=parent, raw=b" " * ((1 << 20) + 1), expect=413,
                 code="payload_too_large")

        # Over the node's snapshot bytes (1 MiB here): refused, and the sandbox runs on.
        api.sh(parent, "head -c 2000000 /dev/zero > big")
        api.call("POST", "/v1/sandboxes/{id}/snapshots", id=parent, expect=413, code="payload_too_large")
        api.call("POST", "/v1/sandboxes/{id}/fork", id=parent, expect=413, code="payload_too_large")
        assert api.sh(parent, "echo up")["stdout"] == "up\n"
    finally:
        api.node.request("DELETE", f"/v1/sandboxes/{parent}")


def test_fork_pool_errors(api: Api) -> None:
    # No room in the pool (tiny: max 1) for a fork.
    sid = api.acquire("tiny")
    try:
        api.call("POST", "/v1/sandboxes/{id}/fork", id=sid, expect=503, code="pool_exhausted")
        snap = api.call("POST", "/v1/sandboxes/{id}/snapshots", id=sid, expect=201)["id"]
        api.call("POST", "/v1/snapshots/{id}/fork", id=snap, expect=503, code="pool_exhausted")
        api.call("DELETE", "/v1/snapshots/{id}", id=snap, expect=204)
    finally:
        api.release(sid)
    # The snapshot's pool is gone: no fork; the snapshot goes once its last fork does.
    api.call("PUT", "/v1/pools/{name}", name="api-fork", json_body={"min_idle": 0, "max": 2}, expect=200)
    sid = api.acquire("api-fork")
    snap = api.call("POST", "/v1/sandboxes/{id}/snapshots", id=sid, expect=201)["id"]
    fork = api.call("POST", "/v1/snapshots/{id}/fork", id=snap, expect=201)["sandboxes"][0]["id"]
    api.call("DELETE", "/v1/pools/{name}", name="api-fork", expect=204)
    api.call("POST", "/v1/snapshots/{id}/fork", id=snap, expect=409, code="conflict")
    api.release(sid)
    api.release(fork)
    wait_gone(api, snap)


def test_files_streamed(api: Api, sandbox: str) -> None:
    # Host-owned files the sandbox's root may not read (before anything writes /etc).
    api.call("GET", "/v1/sandboxes/{id}/files", id=sandbox, query={"path": "/etc/shadow"}, expect=403,
             code="forbidden")
    data = os.urandom(200_000)
    digest = hashlib.sha256(data).hexdigest()
    info = api.call("PUT", "/v1/sandboxes/{id}/files", id=sandbox, query={"path": "dir/sub/blob.bin", "mode": "750"},
                    raw=data, expect=200)
    assert info == {"path": "/workspace/dir/sub/blob.bin", "size": len(data), "sha256": digest}
    assert api.sh(sandbox, "stat -c %a dir/sub/blob.bin")["stdout"] == "750\n"
    got = api.call("GET", "/v1/sandboxes/{id}/files", id=sandbox, query={"path": "/workspace/dir/sub/blob.bin"},
                   expect=200)
    assert got == data and api.last.headers["content-length"] == str(len(data))
    # Absolute paths resolve in the sandbox's root; the sha256 check accepts any case.
    info = api.call("PUT", "/v1/sandboxes/{id}/files", id=sandbox,
                    query={"path": "/tmp/abs.txt", "sha256": hashlib.sha256(b"abs").hexdigest().upper()},
                    raw=b"abs", expect=200)
    assert info["path"] == "/tmp/abs.txt"
    assert api.call("GET", "/v1/sandboxes/{id}/files", id=sandbox, query={"path": "/tmp/abs.txt"}) == b"abs"
    # Empty files are files.
    api.call("PUT", "/v1/sandboxes/{id}/files", id=sandbox, query={"path": "empty"}, raw=b"", expect=200)
    assert api.call("GET", "/v1/sandboxes/{id}/files", id=sandbox, query={"path": "empty"}, expect=200) == b""

    # Errors.
    err = api.call("PUT", "/v1/sandboxes/{id}/files", id=sandbox, query={"path": "bad.txt", "sha256": "0" * 64},
                   raw=b"abc", expect=400, code="checksum_mismatch")
    assert err["error"]["retryable"] is False
    api.call("GET", "/v1/sandboxes/{id}/files", id=sandbox, query={"path": "bad.txt"}, expect=404, code="not_found")
    api.call("PUT", "/v1/sandboxes/{id}/files", id=sandbox, query={"path": "../escape"}, raw=b"x", expect=400,
             code="path_refused")
    api.call("PUT", "/v1/sandboxes/{id}/files", id=sandbox, query={"path": "x", "mode": "999"}, raw=b"x",
             expect=400, code="bad_request")
    api.call("PUT", "/v1/sandboxes/{id}/files", id=sandbox, raw=b"x", expect=400, code="bad_request")  # no path
    api.call("PUT", "/v1/sandboxes/{id}/files", id=sandbox, query={"path": "dir"}, raw=b"x", expect=400,
             code="bad_request")  # a directory
    api.call("PUT", "/v1/sandboxes/{id}/files", id=sandbox, query={"path": "/usr/bin/arl-api-test"}, raw=b"x",
             expect=403, code="forbidden")
    # Writing over a mount point (EBUSY) is the caller's mistake: 400.
    api.call("PUT", "/v1/sandboxes/{id}/files", id=sandbox, query={"path": "/dev/null"}, raw=b"x", expect=400,
             code="bad_request")
    api.sh(sandbox, "ln -s /etc out-link")  # a symlink leaving /workspace
    api.call("GET", "/v1/sandboxes/{id}/files", id=sandbox, query={"path": "out-link/hostname"}, expect=400,
             code="path_refused")
    api.call("GET", "/v1/sandboxes/{id}/files", id=sandbox, query={"path": "dir/../dir/sub/blob.bin"}, expect=400,
             code="path_refused")
    api.call("GET", "/v1/sandboxes/{id}/files", id=sandbox, query={"path": "dir"}, expect=400, code="bad_request")
    api.call("GET", "/v1/sandboxes/{id}/files", id=sandbox, expect=400, code="bad_request")  # no path

    api.call("DELETE", "/v1/sandboxes/{id}/files", id=sandbox, query={"path": "dir/sub/blob.bin"}, expect=204)
    api.call("DELETE", "/v1/sandboxes/{id}/files", id=sandbox, query={"path": "dir/sub/blob.bin"}, expect=404,
             code="not_found")
    api.call("DELETE", "/v1/sandboxes/{id}/files", id=sandbox, query={"path": "dir"}, expect=400,
             code="bad_request")
    api.call("DELETE", "/v1/sandboxes/{id}/files", id=sandbox, query={"path": "../x"}, expect=400,
             code="path_refused")
    api.call("DELETE", "/v1/sandboxes/{id}/files", id=sandbox, query={"path": "/usr/bin/env"}, expect=403,
             code="forbidden")
    api.call("DELETE", "/v1/sandboxes/{id}/files", id=sandbox, query={"path": "/dev/null"}, expect=400,
             code="bad_request")


def test_files_batch(api: Api, sandbox: str) -> None:
    req = {"files": {
        "b/text.txt": "héllo",
        "/tmp/bin.dat": {"content": base64.b64encode(b"\x00\x01\xff").decode(), "encoding": "base64", "mode": 0o700},
        "plain.txt": {"content": "plain", "encoding": "utf8", "mode": None},
    }}
    body = api.call("POST", "/v1/sandboxes/{id}/files", id=sandbox, json_body=req, expect=200, valid_request=True)
    assert body["files"] == [
        {"path": "/tmp/bin.dat", "size": 3, "sha256": hashlib.sha256(b"\x00\x01\xff").hexdigest()},
        {"path": "/workspace/b/text.txt", "size": 6, "sha256": hashlib.sha256("héllo".encode()).hexdigest()},
        {"path": "/workspace/plain.txt", "size": 5, "sha256": hashlib.sha256(b"plain").hexdigest()},
    ]
    wait_content(api, sandbox, "/tmp/bin.dat", b"\x00\x01\xff")
    wait_content(api, sandbox, "b/text.txt", "héllo".encode())
    assert api.sh(sandbox, "stat -c %a /tmp/bin.dat plain.txt")["stdout"] == "700\n644\n"

    # All or nothing: one bad entry writes none.
    api.call("POST", "/v1/sandboxes/{id}/files", id=sandbox, json_body={"files": {"ok.txt": "x", "../bad": "y"}},
             expect=400, code="path_refused", valid_request=True)
    api.call("GET", "/v1/sandboxes/{id}/files", id=sandbox, query={"path": "ok.txt"}, expect=404)
    api.call("POST", "/v1/sandboxes/{id}/files", id=sandbox,
             json_body={"files": {"x": {"content": "%%", "encoding": "base64"}}}, expect=400, code="bad_request",
             valid_request=True)
    api.call("POST", "/v1/sandboxes/{id}/files", id=sandbox, json_body={"files": {"/usr/bin/arl-api-test": "x"}},
             expect=403, code="forbidden", valid_request=True)
    api.call("POST", "/v1/sandboxes/{id}/files", id=sandbox, json_body={"files": {"/dev/null": "x"}},
             expect=400, code="bad_request", valid_request=True)
    for bad in [{"files": {}, "extra": 1}, {"files": {"x": {"content": "x", "encoding": "hex"}}},
                {"files": {"x": 1}}, {"files": []}, {}]:
        api.call("POST", "/v1/sandboxes/{id}/files", id=sandbox, json_body=bad, expect=400, code="bad_request",
                 valid_request=False)
    api.call("POST", "/v1/sandboxes/{id}/files", id=sandbox, raw=b"[", expect=400, code="bad_request")
    api.call("POST", "/v1/sandboxes/{id}/files", id=sandbox, raw=b" " * ((64 << 20) + 1), expect=413,
             code="payload_too_large")


@pytest.fixture
def full_sandbox(api: Api) -> Iterator[str]:
    """A sandbox whose 1 MiB disk is full."""
    api.call("PUT", "/v1/pools/{name}", name="api-small", json_body={"min_idle": 0, "max": 1, "disk_mb": 1},
             expect=200, valid_request=True)
    sid = api.acquire("api-small")
    try:
        api.sh(sid, "head -c 4000000 /dev/zero > fill 2>/dev/null; true")
        yield sid
    finally:
        api.release(sid)
        api.call("DELETE", "/v1/pools/{name}", name="api-small", expect=204)


def test_files_disk_full(api: Api, full_sandbox: str) -> None:
    api.call("PUT", "/v1/sandboxes/{id}/files", id=full_sandbox, query={"path": "more"}, raw=b"y" * 65536,
             expect=507, code="insufficient_storage")
    api.call("GET", "/v1/sandboxes/{id}/files", id=full_sandbox, query={"path": "more"}, expect=404)


def wait_content(api: Api, sid: str, path: str, expected: bytes, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        got = api.call("GET", "/v1/sandboxes/{id}/files", id=sid, query={"path": path}, expect=200)
        if got == expected:
            return
        assert time.monotonic() < deadline, f"{path}: {got[:100]!r} != {expected[:100]!r}"
        time.sleep(0.01)


def test_files_batch_disk_full(api: Api, full_sandbox: str) -> None:
    api.call("POST", "/v1/sandboxes/{id}/files", id=full_sandbox, json_body={"files": {"more": "y" * 65536}},
             expect=507, code="insufficient_storage")


def test_reset(api: Api, sandbox: str) -> None:
    api.call("PUT", "/v1/sandboxes/{id}/files", id=sandbox, query={"path": "keep-me"}, raw=b"x", expect=200)
    first = api.exec(sandbox, {"shell": "echo ran >> /tmp/count; wc -l < /tmp/count", "request_id": "r"})
    info = api.call("POST", "/v1/sandboxes/{id}/reset", id=sandbox, expect=200)
    assert info["id"] == sandbox and info["state"] == "allocated"
    api.call("GET", "/v1/sandboxes/{id}/files", id=sandbox, query={"path": "keep-me"}, expect=404)
    # Remembered request ids are forgotten: the same id runs again (on an emptied /tmp).
    again = api.exec(sandbox, {"shell": "echo ran >> /tmp/count; wc -l < /tmp/count", "request_id": "r"})
    assert first["stdout"] == again["stdout"] == "1\n"
    assert again["duration_ms"] != first["duration_ms"]


def test_sessions(api: Api, sandbox: str) -> None:
    base = "/v1/sandboxes/{id}/sessions"
    info = api.call("POST", base, id=sandbox, json_body={"kind": "shell"}, expect=201, valid_request=True)
    sid = info["id"]
    assert info["kind"] == "shell" and info["busy"] is False
    listed = api.call("GET", base, id=sandbox, expect=200)["sessions"]
    assert [s["id"] for s in listed] == [sid]
    api.call("GET", base + "/{sid}", id=sandbox, sid=sid, expect=200)
    run = base + "/{sid}/run"
    r = api.call("POST", run, id=sandbox, sid=sid, json_body={"code": "cd /tmp; X=1; echo $X"}, expect=200,
                 valid_request=True)
    assert (r["stdout"], r["exit_code"], r["session_ended"]) == ("1\n", 0, False)
    events = api.call("POST", run, id=sandbox, sid=sid, json_body={"code": "pwd; echo e >&2; false"},
                      headers={"Accept": NDJSON}, expect=200)
    assert events[-1]["type"] == "result" and events[-1]["exit_code"] == 1
    assert "".join(e["data"] for e in events if e["type"] == "stdout") == "/tmp\n"
    py = api.call("POST", base, id=sandbox, json_body={"kind": "python"}, expect=201)["id"]
    r = api.call("POST", run, id=sandbox, sid=py, json_body={"code": "1/0"}, expect=200)
    assert r["error"]["ename"] == "ZeroDivisionError" and r["exit_code"] == 1
    r = api.call("POST", run, id=sandbox, sid=py, json_body={"code": "6 * 7"}, expect=200)
    assert r["value"] == "42"
    # Bad requests.
    api.call("POST", base, id=sandbox, json_body={"kind": "ruby"}, expect=400, code="bad_request",
             valid_request=False)
    api.call("POST", base, id=sandbox, json_body={"kind": "shell", "cwd": "/no/such"}, expect=400,
             code="bad_request")
    api.call("POST", run, id=sandbox, sid=sid, json_body={"code": "a\u0000b"}, expect=400, code="bad_request")
    api.call("POST", base, id=sandbox, raw=b"{" + b" " * (1 << 20) + b"}", expect=413, code="payload_too_large")
    api.call("POST", run, id=sandbox, sid=sid, raw=b"{" + b" " * (6 << 20) + b"}", expect=413,
             code="payload_too_large")
    for missing in ("shell-999", "Not..An-Id"):
        api.call("GET", base + "/{sid}", id=sandbox, sid=missing, expect=404, code="not_found")
        api.call("POST", run, id=sandbox, sid=missing, json_body={"code": "true"}, expect=404, code="not_found")
    # At most 16 per sandbox.
    for _ in range(14):
        api.call("POST", base, id=sandbox, json_body={"kind": "shell"}, expect=201)
    api.call("POST", base, id=sandbox, json_body={"kind": "shell"}, expect=409, code="conflict")
    api.call("DELETE", base + "/{sid}", id=sandbox, sid=sid, expect=204)
    api.call("DELETE", base + "/{sid}", id=sandbox, sid=sid, expect=404, code="not_found")
    # Everything above is in the trajectory, in order.
    steps = api.call("GET", "/v1/sandboxes/{id}/trajectory", id=sandbox, expect=200)
    assert [s["seq"] for s in steps] == list(range(1, len(steps) + 1))
    assert steps[0]["action"] == "session_open" and steps[-1]["action"] == "session_close"


def test_pty(api: Api, sandbox: str) -> None:
    # RFC 6455's example key and its digest.
    upgrade = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
               "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
    api.call("GET", "/v1/sandboxes/{id}/pty", id=sandbox, headers=upgrade, query={"cols": "100", "rows": "30"},
             expect=101)
    assert api.last.headers["sec-websocket-accept"] == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    assert api.last.headers["upgrade"].lower() == "websocket"
    api.call("GET", "/v1/sandboxes/{id}/pty", id=sandbox, expect=400, code="bad_request")
    api.call("GET", "/v1/sandboxes/{id}/pty", id=sandbox, headers=upgrade, query={"cols": "0"}, expect=400,
             code="bad_request")
    api.call("GET", "/v1/sandboxes/{id}/pty", id=sandbox, headers={**upgrade, "Sec-WebSocket-Version": "8"},
             expect=400, code="bad_request")


def test_sandbox_routes_refuse_other_tokens_and_unknown_ids(api: Api, contract: Contract, sandbox: str) -> None:
    for method, template in sandbox_operations(contract):
        kw = SAMPLE.get((method, template), {})
        api.call(method.upper(), template, id=sandbox, token=api.node.other_token, expect=403, code="forbidden", **kw)
        api.call(method.upper(), template, id="sb-0000000000000000", expect=404, code="not_found", **kw)
    # The other token did not release it.
    api.call("GET", "/v1/sandboxes/{id}", id=sandbox, expect=200)


def test_expired_lease_is_sandbox_unavailable(api: Api, contract: Contract) -> None:
    sid = api.acquire("default", ttl_seconds=1)
    deadline = time.monotonic() + 10
    while True:
        r = api.node.request("GET", f"/v1/sandboxes/{sid}")
        if r.status != 200:
            break
        assert time.monotonic() < deadline, "the lease never expired"
        time.sleep(0.05)
    for method, template in sandbox_operations(contract):
        if (method, template) == ("delete", "/v1/sandboxes/{id}"):
            continue  # releasing a sandbox that is already gone succeeds (below)
        err = api.call(method.upper(), template, id=sid, expect=503, code="sandbox_unavailable",
                       **SAMPLE.get((method, template), {}))
        assert err["error"]["retryable"] is True
    api.call("DELETE", "/v1/sandboxes/{id}", id=sid, expect=204)


def test_exec_cut_short_by_release_is_released(api: Api, node: Node) -> None:
    """Releasing a sandbox while one of its commands runs stops the command; the exec answers
    `410 released`, which a retry cannot fix."""
    sid = api.acquire()
    result: dict[str, Any] = {}

    def run() -> None:
        conn = node.connection()
        body = json.dumps({"shell": "sleep 30"}).encode()
        conn.request("POST", f"/v1/sandboxes/{sid}/exec", body=body,
                     headers={"Authorization": f"Bearer {node.token}", "Content-Type": "application/json"})
        r = conn.getresponse()
        result["resp"] = Resp(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
        conn.close()

    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 10
    while "sleep 30" not in api.sh(sid, "ps -o args")["stdout"]:
        assert time.monotonic() < deadline, "the command never started"
        time.sleep(0.01)
    api.release(sid)
    t.join(20)
    assert not t.is_alive(), "the exec outlived its sandbox"
    err = api.contract.check_response("post", "/v1/sandboxes/{id}/exec", result["resp"])
    assert result["resp"].status == 410 and err["error"]["code"] == "released"
    assert err["error"]["retryable"] is False


def test_shutdown_drains(api: Api, node: Node, contract: Contract) -> None:
    """SIGTERM: the listener stays open, `/readyz` and every new piece of work answer `503
    draining`, reads and releases are served, a request already on the wire gets `503
    draining` too, and the daemon exits 0 once the work is done."""
    sid = api.acquire()
    body = json.dumps({"pool": "default"}).encode()
    conn = node.connection()
    conn.putrequest("POST", "/v1/sandboxes")
    conn.putheader("Authorization", f"Bearer {node.token}")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(len(body)))
    conn.endheaders()
    conn.sock.sendall(body[:1])  # the handler is waiting for the rest of the body
    probe = node.request("GET", "/readyz", token=None)  # also makes sure the request above is in
    assert probe.status == 200
    node.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    while True:
        err = api.call("GET", "/readyz", token=None)
        if api.last.status == 503:
            assert err["error"]["code"] == "draining"
            break
        assert time.monotonic() < deadline, "the daemon never started draining"
        time.sleep(0.01)
    # The half-sent request is work under way: the node keeps serving until it is done.
    for method, template in sorted(NEW_WORK):
        kw = SAMPLE.get((method, template), {})
        if template == "/v1/pools/{name}":
            kw = {"json_body": {"min_idle": 0}}
        if template == "/v1/sandboxes":
            kw = {"json_body": {"pool": "default"}}
        err = api.call(method.upper(), template, id=sid, name="default", expect=503, code="draining", **kw)
        assert err["error"]["retryable"] is True
    api.call("GET", "/v1/sandboxes/{id}", id=sid, expect=200)
    api.call("DELETE", "/v1/sandboxes/{id}", id=sid, expect=204)
    conn.sock.sendall(body[1:])
    r = conn.getresponse()
    resp = Resp(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
    conn.close()
    err = api.contract.check_response("post", "/v1/sandboxes", resp)
    assert resp.status == 503 and err["error"]["code"] == "draining" and err["error"]["retryable"] is True
    assert node.terminate() == 0, node.log()


def test_every_documented_response_was_seen(request: pytest.FixtureRequest, contract: Contract) -> None:
    """Runs last: every (operation, status, error code) of the spec was produced by the daemon."""
    module_tests = [i for i in request.session.items if i.module is request.module]
    if len(module_tests) != len([n for n in dir(request.module) if n.startswith("test_")]):
        pytest.skip("only meaningful when the whole module runs")
    if request.session.testsfailed:
        pytest.skip("other tests failed")
    missing = []
    for (method, template, status), codes in sorted(contract.documented().items(), key=str):
        if (method, template, status) in UNREACHABLE:
            continue
        seen = {c for (m, t, s, c) in contract.seen if (m, t, s) == (method, template, status)}
        for code in codes:
            if (method, template, status, code) in UNREACHABLE_CODES:
                continue
            if code not in seen:
                missing.append(f"{method.upper()} {template} {status}" + (f" {code}" if code else ""))
    assert not missing, "documented but never produced:\n" + "\n".join(missing)
