"""The one factory of every process's Redis client: one node or a Redis Cluster, by its URL.

``METER_REDIS_URL`` (``Settings.redis_url``) is either

- ``redis://host:port/db`` (or ``rediss://``, ``unix://``): one Redis node, a
  ``redis.asyncio.Redis``;
- ``redis+cluster://host:port[,host:port...]`` (``[user:password@]`` before the first node
  allowed): a Redis Cluster, a ``redis.asyncio.RedisCluster``. The nodes listed are only where
  the client starts discovering the cluster (any one that answers will do); it learns the
  others, and follows ``MOVED`` and failovers, itself. A cluster has only database 0.

Either way the client has the service's retry policy (``infra.instrument``): a command is sent
again once, at once, only after a broken connection, never after a timeout. redis-py's cluster
client decides retries by itself, not by its ``Retry``'s errors: it re-sends after a timeout
too (``RedisCluster.ERRORS_ALLOW_RETRY``, its pipeline as well), so ``InstrumentedRedisCluster``
narrows what it retries to a broken connection and the cluster's own "not now" answers
(``CLUSTERDOWN``, a slot not covered yet during a failover), after which it re-reads the
cluster's layout.

Three more things the cluster client needs that a single node's does not, all in
``InstrumentedClusterPipeline``:

- redis-py 8.1 refuses ``EVALSHA`` in a cluster pipeline (redis/redis-py#2914; allowed upstream
  by #4206): ours queues it, routed by its keys' slot like any keyed command (the keys of one
  call must share a slot; redis-py checks it before sending).
- ``await pipe`` re-initialises a redis-py ``ClusterPipeline`` and empties its queue, and
  ``AsyncScript(..., client=pipe)`` awaits the pipeline it queues ``EVALSHA`` on: every script
  queued would silently drop the commands queued before it. Ours keeps its queue.
- A ``ClusterPipeline`` does not load a pipeline's scripts before sending them (a single node's
  ``Pipeline`` does, with ``SCRIPT EXISTS``). On ``NOSCRIPT`` (a fresh node, a failover to a
  replica, which never gets scripts) ours loads every script registered on the client into every
  primary and raises: the balance store's one retry on ``NOSCRIPT`` (``balance.errors.call``)
  then sends the round trip again.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Generator
from typing import Any, Final, TypeAlias
from urllib.parse import unquote

from redis.asyncio.client import Redis
from redis.asyncio.cluster import ClusterNode, ClusterPipeline, PipelineStrategy, RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import (
    ClusterDownError,
    NoScriptError,
    RedisClusterException,
    RedisError,
    SlotNotCoveredError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.typing import ScriptTextT

from infra import metrics
from infra.instrument import instrumented_redis, redis_retry

#: The scheme of a cluster's ``redis_url``.
CLUSTER_SCHEME: Final = "redis+cluster://"

#: A client of either kind: what the balance store and every process take.
RedisClient: TypeAlias = Redis | RedisCluster


def is_cluster_url(url: str) -> bool:
    return url.startswith(CLUSTER_SCHEME)


def cluster_nodes(url: str) -> tuple[list[tuple[str, int]], str | None, str | None]:
    """The ``(host, port)`` startup nodes of a ``redis+cluster://`` URL, and its username and
    password (None when absent). Raises ``ValueError`` on anything else."""
    if not is_cluster_url(url):
        raise ValueError(f"not a {CLUSTER_SCHEME} URL: {url!r}")
    rest = url.removeprefix(CLUSTER_SCHEME).rstrip("/")
    username = password = None
    if "@" in rest:
        auth, rest = rest.rsplit("@", 1)
        user, sep, pw = auth.partition(":")
        username = unquote(user) or None
        password = unquote(pw) if sep else None
    if "/" in rest and rest.split("/", 1)[1] not in ("", "0"):
        raise ValueError(f"{url!r}: a Redis Cluster has only database 0")
    rest = rest.split("/", 1)[0]
    nodes: list[tuple[str, int]] = []
    for part in rest.split(","):
        host, sep, port = part.strip().rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65_536:
            raise ValueError(f"{url!r}: {part!r} is not host:port")
        nodes.append((host.strip("[]"), int(port)))
    return nodes, username, password


class InstrumentedClusterPipeline(ClusterPipeline):
    """A cluster pipeline (not a transaction) that keeps its queue when awaited, loads scripts
    on ``NOSCRIPT``, retries by the service's policy, and is one observation labelled
    ``pipeline`` (see the module docstring)."""

    cluster_client: InstrumentedRedisCluster

    def __init__(self, client: InstrumentedRedisCluster) -> None:
        super().__init__(client, transaction=False)
        self._execution_strategy = _PolicyStrategy(self)

    def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> InstrumentedClusterPipeline:
        """Queue ``EVALSHA``, routed by its keys' slot like any keyed command. redis-py 8.1
        blocks it in a cluster pipeline (redis/redis-py#2914, allowed upstream since #4206)."""
        self.execute_command("EVALSHA", sha, numkeys, *keys_and_args)
        return self

    def __await__(self) -> Generator[Any, None, InstrumentedClusterPipeline]:
        return self._same().__await__()

    async def _same(self) -> InstrumentedClusterPipeline:
        return self

    async def execute(
        self, raise_on_error: bool = True, allow_redirections: bool = True
    ) -> list[Any]:
        t0 = time.perf_counter()
        try:
            return await super().execute(raise_on_error, allow_redirections)
        except NoScriptError:
            await self.cluster_client.load_scripts()
            raise
        finally:
            metrics.REDIS_SECONDS.labels("pipeline").observe(time.perf_counter() - t0)


class _PolicyStrategy(PipelineStrategy):
    """redis-py's pipeline strategy, retrying what the client's ``ERRORS_ALLOW_RETRY`` allows
    (redis-py's own reads ``RedisCluster``'s, which has timeouts in it)."""

    async def execute(
        self, raise_on_error: bool = True, allow_redirections: bool = True
    ) -> list[Any]:
        if not self._command_queue:
            return []
        client = self._pipe.cluster_client
        retryable = type(client).ERRORS_ALLOW_RETRY
        attempts = client.retry.get_retries()
        try:
            while True:
                try:
                    if client._initialize:
                        await client.initialize()
                    return await self._execute(
                        client,
                        self._command_queue,
                        raise_on_error=raise_on_error,
                        allow_redirections=allow_redirections,
                    )
                except retryable:
                    if attempts <= 0:
                        raise
                    attempts -= 1
                    await client.aclose()  # the next attempt re-reads the cluster's layout
        finally:
            await self.reset()  # type: ignore[no-untyped-call]


class InstrumentedRedisCluster(RedisCluster):
    """``redis.asyncio.RedisCluster`` with the service's retry policy and each command's round
    trip in ``meter_redis_command_duration_seconds{command}``, as ``InstrumentedRedis``."""

    #: Re-sent (once, after re-reading the layout): a broken connection, and the cluster saying
    #: "not now" before running anything. Never a timeout (redis-py's list has it).
    ERRORS_ALLOW_RETRY = (  # type: ignore[assignment]  # narrower than redis-py's, on purpose
        RedisConnectionError,
        ClusterDownError,
        SlotNotCoveredError,
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._scripts: dict[str, AsyncScript] = {}

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return await super().execute_command(*args, **options)
        finally:
            name = args[0].decode() if isinstance(args[0], bytes) else str(args[0])
            metrics.REDIS_SECONDS.labels(name.lower()).observe(time.perf_counter() - t0)

    def pipeline(
        self, transaction: bool | None = None, shard_hint: str | None = None
    ) -> ClusterPipeline:
        if transaction:
            raise ValueError("the service never runs a transaction across a cluster")
        # redis-py's own ClusterPipeline is 'abstract' to mypy in the same way.
        return InstrumentedClusterPipeline(self)  # type: ignore[abstract]

    def register_script(self, script: ScriptTextT) -> AsyncScript:  # type: ignore[override]
        s = AsyncScript(self, script)
        self._scripts.setdefault(s.sha, s)
        return s

    async def load_scripts(self) -> None:
        """Load every script registered on this client into every primary (SCRIPT LOAD goes to
        all primaries)."""
        for s in list(self._scripts.values()):
            await self.script_load(s.script)


def redis_client(
    url: str,
    *,
    socket_timeout: float | None,
    socket_connect_timeout: float,
    health_check_interval: int = 0,
    measured: bool = True,
) -> RedisClient:
    """The client of ``url`` (see the module docstring), with the one retry policy.

    ``socket_timeout`` bounds every read (None: unbounded, for a caller that bounds each call
    itself); ``socket_connect_timeout`` every connect. ``measured``: a single node's client
    times each command (``InstrumentedRedis``); a cluster's always does (its class is the one
    that keeps the policy)."""
    if not is_cluster_url(url):
        if not measured:
            return Redis.from_url(
                url,
                socket_timeout=socket_timeout,
                socket_connect_timeout=socket_connect_timeout,
                health_check_interval=health_check_interval,
                retry=redis_retry(),
            )
        return instrumented_redis(
            url,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_connect_timeout,
            health_check_interval=health_check_interval,
        )
    nodes, username, password = cluster_nodes(url)
    return InstrumentedRedisCluster(
        startup_nodes=[ClusterNode(h, p) for h, p in nodes],
        username=username,
        password=password,
        socket_timeout=socket_timeout,
        socket_connect_timeout=socket_connect_timeout,
        health_check_interval=health_check_interval,
        retry=redis_retry(),  # its count only: which errors is ERRORS_ALLOW_RETRY's
        # Unbounded per node, as a single node's pool is by default: redis-py's 100 would turn
        # a burst of concurrent calls into "Too many connections" (OutcomeUnknown), and the API
        # keeps its pool unbounded on purpose (enforcement.http.app.api_redis_client).
        max_connections=2**31,
    )


async def warm_up(client: RedisClient) -> None:
    """Read a cluster's layout now, before the process's first burst of calls (a no-op on one
    node). Measured here: 100 concurrent first calls on a cold redis-py ``RedisCluster`` had 13
    fail with "Connection closed by server" during their connection handshake, none on a warm
    one. A cluster that does not answer yet is left to the first call, as a single node is."""
    if isinstance(client, RedisCluster):
        with contextlib.suppress(RedisError, RedisClusterException, OSError):
            await client.initialize()
