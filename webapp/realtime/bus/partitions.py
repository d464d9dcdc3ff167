"""Which partition a channel belongs to, and the names a partition's channels and history have in Redis.

On one Redis node there is one partition: the history is one stream, channels keep their names
and travel by classic pub/sub. On a Redis Cluster there are several. Each has a hash tag of its
own, chosen so that the tags' slots are spread evenly over the slot space (any even split of
slots between shards then splits the partitions evenly too). A channel's name in Redis starts
with its partition's tag, so the channel, the stream that records it and the script that writes
both live in one slot: SPUBLISH reaches only that shard, and a publish never spans two slots.
"""

from __future__ import annotations

import zlib

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

# How many partitions a cluster's channels and histories are spread over: the most shards that
# share the load of publishing. Every instance of a fleet must agree, and the offsets clients
# hold name partitions, so changing it is a redeploy that ends recovery sessions.
CLUSTER_PARTITIONS = 16


class Partitions:
    """The partitions of one prefix: one on a single node (classic pub/sub, names unchanged), or
    `count` on a cluster (`sharded`: shard channels, every name tagged)."""

    def __init__(self, history_key: str, count: int = 1, *, sharded: bool = False) -> None:
        if count < 1 or (count > 1 and not sharded):
            raise ValueError("one partition, or a cluster's several")
        self.count = count
        self.sharded = sharded
        if not sharded:
            self._tags = [""]
            self._streams = [history_key]
            return
        base = history_key.replace("{", "").replace("}", "")
        self._tags = [_spread_tag(base, p, count) for p in range(count)]
        self._streams = [f"{{{tag}}}:replay" for tag in self._tags]
        self._by_tag = {f"{{{tag}}}": p for p, tag in enumerate(self._tags)}

    def of(self, channel: str) -> int:
        """The partition of a channel (its name as the app knows it)."""
        if not self.sharded:
            return 0
        return zlib.crc32(channel.encode()) % self.count

    def stream(self, partition: int) -> str:
        """The key of a partition's history stream."""
        return self._streams[partition]

    def wire(self, channel: str) -> str:
        """A channel's name in Redis."""
        if not self.sharded:
            return channel
        return f"{{{self._tags[self.of(channel)]}}}{channel}"

    def unwire(self, name: str) -> tuple[str, int] | None:
        """The app's name and the partition of a channel named in Redis; None for a name that
        is not one of ours (anyone can publish on any channel)."""
        if not self.sharded:
            return name, 0
        tag, brace, channel = name.partition("}")
        partition = self._by_tag.get(tag + brace)
        if partition is None or self.of(channel) != partition:
            return None
        return channel, partition


def _spread_tag(base: str, partition: int, count: int) -> str:
    """A tag whose slot lies in the partition's share of the slot space."""
    low = partition * REDIS_CLUSTER_HASH_SLOTS // count
    high = (partition + 1) * REDIS_CLUSTER_HASH_SLOTS // count
    for attempt in range(100_000):
        tag = f"{base}:{partition}.{attempt}"
        if low <= key_slot(tag.encode()) < high:
            return tag
    raise RuntimeError(f"no tag found for partition {partition} of {count}")  # not with count <= 16384
