"""The session's Redis Cluster (tests/cluster/redis_cluster.py), and ``redis_url`` pointing at
it: every fixture of tests/conftest.py built on ``redis_url`` (``settings``, ``conns``,
``seed``, ``db_settings``, the API's) runs on the cluster here, through the service's own
client factory, so the tests reused from other rooms run unchanged."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis

from tests.cluster.redis_cluster import RedisClusterHandle, redis_cluster


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterHandle]:
    with redis_cluster(tmp_path_factory.mktemp("redis-cluster")) as handle:
        yield handle


@pytest.fixture
async def redis_url(cluster: RedisClusterHandle) -> AsyncIterator[str]:
    """The session's cluster, every primary emptied before each test (it holds nothing else)."""
    cluster.wait_healthy()  # a failover test before this one may have moved primaries
    for n in cluster.primaries():
        r = aioredis.Redis(host="127.0.0.1", port=n.port)
        await r.flushall()
        await r.aclose()
    yield cluster.url
