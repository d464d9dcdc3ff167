"""The load generator's tools: many wire sockets, REST emits, and the two load shapes."""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Self

import aiohttp
import orjson

from webapp.auth.tokens import TokenSigner

from . import procfs
from .wire import EventHandler, SioSocket

WAIT = 10.0  # upper bound of any single wait on the servers, in seconds
TOKEN_TTL = 3600


@dataclass(frozen=True)
class Target:
    """One server instance as the load generator sees it."""

    name: str
    url: str
    pid: int  # the hypercorn worker, for /proc readings


def _ignore(index: int, event: str, data: Any, received_at: float) -> None:
    return None


class Fleet:
    """Sockets on several instances, one HTTP session for REST, and where events go (`sink`)."""

    def __init__(self, targets: Sequence[Target], secret_key: str, api_key: str) -> None:
        self.targets = list(targets)
        self.sockets: list[SioSocket] = []
        self.sink: EventHandler = _ignore
        self.rest_failures = 0
        self._signer = TokenSigner(secret_key)
        self._headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
        self._session: aiohttp.ClientSession | None = None
        self.tag = uuid.uuid4().hex[:6]  # user ids never collide with a previous run's leftovers

    async def __aenter__(self) -> Self:
        # REST only (sockets are bench/wire.py's own). limit=0: an open-loop emit never queues for
        # a connection behind earlier ones, which would count as server latency.
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close_sockets()
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "use Fleet in `async with`"
        return self._session

    def user(self, name: str, i: int) -> str:
        return f"{name}-{self.tag}-{i}"

    async def token_via_rest(self, target: int, user_id: str) -> str:
        """A token from POST /api/tokens: proves the REST hook and that tokens are interchangeable."""
        url = self.targets[target].url + "/api/tokens"
        async with self.session.post(
            url, data=orjson.dumps({"user_id": user_id}), headers=self._headers
        ) as resp:
            body = await resp.read()
            if resp.status != 201:
                raise RuntimeError(f"POST /api/tokens answered {resp.status}: {body[:200]!r}")
            return str(orjson.loads(body)["token"])

    def token(self, user_id: str) -> str:
        # Minted here with the shared secret: thousands of REST round trips would only slow set-up.
        return self._signer.mint(user_id, TOKEN_TTL).value

    def _dispatch(self, index: int, event: str, data: Any, received_at: float) -> None:
        self.sink(index, event, data, received_at)

    async def open(
        self, placements: Sequence[tuple[int, str | None]], concurrency: int = 50, recover: bool = False
    ) -> list[float]:
        """Open one socket per (target index, user id); return each connect's duration in seconds.

        `recover`: every socket opts in to connection state recovery (see bench/wire.py).
        """
        first = len(self.sockets)
        slots: list[SioSocket | None] = [None] * len(placements)
        durations: list[float] = [0.0] * len(placements)
        gate = asyncio.Semaphore(concurrency)
        rest_token = (
            await self.token_via_rest(placements[0][0], placements[0][1]) if placements[0][1] else None
        )

        async def one(i: int, target: int, user_id: str | None) -> None:
            token = rest_token if i == 0 else (self.token(user_id) if user_id else None)
            async with gate:
                started = time.monotonic()
                slots[i] = await SioSocket.connect(
                    self.session, self.targets[target].url, token, first + i, self._dispatch, WAIT, recover
                )
                durations[i] = time.monotonic() - started

        results = await asyncio.gather(
            *(one(i, target, user) for i, (target, user) in enumerate(placements)), return_exceptions=True
        )
        self.sockets.extend(sock for sock in slots if sock is not None)
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            raise RuntimeError(
                f"{len(failures)} of {len(placements)} sockets failed to connect: {failures[0]!r}"
            )
        return durations

    def offset_faults(self) -> int:
        """Offset faults of every socket so far (see wire.OffsetChecks): none is the only good count."""
        return sum(sock.offsets.faults for sock in self.sockets)

    def offset_checks(self) -> dict[str, int]:
        """The sockets' offset checks, summed, for the JSON."""
        checks = [sock.offsets for sock in self.sockets]
        return {
            "recoverable_sockets": sum(1 for sock in self.sockets if sock.pid is not None),
            "offsets_seen": sum(c.seen for c in checks),
            "offsets_missing": sum(c.missing for c in checks),
            "offsets_not_increasing": sum(c.not_increasing for c in checks),
            "offsets_unexpected": sum(c.unexpected for c in checks),
            "recovery_notices": sum(c.notices for c in checks),
        }

    async def close_sockets(self) -> None:
        sockets, self.sockets = self.sockets, []
        await asyncio.gather(*(sock.close() for sock in sockets), return_exceptions=True)

    async def rest_emit(self, target: int, path: str, event: str, data: Any, **fields: Any) -> None:
        """POST an emit (`fields` join the body); a non-202 is counted (its deliveries will show as lost)."""
        url = self.targets[target].url + path
        body = orjson.dumps({**fields, "event": event, "data": data})
        try:
            async with self.session.post(url, data=body, headers=self._headers) as resp:
                await resp.read()
                if resp.status != 202:
                    self.rest_failures += 1
        except (TimeoutError, aiohttp.ClientError):
            self.rest_failures += 1

    def cpu(self) -> list[float]:
        return [procfs.cpu_seconds(t.pid) for t in self.targets]


Send = Callable[[int], Coroutine[Any, Any, None]]
Wait = Callable[[int], Coroutine[Any, Any, bool]]


async def closed_loop(window: int, seconds: float, send: Send, wait: Wait) -> None:
    """`window` senders, each sending its next emit once its previous one was fully delivered."""
    seqs = itertools.count()
    deadline = time.monotonic() + seconds

    async def sender() -> None:
        while time.monotonic() < deadline:
            seq = next(seqs)
            await send(seq)
            await wait(seq)

    await asyncio.gather(*(sender() for _ in range(window)))


async def fixed_rate(rate: float, seconds: float, send: Send) -> None:
    """Open loop: emit k leaves at start + k/rate whether or not earlier ones arrived."""
    count = max(1, int(rate * seconds))
    start = time.monotonic()
    tasks: list[asyncio.Task[None]] = []
    for k in range(count):
        delay = start + k / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(send(k)))
    await asyncio.gather(*tasks)
