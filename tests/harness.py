"""Real parts for tests: hypercorn processes, Socket.IO clients, REST calls, Redis probes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Self

import aiohttp
import socketio
from hypothesis import HealthCheck, Phase, settings
from hypothesis.stateful import RuleBasedStateMachine

from bench.cluster import procfile_flags  # tests serve the app exactly as the Procfile deploys it

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "test-api-key"
SECRET_KEY = "test-secret-key-0123456789"
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
_OUR_VARIABLES = frozenset(
    {"REDIS_URL", "SECRET_KEY", "API_KEYS", "CHANNEL_PREFIX", "CORS_ORIGINS", "WEBAPP_ENV", "DEMO_LOGIN",
     "MAX_PAYLOAD_BYTES", "TOKEN_TTL", "INSTANCE_ID", "PORT", "REDIS_TLS_VERIFY", "REDIS_TLS_CA"}
)
WAIT = 10.0  # upper bound of every wait on an event, in seconds
# The instances tests started, by URL: a fence finds the instance (and its channel prefix) behind a
# probe's URL here. A restart on the same port replaces the entry.
STARTED: dict[str, Instance] = {}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_cluster_base() -> int:
    """A port P with P..P+5 and their cluster-bus ports (P+10000..) free: for a local Redis Cluster."""
    import random

    for _ in range(100):
        base = random.randrange(20000, 25000)
        ports = [*range(base, base + 6), *range(base + 10000, base + 10006)]
        try:
            for port in ports:
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no free ports for a local Redis Cluster")


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def http_get(url: str, timeout: float = 2.0, headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def wait_answering(
    proc: subprocess.Popen[bytes], answers: Callable[[], bool], what: str, timeout: float, log: Callable[[], str]
) -> None:
    """Wait until a process the test started answers (`answers()` holds), bounded; fail at once,
    with its log, if it exits. Polled: a starting server announces nothing a test could await."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{log()}")
        try:
            if answers():
                return
        except OSError:
            pass  # not listening yet
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not answer within {timeout}s:\n{log()}")
        time.sleep(0.02)


def http_status(url: str, timeout: float = 1.0) -> tuple[int, bytes]:
    """The status and body of a GET, whatever the status."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:
            return int(answer.status), bytes(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def redis_pongs(port: int, tls: ssl.SSLContext | None = None) -> bool:
    """Whether a redis-server on 127.0.0.1:`port` answers PING (over TLS with `tls`)."""
    with socket.create_connection(("127.0.0.1", port), timeout=0.5) as raw:
        sock = tls.wrap_socket(raw, server_hostname="127.0.0.1") if tls is not None else raw
        with sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")


class Instance:
    """One `hypercorn webapp.asgi:app` process on its own port."""

    def __init__(
        self,
        name: str,
        env: dict[str, str],
        port: int | None = None,
        *,
        app: str = "webapp.asgi:app",
        args: tuple[str, ...] = (),
    ) -> None:
        self.name = name
        self.app = app
        self.args = args  # hypercorn flags besides the Procfile's
        self.port = port or free_port()
        inherited = {k: v for k, v in os.environ.items() if k not in _OUR_VARIABLES}
        self.env = {**inherited, **env, "INSTANCE_ID": name, "PORT": str(self.port)}
        handle, self.log_path = tempfile.mkstemp(prefix=f"webapp-{name}-", suffix=".log")
        os.close(handle)  # each start() appends through a handle of its own, closed once the child has it
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Instance:
        STARTED[self.url] = self
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable, "-m", "hypercorn", self.app, "--bind", f"127.0.0.1:{self.port}",
                    *procfile_flags(), *self.args,
                ],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    def wait_serving(self, timeout: float = 20.0, ready: bool = True) -> None:
        """Wait until /healthz answers (and, with `ready`, until /readyz says ready)."""
        self.wait_answering("/readyz" if ready else "/healthz", timeout)

    def wait_answering(self, path: str, timeout: float = 20.0, body: bytes = b"") -> None:
        """Wait until GET `path` answers 200 (with a body starting with `body`)."""
        assert self.proc is not None

        def answers() -> bool:
            status, got = http_status(self.url + path)
            return status == 200 and got.startswith(body)

        wait_answering(self.proc, answers, f"{self.name} on {path}", timeout, self.output)

    def readyz(self) -> tuple[int, dict[str, Any]]:
        return http_get(self.url + "/readyz")

    def status(self) -> tuple[int, dict[str, Any]]:
        """GET /api/status: the details /readyz keeps behind the API key."""
        return http_get(self.url + "/api/status", headers={"Authorization": f"Bearer {API_KEY}"})

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)

    def output(self) -> str:
        return Path(self.log_path).read_text(errors="replace")[-6000:]


def start_pair(instances: list[Instance], env_a: dict[str, str], env_b: dict[str, str]) -> tuple[Instance, Instance]:
    """Instances A and B, serving and ready; added to `instances` (killed after the test)."""
    pair = (Instance("A", env_a).start(), Instance("B", env_b).start())
    instances.extend(pair)
    for instance in pair:
        instance.wait_serving()
    return pair


def instance_env(prefix: str, redis_url: str | None = REDIS_URL, **extra: str) -> dict[str, str]:
    env = {
        "SECRET_KEY": SECRET_KEY,
        "API_KEYS": f"other-key,{API_KEY}",
        "CHANNEL_PREFIX": prefix,
        "WEBAPP_ENV": "test",
        **extra,
    }
    if redis_url:
        env["REDIS_URL"] = redis_url
    else:
        env.pop("REDIS_URL", None)
    return env


async def api(
    base: str,
    path: str,
    body: Any = None,
    *,
    key: str | None = API_KEY,
    raw: bytes | None = None,
    method: str = "POST",
) -> tuple[int, Any]:
    """Call a REST hook (POST unless told); return the status and the decoded JSON answer."""
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    data = raw if raw is not None else json.dumps(body).encode() if method == "POST" else None
    async with aiohttp.ClientSession() as session, session.request(
        method, base + path, data=data, headers=headers
    ) as response:
        return response.status, await response.json(content_type=None)


async def token_for(base: str, user_id: str, ttl: int | None = None) -> str:
    body: dict[str, Any] = {"user_id": user_id}
    if ttl is not None:
        body["ttl"] = ttl
    status, answer = await api(base, "/api/tokens", body)
    assert status == 201, answer
    return str(answer["token"])


class Probe:
    """A real Socket.IO client that records every event it receives, in order."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.events: list[tuple[str, Any]] = []
        self.arrivals: list[float] = []  # time.monotonic() at each event's arrival, beside `events`
        self.connect_error: Any = None
        self.client = socketio.AsyncClient(reconnection=False)
        self.base: str | None = None  # the URL it connected to: the instance a fence must wait for
        self._changed = asyncio.Event()
        self.client.on("*", self._record)
        self.client.on("connect_error", self._on_connect_error)
        # Not events, but a wait on the connection's state must wake up on them too.
        self.client.on("connect", self._changed.set)
        self.client.on("disconnect", lambda *reason: self._changed.set())

    async def _record(self, event: str, data: Any = None) -> None:
        self.events.append((event, data))
        self.arrivals.append(time.monotonic())
        self._changed.set()

    async def _on_connect_error(self, data: Any) -> None:
        self.connect_error = data
        self._changed.set()

    async def connect(
        self,
        base: str,
        token: str | None = None,
        *,
        how: str = "auth",
        wait: float = WAIT,
        transports: tuple[str, ...] = ("websocket",),
    ) -> Probe:
        url, auth, headers = base, None, {}
        if token is not None and how == "auth":
            auth = {"token": token}
        elif token is not None and how == "query":
            url = f"{base}?token={token}"
        elif token is not None and how == "header":
            headers = {"Authorization": f"Bearer {token}"}
        self.base = base
        await self.client.connect(
            url, auth=auth, headers=headers, transports=list(transports), wait_timeout=wait
        )
        return self

    @property
    def sid(self) -> str:
        return str(self.client.get_sid())

    def of(self, event: str) -> list[Any]:
        return [data for name, data in self.events if name == event]

    async def wait_until(self, predicate: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not predicate():
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise AssertionError(f"{self.name}: timed out waiting for {what}; got {self.events}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                pass

    async def wait_for(self, event: str, count: int = 1, timeout: float = WAIT) -> list[Any]:
        await self.wait_until(lambda: len(self.of(event)) >= count, f"{count}x {event!r}", timeout)
        return self.of(event)

    async def close(self) -> None:
        if self.client.connected:
            await self.client.disconnect()
        await self.client.shutdown()
        # a refused handshake leaves Engine.IO's HTTP session open; close it too
        http = getattr(self.client.eio, "http", None)
        if http is not None and not http.closed:
            await http.close()


async def fence(base: str, probes: Iterable[Probe], *, instances: Iterable[Instance] = ()) -> None:
    """Wait until everything published before this call that was going to reach `probes` has
    reached them: after it, asserting "never arrives" or "exactly once" is safe, on one Redis node
    and on a Redis Cluster alike.

    An instance delivers each partition in the order it consumes it, and queues a socket's
    frames in order. On one node (one partition) a broadcast after the events under test is
    enough: once a probe has it, nothing earlier is still on its way. On a cluster the
    partitions are consumed independently (a subscriber connection per shard), so first every
    instance holding a probe (and each of `instances`) is made to consume every partition past
    this moment (`caught_up`); then the broadcast, queued after whatever that consumption sent.
    `base` is the instance the broadcast is sent through (any of the fleet).
    """
    probes = list(probes)
    behind = {p.base for p in probes if p.base is not None} | {i.url for i in instances}
    await caught_up(sorted(behind), via=base)
    marker = uuid.uuid4().hex
    status, answer = await api(base, "/api/emit/all", {"event": "fence", "data": marker})
    assert status == 202, answer
    await asyncio.gather(
        *(p.wait_until(lambda p=p: marker in p.of("fence"), f"fence {marker}") for p in probes)
    )


async def caught_up(urls: Iterable[str], *, via: str | None = None) -> None:
    """Return once each instance at `urls` has consumed every partition of its bus past this
    moment: whatever was published before, on any channel, has been handled (and its frames
    queued to its sockets) there.

    On one partition (one Redis node, or the in-memory bus) there is nothing to do: a marker to
    the probes themselves orders everything. On a cluster, a fence socket on each instance joins
    one room per partition (rooms named so that their channels fall in each partition), a batch
    of markers goes to those rooms, and each fence socket waits for all of them: a marker is
    consumed after everything published earlier on its partition.
    """
    urls = list(dict.fromkeys(urls))
    if not urls:
        return
    counts = await asyncio.gather(*(_partitions(url) for url in urls))
    urls = [url for url, count in zip(urls, counts, strict=True) if count > 1]
    if not urls:
        return
    unknown = [url for url in urls if url not in STARTED]
    assert not unknown, f"fence: no instance this test started answers at {unknown}; pass it as `instances`"
    prefixes = {STARTED[url].env["CHANNEL_PREFIX"] for url in urls}
    count = max(counts)
    assert len(prefixes) == 1, f"fence: instances of several fleets {sorted(prefixes)}"
    marker = uuid.uuid4().hex[:12]
    rooms = _rooms_per_partition(prefixes.pop(), count, f"public:fence-{marker}")
    user = f"fence-{marker}"
    sockets = [Probe(f"fence@{url}") for url in urls]
    try:
        token = await token_for(urls[0], user)
        for sock, url in zip(sockets, urls, strict=True):
            await sock.connect(url, token)
        joins = await asyncio.gather(
            *(sock.client.call("join", {"room": room}, timeout=WAIT) for sock in sockets for room in rooms)
        )
        assert all(join.get("ok") for join in joins), f"fence sockets could not join their rooms: {joins}"
        events = [{"scope": "room", "room": room, "event": "fence", "data": room} for room in rooms]
        status, answer = await api(via or urls[0], "/api/emit/batch", {"events": events})
        assert status == 202, answer
        await asyncio.gather(
            *(
                sock.wait_until(lambda sock=sock: set(rooms) <= set(sock.of("fence")), f"a marker on each of {count} partitions")
                for sock in sockets
            )
        )
    finally:
        for sock in sockets:
            await sock.close()


async def _partitions(url: str) -> int:
    """How many partitions the bus of the instance at `url` has (1 on one Redis node or in memory)."""
    status, answer = await api(url, "/api/status", method="GET")
    assert status == 200, answer
    return int(answer["bus"].get("partitions") or 1)


def _rooms_per_partition(prefix: str, count: int, stem: str) -> list[str]:
    """A room name for each partition, in partition order: the channel of room `i` falls in partition `i`
    (as the app places it: bus/partitions.py)."""
    from webapp.realtime.bus.partitions import Partitions

    parts = Partitions(prefix, count, sharded=True)
    rooms: dict[int, str] = {}
    for n in range(100 * count):
        room = f"{stem}-{n}"
        rooms.setdefault(parts.of(f"{prefix}:room:{room}"), room)
        if len(rooms) == count:
            return [rooms[p] for p in range(count)]
    raise AssertionError(f"no room name for every one of {count} partitions")


def without_fences(probe: Probe) -> list[tuple[str, Any]]:
    return [(name, data) for name, data in probe.events if name != "fence"]


async def wait_until(predicate: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
    """Poll a cheap condition (e.g. a Redis query) until it holds; bounded."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def holds_for(predicate: Callable[[], Any], what: str, window: float) -> None:
    """Check that a cheap condition keeps holding for `window` seconds: the window of a negative
    check ("never reconnects"), chosen as a multiple of the time the unwanted thing would take."""
    deadline = time.monotonic() + window
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        assert result, f"{what} stopped holding within {window}s"
        if time.monotonic() > deadline:
            return
        await asyncio.sleep(0.02)


class RedisServer:
    """A redis-server of the test's own, on its own port, that the test stops and restarts."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_answering(self.proc, lambda: redis_pongs(self.port), f"redis-server on {self.port}", timeout, str)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


class RawSocket:
    """A bare Engine.IO v4 / Socket.IO v5 client over one WebSocket: cheap, and able to misbehave."""

    def __init__(self, session: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.session = session
        self.ws = ws

    @classmethod
    async def open(
        cls,
        base: str,
        token: str | None = None,
        *,
        auth: dict[str, Any] | None = None,
        timeout: float = WAIT,
        compress: int = 0,
    ) -> Self:
        """Open and send the namespace CONNECT with `auth` (default: just the token, if any).
        `compress`: ask for permessage-deflate with that window, as browsers do."""
        session = aiohttp.ClientSession()
        try:
            url = base.replace("http://", "ws://") + "/socket.io/?EIO=4&transport=websocket"
            ws = await session.ws_connect(url, timeout=aiohttp.ClientWSTimeout(ws_close=timeout), compress=compress)
            opened = await ws.receive_str(timeout=timeout)
            assert opened.startswith("0{"), opened
        except BaseException:
            await session.close()
            raise
        raw = cls(session, ws)
        if auth is None and token:
            auth = {"token": token}
        await ws.send_str("40" + (json.dumps(auth) if auth else ""))
        return raw

    async def _text(self, timeout: float) -> str:
        """The next frame that is not a ping (pings are answered on the way)."""
        while True:
            text = await self.ws.receive_str(timeout=timeout)
            if text != "2":
                return text
            await self.ws.send_str("3")

    async def connected(self, timeout: float = WAIT) -> dict[str, Any]:
        """The namespace answer: {"sid": ...} when accepted, the error data when refused."""
        while True:
            text = await self._text(timeout)
            if text.startswith(("40", "44")):
                return dict(json.loads(text[2:]))

    async def event(self, timeout: float = WAIT) -> list[Any]:
        """The next Socket.IO event's arguments, its name first."""
        while True:
            text = await self._text(timeout)
            if text.startswith("42"):
                return list(json.loads(text[2:]))

    async def close(self) -> None:
        await self.ws.close()
        await self.session.close()


class StalledSocket:
    """A Socket.IO client over a bare TCP socket that connects and then never reads again.

    Its receive buffer is tiny, so the server's writes stop making progress after a few frames:
    the peer a load test, a frozen tab or a hostile client presents."""

    def __init__(self, base: str, timeout: float = WAIT) -> None:
        host, port = base.removeprefix("http://").split(":")
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
        self.sock.settimeout(timeout)
        self.sock.connect((host, int(port)))
        key = "dGhlIHNhbXBsZSBub25jZQ=="
        self.sock.sendall(
            f"GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(1)  # byte by byte: nothing past the handshake is read
            if not chunk:
                raise ConnectionError("the server closed during the handshake")
            head += chunk
        assert head.startswith(b"HTTP/1.1 101"), head
        self.send_text("40")  # the namespace CONNECT; the answer is never read

    @property
    def local_port(self) -> int:
        return int(self.sock.getsockname()[1])

    def send_text(self, text: str) -> None:
        payload = text.encode()
        assert len(payload) < 126
        mask = os.urandom(4)
        masked = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
        self.sock.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + masked)

    def read_until_closed(self, timeout: float = WAIT) -> tuple[list[str], bool]:
        """Read at last: the text of every message the server sent, in order, until it ended the
        connection; and whether it ended it with a close frame (False: the TCP connection ended).
        Blocking: for a test whose server is another process."""
        self.sock.settimeout(timeout)
        texts: list[str] = []
        partial = b""
        while True:
            head = self._exactly(2)
            if head is None:
                return texts, False
            opcode, length = head[0] & 0x0F, head[1] & 0x7F
            if length >= 126:
                extended = self._exactly(2 if length == 126 else 8)
                if extended is None:
                    return texts, False
                length = int.from_bytes(extended, "big")
            payload = self._exactly(length) if length else b""
            if payload is None:
                return texts, False
            if opcode == 0x8:
                return texts, True
            if opcode in (0x0, 0x1):
                partial += payload
                if head[0] & 0x80:  # FIN: the message is whole
                    texts.append(partial.decode())
                    partial = b""

    def _exactly(self, count: int) -> bytes | None:
        data = b""
        while len(data) < count:
            chunk = self.sock.recv(count - len(data))
            if not chunk:
                return None
            data += chunk
        return data

    def close(self) -> None:
        self.sock.close()


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def tcp_peers(port: int) -> set[int]:
    """The client ports of this machine's TCP connections to `port`, in any state (from
    /proc/net/tcp, as the kernel sees them)."""
    peers = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            local, remote = line.split()[1:3]
            if int(local.rsplit(":", 1)[1], 16) == port:
                peers.add(int(remote.rsplit(":", 1)[1], 16))
    return peers


class LoopThread:
    """An event loop on a thread of its own, for synchronous tests (hypothesis) driving async clients."""

    def __init__(self) -> None:
        import threading

        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Any, timeout: float = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()

    @classmethod
    @contextmanager
    def running(cls) -> Iterator[LoopThread]:
        loop = cls()
        try:
            yield loop
        finally:
            loop.close()


# MODEL_RANDOM=1 draws new cases for the Hypothesis models; otherwise (CI) they run derandomised:
# the same cases every run, so a failure is one the next run meets again.
MODEL_RANDOM = os.environ.get("MODEL_RANDOM") == "1"


def run_machine(
    machine: type[RuleBasedStateMachine], *, examples: int, steps: int, derandomize: bool = False
) -> None:
    """Run a hypothesis state machine for a bounded number of examples and steps.

    `derandomize` (pass `not MODEL_RANDOM`): the same cases every run, and a failing case is
    reported as found, not shrunk (shrinking replays real processes for minutes; the case
    comes back at the next run anyway)."""
    case: Any = machine.TestCase
    case.settings = settings(
        max_examples=examples, stateful_step_count=steps, deadline=None, suppress_health_check=list(HealthCheck),
        derandomize=derandomize, database=None if derandomize else settings.default.database,
        phases=[phase for phase in Phase if phase is not Phase.shrink or not derandomize],
    )
    case().runTest()


def proc_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def raw_event(raw: RawSocket, timeout: float = WAIT) -> tuple[str, Any]:
    """The next Socket.IO event a RawSocket receives: its name and first argument."""
    name, *args = await raw.event(timeout)
    return name, args[0] if args else None
