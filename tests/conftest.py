"""Fixtures: apps built by the factory, real instances against a real Redis, cleaned up after."""

from __future__ import annotations

import dataclasses
import signal
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

import pytest
import redis
from quart import Quart
from quart.typing import TestClientProtocol as Client

from webapp import Settings, create_app

from .harness import API_KEY, REDIS_URL, SECRET_KEY, Instance, Probe, instance_env, unique


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
        for key in redis_client.scan_iter(f"{cluster.prefix}:*"):
            redis_client.delete(key)


@pytest.fixture(scope="module")
def cluster(redis_client: redis.Redis) -> Iterator[Cluster]:
    with running(redis_client, Cluster(unique("cluster"))) as started:
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
