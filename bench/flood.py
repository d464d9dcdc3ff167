"""An emit flood at several times what one instance delivers, and its memory: `python -m bench.flood`.

Each run: a redis-server of its own on a free loopback port (unless --redis-url), one instance of
the app as the Procfile serves it (pinned to core 0 when there are two), holding --sockets
WebSocket sockets that read and discard every byte (the clients never set the pace), and a
publisher in this process (the app's own RedisBus) sending `all` envelopes of --size bytes of
data straight to Redis, as a REST emit on another instance would.

1. Capacity: for --probe seconds the publisher keeps --probe-window events in flight (sent, not
   yet on every socket): the instance never waits for work, and no backlog past the window
   builds up (it is below the inbox's bound). The events a socket received per second in the
   second half are what the instance delivers.
2. Flood: --factor times that rate (3 by default; or --rate events/s), paced every 10 ms, for
   --seconds (60), then
   nothing until the instance has delivered what it is going to (no event for 2 s). The
   instance's RSS is read every second throughout; its growth is the largest reading minus the
   one just before the flood. /api/status then tells what the inbox did (overflows, live
   messages left to the history, replayed, gaps) and whether the sockets were kept.

`--inbox-max-messages` / `--inbox-max-bytes` set INBOX_MAX_MESSAGES / INBOX_MAX_BYTES
(`--unbounded`: 10,000,000 messages and 4 GiB, the inbox as it was before it had a bound). The
medians of --runs runs are printed last; every run's figures are written to
bench/results/flood-<time>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Self

import redis

from webapp.realtime import envelope
from webapp.realtime.bus import Mark, RedisBus

from . import procfs
from .cluster import API_KEY, OURS, ROOT, Cluster, free_port
from .wire import _client_frame, _upgrade_problem, _upgrade_request

_TEXT = 0x1
TICK = 0.01  # the flood's pacing period, in seconds
RESULTS = ROOT / "bench" / "results"


class Drain(asyncio.Protocol):
    """A Socket.IO client over one WebSocket that connects, then reads and discards everything,
    counting the frames of the flood's event."""

    def __init__(self, host_header: str, path: str) -> None:
        self._key = base64.b64encode(os.urandom(16)).decode()
        self._request = _upgrade_request(host_header, path, self._key)
        self._head = b""
        self.upgraded = False
        self.events = 0
        self.lost = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        if self.upgraded:
            # An event frame's payload starts `42["flood"`; a count split across two reads is missed
            # (a few per run, against millions).
            self.events += data.count(b'42["flood"')
            return
        self._head += data
        if b"\r\n\r\n" not in self._head:
            return
        head, _, rest = self._head.partition(b"\r\n\r\n")
        problem = _upgrade_problem(head, self._key)
        if problem is not None:
            raise RuntimeError(problem)
        self.upgraded = True
        assert self.transport is not None
        self.transport.write(_client_frame(_TEXT, b"40"))  # the namespace CONNECT, anonymous
        self.events += rest.count(b'42["flood"')

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()


async def _ignore(channel: str, message: bytes, mark: Mark | None) -> None:
    return None


async def _no_gap(reason: str) -> None:
    return None


def _status(url: str) -> dict[str, Any]:
    request = urllib.request.Request(url + "/api/status", headers={"Authorization": f"Bearer {API_KEY}"})
    # Generous: an instance under a flood answers late (how late is part of what is measured).
    with urllib.request.urlopen(request, timeout=30) as answer:
        return dict(json.loads(answer.read()))


class RedisOfOurOwn:
    """A redis-server on a free loopback port, for one run; stopped (SIGKILL, nothing saved) after."""

    def __init__(self) -> None:
        self.port = free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def __enter__(self) -> Self:
        self._proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis(port=self.port, socket_connect_timeout=0.5).ping()
                return self
            except redis.ConnectionError:
                if time.monotonic() > deadline or self._proc.poll() is not None:
                    raise RuntimeError(f"redis-server on {self.port} did not start") from None
                time.sleep(0.05)

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGKILL)
            self._proc.wait(10)


async def _publish(bus: RedisBus, channel: str, data: str, count: int) -> None:
    messages = [envelope.make("all", "flood", data, instance="bench")[1] for _ in range(count)]
    await asyncio.gather(*(bus.publish(channel, message) for message in messages))


async def one_run(args: argparse.Namespace, redis_url: str, env: dict[str, str]) -> dict[str, Any]:
    prefix = f"bench-flood-{uuid.uuid4().hex[:8]}"
    logs = Path(tempfile.mkdtemp(prefix="bench-flood-"))
    app = dataclasses.replace(OURS, env={**OURS.env, **env})
    fleet = Cluster(app, prefix, redis_url, logs, pin=not args.no_pin)
    fleet.grow(1)
    server = fleet.servers[0]
    bus = RedisBus(redis_url, history_key=f"{{{prefix}}}:replay", name=f"{prefix}:bench")
    drains: list[Drain] = []
    loop = asyncio.get_running_loop()
    try:
        await bus.start(_ignore, _no_gap)
        deadline = time.monotonic() + 10
        while not bus.ready:
            if time.monotonic() > deadline:
                raise TimeoutError("the publisher's bus did not reach Redis")
            await asyncio.sleep(0.05)
        path = "/socket.io/?EIO=4&transport=websocket"
        for _ in range(args.sockets):
            drain = Drain(f"127.0.0.1:{server.port}", path)
            await loop.create_connection(lambda d=drain: d, "127.0.0.1", server.port)  # type: ignore[misc]
            drains.append(drain)
        while _status(server.url).get("sockets", 0) < args.sockets:
            await asyncio.sleep(0.05)
        channel = f"{prefix}:all"
        data = "x" * args.size
        _progress(f"{args.sockets} sockets on {server.name}; probing its capacity for {args.probe:g}s")

        # 1. Capacity: a window of --probe-window events in flight (published, not yet on every
        # socket), refilled as they arrive: the instance never waits for work, and no backlog
        # past the window builds up. The second half is counted.
        stop = time.monotonic() + args.probe
        counted_from = time.monotonic() + args.probe / 2
        counted_at, start_events = 0.0, 0
        sent = 0
        while time.monotonic() < stop:
            if sent - min(d.events for d in drains) < args.probe_window:
                await _publish(bus, channel, data, 100)
                sent += 100
            else:
                await asyncio.sleep(0.002)
            if not counted_at and time.monotonic() >= counted_from:
                counted_at, start_events = time.monotonic(), min(d.events for d in drains)
        delivered = (min(d.events for d in drains) - start_events) / (time.monotonic() - counted_at)
        # The probe's last window delivered before the baseline (30 s at most).
        settle_by = time.monotonic() + 30
        while min(d.events for d in drains) < sent and time.monotonic() < settle_by:
            await asyncio.sleep(0.05)
        await asyncio.sleep(1)
        status_before = _status(server.url)["bus"]

        # 2. The flood, paced, with the RSS read every second.
        rate = args.rate or args.factor * delivered
        _progress(f"capacity {delivered:,.0f} events/s; flooding at {rate:,.0f}/s for {args.seconds:g}s")
        baseline = procfs.rss_kib(server.worker_pid)
        samples = [baseline]
        events_before = sum(d.events for d in drains)
        started = last = time.monotonic()
        next_sample = started + 1
        owed = 0.0
        flood_sent = 0
        while (now := time.monotonic()) < started + args.seconds:
            owed += rate * (now - last)  # by the clock: a slow tick is made up by the next
            last = now
            batch = int(owed)
            owed -= batch
            if batch:
                await _publish(bus, channel, data, batch)
                flood_sent += batch
            if now >= next_sample:
                samples.append(procfs.rss_kib(server.worker_pid))
                next_sample += 1
            await asyncio.sleep(max(0.0, TICK - (time.monotonic() - now)))
        achieved = flood_sent / (time.monotonic() - started)
        # Then until it has delivered what it is going to (no new event for 2 s; 240 s at most),
        # its RSS still read every second.
        ended = time.monotonic()
        seen, quiet_since = -1, time.monotonic()
        while time.monotonic() - quiet_since < 2 and time.monotonic() - ended < 240:
            await asyncio.sleep(1)
            samples.append(procfs.rss_kib(server.worker_pid))
            now_seen = sum(d.events for d in drains)
            if now_seen != seen:
                seen, quiet_since = now_seen, time.monotonic()
        settled = time.monotonic() - ended
        status = _status(server.url)
        flood_events = (sum(d.events for d in drains) - events_before) / args.sockets
        bus_after = status["bus"]
        return {
            "sockets": args.sockets,
            "size": args.size,
            "capacity_per_s": round(delivered),
            "flood_rate_per_s": round(achieved),
            "factor_achieved": round(achieved / delivered, 2) if delivered else None,
            "published": flood_sent,
            "delivered_per_socket": round(flood_events),
            # What it delivered per second from the flood's start until it went quiet, and the
            # flood's rate over that: the overload it actually met (the probe is noisy on a
            # shared machine, and a backlog is delivered faster than a trickle).
            "throughput_per_s": round(flood_events / (args.seconds + settled)),
            "overload": round(achieved / (flood_events / (args.seconds + settled)), 2) if flood_events else None,
            "delivered_share": round(flood_events / flood_sent, 3) if flood_sent else None,
            "settle_s": round(settled, 1),
            "rss_baseline_mib": round(baseline / 1024, 1),
            "rss_peak_mib": round(max(samples) / 1024, 1),
            "rss_growth_mib": round((max(samples) - baseline) / 1024, 1),
            "rss_samples_mib": [round(s / 1024, 1) for s in samples],
            "sockets_kept": status.get("sockets"),
            "alive": server.alive,
            **{key: bus_after.get(key, 0) - status_before.get(key, 0)
               for key in ("overflows", "shed", "replayed", "gaps", "reconnects")},
        }
    finally:
        for drain in drains:
            drain.close()
        await bus.close()
        fleet.stop()
        shutil.rmtree(logs, ignore_errors=True)


def _progress(line: str) -> None:
    print(f"  {time.strftime('%H:%M:%S')} {line}", file=sys.stderr, flush=True)


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.flood", description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the flood")
    parser.add_argument("--probe", type=float, default=8.0, help="length of the capacity probe")
    parser.add_argument("--probe-window", type=int, default=2000, help="events in flight during the capacity probe")
    parser.add_argument("--factor", type=float, default=3.0, help="flood rate / measured capacity")
    parser.add_argument("--rate", type=float, default=None, help="flood rate in events/s, instead of --factor")
    parser.add_argument("--sockets", type=int, default=300)
    parser.add_argument("--size", type=int, default=200, help="bytes of data per event")
    parser.add_argument("--inbox-max-messages", type=int, default=None)
    parser.add_argument("--inbox-max-bytes", type=int, default=None)
    parser.add_argument("--unbounded", action="store_true", help="the inbox with no bound to speak of, as before")
    parser.add_argument("--redis-url", default=None, help="a Redis to use instead of one of our own")
    parser.add_argument("--no-pin", action="store_true")
    return parser.parse_args()


def main() -> int:
    args = _arguments()
    # The clients read everything, so they never count as slow; they answer no ping, so the
    # first ping is put past the end of the run.
    env: dict[str, str] = {"SOCKET_MAX_QUEUE": "1000000", "PING_INTERVAL": "3600", "PING_TIMEOUT": "3600"}
    if args.unbounded:
        env |= {"INBOX_MAX_MESSAGES": "10000000", "INBOX_MAX_BYTES": str(1 << 32)}
    if args.inbox_max_messages is not None:
        env["INBOX_MAX_MESSAGES"] = str(args.inbox_max_messages)
    if args.inbox_max_bytes is not None:
        env["INBOX_MAX_BYTES"] = str(args.inbox_max_bytes)
    runs: list[dict[str, Any]] = []
    for index in range(args.runs):
        bound = args.probe + args.seconds + 360  # a run that hangs fails instead
        if args.redis_url:
            result = asyncio.run(asyncio.wait_for(one_run(args, args.redis_url, env), bound))
        else:
            with RedisOfOurOwn() as own:
                result = asyncio.run(asyncio.wait_for(one_run(args, own.url, env), bound))
        runs.append(result)
        shown = {k: v for k, v in result.items() if k != "rss_samples_mib"}
        print(f"run {index + 1}/{args.runs}: {json.dumps(shown)}", flush=True)
    keys = ("capacity_per_s", "flood_rate_per_s", "factor_achieved", "throughput_per_s", "overload", "rss_growth_mib", "overflows", "shed",
            "replayed", "gaps", "reconnects", "delivered_per_socket", "published", "delivered_share", "settle_s")
    medians = {key: statistics.median(r[key] for r in runs if r[key] is not None) for key in keys}
    print("medians:", json.dumps(medians))
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"flood-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"argv": sys.argv[1:], "env": env, "runs": runs, "medians": medians}, indent=2))
    print(f"written to {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
