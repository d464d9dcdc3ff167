"""Server processes for the bench: hypercorn instances of one app sharing one Redis prefix.

Pinning: with `taskset`, instance 0 (the one every single-instance measurement uses, and W5's
holder) gets core 0 to itself among the servers; all other instances share the remaining cores.
The load generator and Redis are not pinned: they take whatever is free.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from webapp.realtime.bus.partitions import CLUSTER_PARTITIONS, Partitions

from . import procfs

ROOT = Path(__file__).resolve().parent.parent
SECRET_KEY = "bench-secret-key-0123456789"
API_KEY = "bench-api-key"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 5.0


@dataclass(frozen=True)
class AppSpec:
    """One app under test: what hypercorn serves (or the command that serves it), extra
    environment, the channel whose subscribers say an instance hears broadcasts."""

    name: str
    target: str
    channel: Callable[[str], str]
    env: Mapping[str, str] = field(default_factory=dict)
    sharded: bool = False  # on a Redis Cluster its channels are shard channels (SSUBSCRIBE)
    command: tuple[str, ...] = ()  # not hypercorn: this command, which reads PORT from the environment


OURS = AppSpec(
    "ours",
    "webapp.asgi:app",
    channel=lambda prefix: f"{prefix}:all",
    # The per-socket rate limit protects production from abusive clients; the gateway workload
    # measures propagation, so it is lifted. Short drain so instances stop quickly.
    env={"SOCKET_RATE": "100000", "SOCKET_BURST": "1000000", "SHUTDOWN_TIMEOUT": "1"},
    sharded=True,
)
BASELINE = AppSpec("baseline", "bench.baseline_app:app", channel=lambda prefix: f"{prefix}:socketio")
# The Node yardstick (bench/reference): its Redis adapter's request channel is a plain SUBSCRIBE
# that every instance makes beside its pattern subscription, so Redis can count it.
REFERENCE = AppSpec(
    "node",
    "bench/reference/server.mjs",
    channel=lambda prefix: f"{prefix}-request#/#",
    command=("node", "bench/reference/server.mjs"),
)
APPS = (OURS, BASELINE)


def forget(client: Any, prefix: str) -> None:
    """Delete every key the app wrote under `prefix`: its own, and those whose hash tag starts
    with it (the history's `{prefix}:replay`, presence's `{prefix:presence}:...`). One key at a
    time, so that keys of different cluster slots never meet in one command."""
    for pattern in (f"{prefix}:*", f"{{{prefix}:*", f"{{{prefix}}}:*"):
        for key in client.scan_iter(match=pattern, count=1000):
            client.delete(key)


def is_cluster(redis_url: str) -> bool:
    client = redis.Redis.from_url(redis_url)
    try:
        return str(client.info("cluster").get("cluster_enabled", 0)) == "1"
    finally:
        client.close()


def wired(prefix: str, channel: str) -> str:
    """The name our app gives `channel` on a Redis Cluster (its partition's hash tag first)."""
    return Partitions(f"{{{prefix}}}:replay", CLUSTER_PARTITIONS, sharded=True).wire(channel)


def publish_raw(redis_url: str, prefix: str, channel: str, message: bytes) -> None:
    """Publish bytes where our app's instances listen for `channel`: PUBLISH on one node, SPUBLISH
    of the channel's wired name on a cluster (as anyone able to reach Redis could)."""
    if not is_cluster(redis_url):
        with redis.Redis.from_url(redis_url) as client:
            client.publish(channel, message)
        return
    with redis.RedisCluster.from_url(redis_url) as cluster:
        name = wired(prefix, channel)
        cluster.get_node_from_key(name).redis_connection.execute_command("SPUBLISH", name, message)


def subscribers(redis_url: str, channel: str, *, sharded_prefix: str | None = None) -> int:
    """Connections subscribed to `channel`: on a Redis Cluster, summed over its nodes, since
    PUBSUB NUMSUB counts only the node it is asked; with `sharded_prefix`, our app's shard
    channel for it there (SHARDNUMSUB)."""
    if not is_cluster(redis_url):
        with redis.Redis.from_url(redis_url) as client:
            return int(dict(client.pubsub_numsub(channel)).get(channel.encode(), 0))
    command = ("PUBSUB", "NUMSUB", channel)
    if sharded_prefix is not None:
        command = ("PUBSUB", "SHARDNUMSUB", wired(sharded_prefix, channel))
    with redis.Redis.from_url(redis_url) as client:
        nodes = client.execute_command("CLUSTER", "NODES").decode()
    total = 0
    for line in nodes.splitlines():
        host, port = line.split()[1].split("@")[0].rsplit(":", 1)
        node = redis.Redis(host=host or "127.0.0.1", port=int(port))
        try:
            total += int(node.execute_command(*command)[1])
        except redis.RedisError:
            continue  # a failed node holds nobody
        finally:
            node.close()
    return total


def procfile_flags(procfile: Path = ROOT / "Procfile") -> list[str]:
    """hypercorn's flags on the Procfile's web line, minus the bind: the bench serves as deployed."""
    try:
        lines = procfile.read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        if line.startswith("web:"):
            words = shlex.split(line[len("web:") :])[2:]  # drop `hypercorn` and the app
            flags: list[str] = []
            skip = False
            for word in words:
                if skip:
                    skip = False
                elif word in ("--bind", "-b"):
                    skip = True
                elif not word.startswith("--bind="):
                    flags.append(word)
            return flags
    return []


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def core_for(index: int, cores: int) -> int | None:
    """Instance 0 on core 0; the others round-robin over cores 1..n-1; no pinning on one core."""
    if cores < 2:
        return None
    return 0 if index == 0 else 1 + (index - 1) % (cores - 1)


class Server:
    """One `hypercorn <app>` process on its own port, with the Procfile's flags."""

    def __init__(self, app: AppSpec, name: str, env: Mapping[str, str], log: Path, core: int | None):
        self.app = app
        self.name = name
        self.port = free_port()
        self.core = core
        self._env = {**os.environ, **env, **app.env, "INSTANCE_ID": name, "PORT": str(self.port)}
        self._log_path = log
        self._proc: subprocess.Popen[bytes] | None = None
        self.worker_pid = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        command = list(self.app.command) or [
            sys.executable,
            "-m",
            "hypercorn",
            self.app.target,
            "--bind",
            f"127.0.0.1:{self.port}",
            *procfile_flags(),
        ]
        if self.core is not None and shutil.which("taskset"):
            command = ["taskset", "-c", str(self.core), *command]  # taskset execs: same pid
        with self._log_path.open("ab") as log:
            # A session of its own: stop() can signal the master and its worker together.
            self._proc = subprocess.Popen(
                command, cwd=ROOT, env=self._env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def poll_ready(self) -> bool:
        """True once /readyz answers 200 and the worker process is known."""
        assert self._proc is not None
        if self._proc.poll() is not None:
            raise RuntimeError(
                f"{self.app.name} {self.name} exited with {self._proc.returncode}:\n{self.log_tail()}"
            )
        try:
            with urllib.request.urlopen(self.url + "/readyz", timeout=1.0) as response:
                if response.status != 200:
                    return False
        except (OSError, urllib.error.HTTPError):
            return False
        self.worker_pid = self._find_worker()
        return self.worker_pid != 0

    def _find_worker(self) -> int:
        # With WEB_CONCURRENCY unset hypercorn serves in its own process; otherwise its master
        # spawns workers (beside multiprocessing's resource tracker): the first one found is
        # measured, so CPU figures with WEB_CONCURRENCY > 1 cover one worker only.
        assert self._proc is not None
        for pid in procfs.children(self._proc.pid):
            try:
                if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return pid
            except OSError:
                continue
        return self._proc.pid

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None and procfs.alive(self.worker_pid)

    def signal(self, sig: int) -> None:
        if self._proc is not None and self._proc.poll() is None:
            try:
                os.killpg(self._proc.pid, sig)
            except ProcessLookupError:
                pass

    def wait(self, deadline: float) -> bool:
        assert self._proc is not None
        try:
            self._proc.wait(max(0.0, deadline - time.monotonic()))
            return True
        except subprocess.TimeoutExpired:
            return False

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self._log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


class Cluster:
    """Instances of one app on one Redis prefix; grows on demand, stops everything at the end."""

    def __init__(self, app: AppSpec, prefix: str, redis_url: str, log_dir: Path, pin: bool) -> None:
        self.app = app
        self.prefix = prefix
        self.redis_url = redis_url
        self.log_dir = log_dir
        self.pin = pin
        self.servers: list[Server] = []
        self._cores = len(os.sched_getaffinity(0))
        self._env = {
            "REDIS_URL": redis_url,
            "SECRET_KEY": SECRET_KEY,
            "API_KEYS": API_KEY,
            "CHANNEL_PREFIX": prefix,
            "WEBAPP_ENV": "test",
        }

    def grow(self, count: int) -> None:
        """Start instances until there are `count`, and wait until every one hears broadcasts."""
        new = []
        while len(self.servers) < count:
            index = len(self.servers)
            core = core_for(index, self._cores) if self.pin else None
            log = self.log_dir / f"{self.app.name}-{self.prefix}-{index}.log"
            server = Server(self.app, f"{self.app.name}-{index}", self._env, log, core)
            server.start()
            self.servers.append(server)
            new.append(server)
        deadline = time.monotonic() + START_TIMEOUT
        pending = list(new)
        while pending:
            pending = [s for s in pending if not s.poll_ready()]
            if pending and time.monotonic() > deadline:
                raise TimeoutError(
                    f"{pending[0].name} not ready after {START_TIMEOUT:.0f}s:\n{pending[0].log_tail()}"
                )
            time.sleep(0.1)
        self._wait_subscribers(deadline)

    def _wait_subscribers(self, deadline: float) -> None:
        # /readyz says "connected"; Redis itself says who will hear a broadcast.
        channel = self.app.channel(self.prefix)
        while True:
            count = subscribers(self.redis_url, channel, sharded_prefix=self.prefix if self.app.sharded else None)
            if count >= len(self.servers):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{channel}: {count} subscribers, expected {len(self.servers)}")
            time.sleep(0.05)

    def targets(self) -> list[dict[str, object]]:
        return [{"name": s.name, "url": s.url, "pid": s.worker_pid} for s in self.servers]

    def dead(self) -> list[str]:
        return [s.name for s in self.servers if not s.alive]

    def stop(self) -> None:
        """SIGTERM every instance, SIGKILL whatever is left after STOP_TIMEOUT, delete our Redis keys."""
        for server in self.servers:
            server.signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for server in self.servers:
            if not server.wait(deadline):
                server.signal(signal.SIGKILL)
                server.wait(time.monotonic() + STOP_TIMEOUT)
        self.servers = []
        self._forget_keys()

    def _forget_keys(self) -> None:
        # Our app keeps a replay stream and presence under the prefix; leave Redis as the run found it.
        client: Any = redis.Redis.from_url(self.redis_url)
        try:
            if str(client.info("cluster").get("cluster_enabled", 0)) == "1":
                client.close()
                client = redis.RedisCluster.from_url(self.redis_url)  # its scan covers every node
            forget(client, self.prefix)
        except redis.RedisError:
            pass
        finally:
            client.close()
