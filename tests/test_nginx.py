"""Three instances behind nginx on one address, with deploy/nginx.conf as shipped: WebSocket and
polling-then-upgrade clients, REST through the same address, and one instance drained while the
clients of the others stay connected."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from .conftest import Cluster, running
from .harness import (
    ROOT,
    Probe,
    api,
    fence,
    free_port,
    http_status,
    token_for,
    unique,
    wait_answering,
    wait_until,
)

pytestmark = pytest.mark.cluster


class Nginx:
    """deploy/nginx.conf with this test's ports, run in the foreground under a prefix of its own."""

    def __init__(self, prefix: Path, ports: list[int]) -> None:
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        if not Path(binary).exists():
            raise RuntimeError("nginx is not installed: scripts/test.sh installs Debian's nginx-light")
        self.port = free_port()
        conf = (ROOT / "deploy" / "nginx.conf").read_text()
        conf = conf.replace("listen 8080;", f"listen 127.0.0.1:{self.port};")
        conf = re.sub(r"server 127\.0\.0\.1:500(\d)", lambda m: f"server 127.0.0.1:{ports[int(m.group(1))]}", conf)
        conf = conf.replace("worker_processes auto;", "worker_processes 1;")
        for folder in ("logs", "tmp"):
            (prefix / folder).mkdir(parents=True, exist_ok=True)
        (prefix / "nginx.conf").write_text(conf)
        self.prefix = prefix
        self.proc = subprocess.Popen(
            [binary, "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-g", "daemon off; pid nginx.pid;"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_serving(self, timeout: float = 15.0) -> None:
        wait_answering(
            self.proc, lambda: http_status(self.url + "/healthz")[0] == 200, "nginx", timeout,
            lambda: (self.prefix / "logs" / "error.log").read_text(),
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful: finish what is in flight
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture
def fleet(redis_client: redis.Redis, tmp_path: Path) -> Iterator[tuple[Cluster, Nginx]]:
    with running(redis_client, Cluster(unique("nginx"), ("A", "B", "C"), DRAIN_DELAY="1")) as cluster:
        nginx = Nginx(tmp_path, [instance.port for instance in cluster.instances])
        try:
            nginx.wait_serving()
            yield cluster, nginx
        finally:
            nginx.stop()


async def _instance_of(probe: Probe) -> str:
    return str((await probe.client.call("whoami", {}, timeout=10))["instance"])


async def test_three_instances_behind_nginx_serve_every_client_through_a_drain(
    fleet: tuple[Cluster, Nginx],
) -> None:
    cluster, nginx = fleet
    probes: list[Probe] = []
    try:
        # Fresh WebSocket connections are spread; a polling client sticks to one instance until
        # its upgrade, which must reach the instance holding its session.
        for n in range(9):
            probe = Probe(f"ws{n}")
            probes.append(await probe.connect(nginx.url, await token_for(nginx.url, f"user{n}")))
        polling = Probe("polling")
        probes.append(
            await polling.connect(nginx.url, await token_for(nginx.url, "poller"), transports=("polling", "websocket"))
        )
        await polling.wait_until(lambda: polling.client.transport() == "websocket", "the upgrade to WebSocket")
        where = {probe.name: await _instance_of(probe) for probe in probes}
        assert len(set(where.values())) >= 2, where  # spread over the fleet, not pinned to one

        status, _ = await api(nginx.url, "/api/emit/all", {"event": "news", "data": 1})
        assert status == 202
        for probe in probes:
            assert await probe.wait_for("news") == [1]

        # Drain the instance holding the most clients; the others' clients must not notice.
        held = Counter(where.values())
        drained_name = held.most_common(1)[0][0]
        drained = next(instance for instance in cluster.instances if instance.name == drained_name)
        leaving = [probe for probe in probes if where[probe.name] == drained_name]
        staying = [probe for probe in probes if where[probe.name] != drained_name]
        assert drained.proc is not None
        drained.proc.send_signal(signal.SIGTERM)
        for probe in leaving:
            assert await probe.wait_for("server_shutdown", timeout=15)
        await wait_until(lambda: drained.proc.poll() is not None, "the drained instance to exit", timeout=20)  # type: ignore[union-attr]
        assert drained.proc.returncode == 0

        # The clients it held come back through the same address and land on the others.
        returned = []
        for probe in leaving:
            await probe.close()
            again = Probe(f"{probe.name}-again")
            returned.append(again)
            user = "poller" if probe is polling else f"user{probe.name.removeprefix('ws')}"
            await again.connect(nginx.url, await token_for(nginx.url, user))
            assert await _instance_of(again) != drained_name
        probes.extend(returned)

        status, _ = await api(nginx.url, "/api/emit/all", {"event": "after", "data": 2})
        assert status == 202
        for probe in staying + returned:
            await probe.wait_for("after")
        await fence(nginx.url, staying + returned)  # one Redis node: a broadcast after it will do
        for probe in staying + returned:
            assert probe.of("after") == [2], probe.name  # exactly once
            assert probe.client.connected
        for probe in staying:
            assert probe.of("news") == [1] and probe.of("server_shutdown") == [], probe.name
    finally:
        for probe in probes:
            await probe.close()
