"""The chaos soak's processes: its own redis-server, and app instances that reach it through TCP proxies one can cut.

The proxy is tests/proxy.py's TcpProxy, imported rather than copied: it is self-contained (the
standard library only), the drills in tests/ rely on it, and one copy means one set of fixes.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from tests.proxy import TcpProxy

from . import procfs
from .cluster import AppSpec, Server, free_port

API_KEY = "chaos-api-key-0123456789"
SECRET_KEY = "chaos-secret-key-0123456789"
START_TIMEOUT = 40.0  # a hypercorn start takes 2-3 s on an idle 2-core machine; far more under load
CHAOS = AppSpec(
    "chaos",
    "webapp.asgi:app",
    channel=lambda prefix: f"{prefix}:all",
    # Drains and restarts within a fault's few seconds; a reconnect backoff capped at 2 s so an
    # instance is back soon after Redis is (the default 5 s would only stretch each fault).
    env={"SHUTDOWN_TIMEOUT": "3", "REDIS_BACKOFF_MAX": "2"},
)


class Process(Server):
    """A hypercorn instance of the app whose exit code the soak reads (a drain must exit 0)."""

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.poll()


_STARTED = time.monotonic()


def log(message: str) -> None:
    """Progress, on stderr (stdout carries the report), with the seconds since the soak began."""
    print(f"[{time.monotonic() - _STARTED:5.1f}s] {message}", file=sys.stderr, flush=True)


def redis_pongs(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisProcess:
    """A redis-server on a free loopback port, with no persistence: a restart comes back empty."""

    def __init__(self, log: Path) -> None:
        self.port = free_port()
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15.0) -> None:
        command = [
            "redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--logfile", str(self.log),
        ]
        # A session of its own: a Ctrl-C at the terminal reaches us, and we stop it ourselves.
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while not redis_pongs(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on {self.port} did not start (see {self.log})")
            time.sleep(0.02)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@dataclass
class Incarnation:
    """One process of an instance slot, from start to exit: what /proc and /api/status said.
    Each series holds the first, the highest and the last reading."""

    name: str
    pid: int
    started: float
    ended: float | None = None
    last_seen: float = 0.0
    samples: int = 0
    rss_kib: list[int] = field(default_factory=list)
    fds: list[int] = field(default_factory=list)
    sockets: list[int] = field(default_factory=list)
    extra_fds: list[int] = field(default_factory=list)  # descriptors beyond one per socket: what a leak grows
    held: int = 0  # sockets, as /api/status last said
    evicted: int = 0  # slow_consumers_evicted, the highest seen
    gaps: int = 0  # bus gaps, the highest seen

    def sample(self, rss: int, fds: int) -> None:
        readings = ((self.rss_kib, rss), (self.fds, fds), (self.sockets, self.held), (self.extra_fds, fds - self.held))
        for series, value in readings:
            if not series:
                series.extend([value, value, value])
            series[1], series[2] = max(series[1], value), value
        self.samples += 1
        self.last_seen = time.monotonic()

    def status(self, body: dict[str, Any]) -> None:
        self.held = int(body.get("sockets", 0))
        self.evicted = max(self.evicted, int(body.get("slow_consumers_evicted", 0)))
        self.gaps = max(self.gaps, int(body.get("bus", {}).get("gaps", 0)))


class Slot:
    """One instance of the fleet: its Redis proxy stays, its process comes and goes."""

    def __init__(self, index: int, redis_port: int, prefix: str, log_dir: Path) -> None:
        self.index = index
        self.name = "ABCDEFGHIJ"[index] if index < 10 else f"I{index}"
        self.proxy = TcpProxy([("127.0.0.1", redis_port)]).start()
        self.log_dir = log_dir
        self.env = {
            "REDIS_URL": self.proxy.redis_url, "SECRET_KEY": SECRET_KEY, "API_KEYS": API_KEY,
            "CHANNEL_PREFIX": prefix, "WEBAPP_ENV": "test",
        }
        self.server: Process | None = None
        self.up = False  # serving, and not being killed: clients and emits may pick it
        self.incarnations: list[Incarnation] = []

    @property
    def url(self) -> str:
        assert self.server is not None
        return self.server.url

    def launch(self) -> None:
        """Start a new process (on a new port: a restarted pod gets a new address too)."""
        number = len(self.incarnations) + 1
        log = self.log_dir / f"instance-{self.name}.log"
        self.server = Process(CHAOS, f"{self.name}{number}", self.env, log, core=None)
        self.server.start()

    async def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Until /readyz answers 200 (polled: a starting server announces nothing)."""
        server = self.server
        assert server is not None
        deadline = time.monotonic() + timeout
        while not await asyncio.to_thread(server.poll_ready):
            if time.monotonic() > deadline:
                raise TimeoutError(f"instance {server.name} not ready after {timeout:.0f}s:\n{server.log_tail()}")
            await asyncio.sleep(0.1)
        if not self.incarnations or self.incarnations[-1].pid != server.worker_pid:
            self.incarnations.append(Incarnation(server.name, server.worker_pid, time.monotonic()))
        self.up = True

    async def stop(self, sig: int, timeout: float, doomed: set[str]) -> int | None:
        """Signal the process and wait for it to exit (SIGKILL after `timeout`); its exit code.
        Its name goes in `doomed` first: its clients' disconnects are this fault's doing."""
        server = self.server
        self.up = False
        if server is None:
            return None
        doomed.add(server.name)
        server.signal(sig)
        exited = await asyncio.to_thread(server.wait, time.monotonic() + timeout)
        if not exited:
            server.signal(signal.SIGKILL)
            await asyncio.to_thread(server.wait, time.monotonic() + 5.0)
        if self.incarnations and self.incarnations[-1].ended is None:
            self.incarnations[-1].ended = time.monotonic()
        return server.returncode


class Fleet:
    """Redis, the proxies and the instances of one soak; `close()` ends them all, whatever state they are in."""

    def __init__(self, instances: int, prefix: str, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.prefix = prefix
        self.redis = RedisProcess(log_dir / "redis.log")
        self.slots: list[Slot] = []
        self.doomed: set[str] = set()  # instances signalled by a fault
        self._count = instances

    async def start(self) -> None:
        self.redis.start()
        self.slots = [Slot(i, self.redis.port, self.prefix, self.log_dir) for i in range(self._count)]
        for slot in self.slots:
            slot.launch()
        await asyncio.gather(*(slot.wait_ready() for slot in self.slots))

    def up(self) -> list[Slot]:
        return [slot for slot in self.slots if slot.up]

    async def sample(self, http: aiohttp.ClientSession) -> None:
        """One reading of every live instance: counters from /api/status, RSS and descriptors from /proc."""
        for slot in self.slots:
            if slot.server is None or not slot.incarnations or slot.incarnations[-1].ended is not None:
                continue
            incarnation = slot.incarnations[-1]
            await self.read_status(http, slot)
            try:
                fds = len(os.listdir(f"/proc/{incarnation.pid}/fd"))
            except OSError:
                continue  # gone between two readings
            rss = procfs.rss_kib(incarnation.pid)
            if rss:
                incarnation.sample(rss, fds)

    async def read_status(self, http: aiohttp.ClientSession, slot: Slot) -> None:
        if slot.server is None or not slot.incarnations:
            return
        try:
            async with http.get(
                slot.url + "/api/status", headers={"Authorization": f"Bearer {API_KEY}"},
                timeout=aiohttp.ClientTimeout(total=3),
            ) as answer:
                if answer.status == 200:
                    slot.incarnations[-1].status(await answer.json())
        except (aiohttp.ClientError, TimeoutError):
            pass  # down, or draining: the next reading will do

    def close(self) -> None:
        """SIGTERM every instance (SIGKILL after a few seconds), close the proxies, stop Redis."""
        servers = [slot.server for slot in self.slots if slot.server is not None]
        for server in servers:
            server.signal(signal.SIGTERM)
        deadline = time.monotonic() + 8.0
        for server in servers:
            if server.returncode is None and not server.wait(deadline):
                server.signal(signal.SIGKILL)
                server.wait(time.monotonic() + 5.0)
        for slot in self.slots:
            slot.proxy.close()
        self.redis.stop()
