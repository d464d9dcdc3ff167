"""Drills against the whole system: a rolling deploy under a steady stream of events with the
official JS client and python-socketio behind one address, and an instance cut off from Redis
for longer than its reconnect backoff. Nothing acknowledged is lost or duplicated."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from typing import Any

import aiohttp
import pytest

from webapp.client import RecoveringClient

from .harness import WAIT, Instance, Probe, api, instance_env, start_pair, token_for, unique, wait_until
from .jsclient import JsClients, client_spec
from .proxy import TcpProxy

pytestmark = pytest.mark.cluster

SCOPES = ("user:u1", "user:u2", "all", "authenticated")


class Publisher:
    """REST emits at a steady rate, cycling through the scopes, to whichever instance answers."""

    def __init__(self, bases: list[str], users: dict[str, str], rate: float = 50.0) -> None:
        self.bases, self.users, self.rate = bases, users, rate
        self.acked: list[tuple[int, str]] = []  # (n, scope) answered 202
        self.unsure: set[int] = set()  # neither a 202 nor a clear refusal
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _run(self) -> None:
        n = 0
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as session:
            while True:
                scope = SCOPES[n % len(SCOPES)]
                path = f"/api/emit/users/{self.users[scope]}" if scope.startswith("user:") else f"/api/emit/{scope}"
                for base in (self.bases[n % 2], self.bases[(n + 1) % 2]):
                    try:
                        async with session.post(
                            base + path,
                            json={"event": "tick", "data": n},
                            headers={"Authorization": "Bearer test-api-key"},
                        ) as response:
                            if response.status == 202:
                                self.acked.append((n, scope))
                                break
                    except (aiohttp.ClientError, TimeoutError):
                        self.unsure.add(n)  # sent perhaps: not retried, so never counted twice
                        break
                n += 1
                await asyncio.sleep(1 / self.rate)  # the drill's steady rate

    def expected(self, scopes: set[str]) -> list[int]:
        return [n for n, scope in self.acked if scope in scopes]


def received(ticks: list[Any], unsure: set[int]) -> list[int]:
    return [n for n in ticks if n not in unsure]


async def test_rolling_deploy_and_a_crash_lose_nothing_for_recovering_clients(instances: list[Instance]) -> None:
    prefix = unique("drill")
    env = instance_env(prefix, REDIS_BACKOFF_MAX="0.5", SHUTDOWN_TIMEOUT="3")
    a, b = Instance("A", env).start(), Instance("B", env).start()
    instances.extend([a, b])
    a.wait_serving()
    b.wait_serving()
    u1, u2 = unique("u1"), unique("u2")
    t1, t2 = await token_for(a.url, u1, ttl=3600), await token_for(a.url, u2, ttl=3600)
    users = {"user:u1": u1, "user:u2": u2}
    with TcpProxy([("127.0.0.1", a.port), ("127.0.0.1", b.port)]).start() as balancer:
        clients = await JsClients.start(
            balancer.url_for(),
            [
                client_spec("js-u1", t1, recover=True),
                client_spec("js-u2", t2, recover=True),
                client_spec("js-anon", None, recover=True),
                client_spec("js-plain", t1, recover=False),
            ],
        )
        py_ticks: list[Any] = []
        py = RecoveringClient(reconnection=True, reconnection_delay=0.1, reconnection_delay_max=0.5)
        py.on("tick", lambda data: py_ticks.append(data))
        py.on("done", lambda data: py_ticks.append("done"))
        await py.connect(balancer.url_for(), auth={"token": t2}, transports=["websocket"], wait_timeout=WAIT)
        publisher = Publisher([a.url, b.url], users)
        try:
            publisher.start()
            await wait_until(lambda: len(publisher.acked) >= 25, "the stream to flow")
            for instance, other, how in ((a, b, signal.SIGTERM), (b, a, signal.SIGTERM), (a, b, signal.SIGKILL)):
                assert instance.stop(how) in (0, -signal.SIGKILL)
                # all five clients are back, on the instance still up, before the restart
                await wait_until(lambda o=other: o.status()[1].get("sockets") == 5, f"all sockets on {other.name}")
                instance.start()
                instance.wait_serving()
                await wait_until(lambda: py.connected, "the Python client back")
                mark = len(publisher.acked)
                await wait_until(lambda m=mark: len(publisher.acked) >= m + 25, "the stream to go on")
        finally:
            await publisher.stop()
        try:
            status, answer = await api(a.url, "/api/emit/all", {"event": "done", "data": None})
            assert status == 202, answer
            await clients.wait_until(
                lambda: all(clients.of(n, "done") for n in ("js-u1", "js-u2", "js-anon", "js-plain")), "done everywhere"
            )
            await wait_until(lambda: "done" in py_ticks, "done for the Python client")
            py_ticks.remove("done")
            unsure = publisher.unsure
            for name, scopes in (
                ("js-u1", {"user:u1", "all", "authenticated"}),
                ("js-u2", {"user:u2", "all", "authenticated"}),
                ("js-anon", {"all"}),
            ):
                ticks = [args[0] for args in clients.of(name, "tick")]
                assert all(isinstance(args[-1], str) and len(args) == 2 for args in clients.of(name, "tick"))
                assert received(ticks, unsure) == publisher.expected(scopes), name
                connects = clients.connects(name)
                # two or three moves each (those that started on B stayed through A's first stop)
                assert len(connects) >= 3 and all(c["recovered"] for c in connects[1:]), (name, connects)
                assert not clients.of(name, "recovery_failed"), name
            plain = [args for args in clients.of("js-plain", "tick")]
            assert all(len(args) == 1 for args in plain)  # no offset for a client that did not opt in
            ticks = [args[0] for args in plain]
            assert len(ticks) == len(set(ticks)) and ticks == sorted(ticks)
            assert received(py_ticks, unsure) == publisher.expected({"user:u2", "all", "authenticated"})
            assert py.recovered
        finally:
            await py.disconnect()
            await py.shutdown()
            await clients.close()


async def test_an_instance_cut_off_from_redis_for_seconds_loses_nothing(instances: list[Instance]) -> None:
    """Cut longer than REDIS_BACKOFF_MAX while the other instance keeps publishing."""
    prefix = unique("partition")
    with TcpProxy([("127.0.0.1", 6379)]).start() as redis_link:
        a, b = start_pair(
            instances,
            instance_env(prefix, redis_url=redis_link.redis_url, REDIS_BACKOFF_MAX="1"),
            instance_env(prefix, REDIS_BACKOFF_MAX="1"),
        )
        user = unique("user")
        probe = Probe(f"{user}@A")
        await probe.connect(a.url, await token_for(b.url, user))
        try:
            sent: list[int] = []
            n = 0

            async def publish_for(seconds: float) -> None:
                nonlocal n
                deadline = asyncio.get_running_loop().time() + seconds
                while asyncio.get_running_loop().time() < deadline:
                    status, _ = await api(b.url, f"/api/emit/users/{user}", {"event": "tick", "data": n})
                    assert status == 202
                    sent.append(n)
                    n += 1
                    await asyncio.sleep(0.05)  # the drill's rate, 20 events/s

            await publish_for(0.5)
            redis_link.cut()
            await wait_until(lambda: a.readyz()[0] == 503, "A to notice the cut")
            await publish_for(4.0)  # four times REDIS_BACKOFF_MAX
            redis_link.restore()
            await wait_until(lambda: a.readyz()[0] == 200, "A back", timeout=15)
            await publish_for(0.5)
            await probe.wait_until(lambda: len(probe.of("tick")) >= len(sent), f"{len(sent)} ticks")
            status, answer = await api(b.url, "/api/emit/all", {"event": "fence", "data": None})
            assert status == 202, answer
            await probe.wait_for("fence")
            assert probe.of("tick") == sent  # every one, once, in order
            assert len(sent) > 60
            assert a.status()[1]["bus"]["gaps"] == 0
        finally:
            await probe.close()


async def test_a_subscriber_cut_twice_within_100_ms_under_load_loses_nothing(instances: list[Instance]) -> None:
    """The second cut lands while the instance reconnects or catches up from the first: a catch-up
    cut short must not move the instance's position past what it had not delivered."""
    prefix = unique("flap")
    with TcpProxy([("127.0.0.1", 6379)]).start() as redis_link:
        a, b = start_pair(
            instances, instance_env(prefix, redis_url=redis_link.redis_url, REDIS_BACKOFF_MAX="0.2"), instance_env(prefix)
        )
        user = unique("user")
        probe = Probe(f"{user}@A")
        await probe.connect(a.url, await token_for(b.url, user))
        acked: list[int] = []
        stop = asyncio.Event()

        async def flood(first: int, step: int) -> None:
            """Batches of 20 events to the user on B, back to back: the load A catches up on."""
            n = first
            while not stop.is_set():
                events = [{"scope": "user", "user_id": user, "event": "tick", "data": n + i} for i in range(20)]
                status, answer = await api(b.url, "/api/emit/batch", {"events": events})
                assert status == 202, answer
                acked.extend(range(n, n + 20))
                n += step

        async def toggle_rooms() -> None:
            """Backend room changes for the user between the events: applying one awaits Redis
            (the room's channel is subscribed), so a catch-up of them yields mid-way."""
            k = 0
            while not stop.is_set():
                for method in ("PUT", "DELETE"):
                    status, answer = await api(b.url, f"/api/users/{user}/rooms/r{k % 5}", method=method)
                    assert status == 200, answer
                k += 1

        floods = [asyncio.create_task(flood(k * 20, 40)) for k in range(2)]
        floods.append(asyncio.create_task(toggle_rooms()))
        try:
            await wait_until(lambda: len(acked) >= 200, "the flood to flow")
            for gap in (0.1, 0.08, 0.06, 0.04, 0.02, 0.1):  # the second cut at various points of the first's recovery
                redis_link.cut()
                redis_link.restore()
                await asyncio.sleep(gap)
                redis_link.cut()
                redis_link.restore()
                await wait_until(lambda: a.readyz()[0] == 200, "A back after the second cut", timeout=15)
                await asyncio.sleep(0.3)  # load in between
        finally:
            stop.set()
            await asyncio.gather(*floods)
            try:
                status, answer = await api(b.url, "/api/emit/all", {"event": "fence", "data": None})
                assert status == 202, answer
                await probe.wait_for("fence", timeout=30)
                ticks = probe.of("tick")
                assert len(ticks) == len(set(ticks)), f"{len(ticks) - len(set(ticks))} duplicates"
                assert sorted(ticks) == sorted(acked), f"lost {sorted(set(acked) - set(ticks))[:20]}"
                status, body = a.status()
                assert body["bus"]["reconnects"] >= 6 and body["bus"]["gaps"] == 0
            finally:
                await probe.close()
