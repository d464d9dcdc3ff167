"""Who is online and who is in which room, across the fleet, and safe against crashes.

Each instance writes its own share: for each user, how many of its sockets it holds, and for
each room, how many sockets of each user are in it. Shares are absolute counts written by one
writer task per instance, coalesced and pipelined, so a retried or reordered write can never
skew a count. Every instance heartbeats (`<prefix>:presence:instances`, a sorted set of expiry
times); answers count only instances whose heartbeat is fresh, so within PRESENCE_TTL of a
SIGKILL the dead instance's sockets are gone from every answer. A surviving instance then reaps
the dead share (it is indexed per instance, so no SCAN) and announces the leaves it causes.

A room's fleet-wide member set and each user's number of instances in it are kept by one Lua
script, which tells whether a write made the user join or leave the room fleet-wide: `presence`
events fire once per user, not per socket, whichever instance the sockets are on.

Without Redis (the in-memory bus) the instance's own counts are the whole truth.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from .bus import BusUnavailable
from .bus.cluster import REDIS_FAILURES, Client, Topology
from .bus.tls import TlsOptions

log = logging.getLogger(__name__)

# KEYS: room counts (hash), room members (sorted set, lex-ordered), this instance's share.
# ARGV: user, instance tag, count, room. Returns 1 when the user joined the room fleet-wide,
# -1 when they left it, 0 otherwise. Fields: `<user>|<tag>` -> sockets there, `<user>` ->
# instances where the user has sockets in the room (user ids have no `|`).
_ROOM_SCRIPT = """
local field = ARGV[1] .. '|' .. ARGV[2]
local count = tonumber(ARGV[3])
local before = tonumber(redis.call('HGET', KEYS[1], field) or '0')
local share_field = 'r|' .. ARGV[4] .. '|' .. ARGV[1]
if count > 0 then
  redis.call('HSET', KEYS[1], field, count)
  if KEYS[3] ~= '' then redis.call('HSET', KEYS[3], share_field, count) end
else
  redis.call('HDEL', KEYS[1], field)
  if KEYS[3] ~= '' then redis.call('HDEL', KEYS[3], share_field) end
end
if (before > 0) == (count > 0) then return 0 end
local instances = redis.call('HINCRBY', KEYS[1], ARGV[1], count > 0 and 1 or -1)
if count > 0 and instances == 1 then
  redis.call('ZADD', KEYS[2], 0, ARGV[1])
  return 1
end
if instances <= 0 then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
  return -1
end
return 0
"""

Announce = Callable[[str, str, str], Awaitable[None]]  # room, user, "join" | "leave"
PAGE_MAX = 1000


def _room_call(pipe: Any, counts: str, members: str, share: str, *args: object) -> None:
    """Queue the room script on a pipeline: EVAL, since redis-py loads a script before a pipeline
    runs it only on a single node (on a cluster, EVALSHA would meet NOSCRIPT), and Redis caches
    the script by its hash anyway; its three keys share presence's hash tag."""
    pipe.execute_command("EVAL", _ROOM_SCRIPT, 3, counts, members, share, *args)


@dataclass(frozen=True)
class UserPresence:
    user_id: str
    sockets: int
    instances: list[str]
    since: float | None

    def as_json(self) -> dict[str, Any]:
        since = datetime.fromtimestamp(self.since, tz=UTC).isoformat().replace("+00:00", "Z") if self.since else None
        return {
            "user_id": self.user_id,
            "online": self.sockets > 0,
            "sockets": self.sockets,
            "instances": self.instances,
            "since": since,
        }


class Presence:
    """This instance's share of presence, written to Redis (or kept in memory), and answers."""

    def __init__(
        self,
        prefix: str,
        tag: str,
        instance_id: str,
        *,
        redis_url: str | None,
        ttl: float = 15.0,
        timeout: float = 2.0,
        announce: Announce | None = None,
        announced_prefixes: Iterable[str] = (),
        tls: TlsOptions | None = None,
        topology: Topology | None = None,
    ) -> None:
        # One hash tag for every presence key: a script touches a room's keys and a share
        # together, and on a Redis Cluster those must live in one slot.
        self._prefix = f"{{{prefix}:presence}}"
        self._tag = tag
        self._instance_id = instance_id
        self._memory = redis_url is None  # one instance: presence is this instance's counts
        self._topology = topology if topology is not None or redis_url is None else Topology(
            redis_url, forced=None, timeout=timeout, tls=tls
        )
        self._ttl = ttl
        self._timeout = timeout
        self.announce = announce
        self._event_prefixes = tuple(announced_prefixes)
        self._members_here: set[tuple[str, str]] = set()  # memory mode: who is in which room
        self._redis: Client | None = None  # made once the topology is known
        self._users: Counter[str] = Counter()  # user -> sockets here
        self._rooms: Counter[tuple[str, str]] = Counter()  # (room, user) -> sockets here in the room
        self._since: dict[str, float] = {}
        self._dirty_users: set[str] = set()
        self._dirty_rooms: set[tuple[str, str]] = set()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.reaped = 0
        self.write_errors = 0

    # --- keys --------------------------------------------------------------------------------

    @property
    def _instances_key(self) -> str:
        return f"{self._prefix}:instances"

    @property
    def _names_key(self) -> str:
        return f"{self._prefix}:names"

    def _user_key(self, user_id: str) -> str:
        return f"{self._prefix}:user:{user_id}"

    def _room_counts_key(self, room: str) -> str:
        return f"{self._prefix}:room:{room}:counts"

    def _room_members_key(self, room: str) -> str:
        return f"{self._prefix}:room:{room}:members"

    def _share_key(self, tag: str) -> str:
        return f"{self._prefix}:share:{tag}"

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        if not self._memory:
            self._tasks.append(asyncio.create_task(self._heartbeat_forever(), name="presence-heartbeat"))
        self._tasks.append(asyncio.create_task(self._write_forever(), name="presence-writer"))

    async def _client(self) -> Client:
        """The Redis client, made at first use (the topology may need Redis to answer first)."""
        if self._redis is None:
            assert self._topology is not None
            client = await self._topology.client(
                socket_timeout=self._timeout, socket_connect_timeout=self._timeout,
                client_name=f"{self._prefix}:{self._tag}",
            )
            if self._redis is None:
                self._redis = client
            else:  # another caller made one while the topology was asked for
                await client.aclose()
        return self._redis

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._redis is not None:
            try:  # leave at once instead of after the TTL: a drained instance's users are gone now
                await self._redis.zrem(self._instances_key, self._tag)
                # Announced: the bus still runs (the propagator closes presence first). Users
                # who reconnect elsewhere are announced again when their new instance writes.
                await self._reap(self._tag)
            except REDIS_FAILURES as exc:
                log.warning("presence: could not withdraw this instance's share: %s", exc)
            finally:
                await self._redis.aclose()
                self._redis = None

    # --- this instance's sockets ---------------------------------------------------------------

    def socket_connected(self, user_id: str) -> None:
        if self._users[user_id] == 0:
            self._since[user_id] = time.time()
        self._users[user_id] += 1
        self._mark_user(user_id)

    def socket_disconnected(self, user_id: str) -> None:
        self._users[user_id] -= 1
        if self._users[user_id] <= 0:
            del self._users[user_id]
            self._since.pop(user_id, None)
        self._mark_user(user_id)

    def entered(self, room: str, user_id: str) -> None:
        self._rooms[room, user_id] += 1
        self._mark_room(room, user_id)

    def left(self, room: str, user_id: str) -> None:
        self._rooms[room, user_id] -= 1
        if self._rooms[room, user_id] <= 0:
            del self._rooms[room, user_id]
        self._mark_room(room, user_id)

    def _mark_user(self, user_id: str) -> None:
        self._dirty_users.add(user_id)
        self._wake.set()

    def _mark_room(self, room: str, user_id: str) -> None:
        self._dirty_rooms.add((room, user_id))
        self._wake.set()

    # --- writing --------------------------------------------------------------------------------

    async def _write_forever(self) -> None:
        backoff = 0.1
        while True:
            await self._wake.wait()
            self._wake.clear()
            users, rooms = self._dirty_users, self._dirty_rooms
            self._dirty_users, self._dirty_rooms = set(), set()
            try:
                transitions = await self._write(users, rooms)
            except REDIS_FAILURES as exc:
                # Counts are absolute: writing them again later is exact whatever landed.
                self.write_errors += 1
                self._dirty_users |= users
                self._dirty_rooms |= rooms
                log.warning("presence: write failed (%s); retrying in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                self._wake.set()
                continue
            backoff = 0.1
            # Together: the bus sends concurrent publishes in one round trip.
            await asyncio.gather(*(self._announce(room, user_id, status) for room, user_id, status in transitions))

    async def _write(self, users: set[str], rooms: set[tuple[str, str]]) -> list[tuple[str, str, str]]:
        """Write the current counts of what changed; the fleet-wide room joins and leaves."""
        if self._memory:
            return self._memory_transitions(rooms)
        share = self._share_key(self._tag)
        async with (await self._client()).pipeline(transaction=False) as pipe:
            # One command per user (`<count>|<since>` under this instance's tag), and the share
            # in one command for all of them: a connect storm costs few commands.
            shared: dict[str, int] = {}
            gone: list[str] = []
            for user_id in users:
                count, key = self._users[user_id], self._user_key(user_id)
                if count:
                    pipe.hset(key, self._tag, f"{count}|{self._since.get(user_id, time.time())!r}")
                    shared[f"u|{user_id}"] = count
                else:
                    pipe.hdel(key, self._tag)
                    gone.append(f"u|{user_id}")
            if shared:
                pipe.hset(share, mapping=shared)  # type: ignore[arg-type]
            if gone:
                pipe.hdel(share, *gone)
            ordered = sorted(rooms)
            for room, user_id in ordered:
                _room_call(
                    pipe, self._room_counts_key(room), self._room_members_key(room), share,
                    user_id, self._tag, self._rooms[room, user_id], room,
                )
            results = await pipe.execute()
        room_results = results[len(results) - len(ordered):] if ordered else []
        return [
            (room, user_id, "join" if result == 1 else "leave")
            for (room, user_id), result in zip(ordered, room_results, strict=True)
            if result in (1, -1)
        ]

    def _memory_transitions(self, rooms: set[tuple[str, str]]) -> list[tuple[str, str, str]]:
        """Without Redis this instance is the fleet: a user joins a room with their first socket in it."""
        transitions = []
        for room, user_id in sorted(rooms):
            present = self._rooms[room, user_id] > 0
            if present != ((room, user_id) in self._members_here):
                (self._members_here.add if present else self._members_here.discard)((room, user_id))
                transitions.append((room, user_id, "join" if present else "leave"))
        return transitions

    async def _announce(self, room: str, user_id: str, status: str) -> None:
        if self.announce is None or not room.startswith(self._event_prefixes):
            return
        try:
            await self.announce(room, user_id, status)
        except BusUnavailable as exc:
            log.warning("presence: could not announce %s %s %s: %s", user_id, status, room, exc)

    # --- heartbeats and the dead ---------------------------------------------------------------

    async def _heartbeat_forever(self) -> None:
        first = True
        while True:
            try:
                await self._heartbeat(first)
                first = False
                await self._reap_the_dead()
            except REDIS_FAILURES as exc:
                log.warning("presence: heartbeat failed: %s", exc)
            await asyncio.sleep(self._ttl / 3)

    async def _heartbeat(self, first: bool) -> None:
        async with (await self._client()).pipeline(transaction=False) as pipe:
            pipe.zscore(self._instances_key, self._tag)
            pipe.zadd(self._instances_key, {self._tag: (time.time() + self._ttl) * 1000})
            pipe.hset(self._names_key, self._tag, self._instance_id)
            known, *_ = await pipe.execute()
        if known is None and not first:
            # Redis lost our share (a restart), or others reaped us while we were cut off:
            # write all of it again.
            log.warning("presence: this instance's share was gone; writing it again")
            self._dirty_users |= set(self._users)
            self._dirty_rooms |= set(self._rooms)
            self._wake.set()

    async def _reap_the_dead(self) -> None:
        dead = await (await self._client()).zrangebyscore(self._instances_key, "-inf", time.time() * 1000)
        for raw in dead:
            tag = raw.decode() if isinstance(raw, bytes) else str(raw)
            if tag == self._tag:
                continue
            # One reaper per dead instance; the lock outlives a slow reap.
            if await (await self._client()).set(f"{self._prefix}:reaping:{tag}", self._tag, nx=True, px=60_000):
                await self._reap(tag)
                self.reaped += 1

    async def _reap(self, tag: str) -> None:
        """Remove an instance's share from every answer; announce the leaves it causes."""
        share = await (await self._client()).hgetall(self._share_key(tag))
        rooms: list[tuple[str, str]] = []
        async with (await self._client()).pipeline(transaction=False) as pipe:
            # Rooms first: their results lead the pipeline's answers.
            for raw_field in share:
                kind, _, rest = _text(raw_field).partition("|")
                if kind == "r":
                    room, _, user_id = rest.rpartition("|")
                    rooms.append((room, user_id))
                    _room_call(
                        pipe, self._room_counts_key(room), self._room_members_key(room), self._share_key(tag),
                        user_id, tag, 0, room,
                    )
            for raw_field in share:
                kind, _, user_id = _text(raw_field).partition("|")
                if kind == "u":
                    pipe.hdel(self._user_key(user_id), tag)
            pipe.delete(self._share_key(tag))
            pipe.zrem(self._instances_key, tag)
            pipe.hdel(self._names_key, tag)
            results = await pipe.execute()
        await asyncio.gather(*(
            self._announce(room, user_id, "leave")
            for (room, user_id), result in zip(rooms, results[: len(rooms)], strict=True)
            if result == -1
        ))

    # --- answers ---------------------------------------------------------------------------------

    async def _alive(self) -> dict[str, str]:
        """Instances whose heartbeat is fresh: tag -> instance id."""
        if self._memory:
            return {self._tag: self._instance_id}
        tags = [
            t.decode() if isinstance(t, bytes) else str(t)
            for t in await (await self._client()).zrangebyscore(self._instances_key, time.time() * 1000, "+inf")
        ]
        if not tags:
            return {}
        names = await (await self._client()).hmget(self._names_key, tags)
        return {tag: (name.decode() if isinstance(name, bytes) else tag) for tag, name in zip(tags, names, strict=True)}

    async def users(self, user_ids: list[str]) -> list[UserPresence]:
        """The presence of each user, across the fleet."""
        try:
            if self._memory:
                return [
                    UserPresence(u, self._users[u], [self._instance_id] if self._users[u] else [], self._since.get(u))
                    for u in user_ids
                ]
            alive = await self._alive()
            async with (await self._client()).pipeline(transaction=False) as pipe:
                for user_id in user_ids:
                    pipe.hgetall(self._user_key(user_id))
                found = await pipe.execute()
        except REDIS_FAILURES as exc:
            raise BusUnavailable(f"Redis did not answer: {exc}") from None
        return [self._user_from(user_id, fields, alive) for user_id, fields in zip(user_ids, found, strict=True)]

    @staticmethod
    def _user_from(user_id: str, fields: dict[Any, Any], alive: dict[str, str]) -> UserPresence:
        values = {
            (k.decode() if isinstance(k, bytes) else str(k)): (v.decode() if isinstance(v, bytes) else str(v))
            for k, v in fields.items()
        }
        sockets, instances, since = 0, [], None
        for tag, name in alive.items():
            count, _, started = values.get(tag, "0|0").partition("|")
            if int(count) > 0:
                sockets += int(count)
                instances.append(name)
                since = float(started) if since is None else min(since, float(started))
        return UserPresence(user_id, sockets, sorted(instances), since)

    async def room(self, room: str, after: str | None = None, limit: int = PAGE_MAX) -> tuple[list[dict[str, Any]], str | None]:
        """A page of a room's members (users, in id order, after `after`) with their socket
        counts across the fleet, and the cursor of the next page (None on the last)."""
        limit = max(1, min(limit, PAGE_MAX))
        if self._memory:
            members = sorted(u for (r, u), n in self._rooms.items() if r == room and n > 0 and (after is None or u > after))
            page = members[:limit]
            return (
                [{"user_id": u, "sockets": self._rooms[room, u]} for u in page],
                page[-1] if len(members) > limit else None,
            )
        try:
            alive = list(await self._alive())
            low = f"({after}" if after else "-"
            raw = await (await self._client()).zrangebylex(self._room_members_key(room), low, "+", start=0, num=limit + 1)
            users = [u.decode() if isinstance(u, bytes) else str(u) for u in raw]
            page, more = users[:limit], len(users) > limit
            counts: list[Any] = []
            if page and alive:
                counts = await (await self._client()).hmget(
                    self._room_counts_key(room), [f"{u}|{tag}" for u in page for tag in alive]
                )
        except REDIS_FAILURES as exc:
            raise BusUnavailable(f"Redis did not answer: {exc}") from None
        listed: list[dict[str, Any]] = []
        for index, user_id in enumerate(page):
            chunk = counts[index * len(alive): (index + 1) * len(alive)] if counts else []
            sockets = sum(int(c) for c in chunk if c is not None)
            if sockets > 0:  # a user only on an instance that died is not a member any more
                listed.append({"user_id": user_id, "sockets": sockets})
        return listed, (page[-1] if more else None)

    def status(self) -> dict[str, Any]:
        return {
            "users_here": len(self._users),
            "room_memberships_here": len(self._rooms),
            "reaped_instances": self.reaped,
            "write_errors": self.write_errors,
        }


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
