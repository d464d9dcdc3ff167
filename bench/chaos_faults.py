"""The chaos soak's faults: one at a time, drawn from a seeded generator, each healed and settled before the next."""

from __future__ import annotations

import asyncio
import random
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .chaos_clients import Emitter, World
from .chaos_fleet import CHAOS, START_TIMEOUT, log

# How often each fault is drawn, relative to the others.
WEIGHTS = {"blink": 3, "partition": 2, "flood": 2, "redis_restart": 1, "sigkill": 1, "sigterm": 1}
SETTLE_BOUND = 90.0  # every instance ready and every client back within this long after a fault
DRAIN_BOUND = float(CHAOS.env["SHUTDOWN_TIMEOUT"]) + 10.0  # a drain's exit, past which it is SIGKILLed


@dataclass
class Fault:
    id: int
    kind: str
    started: float
    target: str = ""
    ended: float = 0.0
    wall: str = field(default_factory=lambda: time.strftime("%H:%M:%S"))  # to find it in the instances' logs
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return self.ended - self.started


def schedule(rng: random.Random) -> Iterator[str]:
    """Each kind once, in a random order, so that a short run sees them all; then bags of the
    weighted kinds, shuffled."""
    first = list(WEIGHTS)
    rng.shuffle(first)
    yield from first
    while True:
        bag = [kind for kind, weight in WEIGHTS.items() for _ in range(weight)]
        rng.shuffle(bag)
        yield from bag


class Chaos:
    """Injects faults until told to stop; keeps the record of each."""

    def __init__(self, world: World, emitter: Emitter, rng: random.Random, gap: tuple[float, float]) -> None:
        self.world = world
        self.emitter = emitter
        self.rng = rng
        self.gap = gap
        self.faults: list[Fault] = []

    async def run(self, until: float) -> None:
        kinds = schedule(self.rng)
        while True:
            pause = self.rng.uniform(*self.gap)
            if time.monotonic() + pause >= until:
                return
            await asyncio.sleep(pause)  # the soak's schedule, not a wait for an outcome
            fault = Fault(len(self.faults) + 1, next(kinds), time.monotonic())
            self.faults.append(fault)
            self.world.fault = fault.id
            try:
                await getattr(self, fault.kind)(fault)
                await self.settle(fault)
            finally:
                fault.ended = time.monotonic()
                self.world.fault = 0
                detail = ", ".join(f"{k} {v}" for k, v in fault.detail.items())
                log(f"chaos: fault {fault.id} at {fault.wall}: {fault.kind} {fault.target} ({detail}), healed in {fault.seconds:.1f}s")

    async def settle(self, fault: Fault) -> None:
        """Until every instance is ready and every client connected again (bounded)."""
        world = self.world
        deadline = time.monotonic() + SETTLE_BOUND
        while True:
            slots = world.fleet.slots
            ready = all(slot.up for slot in slots)
            back = [c for c in world.clients if not c.sio.connected or c.busy]
            if ready and not back:
                return
            if time.monotonic() > deadline:
                world.fail(f"fault {fault.id} ({fault.kind}): {len(back)} clients not back, "
                           f"instances up: {[s.name for s in slots if s.up]}, {SETTLE_BOUND:.0f}s after it")
                return
            await asyncio.sleep(0.1)

    # --- the faults ------------------------------------------------------------------------------------

    async def blink(self, fault: Fault) -> None:
        """Recovering sockets drop their connection and come back, with their pid, to a random instance."""
        candidates = [c for c in self.world.clients if c.recovering and c.sio.connected and not c.busy]
        if not candidates:
            return
        chosen = self.rng.sample(candidates, max(1, round(len(candidates) * self.rng.uniform(0.05, 0.2))))
        for client in chosen:
            client.blinking, client.hold = True, self.rng.uniform(0.2, 3.0)
        await asyncio.gather(*(client.sio.disconnect() for client in chosen), return_exceptions=True)
        fault.target, fault.detail["sockets"] = f"{len(chosen)} sockets", len(chosen)

    async def partition(self, fault: Fault) -> None:
        """One instance's connection to Redis is cut for a few seconds, then restored."""
        slot = self.rng.choice(self.world.fleet.up())
        seconds = self.rng.uniform(1.5, 5.0)
        fault.target, fault.detail["seconds"] = slot.name, round(seconds, 1)
        await asyncio.to_thread(slot.proxy.cut)
        try:
            await asyncio.sleep(seconds)
        finally:
            await asyncio.to_thread(slot.proxy.restore)
        await slot.wait_ready(START_TIMEOUT)

    async def flood(self, fault: Fault) -> None:
        """A burst of emits, batches of 100 mixed scopes at once, under SOCKET_MAX_QUEUE per socket."""
        batches = self.rng.choice([2, 3])
        acked = await asyncio.gather(*(self.emitter.batch(100) for _ in range(batches)))
        fault.target, fault.detail["events"], fault.detail["acknowledged"] = f"{batches * 100} events", batches * 100, sum(acked)

    async def sigkill(self, fault: Fault) -> None:
        await self._restart(fault, signal.SIGKILL)

    async def sigterm(self, fault: Fault) -> None:
        await self._restart(fault, signal.SIGTERM)

    async def _restart(self, fault: Fault, sig: int) -> None:
        """An instance is killed (or drained) and started again; its sockets move to the others."""
        world = self.world
        slot = self.rng.choice(world.fleet.up())
        assert slot.server is not None
        fault.target = slot.server.name
        await world.fleet.read_status(world.http, slot)  # its last counters (evictions) before it goes
        held = sum(1 for c in world.clients if c.server == slot.server.name and c.sio.connected)
        began = time.monotonic()
        code = await slot.stop(sig, DRAIN_BOUND if sig == signal.SIGTERM else 5.0, world.fleet.doomed)
        fault.detail.update(sockets=held, exit_code=code, exit_seconds=round(time.monotonic() - began, 2))
        if sig == signal.SIGTERM and code != 0:
            world.fail(f"fault {fault.id}: the drained instance {fault.target} exited with {code}, not 0")
        slot.launch()
        await slot.wait_ready()

    async def redis_restart(self, fault: Fault) -> None:
        """Redis stops (SIGTERM) and starts again empty; the backend gives its users their rooms again."""
        world = self.world
        fleet = world.fleet
        fault.target = "redis"
        await asyncio.to_thread(fleet.redis.stop)
        for rooms in world.record_rooms.values():
            rooms.clear()  # the users' records went with the data set
        down = self.rng.uniform(0.5, 2.5)
        fault.detail["down_seconds"] = round(down, 1)
        await asyncio.sleep(down)
        await asyncio.to_thread(fleet.redis.start)
        await asyncio.gather(*(slot.wait_ready() for slot in fleet.up()))
        for user, rooms in sorted(world.backend_rooms.items()):
            for room in sorted(rooms):
                await world.give_room(user, room)
