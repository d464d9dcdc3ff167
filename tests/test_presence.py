"""Presence across three instances: who is online, who is in a room, join and leave events once
per user, and answers that forget a SIGKILLed instance within PRESENCE_TTL."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
import redis
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from .conftest import BACKENDS, Cluster, on_backend
from .harness import (
    MODEL_RANDOM,
    WAIT,
    Instance,
    LoopThread,
    Probe,
    api,
    fence,
    holds_for,
    run_machine,
    token_for,
    unique,
    wait_until,
)

pytestmark = pytest.mark.cluster

TTL = 2.0  # PRESENCE_TTL of these instances: a dead one is forgotten within it


@pytest.fixture(scope="module", params=BACKENDS)
def fleet(request: pytest.FixtureRequest, redis_client: redis.Redis) -> Iterator[Cluster]:
    """Three instances on one Redis node, then on a Redis Cluster (presence's scripts touch
    several keys at once: on a cluster they must share a slot)."""
    with on_backend(request, redis_client, "presence", ("A", "B", "C"), PRESENCE_TTL=str(TTL)) as started:
        yield started


async def connect(probes: list[Probe], instance: Instance, user: str) -> Probe:
    probe = Probe(f"{user}@{instance.name}")
    probes.append(probe)
    return await probe.connect(instance.url, await token_for(instance.url, user))


async def get(base: str, path: str) -> Any:
    status, answer = await api(base, path, method="GET")
    assert status == 200, answer
    return answer


async def test_a_user_is_online_with_every_socket_on_every_instance(fleet: Cluster, probes: list[Probe]) -> None:
    a, b, c = fleet.instances
    user, absent = unique("uma"), unique("nobody")
    started = time.time()
    sockets = [await connect(probes, a, user), await connect(probes, a, user), await connect(probes, b, user)]

    async def presence() -> Any:
        return await get(c.url, f"/api/users/{user}/presence")

    await wait_until(lambda: _async_true(presence, lambda p: p["sockets"] == 3), "three sockets counted")
    answer = await presence()
    assert (answer["online"], answer["sockets"], answer["instances"]) == (True, 3, ["A", "B"])
    assert answer["since"].endswith("Z") and _epoch(answer["since"]) >= started - 1

    status, many = await api(b.url, "/api/presence", {"user_ids": [user, absent]})
    assert status == 200
    assert [(u["user_id"], u["online"], u["sockets"]) for u in many["users"]] == [(user, True, 3), (absent, False, 0)]
    assert many["users"][1] == {"user_id": absent, "online": False, "sockets": 0, "instances": [], "since": None}

    for probe in sockets:
        await probe.close()
    await wait_until(lambda: _async_true(presence, lambda p: not p["online"]), "the user to go offline")
    for body in ({"user_ids": []}, {"user_ids": ["bad id"]}, {"user_ids": ["u"] * 1001}, {"users": ["u"]}):
        status, answer = await api(a.url, "/api/presence", body)
        assert (status, answer["error"]["code"]) == (422, "invalid_fields"), body


async def test_room_members_see_each_user_join_and_leave_once(fleet: Cluster, probes: list[Probe]) -> None:
    a, b, c = fleet.instances
    room, alice, bob = f"public:{unique('hall')}", unique("alice"), unique("bob")
    watcher = await connect(probes, c, bob)
    assert (await watcher.client.call("join", {"room": room}, timeout=WAIT))["ok"]
    await watcher.wait_for("presence")  # bob's own join
    tabs = [await connect(probes, a, alice), await connect(probes, b, alice)]
    for tab in tabs:
        assert (await tab.client.call("join", {"room": room}, timeout=WAIT))["ok"]
    await watcher.wait_for("presence", 2)

    members = await get(a.url, f"/api/rooms/{room}/presence")
    assert members == {
        "room": room,
        "members": sorted([{"user_id": alice, "sockets": 2}, {"user_id": bob, "sockets": 1}], key=lambda m: m["user_id"]),
        "next": None,
    }
    await tabs[0].close()  # alice is still in the room on B: nothing to announce
    await wait_until(
        lambda: _async_true(lambda: get(a.url, f"/api/rooms/{room}/presence"),
                            lambda p: {"user_id": alice, "sockets": 1} in p["members"]),
        "alice's count to drop",
    )
    await tabs[1].close()
    await watcher.wait_for("presence", 3)
    await fence(c.url, [watcher])
    assert watcher.of("presence") == [
        {"room": room, "user": bob, "status": "join"},
        {"room": room, "user": alice, "status": "join"},
        {"room": room, "user": alice, "status": "leave"},
    ]
    assert (await get(b.url, f"/api/rooms/{room}/presence"))["members"] == [{"user_id": bob, "sockets": 1}]


async def test_room_presence_pages_in_user_order(fleet: Cluster, probes: list[Probe]) -> None:
    a, b, _ = fleet.instances
    room = f"team:{unique('pages')}"
    users = sorted(unique(f"p{n}") for n in range(5))
    for n, user in enumerate(users):
        assert (await api(a.url, f"/api/users/{user}/rooms/{room}", method="PUT"))[0] == 200
        await connect(probes, (a, b)[n % 2], user)
    path = f"/api/rooms/{room}/presence"
    await wait_until(lambda: _async_true(lambda: get(a.url, path), lambda p: len(p["members"]) == 5), "five members")
    seen, after = [], None
    while True:
        page = await get(b.url, path + "?limit=2" + (f"&after={after}" if after else ""))
        assert len(page["members"]) <= 2
        seen += [m["user_id"] for m in page["members"]]
        after = page["next"]
        if after is None:
            break
    assert seen == users
    for query in ("?limit=0", "?limit=1001", "?limit=x", "?after=bad%20id"):
        status, answer = await api(a.url, path + query, method="GET")
        assert (status, answer["error"]["code"]) == (422, "invalid_fields"), query


async def two_in_a_room(fleet: Cluster, probes: list[Probe], at: int) -> tuple[str, Probe, str, str]:
    """A watcher on instance A and another user on instance `at`, both in a new public room:
    the room, the watcher (who has seen both joins), the watcher's user and the other user."""
    room, watching, other = f"public:{unique('room')}", unique("watcher"), unique("other")
    watcher = await connect(probes, fleet.instances[0], watching)
    assert (await watcher.client.call("join", {"room": room}, timeout=WAIT))["ok"]
    elsewhere = await connect(probes, fleet.instances[at], other)
    assert (await elsewhere.client.call("join", {"room": room}, timeout=WAIT))["ok"]
    await watcher.wait_for("presence", 2)
    return room, watcher, watching, other


async def last_asked_online(base: str, user: str, timeout: float) -> float:
    """Ask for `user`'s presence until an answer says offline; when the last answer saying online
    was asked (time.monotonic(); now if the first one says offline)."""
    last = time.monotonic()
    deadline = last + timeout
    while True:
        asked = time.monotonic()
        if not (await get(base, f"/api/users/{user}/presence"))["online"]:
            return last
        assert asked < deadline, f"{user} still online after {timeout}s"
        last = asked
        await asyncio.sleep(0.02)


async def test_a_killed_instance_is_forgotten_within_the_ttl_and_its_leaves_announced(
    fleet: Cluster, probes: list[Probe]
) -> None:
    a, b, c = fleet.instances
    room, dave, carol, erin = f"public:{unique('room')}", unique("watcher"), unique("carol"), unique("erin")
    watcher = await connect(probes, a, dave)
    assert (await watcher.client.call("join", {"room": room}, timeout=WAIT))["ok"]
    # carol: two sockets in the room, both on B (the instance that dies); erin: one on B, one on C
    members = [await connect(probes, b, carol), await connect(probes, b, carol)]
    members += [await connect(probes, b, erin), await connect(probes, c, erin)]
    for member in members:
        assert (await member.client.call("join", {"room": room}, timeout=WAIT))["ok"]
    await watcher.wait_for("presence", 3)  # dave, carol and erin joined: once per user

    killed = time.monotonic()
    b.stop(signal.SIGKILL)  # no goodbye from the instance
    try:
        # Answers count only fresh heartbeats: none says carol is online once PRESENCE_TTL has passed.
        last_online = await last_asked_online(c.url, carol, timeout=TTL * 2 + WAIT)
        assert last_online - killed < TTL, f"carol still counted {last_online - killed:.1f}s after the kill"
        await watcher.wait_for("presence", 4, timeout=TTL * 2 + WAIT)
        took = watcher.arrivals[[n for n, (e, _) in enumerate(watcher.events) if e == "presence"][3]] - killed
        # The heartbeat runs every TTL/3: the share expires within TTL of the kill, and a survivor's
        # reaper, as often, finds it within TTL/3 more.
        assert took < TTL * 2, f"the leave came {took:.1f}s after the kill"
        # Once per user: carol's two sockets are one leave, and erin, still in the room on C, none,
        # whichever survivor reaps (a window of three reaper periods, then a fence).
        await holds_for(lambda: len(watcher.of("presence")) == 4, "no other presence event", TTL)
    finally:
        fleet.restart(1)  # the fleet serves the module's other tests
    await fence(a.url, [watcher])
    assert Counter((p["user"], p["status"]) for p in watcher.of("presence")) == Counter(
        {(dave, "join"): 1, (carol, "join"): 1, (erin, "join"): 1, (carol, "leave"): 1}
    )
    assert watcher.of("presence")[-1] == {"room": room, "user": carol, "status": "leave"}
    answer = await get(c.url, f"/api/users/{carol}/presence")
    assert answer["online"] is False and answer["sockets"] == 0
    answer = await get(c.url, f"/api/users/{erin}/presence")
    assert (answer["sockets"], answer["instances"]) == (1, ["C"])
    listed = (await get(a.url, f"/api/rooms/{room}/presence"))["members"]
    assert listed == sorted([{"user_id": dave, "sockets": 1}, {"user_id": erin, "sockets": 1}], key=lambda m: m["user_id"])


async def test_a_drained_instance_announces_its_users_leaving(fleet: Cluster, probes: list[Probe]) -> None:
    room, watcher, _, erin = await two_in_a_room(fleet, probes, at=2)
    fleet.restart(2, signal.SIGTERM)  # a drain: the client is told to go elsewhere, and does not
    await watcher.wait_for("presence", 3)
    assert watcher.of("presence")[-1] == {"room": room, "user": erin, "status": "leave"}
    assert (await get(fleet.instances[1].url, f"/api/users/{erin}/presence"))["online"] is False


# --- a model: random connects, disconnects, joins, leaves and kills ---------------------------

USERS = ["u1", "u2", "u3"]
ROOMS = ["public:m1", "public:m2"]
MODEL_RUNS, MODEL_STEPS = 50, 30
# A kill (SIGKILL, restart, expiry) costs seconds, the other steps milliseconds: a run may kill,
# once, if it draws the last of these tickets (3 of the 50 derandomised runs do). Drawn in the run,
# so a replayed or shrunk run makes the same choices.
KILL_TICKETS = 4


class PresenceModel(RuleBasedStateMachine):
    """Counts over three instances must equal the model's exactly at a fence after every step,
    and within PRESENCE_TTL of a kill."""

    fleet: Cluster
    loop: LoopThread
    steps_run: int
    kills_run: int

    def __init__(self) -> None:
        super().__init__()
        self.run = unique("pm")
        self.sockets: list[tuple[Probe, str, int, set[str]]] = []  # probe, user, instance, rooms
        self.touched: set[int] = set()  # instances with presence changes the next check must fence
        self.killed_at: float | None = None
        self.fences: dict[int, Probe] = {}  # a socket per instance, joining and leaving its fence room
        self.fenced_in: dict[int, bool] = {}
        self.may_kill = False

    def user(self, name: str) -> str:
        return f"{self.run}-{name}"

    def room(self, name: str) -> str:
        return f"{name}-{self.run}"

    def fence_room(self, instance: int) -> str:
        # Written last in its instance's round of presence writes: users come first, then rooms in
        # name order, and "public:zz" sorts after every room of the model.
        return f"public:zz-fence-{self.run}-{instance}"

    @initialize(ticket=st.sampled_from(range(KILL_TICKETS)))
    def tokens(self, ticket: int) -> None:
        self.may_kill = ticket == KILL_TICKETS - 1
        base = self.fleet.instances[0].url
        self.tokens_of = {u: self.loop.run(token_for(base, self.user(u))) for u in [*USERS, "fence"]}

    @precondition(lambda self: len(self.sockets) < 7)
    @rule(user=st.sampled_from(USERS), instance=st.integers(0, 2))
    def connect(self, user: str, instance: int) -> None:
        probe = Probe(user)
        self.loop.run(probe.connect(self.fleet.instances[instance].url, self.tokens_of[user]))
        self.sockets.append((probe, user, instance, set()))
        self.touched.add(instance)

    @precondition(lambda self: self.sockets)
    @rule(pick=st.integers(0, 6))
    def disconnect(self, pick: int) -> None:
        probe, _, instance, _ = self.sockets.pop(pick % len(self.sockets))
        self.loop.run(probe.close())
        self.touched.add(instance)

    @precondition(lambda self: self.sockets)
    @rule(pick=st.integers(0, 6), room=st.sampled_from(ROOMS), join=st.booleans())
    def join_or_leave(self, pick: int, room: str, join: bool) -> None:
        probe, _, instance, rooms = self.sockets[pick % len(self.sockets)]
        ack = self.loop.run(probe.client.call("join" if join else "leave", {"room": self.room(room)}, timeout=10))
        assert ack["ok"], ack
        (rooms.add if join else rooms.discard)(room)
        self.touched.add(instance)

    @precondition(lambda self: self.may_kill)
    @rule(instance=st.integers(0, 2))
    def kill(self, instance: int) -> None:
        self.may_kill = False  # once per run
        PresenceModel.kills_run += 1
        self.killed_at = time.monotonic()
        self.fleet.restart(instance)  # SIGKILL, then a new process on the same port
        for entry in [s for s in self.sockets if s[2] == instance]:
            self.sockets.remove(entry)
            self.loop.run(entry[0].close())
        fence = self.fences.pop(instance, None)
        if fence is not None:
            self.loop.run(fence.close())
        self.touched.discard(instance)

    @invariant()
    def answers_match_the_model(self) -> None:
        PresenceModel.steps_run += 1
        if self.killed_at is not None:
            # Answers count only fresh heartbeats: exact within PRESENCE_TTL of the kill.
            left = self.killed_at + TTL - time.monotonic()
            self.loop.run(wait_until(self.matches, "presence to match the model after a kill", timeout=max(left, 0.0)))
            self.killed_at = None
        for instance in sorted(self.touched):
            self.loop.run(self.written(instance))
        self.touched.clear()
        assert self.loop.run(self.matches()), "presence does not match the model at a fence"

    async def written(self, instance: int) -> None:
        """Return once every presence change made on `instance` so far is in Redis: a fence.

        Each instance writes presence with one task, a round at a time, each round one pipeline:
        users, then rooms in name order. The fence socket joins (or leaves) its fence room, whose
        name sorts last; once an answer shows that, the round holding it has been written whole,
        and with it every change made before."""
        server = self.fleet.instances[instance]
        fence = self.fences.get(instance)
        # A disconnect reaches the server after the client closed: wait until it has counted it.
        held = sum(1 for s in self.sockets if s[2] == instance) + (fence is not None)
        await wait_until(lambda: server.status()[1]["sockets"] == held, f"{server.name} to hold {held} sockets")
        if fence is None:
            fence = self.fences[instance] = await Probe("fence").connect(server.url, self.tokens_of["fence"])
            self.fenced_in[instance] = False
        joining = not self.fenced_in[instance]
        room = self.fence_room(instance)
        assert (await fence.client.call("join" if joining else "leave", {"room": room}, timeout=WAIT))["ok"]
        self.fenced_in[instance] = joining

        async def shows_it() -> bool:
            members = (await get(server.url, f"/api/rooms/{room}/presence"))["members"]
            return bool(members) is joining

        await wait_until(shows_it, f"{server.name}'s fence room to show the fence")

    async def matches(self) -> bool:
        base = self.fleet.instances[0].url
        users = Counter(user for _, user, _, _ in self.sockets)
        rooms = {room: Counter(u for _, u, _, r in self.sockets if room in r) for room in ROOMS}
        asked = await asyncio.gather(
            api(base, "/api/presence", {"user_ids": [self.user(u) for u in USERS]}),
            *(get(base, f"/api/rooms/{self.room(room)}/presence") for room in ROOMS),
        )
        status, many = asked[0]
        assert status == 200, many
        if [p["sockets"] for p in many["users"]] != [users[u] for u in USERS]:
            return False
        for room, page in zip(ROOMS, asked[1:], strict=True):
            expected = sorted(
                ({"user_id": self.user(u), "sockets": n} for u, n in rooms[room].items() if n),
                key=lambda m: str(m["user_id"]),
            )
            if page["members"] != expected:
                return False
        return True

    def teardown(self) -> None:
        for probe in [p for p, *_ in self.sockets] + list(self.fences.values()):
            self.loop.run(probe.close())


@pytest.mark.timeout(300)  # about 35 s a backend here; a failure's shrinking takes longer
def test_presence_counts_stay_exact_under_churn_and_kills(fleet: Cluster) -> None:
    """MODEL_RUNS runs of up to MODEL_STEPS steps, the same ones every time unless MODEL_RANDOM=1."""
    PresenceModel.fleet = fleet
    PresenceModel.steps_run = PresenceModel.kills_run = 0
    started = time.monotonic()
    with LoopThread.running() as PresenceModel.loop:
        run_machine(PresenceModel, examples=MODEL_RUNS, steps=MODEL_STEPS, derandomize=not MODEL_RANDOM)
    print(f"presence model: {PresenceModel.steps_run} checks, {PresenceModel.kills_run} kills, "
          f"{time.monotonic() - started:.1f} s")


async def _async_true(fetch: Any, check: Any) -> bool:
    return bool(check(await fetch()))


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()
