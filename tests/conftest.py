"""Fixtures: apps built by the factory, real instances against a real Redis, cleaned up after."""

from __future__ import annotations

import dataclasses
import signal
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

import pytest
import redis
from quart import Quart
from quart.typing import TestClientProtocol as Client

from bench.cluster import forget
from webapp import Settings, create_app

from .harness import (
    API_KEY,
    REDIS_URL,
    ROOT,
    SECRET_KEY,
    Instance,
    Probe,
    RawSocket,
    free_cluster_base,
    instance_env,
    unique,
)


@pytest.fixture
def settings() -> Settings:
    from_env = Settings.from_env(
        {
            "SECRET_KEY": SECRET_KEY,
            "API_KEYS": API_KEY,
            "CHANNEL_PREFIX": unique("unit"),
            "WEBAPP_ENV": "test",
            "MAX_PAYLOAD_BYTES": "4096",
            "INSTANCE_ID": "unit",
        }
    )
    return dataclasses.replace(from_env, drain_on_sigterm=False)


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[Quart]:
    """An app on the in-memory bus, started (before_serving/while_serving run) and stopped."""
    application = create_app(settings)
    async with application.test_app():
        yield application


@pytest.fixture
def client(app: Quart) -> Client:
    return app.test_client()


@pytest.fixture(scope="session")
def redis_client() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.ConnectionError as exc:  # pragma: no cover - a broken test machine
        pytest.fail(f"tests need a real Redis at {REDIS_URL}: {exc}")
    yield client
    client.close()


class Cluster:
    """Real instances (A and B unless told) sharing one Redis under a prefix of their own."""

    def __init__(
        self, prefix: str, names: tuple[str, ...] = ("A", "B"), *, app: str = "webapp.asgi:app", **env: str
    ) -> None:
        self.prefix = prefix
        self.redis_url = env.get("redis_url", REDIS_URL)
        self.instances = [Instance(name, instance_env(prefix, **env), app=app).start() for name in names]
        for instance in self.instances:
            instance.wait_serving()

    def restart(self, index: int, sig: int = signal.SIGKILL) -> None:
        """Stop an instance (SIGKILL unless told) and start it again on the same port (a new
        process: a new sid tag)."""
        old = self.instances[index]
        old.stop(sig)
        self.instances[index] = Instance(old.name, old.env, port=old.port, app=old.app).start()
        self.instances[index].wait_serving()

    @property
    def a(self) -> Instance:
        return self.instances[0]

    @property
    def b(self) -> Instance:
        return self.instances[1]

    def close(self) -> None:
        for instance in self.instances:
            instance.stop()


@contextmanager
def running(redis_client: redis.Redis, cluster: Cluster) -> Iterator[Cluster]:
    """Yield a started cluster; afterwards stop it and delete every key under its prefix."""
    try:
        yield cluster
    finally:
        cluster.close()
        forget(redis_client, cluster.prefix)


@pytest.fixture
async def wires() -> AsyncIterator[list[RawSocket]]:
    """Raw sockets a test opened (the recovery tests' `Wire`s), closed after it."""
    opened: list[RawSocket] = []
    yield opened
    for wire in opened:
        await wire.close()


@pytest.fixture(scope="session")
def redis_cluster_url() -> Iterator[str]:
    """A local Redis Cluster (3 masters, 3 replicas) from scripts/redis-cluster.sh, for the session."""
    base = free_cluster_base()
    script = str(ROOT / "scripts" / "redis-cluster.sh")
    started = subprocess.run([script, "start", str(base)], capture_output=True, text=True, timeout=60, check=False)
    if started.returncode != 0:
        pytest.fail(f"the local Redis Cluster did not start: {started.stderr}")
    yield started.stdout.strip()
    subprocess.run([script, "stop", str(base)], capture_output=True, timeout=60, check=False)


BACKENDS = ["redis", "redis-cluster"]  # the params of fixtures whose suites run on both


@contextmanager
def on_backend(
    request: pytest.FixtureRequest, redis_client: redis.Redis, name: str, names: tuple[str, ...] = ("A", "B"), **env: str
) -> Iterator[Cluster]:
    """Instances on the backend `request.param` names: one Redis node (keys deleted afterwards), or
    the session's local Redis Cluster (gone with it)."""
    if request.param == "redis":
        with running(redis_client, Cluster(unique(name), names, **env)) as started:
            yield started
        return
    fleet = Cluster(unique(name), names, redis_url=request.getfixturevalue("redis_cluster_url"), **env)
    try:
        yield fleet
    finally:
        fleet.close()


@pytest.fixture(scope="module", params=BACKENDS)
def cluster(request: pytest.FixtureRequest, redis_client: redis.Redis) -> Iterator[Cluster]:
    """Two instances on one Redis node, then on a Redis Cluster: the contract holds on both."""
    with on_backend(request, redis_client, "cluster") as started:
        yield started


@pytest.fixture
def instances() -> Iterator[list[Instance]]:
    """Instances a test starts itself; killed at the end, whatever happens."""
    started: list[Instance] = []
    yield started
    for instance in started:
        instance.stop(signal.SIGKILL)


@pytest.fixture
async def probes() -> AsyncIterator[list[Probe]]:
    """Collects the probes a test opens and closes them all, whatever happens."""
    opened: list[Probe] = []
    yield opened
    for probe in opened:
        await probe.close()
