"""One Redis node or a Redis Cluster behind REDIS_URL: which one, and a command client for it.

The same app runs on both. On a cluster, commands go through redis-py's `RedisCluster` (it
follows MOVED and ASK, and learns the topology); keys a script or a transaction touches
together share a hash tag, so they live in one slot (see `partitions.py`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from redis.asyncio import Redis, RedisCluster
from redis.asyncio.cluster import ClusterNode
from redis.exceptions import RedisClusterException, RedisError

from .tls import TlsOptions

Client = Redis | RedisCluster
# What a Redis call can raise: a cluster client also raises RedisClusterException (not a
# RedisError) when it cannot route a command.
REDIS_FAILURES = (RedisError, RedisClusterException, OSError, TimeoutError)


class Topology:
    """Whether REDIS_URL names a cluster node: REDIS_CLUSTER when set, else asked of Redis
    (`INFO cluster`) once it answers; every Redis client of the instance follows the answer."""

    def __init__(self, url: str, *, forced: bool | None, timeout: float, tls: TlsOptions | None = None) -> None:
        self._url = url
        self._timeout = timeout
        self._tls: TlsOptions = tls or {}
        self._known: bool | None = forced
        self._lock = asyncio.Lock()

    @property
    def known(self) -> bool | None:
        return self._known

    async def cluster(self) -> bool:
        """True for a cluster; raises what redis-py raises while Redis cannot be asked."""
        if self._known is not None:
            return self._known
        async with self._lock:
            if self._known is None:
                probe = Redis.from_url(
                    self._url, socket_timeout=self._timeout, socket_connect_timeout=self._timeout, **self._tls
                )
                try:
                    info = await probe.info("cluster")
                finally:
                    await probe.aclose()
                self._known = str(info.get("cluster_enabled", 0)) == "1"
        return self._known

    async def client(self, **options: Any) -> Client:
        """A command client of the right kind for REDIS_URL, with `options` for its connections."""
        if await self.cluster():
            # A cluster client keeps one pool per node; its retries follow MOVED/ASK and failovers.
            return RedisCluster.from_url(self._url, **self._tls, **options)
        return Redis.from_url(self._url, **self._tls, **options)


class ShardWatch:
    """Pings every master of a cluster now and then, so /readyz can say which shards are down.

    A shard whose master and replicas are all gone leaves its slots uncovered: commands on its
    keys fail while the rest of the cluster (with cluster-require-full-coverage no) goes on.
    """

    def __init__(self, client: Callable[[], Client | None], *, interval: float = 2.0, timeout: float = 1.0) -> None:
        self._client = client
        self._interval = interval
        self._timeout = timeout
        self._task: asyncio.Task[None] | None = None
        self.unreachable: list[str] = []  # "host:port" of the masters that did not answer

    def start(self) -> None:
        self._task = asyncio.create_task(self._watch_forever(), name="redis-shard-watch")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _watch_forever(self) -> None:
        while True:
            client = self._client()
            if isinstance(client, RedisCluster):
                self.unreachable = [name for name in await asyncio.gather(*map(self._down, client.get_primaries())) if name]
            elif client is not None:
                return  # one node: no shards to watch
            await asyncio.sleep(self._interval)

    async def _down(self, node: ClusterNode) -> str | None:
        """The node's name when it does not answer a PING in time, else None. Asked of the
        node itself: through the cluster client, each failure would also make the next
        command of the instance rediscover the topology first."""
        try:
            async with asyncio.timeout(self._timeout):
                await node.execute_command("PING")
        except Exception:  # noqa: BLE001 - whatever the reason, it did not answer
            return f"{node.host}:{node.port}"
        return None
