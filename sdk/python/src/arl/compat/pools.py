"""``WarmPoolManager``: pool management in the style of the original SDK."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from typing import Any

from ..client import Client
from ..errors import PoolNotReadyError
from ..types import PoolInfo as NodePoolInfo
from ._shared import _endpoints, _token
from .errors import UnsupportedOperation
from .models import PoolCondition, ResourceRequirements, WarmPoolInfo


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
