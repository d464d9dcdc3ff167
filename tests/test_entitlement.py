"""Who may receive what, from which offset, where rooms, backend ops and recovery meet: over two
instances with stock clients, a socket gets an event only if it was a member of the event's
channel at the event's offset, live, after an instance's catch-up, and on recovery."""

from __future__ import annotations

import hashlib
import json
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
import pytest
import redis

from webapp.realtime.bus import RedisBus

from .harness import (
    REDIS_URL,
    WAIT,
    Instance,
    Probe,
    api,
    instance_env,
    start_pair,
    token_for,
    unique,
    wait_until,
)
from .proxy import TcpProxy
from .test_recovery import Wire, emit

FORBIDDEN = {"ok": False, "error": "forbidden"}


def fleet(instances: list[Instance], prefix: str, names: tuple[str, ...] = ("A", "B"), **env: str) -> list[Instance]:
    """Instances of tests.open_app: any room but the scopes' own may be joined (`team:` rooms
    here, which announce no presence), and python-socketio's API is at hand (`api_close`)."""
    started = [Instance(name, instance_env(prefix, **env), app="tests.open_app:app").start() for name in names]
    instances.extend(started)
    for instance in started:
        instance.wait_serving()
    return started


async def call(wire: Wire, event: str, data: Any, ack: int = 7) -> Any:
    """Send an event with an ack id over the raw socket; the ack's argument."""
    await wire.ws.send_str(f"42{ack}" + json.dumps([event, data]))
    while True:
        text = await wire._text(WAIT)
        if text.startswith(f"43{ack}"):
            return json.loads(text[2 + len(str(ack)):])[0]


async def put(base: str, user: str, room: str, *, member: bool = True) -> None:
    status, answer = await api(base, f"/api/users/{user}/rooms/{room}", method="PUT" if member else "DELETE")
    assert status == 200, answer


async def emit_room(base: str, room: str, data: Any) -> None:
    await emit(base, f"/api/emit/rooms/{room}", "news", data)


async def opted_in(base: str, user: str, wires: list[Wire]) -> tuple[Wire, str]:
    """A socket of `user` that opted in to recovery, and the user's token."""
    token = await token_for(base, user)
    wire = await Wire.connect(base, {"token": token, "recover": True})
    wires.append(wire)
    return wire, token


async def resume(base: str, token: str, gone: Wire, offset: str, wires: list[Wire]) -> Wire:
    """The same session back, on `base`, from `offset`."""
    back = await Wire.connect(base, {"token": token, "recover": True, "pid": gone.reply["pid"], "offset": offset})
    wires.append(back)
    return back


async def next_events(wire: Wire, until: str) -> list[list[Any]]:
    """Events up to and including the first `until` event, without their offsets."""
    return [e[:2] for e in await wire.events_until(until)]


@asynccontextmanager
async def recorder(prefix: str) -> AsyncIterator[RedisBus]:
    """A bus of the test's own on the instances' history: it publishes exactly the bytes it is
    given, through the same script, as a retried publish whose first reply was lost would."""
    bus = RedisBus(REDIS_URL, history_key=f"{{{prefix}}}:replay", epoch_key=f"{{{prefix}}}:epoch")

    async def ignore(*_: Any) -> None:
        return None

    await bus.start(ignore, ignore)
    try:
        await wait_until(lambda: bus.ready, "the test's bus to boot")
        yield bus
    finally:
        await bus.close()


def user_envelope(user: str, event: str, data: Any, *, sid: str | None = None) -> bytes:
    return orjson.dumps({
        "v": 1, "id": hashlib.sha256(f"{user}{event}{data}".encode()).hexdigest()[:32], "scope": "user",
        "event": event, "data": data, "user_id": user, "origin": {"instance": "elsewhere", "sid": sid}, "ts": 1.0,
    })


# --- C. the scopes' own rooms are nobody's to join, leave, send to or list ---------------------


async def test_the_scopes_rooms_are_refused_whatever_the_join_policy(
    instances: list[Instance], probes: list[Probe]
) -> None:
    """alice may not room_send to `authenticated` (bob, elsewhere and in no room with her, gets
    nothing), nor join, leave or list it, a user's room, a sid or a node, even where the join
    policy grants every room."""
    a, b = fleet(instances, unique("scopes"))
    alice, bob = unique("alice"), unique("bob")
    asker = Probe("alice@A")
    listener = Probe("bob@B")
    probes.extend([asker, listener])
    await asker.connect(a.url, await token_for(a.url, alice))
    await listener.connect(b.url, await token_for(b.url, bob))
    reserved = ["authenticated", f"user:{bob}", f"user:{alice}", listener.sid, "node:abcdefgh"]
    for room in reserved:
        for event in ("join", "leave", "room_send", "who"):
            ack = await asker.client.call(event, {"room": room, "text": "x"}, timeout=WAIT)
            assert ack == FORBIDDEN, (event, room, ack)
    granted = await asker.client.call("join", {"room": "team:anything"}, timeout=WAIT)
    assert granted == {"ok": True, "room": "team:anything"}  # the policy is open for real rooms
    await emit(a.url, f"/api/emit/users/{bob}", "fence", 1)  # after every refused send, on B's one partition
    await listener.wait_for("fence")
    assert listener.of("room_message") == [], listener.events
    assert [e["code"] for e in asker.of("error")] == ["forbidden"] * 4 * len(reserved)


# --- B. recovery replays only what the socket was entitled to -------------------------------------


async def test_recovery_does_not_replay_a_rooms_past_to_a_socket_put_in_it_while_away(
    instances: list[Instance], wires: list[Wire]
) -> None:
    a, b = fleet(instances, unique("entitled-put"))
    carol = unique("carol")
    room = f"team:{unique('secret')}"
    wire, token = await opted_in(a.url, carol, wires)
    await emit(b.url, f"/api/emit/users/{carol}", "dm", "hello")
    _, _, offset = await wire.event()
    await wire.close()  # a blink
    await emit_room(b.url, room, "secret")  # before she is a member
    await put(b.url, carol, room)
    await emit_room(b.url, room, "welcome")  # after
    back = await resume(b.url, token, wire, offset, wires)
    assert await next_events(back, "recovered") == [["news", "welcome"], ["recovered", {"missed": 1}]]


@pytest.mark.parametrize("when", ["live", "while away"])
async def test_a_room_the_backend_took_away_does_not_come_back_on_recovery(
    when: str, instances: list[Instance], wires: list[Wire]
) -> None:
    a, b = fleet(instances, unique("entitled-delete"))
    dave = unique("dave")
    room = f"team:{unique('x')}"
    wire, token = await opted_in(a.url, dave, wires)
    assert await call(wire, "join", {"room": room}) == {"ok": True, "room": room}  # by himself
    await emit_room(b.url, room, "member")
    _, _, offset = await wire.event()
    if when == "live":
        await put(b.url, dave, room, member=False)
        await emit_room(b.url, room, "after the delete")
        await emit(b.url, f"/api/emit/users/{dave}", "dm", "fence")
        got = await wire.event()
        assert got[:2] == ["dm", "fence"]  # out of the room, live (one partition: in order)
        offset = got[2]
    await wire.close()  # a blink
    if when == "while away":
        await put(b.url, dave, room, member=False)
    await emit_room(b.url, room, "while away")
    back = await resume(b.url, token, wire, offset, wires)
    await emit_room(a.url, room, "later")
    await emit(a.url, f"/api/emit/users/{dave}", "dm", "fence 2")
    # `recovered` comes when the history held anything on its channels since (not when live)
    assert await next_events(back, "dm") in (
        [["recovered", {"missed": 0}], ["dm", "fence 2"]], [["dm", "fence 2"]]
    )
    assert await call(back, "who", {"room": room}) == FORBIDDEN  # not a member any more


async def test_a_room_closed_while_away_is_not_rejoined(instances: list[Instance], wires: list[Wire]) -> None:
    a, b = fleet(instances, unique("entitled-close"))
    erin = unique("erin")
    room = f"team:{unique('closing')}"
    wire, token = await opted_in(a.url, erin, wires)
    assert await call(wire, "join", {"room": room}) == {"ok": True, "room": room}
    await emit_room(b.url, room, "member")
    _, _, offset = await wire.event()
    await wire.close()
    closer = await Wire.connect(b.url, {"token": await token_for(b.url, unique("admin"))})
    wires.append(closer)
    assert await call(closer, "api_close", {"room": room}) == {"ok": True, "result": None}
    await emit_room(b.url, room, "after the close")
    back = await resume(b.url, token, wire, offset, wires)
    assert await next_events(back, "recovered") == [["recovered", {"missed": 0}]]
    assert await call(back, "api_rooms", None) == sorted([back.reply["sid"], f"user:{erin}", "authenticated"])


async def test_a_sigkilled_sessions_self_join_replays_nothing_from_before_it(
    instances: list[Instance], wires: list[Wire], redis_client: redis.Redis
) -> None:
    """Suspicion: on one Redis node, with no leave record (SIGKILL), events sent to a room before
    the socket joined it were replayed. Held: the session's rooms carry the offset they began at."""
    prefix = unique("entitled-kill")
    a, b = fleet(instances, prefix)
    frank = unique("frank")
    room = f"team:{unique('late')}"
    wire, token = await opted_in(a.url, frank, wires)
    await emit(b.url, f"/api/emit/users/{frank}", "dm", "first")
    _, _, offset = await wire.event()
    await emit_room(b.url, room, "before the join")
    assert await call(wire, "join", {"room": room}) == {"ok": True, "room": room}
    key = f"{prefix}:recovery:{hashlib.sha256(wire.reply['pid'].encode()).hexdigest()[:32]}:rooms"
    await wait_until(lambda: room.encode() in (redis_client.get(key) or b""), "the session's rooms written")
    a.stop(signal.SIGKILL)
    await wire.close()
    await emit_room(b.url, room, "after the join")
    back = await resume(b.url, token, wire, offset, wires)
    assert await next_events(back, "recovered") == [["news", "after the join"], ["recovered", {"missed": 1}]]


# --- D. exactly once on both paths ------------------------------------------------------------


async def test_an_answer_recorded_twice_is_replayed_once(instances: list[Instance], wires: list[Wire]) -> None:
    """Suspicion: replay did not de-duplicate by envelope id, so a gateway answer the outbox
    retried after a lost reply reached a recovering socket twice."""
    prefix = unique("entitled-twice")
    a, b = fleet(instances, prefix)
    gina = unique("gina")
    wire, token = await opted_in(a.url, gina, wires)
    await emit(b.url, f"/api/emit/users/{gina}", "dm", "first")
    _, _, offset = await wire.event()
    await wire.close()
    answer = user_envelope(gina, "events", "answered once", sid="zzzzzzzz.another-socket-of-gina")
    async with recorder(prefix) as bus:
        await bus.publish(f"{prefix}:user:{gina}", answer)
        await bus.publish(f"{prefix}:user:{gina}", answer)  # the retry: same envelope, same id
    back = await resume(b.url, token, wire, offset, wires)
    assert await next_events(back, "recovered") == [["events", "answered once"], ["recovered", {"missed": 1}]]


async def test_live_deduplication_holds_as_long_as_the_history_does(
    instances: list[Instance], probes: list[Probe]
) -> None:
    """A copy is dropped while the history still holds its first (REPLAY_MAX_LEN entries of the
    partition); past that nothing can tell it from a new event, and it is delivered."""
    prefix = unique("entitled-window")
    (a,) = fleet(instances, prefix, names=("A",), REPLAY_MAX_LEN="20")
    hana = unique("hana")
    probe = Probe("hana@A")
    probes.append(probe)
    await probe.connect(a.url, await token_for(a.url, hana))
    channel = f"{prefix}:user:{hana}"
    twice = user_envelope(hana, "dm", "twice")
    async with recorder(prefix) as bus:
        await bus.publish(channel, twice)
        for n in range(19):  # the first copy is still among the last 20 entries
            await bus.publish(channel, user_envelope(hana, "dm", n))
        await bus.publish(channel, twice)
        for n in range(19, 40):  # now it is not
            await bus.publish(channel, user_envelope(hana, "dm", n))
        await bus.publish(channel, twice)
    await probe.wait_until(lambda: probe.of("dm")[-1:] == ["twice"] and len(probe.of("dm")) >= 42, "every dm")
    assert probe.of("dm") == ["twice", *range(40), "twice"]
    assert a.status()[1]["deduplicated"] == 1


# --- B. an instance's catch-up is entitled by the same rule ---------------------------------------


async def test_a_socket_accepted_during_an_outage_is_caught_up_only_from_its_connect(
    instances: list[Instance], probes: list[Probe], wires: list[Wire], redis_client: redis.Redis
) -> None:
    """Suspicion: sockets accepted while Redis was unreachable got catch-up events from before
    they connected (and a session begun then, on its resume). Held: such a join, and such a
    session's start, are dated by Redis's clock, as last measured."""
    prefix = unique("entitled-outage")

    def redis_ms() -> int:
        seconds, micros = redis_client.time()
        return int(seconds) * 1000 + int(micros) // 1000

    with TcpProxy([("127.0.0.1", 6379)]).start() as link:
        a, b = start_pair(
            instances, instance_env(prefix, redis_url=link.redis_url, REDIS_BACKOFF_MAX="0.3"), instance_env(prefix)
        )
        link.cut()
        await wait_until(lambda: a.readyz()[0] == 503, "A to lose Redis")
        await emit(b.url, "/api/emit/all", "news", "before")
        sent = redis_ms()
        await wait_until(lambda: redis_ms() > sent + 100, "Redis's clock to move on")
        probe = Probe("anon@A")
        probes.append(probe)
        await probe.connect(a.url)  # accepted in the outage mode
        away = await Wire.connect(a.url, {"recover": True})  # so is a session, which then blinks
        wires.append(away)
        await away.close()
        connected = redis_ms()
        await wait_until(lambda: redis_ms() > connected + 100, "Redis's clock to move on")
        await emit(b.url, "/api/emit/all", "news", "after")
        link.restore()
        await wait_until(lambda: a.readyz()[0] == 200, "A back, caught up", timeout=15)
        await emit(b.url, "/api/emit/all", "news", "live")
        await probe.wait_until(lambda: "live" in probe.of("news"), "the live event")
        assert probe.of("news") == ["after", "live"]
        back = await Wire.connect(b.url, {"recover": True, "pid": away.reply["pid"]})  # nothing received: no offset
        wires.append(back)
        assert await next_events(back, "recovered") == [["news", "after"], ["news", "live"], ["recovered", {"missed": 2}]]
