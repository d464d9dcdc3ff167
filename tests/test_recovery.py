"""Connection state recovery across instances, on the wire: what an opted-in socket is sent, and
what it gets back after a blink, a SIGTERM, a SIGKILL, a restart, a forged or stolen pid, or too
long away. The official JS client and python-socketio take the same paths in test_drills.py."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import pytest
import redis

from webapp.client import RecoveringClient

from .harness import WAIT, Instance, RawSocket, RedisServer, api, instance_env, token_for, unique, wait_until
from .proxy import TcpProxy

pytestmark = pytest.mark.cluster


class Wire(RawSocket):
    """A RawSocket accepted by the server, with the CONNECT reply it got: every packet is visible."""

    reply: dict[str, Any]

    @classmethod
    async def connect(cls, base: str, auth: dict[str, Any]) -> Wire:
        wire = await cls.open(base, auth=auth)
        wire.reply = await wire.connected()
        assert "sid" in wire.reply, wire.reply
        return wire

    async def events_until(self, name: str) -> list[list[Any]]:
        """Events up to and including the first one called `name`."""
        got = [await self.event()]
        while got[-1][0] != name:
            got.append(await self.event())
        return got


def fleet(instances: list[Instance], prefix: str, names: tuple[str, ...] = ("A", "B"), **env: str) -> list[Instance]:
    started = [Instance(name, instance_env(prefix, **env)).start() for name in names]
    instances.extend(started)
    for instance in started:
        instance.wait_serving()
    return started


async def emit(base: str, path: str, event: str, data: Any) -> None:
    status, answer = await api(base, path, {"event": event, "data": data})
    assert status == 202, answer


def offsets_increase(events: list[list[Any]]) -> bool:
    offsets = [tuple(map(int, e[-1].split("-"))) for e in events]
    return offsets == sorted(set(offsets))


async def test_opted_in_sockets_recover_on_another_instance_and_others_see_no_change(
    instances: list[Instance], wires: list[Wire]
) -> None:
    a, b = fleet(instances, unique("recover"))
    alice = unique("alice")
    token = await token_for(a.url, alice)
    plain = await Wire.connect(a.url, {"token": token})
    first = await Wire.connect(a.url, {"token": token, "recover": True})
    wires.extend([plain, first])
    assert set(plain.reply) == {"sid"}  # not opted in: today's CONNECT reply, today's events
    pid = first.reply["pid"]

    await emit(b.url, f"/api/emit/users/{alice}", "dm", 1)
    assert await plain.event() == ["dm", 1]
    got = await first.event()
    assert got[:2] == ["dm", 1] and isinstance(got[2], str)

    await first.close()  # a blink: everything below is missed
    await emit(b.url, f"/api/emit/users/{alice}", "dm", 2)
    await emit(a.url, "/api/emit/all", "news", 3)
    await emit(b.url, "/api/emit/authenticated", "members", 4)
    assert [await plain.event() for _ in range(3)] == [["dm", 2], ["news", 3], ["members", 4]]

    back = await Wire.connect(b.url, {"token": token, "recover": True, "pid": pid, "offset": got[2]})
    wires.append(back)
    assert back.reply["pid"] == pid  # the same pid: socket.recovered is true in the JS client
    replay = await back.events_until("recovered")
    assert [e[:2] for e in replay] == [["dm", 2], ["news", 3], ["members", 4], ["recovered", {"missed": 3}]]
    assert offsets_increase(replay[:3]) and replay[3][2] == replay[2][2]
    await emit(a.url, f"/api/emit/users/{alice}", "dm", 5)  # live again, after the replay
    live = await back.event()
    assert live[:2] == ["dm", 5] and offsets_increase([*replay[:3], live])
    assert await plain.event() == ["dm", 5]


async def test_recovery_before_any_event_and_again_and_again(instances: list[Instance], wires: list[Wire]) -> None:
    """Node fails a reconnect before the first event (no offset yet) and recovers only once."""
    a, b = fleet(instances, unique("recover-again"))
    bob = unique("bob")
    token = await token_for(a.url, bob)
    wire = await Wire.connect(a.url, {"token": token, "recover": True})
    wires.append(wire)
    pid, offset, n = wire.reply["pid"], None, 0
    for round_ in range(3):
        await wire.close()
        for _ in range(2):
            n += 1
            await emit(a.url, f"/api/emit/users/{bob}", "dm", n)
        auth = {"token": token, "recover": True, "pid": pid, **({"offset": offset} if offset else {})}
        wire = await Wire.connect((b if round_ % 2 == 0 else a).url, auth)
        wires.append(wire)
        assert wire.reply["pid"] == pid, f"round {round_}"
        replay = await wire.events_until("recovered")
        assert [e[:2] for e in replay] == [["dm", n - 1], ["dm", n], ["recovered", {"missed": 2}]]
        offset = replay[1][2]


async def test_forged_stolen_and_unknown_pids_connect_fresh(instances: list[Instance], wires: list[Wire]) -> None:
    (a,) = fleet(instances, unique("recover-forged"), names=("A",))
    alice, mallory = unique("alice"), unique("mallory")
    alice_token, mallory_token = await token_for(a.url, alice), await token_for(a.url, mallory)
    victim = await Wire.connect(a.url, {"token": alice_token, "recover": True})
    wires.append(victim)
    stolen = victim.reply["pid"]
    for pid in (stolen, stolen[:-4] + "AAAA", "not-a-pid"):
        thief = await Wire.connect(a.url, {"token": mallory_token, "recover": True, "pid": pid})
        wires.append(thief)
        assert thief.reply["pid"] != stolen  # a new session: socket.recovered is false
        failed = await thief.event()
        assert failed[:2] == ["recovery_failed", {"reason": "unknown_session"}] and isinstance(failed[2], str)
    # alice's own pid with an offset that is not one is refused too, and tells why
    garbled = await Wire.connect(a.url, {"token": alice_token, "recover": True, "pid": stolen, "offset": "junk"})
    wires.append(garbled)
    assert (await garbled.event())[:2] == ["recovery_failed", {"reason": "invalid_offset"}]
    # none of alice's events reach the thief: the next thing it gets is its own
    await emit(a.url, f"/api/emit/users/{alice}", "dm", "for alice")
    await emit(a.url, f"/api/emit/users/{mallory}", "dm", "for mallory")
    assert (await thief.event())[:2] == ["dm", "for mallory"]
    assert (await victim.event())[:2] == ["dm", "for alice"]


async def test_too_long_away_is_refused_with_a_reason(instances: list[Instance], wires: list[Wire]) -> None:
    (a,) = fleet(instances, unique("recover-window"), names=("A",), RECOVERY_WINDOW="1", REPLAY_MAX_AGE="60")
    carol = unique("carol")
    token = await token_for(a.url, carol)
    wire = await Wire.connect(a.url, {"token": token, "recover": True})
    wires.append(wire)
    pid = wire.reply["pid"]
    await wire.close()
    await emit(a.url, f"/api/emit/users/{carol}", "dm", "while away")
    await asyncio.sleep(1.5)  # the subject of the test: longer away than RECOVERY_WINDOW
    late = await Wire.connect(a.url, {"token": token, "recover": True, "pid": pid})
    wires.append(late)
    assert late.reply["pid"] != pid
    name, data, offset = await late.event()
    assert (name, data) == ("recovery_failed", {"reason": "expired"}) and isinstance(offset, str)


async def test_an_idle_socket_older_than_the_history_still_recovers(
    instances: list[Instance], wires: list[Wire], redis_client: redis.Redis
) -> None:
    """Node fails a connection that lived longer than its window: its last offset is gone."""
    prefix = unique("recover-idle")
    a, b = fleet(instances, prefix, RECOVERY_WINDOW="2", REPLAY_MAX_AGE="2")
    dave, other = unique("dave"), unique("other")
    token = await token_for(a.url, dave)
    idle = await Wire.connect(a.url, {"token": token, "recover": True})
    wires.append(idle)
    pid = idle.reply["pid"]
    # traffic for someone else until the history's age bound has trimmed past dave's start
    # ("MINID ~" drops whole stream nodes of 100 entries)
    async def trimmed_after_one_more() -> bool:
        await emit(b.url, f"/api/emit/users/{other}", "dm", "not for dave")
        info = redis_client.xinfo_stream(f"{{{prefix}}}:replay")
        return int(info["entries-added"]) > int(info["length"])

    await wait_until(trimmed_after_one_more, "the history to trim past dave's start", timeout=20)
    await idle.close()
    await wait_until(lambda: a.status()[1].get("recoverable_sockets") == 0, "A to notice dave left")
    await emit(b.url, f"/api/emit/users/{dave}", "dm", "while away")
    back = await Wire.connect(b.url, {"token": token, "recover": True, "pid": pid})
    wires.append(back)
    assert back.reply["pid"] == pid
    replay = await back.events_until("recovered")
    assert [e[:2] for e in replay] == [["dm", "while away"], ["recovered", {"missed": 1}]]


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL])
async def test_recovery_after_the_instance_died_or_restarted(
    how: signal.Signals, instances: list[Instance], wires: list[Wire]
) -> None:
    a, b = fleet(instances, unique(f"recover-{how.name.lower()}"))
    erin = unique("erin")
    token = await token_for(b.url, erin)
    wire = await Wire.connect(a.url, {"token": token, "recover": True})
    await emit(b.url, f"/api/emit/users/{erin}", "dm", "before")
    name, _, offset = await wire.event()
    assert name == "dm"
    wires.append(wire)
    a.stop(how)
    await wire.close()
    await emit(b.url, f"/api/emit/users/{erin}", "dm", "while down")
    await emit(b.url, "/api/emit/all", "news", "while down")
    a.start()
    a.wait_serving()
    # the restarted instance takes it back
    back = await Wire.connect(a.url, {"token": token, "recover": True, "pid": wire.reply["pid"], "offset": offset})
    wires.append(back)
    assert back.reply["pid"] == wire.reply["pid"]
    replay = await back.events_until("recovered")
    assert [e[:2] for e in replay] == [["dm", "while down"], ["news", "while down"], ["recovered", {"missed": 2}]]


async def test_own_gateway_answers_are_not_replayed_to_the_session(instances: list[Instance], wires: list[Wire]) -> None:
    a, b = fleet(instances, unique("recover-origin"))
    frank = unique("frank")
    token = await token_for(a.url, frank)
    asker = await Wire.connect(a.url, {"token": token, "recover": True})
    other = await Wire.connect(b.url, {"token": token})
    wires.extend([asker, other])
    await asker.ws.send_str('42["events","hello"]')
    answer = await asker.event()
    assert answer[:2] == ["events", "hello"]
    assert await other.event() == ["events", "hello"]
    await asker.close()
    await emit(b.url, f"/api/emit/users/{frank}", "dm", "missed")
    assert await other.event() == ["dm", "missed"]
    back = await Wire.connect(b.url, {"token": token, "recover": True, "pid": asker.reply["pid"], "offset": answer[2]})
    wires.append(back)
    replay = await back.events_until("recovered")
    assert [e[:2] for e in replay] == [["dm", "missed"], ["recovered", {"missed": 1}]]
    # and answers it asks for now are still not echoed back through the bus
    await back.ws.send_str('42["events","again"]')
    assert (await back.event())[:2] == ["events", "again"]
    assert await other.event() == ["events", "again"]
    await emit(a.url, f"/api/emit/users/{frank}", "dm", "fence")
    assert (await back.event())[:2] == ["dm", "fence"]


async def test_a_session_from_before_redis_lost_its_data_is_not_recovered(
    instances: list[Instance], wires: list[Wire]
) -> None:
    server = RedisServer().start()
    try:
        (a,) = fleet(instances, unique("recover-epoch"), names=("A",), redis_url=server.url, REDIS_BACKOFF_MAX="0.5")
        henry = unique("henry")
        token = await token_for(a.url, henry)
        wire = await Wire.connect(a.url, {"token": token, "recover": True})
        wires.append(wire)
        await wire.close()
        server.stop(signal.SIGKILL)
        server.start()  # empty: its history, and what the session's offsets meant, are gone
        await wait_until(lambda: a.readyz()[0] == 200, "A back on the new Redis", timeout=15)
        back = await Wire.connect(a.url, {"token": token, "recover": True, "pid": wire.reply["pid"]})
        wires.append(back)
        assert back.reply["pid"] != wire.reply["pid"]
        assert (await back.event())[:2] == ["recovery_failed", {"reason": "history_lost"}]
        assert a.status()[1]["bus"]["epoch_changes"] == 1
    finally:
        server.stop(signal.SIGKILL)


async def test_python_socketio_recovers_with_the_helper(instances: list[Instance]) -> None:
    a, b = fleet(instances, unique("recover-python"))
    grace = unique("grace")
    token = await token_for(a.url, grace)
    got: list[Any] = []
    client = RecoveringClient(reconnection=True, reconnection_delay=0.1, reconnection_delay_max=0.5)
    client.on("dm", lambda data: got.append(data))
    urls = iter([a.url, b.url])
    await client.connect(next(urls), auth={"token": token}, transports=["websocket"], wait_timeout=WAIT)
    try:
        await emit(a.url, f"/api/emit/users/{grace}", "dm", 1)
        await wait_until(lambda: got == [1], "the first event, without its offset")
        assert client.offset is not None and not client.recovered
        await client.disconnect()
        await emit(a.url, f"/api/emit/users/{grace}", "dm", 2)
        await client.connect(next(urls), auth={"token": token}, transports=["websocket"], wait_timeout=WAIT)
        await wait_until(lambda: got == [1, 2], "the missed event")
        assert client.recovered
    finally:
        await client.disconnect()
        await client.shutdown()


async def test_an_instance_that_missed_more_than_the_history_tells_its_recovering_sockets(
    instances: list[Instance], wires: list[Wire]
) -> None:
    prefix = unique("recover-gap")
    with TcpProxy([("127.0.0.1", 6379)]).start() as redis_link:
        a = Instance("A", instance_env(prefix, redis_url=redis_link.redis_url, REPLAY_MAX_LEN="10")).start()
        (b,) = fleet(instances, prefix, names=("B",), REPLAY_MAX_LEN="10")
        instances.append(a)
        a.wait_serving()
        ivy = unique("ivy")
        token = await token_for(b.url, ivy)
        wire = await Wire.connect(a.url, {"token": token, "recover": True})
        wires.append(wire)
        redis_link.cut()
        await wait_until(lambda: a.readyz()[0] == 503, "A to notice the cut")
        # "MAXLEN ~" trims whole stream nodes (100 entries): 300 trim past A's position for sure
        for n in range(300):
            await emit(b.url, "/api/emit/all", "news", n)
        redis_link.restore()
        failed = await wire.events_until("recovery_failed")
        assert failed[-1][:2] == ["recovery_failed", {"reason": "gap"}]
        numbers = [e[1] for e in failed[:-1]]
        assert numbers == sorted(set(numbers)) and numbers[-1] == 299 and len(numbers) < 300
        assert a.status()[1]["bus"]["gaps"] == 1
