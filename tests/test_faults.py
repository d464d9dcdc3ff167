"""Faults against real processes: Redis restarts or is missing, instances die or drain, slow readers."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import aiohttp
import pytest
import redis

from bench.cluster import subscribers

from .conftest import BACKENDS
from .harness import (
    API_KEY,
    REDIS_URL,
    Instance,
    Probe,
    RawSocket,
    RedisServer,
    StalledSocket,
    api,
    fence,
    http_get,
    instance_env,
    open_fds,
    tcp_peers,
    token_for,
    unique,
    wait_until,
)

pytestmark = pytest.mark.cluster

BACKOFF_MAX = 0.5  # REDIS_BACKOFF_MAX of these instances, in seconds
FAST_RECOVERY = {"REDIS_BACKOFF_MAX": str(BACKOFF_MAX)}


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.stop(signal.SIGKILL)


def launch(instances: list[Instance], name: str, prefix: str, redis_url: str | None, **extra: str) -> Instance:
    instance = Instance(name, instance_env(prefix, redis_url=redis_url, **{**FAST_RECOVERY, **extra})).start()
    instances.append(instance)
    return instance


async def pair(
    instances: list[Instance], probes: list[Probe], name: str, redis_url: str, **a_env: str
) -> tuple[Instance, Instance, str, str, str, Probe, Probe]:
    """Instances A and B under a fresh prefix, and one user with a socket on each."""
    prefix = unique(name)
    a = launch(instances, "A", prefix, redis_url, **a_env)
    b = launch(instances, "B", prefix, redis_url)
    a.wait_serving()
    b.wait_serving()
    user = unique(f"{name}-user")
    token = await token_for(a.url, user)
    on_a, on_b = Probe(f"{user}@A"), Probe(f"{user}@B")
    probes.extend([on_a, on_b])
    await on_a.connect(a.url, token)
    await on_b.connect(b.url, token)
    return a, b, prefix, user, token, on_a, on_b


async def ready(instance: Instance, want: bool = True, timeout: float = 15) -> None:
    await wait_until(lambda: (instance.readyz()[0] == 200) is want, f"{instance.name} ready={want}", timeout=timeout)


async def test_redis_restart_under_traffic(
    own_redis: RedisServer, instances: list[Instance], probes: list[Probe]
) -> None:
    a, b, _, alice, _, alice_a, alice_b = await pair(instances, probes, "restart", own_redis.url)
    anon_b = Probe("anon@B")
    probes.append(anon_b)
    await anon_b.connect(b.url)

    # steady traffic through the whole outage: every acknowledged tick must arrive everywhere
    acknowledged: list[int] = []
    refused: list[int] = []
    stop = asyncio.Event()

    async def traffic() -> None:
        n = 0
        while not stop.is_set() and n < 2000:
            status, _ = await api((a, b)[n % 2].url, "/api/emit/all", {"event": "tick", "data": n})
            (acknowledged if status == 202 else refused).append(n)
            assert status in (202, 503)
            n += 1
            await asyncio.sleep(0.01)

    ticker = asyncio.create_task(traffic())
    await wait_until(lambda: len(acknowledged) >= 10, "some traffic before the outage")

    own_redis.stop()
    await ready(a, False)
    await ready(b, False)
    await wait_until(lambda: len(refused) >= 3, "REST hooks answering 503 during the outage")

    # during the outage: a new user connects, and a gateway answer waits in the outbox
    carol = unique("carol")
    carol_a = Probe("carol@A")
    probes.append(carol_a)
    await carol_a.connect(a.url, await token_for(a.url, carol))
    assert await alice_a.client.call("events", "said during the outage", timeout=10) == {"ok": True, "answers": 1}
    assert await alice_a.wait_for("events") == ["said during the outage"]

    own_redis.start()
    # Ready again within the backoff cap, plus the reconnection, resubscription and replay (tens
    # of milliseconds; 0.0 to 0.2 s measured in all): 1 s for a 0.5 s cap.
    bound = BACKOFF_MAX + 0.5
    await asyncio.gather(ready(a, timeout=bound), ready(b, timeout=bound))
    assert await alice_b.wait_for("events") == ["said during the outage"]  # delivered from the outbox
    stop.set()
    await ticker

    assert (await api(b.url, f"/api/emit/users/{carol}", {"event": "dm", "data": "hi carol"}))[0] == 202
    assert (await api(b.url, f"/api/emit/users/{alice}", {"event": "dm", "data": "hi alice"}))[0] == 202
    assert await carol_a.wait_for("dm") == ["hi carol"]
    everyone = [alice_a, alice_b, anon_b, carol_a]
    await fence(a.url, everyone)
    # the answer given during the outage: once to the asker, once to her other socket, late
    assert alice_a.of("events") == alice_b.of("events") == ["said during the outage"]
    assert carol_a.of("dm") == ["hi carol"]
    for probe in (alice_a, alice_b, anon_b):
        assert probe.client.connected, f"{probe.name} was disconnected by a Redis restart"
        ticks = probe.of("tick")
        assert len(ticks) == len(set(ticks)), f"{probe.name} got duplicates: {ticks}; acked {acknowledged}; refused {refused}"
        assert set(acknowledged) <= set(ticks), f"{probe.name} lost {sorted(set(acknowledged) - set(ticks))}"
        assert not set(ticks) & set(refused), "a refused (503) event was delivered"
    assert alice_a.of("dm") == alice_b.of("dm") == ["hi alice"]
    status, body = a.status()
    assert status == 200 and body["bus"]["reconnects"] >= 1 and body["outbox"]["delivered_late"] == 1


async def test_redis_missing_at_start_then_appearing(instances: list[Instance], probes: list[Probe]) -> None:
    later = RedisServer()  # its port is closed for now
    instance = launch(instances, "early", unique("early"), later.url)
    try:
        instance.wait_serving(ready=False)
        page = http_get(instance.url + "/healthz")
        assert page[0] == 200
        assert instance.readyz()[0] == 503
        later.start()
        await ready(instance)
        user = unique("erin")
        probe = Probe("erin")
        probes.append(probe)
        await probe.connect(instance.url, await token_for(instance.url, user))
        assert (await api(instance.url, f"/api/emit/users/{user}", {"event": "dm", "data": 1}))[0] == 202
        await probe.wait_for("dm")
        await fence(instance.url, [probe])
        assert probe.of("dm") == [1]  # once
    finally:
        later.stop(signal.SIGKILL)


async def test_outbox_is_bounded_and_counts_what_it_drops(
    own_redis: RedisServer, instances: list[Instance], probes: list[Probe]
) -> None:
    a, b, _, _, _, on_a, on_b = await pair(instances, probes, "outbox", own_redis.url, OUTBOX_MAX_MESSAGES="3")
    own_redis.stop()
    await ready(a, False)
    for n in range(5):
        await on_a.client.call("events", n, timeout=10)
    assert await on_a.wait_for("events", 5) == [0, 1, 2, 3, 4]  # the asker always gets its answers
    own_redis.start()
    await ready(a)
    await ready(b)
    await on_b.wait_for("events", 3)
    await fence(a.url, [on_a, on_b])
    assert on_b.of("events") == [0, 1, 2]  # what fitted, in order; the rest is counted, not silent
    body = a.status()[1]
    assert body["outbox"] == {"waiting": 0, "delivered_late": 3, "dropped": 2}


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """The Redis the test's instances use: one node, then the session's local Redis Cluster."""
    return REDIS_URL if request.param == "redis" else str(request.getfixturevalue("redis_cluster_url"))


async def test_sigkill_leaves_the_other_instance_serving(
    instances: list[Instance], probes: list[Probe], backend: str
) -> None:
    a, b, prefix, alice, token, alice_a, alice_b = await pair(instances, probes, "kill", backend)
    lost = asyncio.Event()
    alice_a.client.on("disconnect", lambda *_: lost.set())

    a.stop(signal.SIGKILL)
    await asyncio.wait_for(lost.wait(), 10)
    assert b.readyz()[0] == 200
    channel = f"{prefix}:user:{alice}"
    await wait_until(
        lambda: subscribers(backend, channel, sharded_prefix=prefix) == 1, "Redis to drop A's subscriptions"
    )
    # the client of the dead instance comes back through a live one (as a load balancer would send it)
    back = Probe("alice@A->B")
    probes.append(back)
    await back.connect(b.url, token)
    assert (await api(b.url, f"/api/emit/users/{alice}", {"event": "dm", "data": "after the crash"}))[0] == 202
    await back.wait_for("dm")
    await alice_b.wait_for("dm")
    await fence(b.url, [back, alice_b])
    assert back.of("dm") == alice_b.of("dm") == ["after the crash"]  # once each


async def test_sigterm_drains_tells_clients_and_exits_zero(
    instances: list[Instance], probes: list[Probe], backend: str
) -> None:
    a, b, prefix, gina, _, on_a, on_b = await pair(instances, probes, "drain", backend, SHUTDOWN_TIMEOUT="5")
    reasons: list[str] = []
    on_a.client.on("disconnect", lambda reason=None: reasons.append(str(reason)))

    assert a.proc is not None
    a.proc.send_signal(signal.SIGTERM)
    # wait without blocking this loop: the clients here must see the close to finish the drain
    await wait_until(lambda: a.proc.poll() is not None, "A to exit", timeout=10)  # type: ignore[union-attr]
    assert a.proc.returncode == 0
    notice = await on_a.wait_for("server_shutdown")
    assert notice == [{"reason": "instance shutting down", "instance": "A", "reconnect": True}]
    await wait_until(lambda: reasons, "the client to see the disconnect")
    for channel in (f"{prefix}:user:{gina}", f"{prefix}:all"):
        assert subscribers(backend, channel, sharded_prefix=prefix) == 1  # only B's remains
    assert "drained; 0 sockets left" in a.output()
    assert (await api(b.url, f"/api/emit/users/{gina}", {"event": "dm", "data": "still here"}))[0] == 202
    await on_b.wait_for("dm")
    await fence(b.url, [on_b])
    assert on_b.of("dm") == ["still here"]  # once


@pytest.mark.parametrize("consumed", [True, False], ids=["queued", "in-flight"])
async def test_sigterm_flushes_what_was_sent_before_each_socket_closes(instances: list[Instance], consumed: bool) -> None:
    """Events sent to a socket just before SIGTERM, while it reads nothing, all reach it in order,
    then `server_shutdown`, then the end of the connection: nothing in flight is lost."""
    instance = launch(instances, "F", unique("flush"), REDIS_URL, SHUTDOWN_TIMEOUT="10")
    instance.wait_serving()
    stalled = StalledSocket(instance.url)  # anonymous: broadcasts reach it; it reads nothing for now
    try:
        await wait_until(lambda: instance.status()[1]["sockets"] == 1, "the socket to be held")
        delivered = instance.status()[1]["delivered"]
        # 8 MB: more than the connection's buffers take (a loopback send buffer grows to 4 MB), so
        # most of it waits in the socket's queue when the signal comes.
        count, blob = 140, "x" * 60_000
        for n in range(count):
            assert (await api(instance.url, "/api/emit/all", {"event": "sent", "data": [n, blob]}))[0] == 202
        if consumed:  # consumed and queued for the socket (or written to it), not yet read
            await wait_until(lambda: instance.status()[1]["delivered"] >= delivered + count, "every event queued")
        assert instance.proc is not None
        instance.proc.send_signal(signal.SIGTERM)
        texts, close_frame = stalled.read_until_closed()
    finally:
        stalled.close()
    events = [json.loads(text[2:]) for text in texts if text.startswith("42")]
    assert [event[0] for event in events] == ["sent"] * count + ["server_shutdown"], [e[0] for e in events]
    assert [event[1][0] for event in events[:count]] == list(range(count))
    assert texts[-1].startswith('42["server_shutdown"')  # and then the connection ended
    await wait_until(lambda: instance.proc.poll() is not None, "the exit", timeout=10)  # type: ignore[union-attr]
    assert instance.proc.returncode == 0
    print(f"ended {'with' if close_frame else 'without'} a close frame")


async def test_sigterm_turns_unready_first_and_drains_after_the_delay(
    instances: list[Instance], probes: list[Probe]
) -> None:
    """Behind a load balancer: /readyz is 503 at once, new sockets are still accepted while it
    notices, and only after DRAIN_DELAY are sockets told to go and the listener closed."""
    instance = launch(instances, "D", unique("delay"), REDIS_URL, DRAIN_DELAY="2", SHUTDOWN_TIMEOUT="5")
    instance.wait_serving()
    early = Probe("early")
    probes.append(early)
    await early.connect(instance.url)
    assert instance.proc is not None
    signalled = time.monotonic()
    instance.proc.send_signal(signal.SIGTERM)
    await wait_until(lambda: instance.readyz()[0] == 503, "/readyz to turn 503", timeout=1)
    late = Probe("late")
    probes.append(late)
    await late.connect(instance.url)  # still accepted while the load balancer catches up
    assert early.of("server_shutdown") == []
    await early.wait_for("server_shutdown")
    assert time.monotonic() - signalled >= 1.8  # not before DRAIN_DELAY
    assert await late.wait_for("server_shutdown")
    await wait_until(lambda: instance.proc.poll() is not None, "the exit", timeout=10)  # type: ignore[union-attr]
    assert instance.proc.returncode == 0


async def test_web_concurrency_workers_serve_as_instances_and_drain_on_the_parents_sigterm(
    instances: list[Instance], probes: list[Probe]
) -> None:
    """WEB_CONCURRENCY=2: two hypercorn workers share the port, each an instance of its own (a
    user's event reaches the user's sockets on both); SIGTERM to hypercorn's parent alone, as
    `docker stop` sends it, drains both: every socket is told why, and the server exits 0."""
    server = launch(instances, "W", unique("workers"), REDIS_URL, WEB_CONCURRENCY="2", SHUTDOWN_TIMEOUT="5")
    server.wait_serving()
    ready: set[str] = set()

    def both_ready() -> bool:  # each request is a new connection: either worker may answer it
        status, body = server.status()
        if status == 200 and body["ready"]:
            ready.add(body["instance"])
        return len(ready) == 2

    await wait_until(both_ready, "both workers to answer ready", timeout=20)
    walt = unique("walt")
    token = await token_for(server.url, walt)
    held: dict[str, Probe] = {}  # a socket on each worker
    for n in range(100):  # the kernel hands each connection to either worker
        probe = Probe(f"walt{n}")
        probes.append(probe)
        await probe.connect(server.url, token)
        held.setdefault((await probe.client.call("whoami"))["instance"], probe)
        if len(held) == 2:
            break
    assert len(held) == 2, f"every connection went to one worker: {list(held)}"
    assert all(name.startswith("W.") for name in held), held  # INSTANCE_ID, then the worker's pid
    assert (await api(server.url, f"/api/emit/users/{walt}", {"event": "dm", "data": 1}))[0] == 202
    for probe in held.values():
        await probe.wait_for("dm")
    await fence(server.url, held.values())  # one Redis node: the broadcast reaches both workers
    for probe in held.values():
        assert probe.of("dm") == [1], probe.name  # once on each worker

    assert server.proc is not None
    server.proc.send_signal(signal.SIGTERM)  # the parent only
    for probe in held.values():
        notice = await probe.wait_for("server_shutdown")
        assert notice[0]["reconnect"] is True and notice[0]["instance"] in held
    await wait_until(lambda: server.proc.poll() is not None, "hypercorn to exit", timeout=15)  # type: ignore[union-attr]
    assert server.proc.returncode == 0


async def test_slow_consumer_delays_nobody_and_its_connection_is_freed(
    instances: list[Instance], probes: list[Probe]
) -> None:
    """A socket that never reads is evicted at SOCKET_MAX_QUEUE, and its TCP connection, file
    descriptor and tasks are gone within SOCKET_WRITE_TIMEOUT, though the server's last writes
    to it can never complete."""
    instance = launch(instances, "S", unique("slow"), REDIS_URL, SOCKET_MAX_QUEUE="50", SOCKET_WRITE_TIMEOUT="2")
    instance.wait_serving()
    assert instance.proc is not None
    pid = instance.proc.pid
    reader = Probe("reader")
    probes.append(reader)
    await reader.connect(instance.url)
    # Every REST call goes over one kept-alive connection, opened (with Redis's publishing
    # connection) before the counts: hypercorn 0.18 keeps a task, and a descriptor in
    # CLOSE-WAIT, for each connection a client closed, until --keep-alive expires.
    rest = aiohttp.ClientSession(base_url=instance.url, headers={"Authorization": f"Bearer {API_KEY}"})

    async def emit(event: str, data: object) -> int:
        async with rest.post("/api/emit/all", json={"event": event, "data": data}) as response:
            await response.read()  # read in full, so aiohttp keeps the connection
            return response.status

    async def status() -> dict[str, Any]:
        async with rest.get("/api/status") as response:
            return dict(await response.json())

    stalled: StalledSocket | None = None
    try:
        assert await emit("warm", 0) == 202
        await reader.wait_for("warm")
        fds, tasks = open_fds(pid), (await status())["tasks"]
        stalled = StalledSocket(instance.url)
        await wait_until(lambda: _sockets_held(status, 2), "the stalled socket to be held")
        assert stalled.local_port in tcp_peers(instance.port)
        blob = "x" * 30_000
        total = 300
        for n in range(total):
            assert await emit("bulk", [n, blob]) == 202
        got = await reader.wait_for("bulk", total, timeout=30)
        assert [item[0] for item in got] == list(range(total))
        body = await status()
        assert body["slow_consumers_evicted"] == 1
        assert body["sockets"] == 1  # the stalled socket is gone from the state at once
        # The server's writes to it are stuck in a shut window: only the write timeout frees it.
        port = stalled.local_port
        await wait_until(lambda: port not in tcp_peers(instance.port), "the stalled connection to be dropped", timeout=2 + 5)
        await wait_until(lambda: open_fds(pid) <= fds, f"file descriptors back to {fds}", timeout=5)
        await wait_until(lambda: _tasks_at_most(status, tasks), f"tasks back to {tasks}", timeout=5)
        assert await emit("after", 1) == 202
        assert await reader.wait_for("after") == [1]  # the instance serves on, undisturbed
    finally:
        if stalled is not None:
            stalled.close()
        await rest.close()


async def _sockets_held(status: Callable[[], Awaitable[dict[str, Any]]], count: int) -> bool:
    return bool((await status())["sockets"] == count)


async def _tasks_at_most(status: Callable[[], Awaitable[dict[str, Any]]], count: int) -> bool:
    return bool((await status())["tasks"] <= count)


async def test_a_socket_whose_channel_redis_does_not_confirm_is_refused(
    own_redis: RedisServer, instances: list[Instance]
) -> None:
    """Redis is there but does not answer in time: the handshake is refused, never accepted
    with a channel that may not be subscribed."""
    prefix = unique("unconfirmed")
    a = launch(instances, "A", prefix, own_redis.url, REDIS_TIMEOUT="0.3")
    a.wait_serving()
    user = unique("user")
    token = await token_for(a.url, user)
    pauser = redis.Redis.from_url(own_redis.url)
    try:
        pauser.execute_command("CLIENT", "PAUSE", "1500", "ALL")  # every other client's commands wait
        raw = await RawSocket.open(a.url, token)
        try:
            assert (await raw.connected())["data"]["code"] == "bus_unavailable"
        finally:
            await raw.close()
    finally:
        pauser.execute_command("CLIENT", "UNPAUSE")
        pauser.close()
    probe = Probe(f"{user}@A")
    try:
        await probe.connect(a.url, token)  # Redis answers again: accepted, and reached
        status, _ = await api(a.url, f"/api/emit/users/{user}", {"event": "dm", "data": 1})
        assert status == 202
        await probe.wait_for("dm")
        await fence(a.url, [probe])
        assert probe.of("dm") == [1]  # once
    finally:
        await probe.close()
