"""Instances joined by a Redis that speaks only TLS, with a certificate from a CA of the test's own."""

from __future__ import annotations

import asyncio
import signal
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .certs import Certs, make_certs
from .harness import (
    Instance,
    Probe,
    api,
    free_port,
    instance_env,
    redis_pongs,
    token_for,
    unique,
    wait_answering,
    wait_until,
)

pytestmark = pytest.mark.cluster

FAST_RECOVERY = {"REDIS_BACKOFF_MAX": "0.5"}


class TlsRedisServer:
    """A redis-server with TLS only (no plain port), on 127.0.0.1, stopped by the test."""

    def __init__(self, certs: Certs, log: Path) -> None:
        self.certs = certs
        self.log = log
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"rediss://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> TlsRedisServer:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    "redis-server", "--port", "0", "--tls-port", str(self.port), "--bind", "127.0.0.1",
                    "--tls-cert-file", str(self.certs.cert), "--tls-key-file", str(self.certs.key),
                    "--tls-ca-cert-file", str(self.certs.ca), "--tls-auth-clients", "no",
                    "--save", "", "--appendonly", "no",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        context = ssl.create_default_context(cafile=self.certs.ca)
        wait_answering(
            self.proc, lambda: redis_pongs(self.port, context), f"redis-server with TLS on {self.port}", timeout,
            self.log.read_text,
        )
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def tls_redis(certs: Certs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRedisServer]:
    server = TlsRedisServer(certs, tmp_path_factory.mktemp("redis") / "redis.log").start()
    yield server
    server.stop()


def launch(instances: list[Instance], name: str, prefix: str, redis_url: str, **extra: str) -> Instance:
    instance = Instance(name, instance_env(prefix, redis_url=redis_url, **{**FAST_RECOVERY, **extra})).start()
    instances.append(instance)
    return instance


async def online(instance: Instance, user: str) -> bool:
    status, answer = await api(instance.url, f"/api/users/{user}/presence", method="GET")
    return status == 200 and answer["online"] is True


@pytest.mark.parametrize(
    ("tls_env", "query"),
    [
        pytest.param({"REDIS_TLS_VERIFY": "none"}, "", id="unverified"),
        pytest.param({"REDIS_TLS_CA": "<ca>"}, "", id="verified-against-REDIS_TLS_CA"),
        pytest.param({}, "?ssl_cert_reqs=none", id="redis-py-url-option"),
    ],
)
async def test_an_event_crosses_instances_over_tls(
    tls_redis: TlsRedisServer, certs: Certs, instances: list[Instance], probes: list[Probe],
    tls_env: dict[str, str], query: str,
) -> None:
    """A user's socket on B gets what a REST call on A emitted, through the TLS-only Redis."""
    env = {name: str(certs.ca) if value == "<ca>" else value for name, value in tls_env.items()}
    prefix = unique("tls")
    a = launch(instances, "A", prefix, tls_redis.url + query, **env)
    b = launch(instances, "B", prefix, tls_redis.url + query, **env)
    a.wait_serving()
    b.wait_serving()
    user = unique("tls-user")
    on_b = Probe(f"{user}@B")
    probes.append(on_b)
    await on_b.connect(b.url, await token_for(a.url, user))
    status, answer = await api(a.url, f"/api/emit/users/{user}", {"event": "dm", "data": "over tls"})
    assert status == 202, answer
    assert await on_b.wait_for("dm") == ["over tls"]
    # Presence has a Redis client of its own: A sees the user B holds.
    await wait_until(lambda: online(a, user), f"A to see {user} online")


async def test_an_unverifiable_certificate_keeps_the_instance_unready(
    tls_redis: TlsRedisServer, instances: list[Instance]
) -> None:
    """Verification on (the default) without the CA: never ready, 503 at once, and a log line that
    says why instead of a silent plaintext fallback or a hang."""
    a = launch(instances, "A", unique("untrusted"), tls_redis.url)
    a.wait_serving(ready=False)
    await wait_until(lambda: "certificate could not be verified" in a.output(), "the log to name the certificate")
    assert "REDIS_TLS_CA" in a.output()
    status, body = a.readyz()
    assert status == 503 and body["bus"] == {"kind": "redis", "connected": False}, body
    status, answer = await asyncio.wait_for(api(a.url, "/api/emit/all", {"event": "news", "data": 1}), 10)
    assert status == 503 and answer["error"]["code"] == "bus_unavailable", answer
