"""Two real hypercorn instances sharing a real Redis, driven by real Socket.IO clients."""

from __future__ import annotations

import asyncio

import orjson
import pytest
import socketio

from bench.cluster import publish_raw
from bench.cluster import subscribers as count_subscribers
from webapp.auth.tokens import TokenSigner

from .conftest import Cluster
from .harness import (
    REDIS_URL,
    SECRET_KEY,
    Instance,
    Probe,
    api,
    fence,
    token_for,
    unique,
    wait_until,
    without_fences,
)

pytestmark = pytest.mark.cluster


async def open_probe(probes: list[Probe], name: str, base: str, token: str | None = None, how: str = "auth") -> Probe:
    probe = Probe(name)
    probes.append(probe)
    return await probe.connect(base, token, how=how)


async def cast(cluster: Cluster, probes: list[Probe]) -> dict[str, Probe]:
    """alice on A and on B, bob on B, an anonymous socket on A."""
    alice, bob = unique("alice"), unique("bob")
    alice_token = await token_for(cluster.a.url, alice)
    bob_token = await token_for(cluster.b.url, bob)
    cast = {
        "alice_a": await open_probe(probes, "alice@A", cluster.a.url, alice_token),
        "alice_b": await open_probe(probes, "alice@B", cluster.b.url, alice_token),
        "bob_b": await open_probe(probes, "bob@B", cluster.b.url, bob_token),
        "anon_a": await open_probe(probes, "anon@A", cluster.a.url),
    }
    cast["alice_a"].user = cast["alice_b"].user = alice  # type: ignore[attr-defined]
    cast["bob_b"].user = bob  # type: ignore[attr-defined]
    return cast


@pytest.mark.parametrize("via", ["a", "b"])
async def test_user_scope_reaches_exactly_that_users_sockets(
    cluster: Cluster, probes: list[Probe], via: str
) -> None:
    c = await cast(cluster, probes)
    base = getattr(cluster, via).url
    status, answer = await api(base, f"/api/emit/users/{c['alice_a'].user}", {"event": "dm", "data": {"n": 1}})  # type: ignore[attr-defined]
    assert status == 202, answer
    await fence(base, c.values())
    assert without_fences(c["alice_a"]) == [("dm", {"n": 1})]
    assert without_fences(c["alice_b"]) == [("dm", {"n": 1})]
    assert without_fences(c["bob_b"]) == []
    assert without_fences(c["anon_a"]) == []


def test_each_instance_tells_whether_its_redis_is_a_cluster(cluster: Cluster) -> None:
    """Asked of Redis (INFO cluster) at the first connection: nothing was configured."""
    expected = cluster.redis_url != REDIS_URL
    for instance in cluster.instances:
        assert instance.status()[1]["bus"]["cluster"] is expected


async def test_all_scope_reaches_everyone_including_anonymous(cluster: Cluster, probes: list[Probe]) -> None:
    c = await cast(cluster, probes)
    status, _ = await api(cluster.b.url, "/api/emit/all", {"event": "news", "data": [1, "two", None]})
    assert status == 202
    await fence(cluster.a.url, c.values())
    for probe in c.values():
        assert without_fences(probe) == [("news", [1, "two", None])], probe.name


async def test_authenticated_scope_skips_anonymous(cluster: Cluster, probes: list[Probe]) -> None:
    c = await cast(cluster, probes)
    status, _ = await api(cluster.a.url, "/api/emit/authenticated", {"event": "members", "data": "hi"})
    assert status == 202
    await fence(cluster.b.url, c.values())
    for key in ("alice_a", "alice_b", "bob_b"):
        assert without_fences(c[key]) == [("members", "hi")], key
    assert without_fences(c["anon_a"]) == []


async def test_long_polling_and_upgraded_clients_get_every_scope(cluster: Cluster, probes: list[Probe]) -> None:
    """Clients that start on long-polling (the socket.io default) take the library's paths."""
    alice = unique("alice")
    token = await token_for(cluster.a.url, alice)
    polling = Probe("alice@A polling")
    upgraded = Probe("alice@B polling then websocket")
    probes += [polling, upgraded]
    await polling.connect(cluster.a.url, token, transports=("polling",))
    await upgraded.connect(cluster.b.url, token, transports=("polling", "websocket"))
    await upgraded.wait_until(lambda: upgraded.client.transport() == "websocket", "the upgrade")
    assert polling.client.transport() == "polling"
    assert (await api(cluster.a.url, f"/api/emit/users/{alice}", {"event": "dm", "data": 1}))[0] == 202
    assert (await api(cluster.b.url, "/api/emit/all", {"event": "news", "data": 2}))[0] == 202
    await polling.client.emit("events", {"text": "from polling"})
    await upgraded.client.emit("events", {"text": "from websocket"})
    await polling.wait_for("events", 2)
    await upgraded.wait_for("events", 2)
    await fence(cluster.a.url, [polling, upgraded])
    for probe in (polling, upgraded):
        got = without_fences(probe)
        assert got[:2] == [("dm", 1), ("news", 2)], probe.name
        assert sorted(str(data) for _, data in got[2:]) == sorted(
            str({"text": text}) for text in ("from polling", "from websocket")
        ), probe.name
    # Leaving ends the pending long-poll GET at once (python-engineio alone holds it for 45 s).
    await asyncio.wait_for(polling.close(), 5)


async def test_gateway_answer_reaches_asker_once_and_users_other_sockets_in_order(
    cluster: Cluster, probes: list[Probe]
) -> None:
    c = await cast(cluster, probes)
    token = await token_for(cluster.a.url, c["alice_a"].user)  # type: ignore[attr-defined]
    alice_a2 = await open_probe(probes, "alice@A#2", cluster.a.url, token)
    messages = [{"text": f"m{n}"} for n in range(5)]
    for message in messages:
        assert (await c["alice_a"].client.call("events", message, timeout=10))["answers"] == 1
    for probe in (c["alice_a"], c["alice_b"], alice_a2):
        await probe.wait_for("events", len(messages))
    await fence(cluster.a.url, [*c.values(), alice_a2])
    for probe in (c["alice_a"], c["alice_b"], alice_a2):
        assert without_fences(probe) == [("events", m) for m in messages], probe.name
    assert without_fences(c["bob_b"]) == []
    assert without_fences(c["anon_a"]) == []


async def test_several_answers_keep_their_order_everywhere(cluster: Cluster, probes: list[Probe]) -> None:
    c = await cast(cluster, probes)
    ack = await c["alice_b"].client.call("stream", {"count": 7}, timeout=10)
    assert ack == {"ok": True, "answers": 7}
    expected = [("stream", {"n": n, "of": 7}) for n in range(1, 8)]
    await fence(cluster.b.url, c.values())
    assert without_fences(c["alice_b"]) == expected
    assert without_fences(c["alice_a"]) == expected
    assert without_fences(c["bob_b"]) == []


async def test_gateway_refuses_bad_payload_with_an_error_event(cluster: Cluster, probes: list[Probe]) -> None:
    c = await cast(cluster, probes)
    ack = await c["alice_a"].client.call("stream", {"count": "lots"}, timeout=10)
    assert ack["ok"] is False and ack["error"] == "bad_payload"
    errors = await c["alice_a"].wait_for("error")
    assert errors == [{"code": "bad_payload", "message": ack["message"], "event": "stream"}]
    await fence(cluster.a.url, c.values())
    assert without_fences(c["alice_b"]) == []


async def test_anonymous_answers_are_not_propagated(cluster: Cluster, probes: list[Probe]) -> None:
    c = await cast(cluster, probes)
    other_anon = await open_probe(probes, "anon@B", cluster.b.url)
    await c["anon_a"].client.call("events", "hello", timeout=10)
    await fence(cluster.a.url, [*c.values(), other_anon])
    assert without_fences(c["anon_a"]) == [("events", "hello")]
    for probe in (c["alice_a"], c["alice_b"], c["bob_b"], other_anon):
        assert without_fences(probe) == [], probe.name


@pytest.mark.parametrize("how", ["query", "header"])
async def test_token_from_query_or_header(cluster: Cluster, probes: list[Probe], how: str) -> None:
    user = unique("carol")
    probe = await open_probe(probes, "carol", cluster.b.url, await token_for(cluster.b.url, user), how=how)
    assert (await probe.client.call("whoami", timeout=10))["user_id"] == user
    await api(cluster.a.url, f"/api/emit/users/{user}", {"event": "dm", "data": 1})
    assert await probe.wait_for("dm") == [1]


async def test_whoami_names_the_instance(cluster: Cluster, probes: list[Probe]) -> None:
    probe = await open_probe(probes, "anon", cluster.b.url)
    me = await probe.client.call("whoami", timeout=10)
    assert me == {"sid": probe.sid, "user_id": None, "instance": "B"}


@pytest.mark.parametrize("kind", ["tampered", "expired", "other-key", "garbage"])
async def test_bad_tokens_are_refused_with_invalid_token(cluster: Cluster, kind: str) -> None:
    good = TokenSigner(SECRET_KEY).mint("alice", ttl=60).value
    token = {
        "tampered": good[:-3] + ("AAA" if not good.endswith("AAA") else "BBB"),
        "expired": TokenSigner(SECRET_KEY).mint("alice", ttl=10, now=0).value,
        "other-key": TokenSigner("some-other-secret").mint("alice", ttl=60).value,
        "garbage": "not-a-token",
    }[kind]
    probe = Probe(kind)
    try:
        with pytest.raises(socketio.exceptions.ConnectionError):
            await probe.connect(cluster.a.url, token)
        assert probe.connect_error["data"]["code"] == "invalid_token"
        assert probe.connect_error["data"]["message"]
    finally:
        await probe.close()


async def test_garbage_on_our_channels_is_dropped_and_consumption_goes_on(
    cluster: Cluster, probes: list[Probe]
) -> None:
    c = await cast(cluster, probes)
    alice = c["alice_a"].user  # type: ignore[attr-defined]
    before = sum(i.status()[1]["dropped_invalid"] for i in cluster.instances)
    prefix = cluster.prefix
    wrong_user = {"v": 1, "id": "x", "scope": "user", "user_id": "mallory", "event": "e", "ts": 1}
    garbage = [
        (f"{prefix}:all", b"not json at all"),
        (f"{prefix}:all", b"\xff\xfe\x00"),
        (f"{prefix}:all", b'{"v": 1, "scope": "all"}'),
        (f"{prefix}:all", b"[1, 2, 3]"),
        (f"{prefix}:authenticated", orjson.dumps({**wrong_user, "scope": "all"})),
        (f"{prefix}:user:{alice}", orjson.dumps(wrong_user)),
        (f"{prefix}:user:{alice}", b'{"v": 1, "id": "x", "scope": "user", "user_id": "a", "event": "disconnect", "ts": 1}'),
    ]
    for channel, raw in garbage:
        publish_raw(cluster.redis_url, prefix, channel, raw)
    status, _ = await api(cluster.a.url, "/api/emit/all", {"event": "after", "data": "still alive"})
    assert status == 202
    await fence(cluster.b.url, c.values())
    for probe in c.values():
        assert without_fences(probe) == [("after", "still alive")], probe.name
    # Every instance drops the five broadcast ones; the two on alice's channel on both (alice on A
    # and B). Done by now: the fence had every instance consume every partition past the garbage.
    assert sum(i.status()[1]["dropped_invalid"] for i in cluster.instances) - before == 2 * len(garbage)


async def test_an_envelope_published_twice_is_delivered_once(cluster: Cluster, probes: list[Probe]) -> None:
    """What a batch Redis applied although its reply was lost, then retried, looks like."""
    c = await cast(cluster, probes)
    alice = c["alice_a"].user  # type: ignore[attr-defined]
    twice = orjson.dumps(
        {"v": 1, "id": unique("env"), "scope": "user", "user_id": alice, "event": "dm", "data": 1, "ts": 1}
    )
    for _ in range(2):
        publish_raw(cluster.redis_url, cluster.prefix, f"{cluster.prefix}:user:{alice}", twice)
    await fence(cluster.b.url, c.values())
    assert without_fences(c["alice_a"]) == [("dm", 1)]
    assert without_fences(c["alice_b"]) == [("dm", 1)]


async def test_last_socket_leaving_releases_the_users_channel(cluster: Cluster, probes: list[Probe]) -> None:
    user = unique("dave")
    channel = f"{cluster.prefix}:user:{user}"
    token = await token_for(cluster.a.url, user)

    def subscribers() -> int:
        # On a cluster: the shard channel, over every node.
        return count_subscribers(cluster.redis_url, channel, sharded_prefix=cluster.prefix)

    first = await open_probe(probes, "dave1", cluster.a.url, token)
    # confirmed before the connection was accepted: no waiting needed here
    assert subscribers() == 1
    second = await open_probe(probes, "dave2", cluster.a.url, token)
    third = await open_probe(probes, "dave3", cluster.b.url, token)
    assert subscribers() == 2
    await first.close()
    await second.close()
    await wait_until(lambda: subscribers() == 1, "A to release the channel")
    users_on_a = cluster.a.status()[1]
    assert users_on_a["users"] == 0 and users_on_a["sockets"] == 0
    await third.close()
    await wait_until(lambda: subscribers() == 0, "B to release the channel")
    for instance in cluster.instances:

        def empty(instance: Instance = instance) -> bool:
            state = instance.status()[1]
            return (state["sockets"], state["users"], state["bus"]["channels"]) == (0, 0, 4)

        await wait_until(empty, f"{instance.name} to hold nothing but its four fixed channels (all, authenticated, its own sync and node channels)")
