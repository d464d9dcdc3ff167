"""Rooms and user control across three instances, through python-socketio's own API, the
`join`/`leave` gateway events and the REST hooks; recovering sockets get their rooms back."""

from __future__ import annotations

import signal
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import socketio

from bench.cluster import forget
from webapp.auth.tokens import TokenSigner
from webapp.client import RecoveringClient

from .conftest import Cluster, running
from .harness import (
    SECRET_KEY,
    WAIT,
    Instance,
    Probe,
    api,
    fence,
    holds_for,
    instance_env,
    token_for,
    unique,
    wait_until,
)
from .jsclient import JsClients, client_spec

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def fleet(redis_client: redis.Redis) -> Iterator[Cluster]:
    """Three instances serving the app plus test events that call python-socketio's API."""
    with running(redis_client, Cluster(unique("rooms"), ("A", "B", "C"), app="tests.fleet_app:app")) as started:
        yield started
        for instance in started.instances:
            assert "Traceback" not in instance.output(), instance.output()


async def connect(probes: list[Probe], instance: Instance, user: str | None, name: str = "") -> Probe:
    probe = Probe(name or f"{user}@{instance.name}")
    probes.append(probe)
    token = await token_for(instance.url, user) if user else None
    return await probe.connect(instance.url, token)


async def call(probe: Probe, event: str, data: Any = None) -> Any:
    return await probe.client.call(event, data, timeout=WAIT)


def subscribers(redis_client: redis.Redis, channel: str) -> int:
    return int(dict(redis_client.pubsub_numsub(channel))[channel.encode()])


async def emit_room(base: str, room: str, data: Any, event: str = "news") -> None:
    status, answer = await api(base, f"/api/emit/rooms/{room}", {"event": event, "data": data})
    assert status == 202, answer
    assert answer["scope"] == "room"


async def test_a_room_reaches_its_members_on_every_instance_and_only_them(
    fleet: Cluster, probes: list[Probe], redis_client: redis.Redis
) -> None:
    a, b, c = fleet.instances
    room = f"public:{unique('lobby')}"
    channel = f"{fleet.prefix}:room:{room}"
    alice = await connect(probes, a, unique("alice"))
    bob = await connect(probes, b, unique("bob"))
    carol = await connect(probes, c, unique("carol"))
    anonymous = await connect(probes, a, None, "anon@A")

    assert await call(alice, "join", {"room": room}) == {"ok": True, "room": room}
    assert await call(bob, "join", {"room": room}) == {"ok": True, "room": room}
    # Joining returns once the room's channel is held: A and B hold it, C (no member) does not.
    assert subscribers(redis_client, channel) == 2

    await emit_room(c.url, room, "hello")
    assert await alice.wait_for("news") == ["hello"]
    assert await bob.wait_for("news") == ["hello"]
    await fence(a.url, [alice, bob, carol, anonymous])
    assert carol.of("news") == [] and anonymous.of("news") == []

    assert await call(alice, "leave", {"room": room}) == {"ok": True, "room": room}
    await emit_room(a.url, room, "after alice left")
    assert await bob.wait_for("news", 2) == ["hello", "after alice left"]
    await fence(a.url, [alice, bob])
    assert alice.of("news") == ["hello"]

    await bob.close()  # the last member anywhere: no instance holds the channel any more
    await wait_until(lambda: subscribers(redis_client, channel) == 0, "the room's channel to be released")


async def test_the_join_policy_decides_and_refusals_are_explained(fleet: Cluster, probes: list[Probe]) -> None:
    a = fleet.instances[0]
    user = unique("dora")
    dora = await connect(probes, a, user)
    anonymous = await connect(probes, a, None, "anon@A")

    for room in ("private:board", "authenticated", f"user:{unique('eve')}", f"user:{user}"):
        assert await call(dora, "join", {"room": room}) == {"ok": False, "error": "forbidden"}, room
    assert await call(anonymous, "join", {"room": "public:open"}) == {"ok": False, "error": "forbidden"}
    for data in ({"room": "has space"}, {"room": ""}, {"room": "x" * 129}, "public:lobby", None, {"room": 5}):
        assert await call(dora, "join", data) == {"ok": False, "error": "bad_payload"}, data
    errors = await dora.wait_for("error", 10)
    assert [e["code"] for e in errors] == ["forbidden"] * 4 + ["bad_payload"] * 6
    assert all(e["event"] == "join" for e in errors)
    assert (await anonymous.wait_for("error"))[0]["code"] == "forbidden"
    assert dora.client.connected and anonymous.client.connected


async def test_the_backend_puts_a_user_in_a_room_everywhere_and_for_later_sockets(
    fleet: Cluster, probes: list[Probe], redis_client: redis.Redis
) -> None:
    a, b, c = fleet.instances
    user, room = unique("frank"), f"team:{unique('red')}"
    on_a = await connect(probes, a, user)
    on_b = await connect(probes, b, user)

    status, answer = await api(c.url, f"/api/users/{user}/rooms/{room}", method="PUT")
    assert (status, answer) == (200, {"user_id": user, "room": room, "member": True, "changed": True})
    assert (await api(a.url, f"/api/users/{user}/rooms", method="GET")) == (200, {"user_id": user, "rooms": [room]})
    # Applied to the live sockets of every instance: once an emit after the join is in, it is.
    await emit_room(c.url, room, "first")
    assert await on_a.wait_for("news") == ["first"]
    assert await on_b.wait_for("news") == ["first"]

    later = await connect(probes, c, user, "later@C")  # opened after the join: in the room at once
    await emit_room(a.url, room, "second")
    assert await later.wait_for("news") == ["second"]
    assert await on_a.wait_for("news", 2) == ["first", "second"]

    status, answer = await api(b.url, f"/api/users/{user}/rooms/{room}", method="DELETE")
    assert (status, answer) == (200, {"user_id": user, "room": room, "member": False, "changed": True})
    await wait_until(lambda: subscribers(redis_client, f"{fleet.prefix}:room:{room}") == 0, "the room to empty")
    await emit_room(a.url, room, "third")
    newest = await connect(probes, b, user, "newest@B")
    await fence(a.url, [on_a, on_b, later, newest])
    assert [p.of("news") for p in (on_a, on_b, later, newest)] == [["first", "second"], ["first", "second"], ["second"], []]
    assert (await api(a.url, f"/api/users/{user}/rooms", method="GET")) == (200, {"user_id": user, "rooms": []})


async def test_rest_room_hooks_validate_names_and_keys(fleet: Cluster) -> None:
    a = fleet.instances[0]
    for path, method in (
        ("/api/users/bad%20id/rooms/team", "PUT"),
        ("/api/users/ok/rooms/bad%20room", "PUT"),
        ("/api/users/ok/rooms/user:ok", "PUT"),
        ("/api/users/ok/rooms/authenticated", "DELETE"),
        ("/api/users/ok/rooms/" + "r" * 129, "PUT"),
        ("/api/emit/rooms/bad%20room", "POST"),
        ("/api/users/bad%20id/rooms", "GET"),
    ):
        body = {"event": "x", "data": 1} if method == "POST" else None
        status, answer = await api(a.url, path, body, method=method)
        assert (status, answer["error"]["code"]) == (422, "invalid_fields"), (path, answer)
    status, answer = await api(a.url, "/api/users/ok/rooms/team", method="PUT", key="wrong")
    assert (status, answer["error"]["code"]) == (401, "unauthorized")
    status, answer = await api(a.url, "/api/emit/rooms/team", {"event": "connect", "data": 1})
    assert (status, answer["error"]["code"]) == (422, "invalid_fields")


async def test_python_socketio_api_acts_on_sockets_of_other_instances(
    fleet: Cluster, probes: list[Probe], redis_client: redis.Redis
) -> None:
    a, b, c = fleet.instances
    caller = await connect(probes, a, unique("caller"))
    target = await connect(probes, b, unique("target"))
    bystander = await connect(probes, c, unique("bystander"))
    room = unique("squad")

    # emit(to=sid): only the instance holding the socket wakes (its own channel has one subscriber).
    tag = target.sid.partition(".")[0]
    assert subscribers(redis_client, f"{fleet.prefix}:node:{tag}") == 1
    assert (await call(caller, "api_emit", {"event": "direct", "data": "psst", "to": target.sid}))["ok"]
    assert await target.wait_for("direct") == ["psst"]

    # enter_room on a socket held elsewhere, then an emit to the room from a third instance
    assert (await call(caller, "api_enter", {"sid": target.sid, "room": room}))["ok"]
    assert (await call(caller, "api_enter", {"room": room}))["ok"]
    await wait_until(lambda: subscribers(redis_client, f"{fleet.prefix}:room:{room}") == 2, "B to hold the room")
    assert await call(target, "api_rooms") == sorted(
        [target.sid, room, "authenticated", f"user:{target.name.split('@')[0]}"]
    )
    assert (await call(bystander, "api_emit", {"event": "squad", "data": 1, "to": room}))["ok"]
    assert await target.wait_for("squad") == [1]
    assert await caller.wait_for("squad") == [1]

    # skip_sid: the asking socket is left out of its own room emit
    assert (await call(caller, "api_emit", {"event": "squad", "data": 2, "to": room, "skip_me": True}))["ok"]
    assert await target.wait_for("squad", 2) == [1, 2]

    # close_room empties it on every instance
    assert (await call(bystander, "api_close", {"room": room}))["ok"]
    await wait_until(lambda: subscribers(redis_client, f"{fleet.prefix}:room:{room}") == 0, "the room to close")
    assert (await call(bystander, "api_emit", {"event": "squad", "data": 3, "to": room}))["ok"]
    await fence(a.url, [caller, target, bystander])
    assert caller.of("squad") == [1] and target.of("squad") == [1, 2] and bystander.of("squad") == []

    # an ack from a socket elsewhere cannot come back: refused at once, never a hang
    answer = await call(caller, "api_emit_with_ack", {"to": target.sid})
    assert answer["ok"] is False and answer["error"] == "ValueError" and "acks" in answer["message"]

    # disconnect(sid) of a socket held elsewhere: it is told why, then disconnected
    assert (await call(caller, "api_disconnect", {"sid": target.sid}))["ok"]
    await target.wait_until(lambda: not target.client.connected, "the target to be disconnected")
    assert target.of("disconnect_reason") == [{"reason": "disconnected by the server"}]
    assert caller.client.connected and bystander.client.connected


async def test_the_backend_disconnects_a_user_everywhere_and_clients_stay_away(
    fleet: Cluster, probes: list[Probe]
) -> None:
    a, b, c = fleet.instances
    user = unique("mallory")
    sockets = [await connect(probes, instance, user) for instance in (a, b, b)]
    other = await connect(probes, c, unique("olivia"))
    for probe in sockets:  # reconnecting clients, and quick ones: a reconnect would come in 0.1 s
        probe.client.reconnection = True
        probe.client.reconnection_delay = probe.client.reconnection_delay_max = 0.1
        probe.client.randomization_factor = 0
    # The official JS client too (it retries after 100 to 500 ms, tests/js/clients.mjs).
    async with await JsClients.start(c.url, [client_spec("js", await token_for(c.url, user))]) as js:
        status, answer = await api(c.url, f"/api/users/{user}/disconnect", {"reason": "account suspended"})
        assert status == 202 and answer["accepted"] is True
        for probe in sockets:
            await probe.wait_until(lambda p=probe: not p.client.connected, "a server disconnect")
            assert probe.of("disconnect_reason") == [{"reason": "account suspended"}]
        await js.wait_until(lambda: js.disconnects("js"), "the JS client's disconnect")
        assert js.disconnects("js") == ["io server disconnect"]
        assert js.of("js", "disconnect_reason") == [[{"reason": "account suspended"}]]
        await fence(c.url, [other])
        assert other.client.connected and other.of("disconnect_reason") == []
        for instance in (a, b):
            await wait_until(lambda i=instance: i.status()[1]["users"] == 0, "the user to be gone")

        # They stay away: ten times python-socketio's delay here, twice the JS client's longest.
        def away() -> bool:
            return not any(p.client.connected for p in sockets) and len(js.connects("js")) == 1

        await holds_for(away, "no client of the user reconnecting", 1.0)
        assert [i.status()[1]["users"] for i in (a, b, c)] == [0, 0, 1]  # olivia's, on C

    status, answer = await api(c.url, f"/api/users/{user}/disconnect", {"reason": 5})
    assert (status, answer["error"]["code"]) == (422, "invalid_fields")


async def test_a_recovering_socket_gets_its_rooms_back_even_from_a_killed_instance(
    redis_client: redis.Redis, probes: list[Probe]
) -> None:
    prefix = unique("rooms-recovery")
    a, b = (Instance(name, instance_env(prefix)).start() for name in ("A", "B"))
    try:
        a.wait_serving()
        b.wait_serving()
        user, room, given = unique("rita"), f"public:{unique('den')}", f"team:{unique('blue')}"
        assert (await api(a.url, f"/api/users/{user}/rooms/{given}", method="PUT"))[0] == 200
        token = await token_for(a.url, user)
        client = RecoveringClient(reconnection=False)
        got: list[tuple[str, Any]] = []
        client.on("*", lambda event, data=None: got.append((event, data)))
        await client.connect(a.url, auth={"token": token}, transports=["websocket"])
        assert await client.call("join", {"room": room}, timeout=WAIT) == {"ok": True, "room": room}
        await emit_room(b.url, room, "before")
        await wait_until(lambda: ("news", "before") in got, "the first room event")

        a.stop(signal.SIGKILL)  # no goodbye: the session's rooms come from what was written at join
        await wait_until(lambda: not client.connected, "the client to notice")
        await emit_room(b.url, room, "missed")
        await emit_room(b.url, given, "missed too")

        await client.connect(b.url, auth={"token": token}, transports=["websocket"])
        await wait_until(lambda: any(e == "recovered" for e, _ in got), "the recovery")
        await emit_room(b.url, room, "live")
        await emit_room(b.url, given, "live too")
        await wait_until(lambda: ("news", "live too") in got, "live room events")
        assert [d for e, d in got if e in ("news", "recovered")] == [
            "before", "missed", "missed too", {"missed": 2}, "live", "live too"
        ]
        await client.disconnect()
    finally:
        for instance in (a, b):
            instance.stop(signal.SIGKILL)
        forget(redis_client, prefix)


async def test_revoking_a_user_refuses_older_tokens_everywhere_and_ends_live_sockets(
    fleet: Cluster, probes: list[Probe]
) -> None:
    a, b, c = fleet.instances
    user = unique("trudy")
    old_token = await token_for(a.url, user)
    live = [await connect_with(probes, a, old_token), await connect_with(probes, b, old_token)]

    status, answer = await api(c.url, f"/api/users/{user}/revoke")
    assert status == 202 and answer["user_id"] == user and answer["not_before"].endswith("Z")
    for probe in live:
        await probe.wait_until(lambda p=probe: not p.client.connected, "the revoked socket to end")
        assert probe.of("disconnect_reason") == [{"reason": "token revoked"}]
    for instance in (a, b, c):
        refused = Probe(f"old@{instance.name}")
        probes.append(refused)
        with pytest.raises(socketio.exceptions.ConnectionError):
            await refused.connect(instance.url, old_token)
        assert refused.connect_error["data"]["code"] == "invalid_token"
        assert "revoked" in refused.connect_error["data"]["message"]
    fresh = await connect_with(probes, b, await token_for(c.url, user))
    assert (await call(fresh, "whoami"))["user_id"] == user


async def test_sockets_are_warned_then_ended_when_their_token_expires(
    redis_client: redis.Redis, probes: list[Probe]
) -> None:
    with running(redis_client, Cluster(unique("expiry"), ("A",), DISCONNECT_ON_TOKEN_EXPIRY="1")) as started:
        instance = started.instances[0]
        user = unique("ivan")
        short = TokenSigner(SECRET_KEY).mint(user, ttl=3)  # shorter than the 30 s notice: warned at once
        probe = await connect_with(probes, instance, short.value)
        lasting = await connect_with(probes, instance, await token_for(instance.url, unique("june")))
        assert await probe.wait_for("token_expiring") == [{"expires_at": short.expires_at_iso}]
        await probe.wait_until(lambda: not probe.client.connected, "the socket to end at expiry", timeout=WAIT)
        assert probe.of("disconnect_reason") == [{"reason": "token_expired"}]
        assert lasting.client.connected and lasting.of("token_expiring") == []


async def connect_with(probes: list[Probe], instance: Instance, token: str) -> Probe:
    probe = Probe(f"socket@{instance.name}")
    probes.append(probe)
    return await probe.connect(instance.url, token)


async def test_batches_and_multi_user_emits_reach_exactly_their_sockets(fleet: Cluster, probes: list[Probe]) -> None:
    a, b, c = fleet.instances
    room = f"team:{unique('batch')}"
    alice, bob, carol = unique("alice"), unique("bob"), unique("carol")
    on = {name: await connect(probes, instance, name) for name, instance in ((alice, a), (bob, b), (carol, c))}
    anonymous = await connect(probes, b, None, "anon@B")
    assert (await api(a.url, f"/api/users/{carol}/rooms/{room}", method="PUT"))[0] == 200

    events = [
        {"scope": "user", "user_id": alice, "event": "m", "data": 1},
        {"scope": "room", "room": room, "event": "m", "data": 2},
        {"scope": "authenticated", "event": "m", "data": 3},
        {"scope": "all", "event": "m", "data": 4},
        {"scope": "user", "user_id": bob, "event": "m", "data": 5},
    ]
    status, answer = await api(c.url, "/api/emit/batch", {"events": events})
    assert status == 202 and len(answer["ids"]) == 5
    status, answer = await api(b.url, "/api/emit/users", {"user_ids": [alice, carol], "event": "m", "data": 6})
    assert status == 202 and len(answer["ids"]) == 2
    await fence(a.url, [*on.values(), anonymous])
    assert on[alice].of("m") == [1, 3, 4, 6]
    assert on[bob].of("m") == [3, 4, 5]
    assert on[carol].of("m") == [2, 3, 4, 6]
    assert anonymous.of("m") == [4]


async def test_each_instance_exposes_its_own_metrics(fleet: Cluster, probes: list[Probe]) -> None:
    a, b, _ = fleet.instances

    def metric(instance: Instance, line_start: str) -> float:
        text = urllib.request.urlopen(instance.url + "/metrics", timeout=5).read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start))

    before = metric(a, 'webapp_deliveries_total{scope="room"}'), metric(a, 'webapp_connects_total{outcome="invalid_token"}')
    user, room = unique("mia"), unique("metrics-room")
    probe = await connect(probes, a, user)
    assert (await call(probe, "api_enter", {"room": room}))["ok"]
    await emit_room(b.url, room, "counted")
    await probe.wait_for("news")
    refused = Probe("bad-token")
    probes.append(refused)
    with pytest.raises(socketio.exceptions.ConnectionError):
        await refused.connect(a.url, "not-a-token")
    assert metric(a, 'webapp_deliveries_total{scope="room"}') == before[0] + 1
    assert metric(a, 'webapp_connects_total{outcome="invalid_token"}') == before[1] + 1
    assert metric(a, 'webapp_connects_total{outcome="accepted"}') >= 1
    assert metric(b, 'webapp_publishes_total{outcome="ok"}') >= 1
    assert metric(a, "webapp_delivery_lag_seconds_count") >= 1
