"""A chaos soak with an oracle: three instances, ~200 sockets, steady emits to every scope, a random fault every few seconds.

.venv/bin/python -m bench.chaos --minutes 30            # the soak the README reports
.venv/bin/python -m bench.chaos --minutes 1 --seed 7    # what CI runs
.venv/bin/python -m bench.chaos --minutes 5 --json      # the report as JSON on stdout

It starts its own redis-server and instances (each reaching Redis through a TCP proxy of its
own, so that one can be cut off), and stops them all at the end, Ctrl-C included. The exit status
is 0 when the oracle passes, 1 when it fails, 2 when the soak itself could not run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import time
import traceback
import uuid
from pathlib import Path
from typing import Any

import aiohttp

from .chaos_clients import BACKEND_ROOMS, PUBLIC_ROOMS, Client, Emitter, World
from .chaos_faults import Chaos, Fault
from .chaos_fleet import Fleet, log
from .chaos_oracle import judge
from .chaos_report import summarise, text

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
QUIET = 3.0  # seconds without emits or faults before the final fence
FINAL_FENCE = 60.0  # bound on the final fence reaching every socket
CONNECT_BATCH = 20  # sockets connecting at once at the start


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.chaos", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, required=True, help="how long faults and emits go on")
    parser.add_argument("--seed", type=int, default=None, help="seeds the faults and the traffic (default: random)")
    parser.add_argument("--sockets", type=int, default=200)
    parser.add_argument("--instances", type=int, default=3)
    parser.add_argument("--rate", type=float, default=10.0, help="steady emits per second (floods come on top)")
    parser.add_argument("--gap", default="2-5", help="seconds between a fault healing and the next, MIN-MAX")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the JSON report and logs go")
    args = parser.parse_args(argv)
    low, _, high = args.gap.partition("-")
    args.gap = (float(low), float(high or low))
    if args.seed is None:
        args.seed = random.randrange(1_000_000)
    return args


def population(sockets: int) -> tuple[list[str], list[tuple[str | None, bool, tuple[str, ...]]]]:
    """The users, and each socket's user (None: anonymous), whether it opts in to recovery, and
    the public rooms it joins itself: about a third opted in, three in ten anonymous, mixed."""
    signed_in = [i for i in range(sockets) if i % 10 not in (1, 4, 7)]
    users = [f"u{j:03d}" for j in range(max(2, len(signed_in) // 3))]
    plan: list[tuple[str | None, bool, tuple[str, ...]]] = []
    for i in range(sockets):
        user = users[signed_in.index(i) % len(users)] if i % 10 not in (1, 4, 7) else None
        rooms = tuple(room for room, every in zip(PUBLIC_ROOMS, (2, 5)) if user is not None and i % every == 0)
        plan.append((user, i % 3 == 0, rooms))
    return users, plan


async def setup(world: World, args: argparse.Namespace) -> list[str]:
    """Tokens, backend rooms, every socket connected and in its rooms, then a fence to all."""
    users, plan = population(args.sockets)
    ttl = min(604800, int(args.minutes * 60) + 3600)
    for user in users:
        status, answer = await world.rest_anywhere("POST", "/api/tokens", {"user_id": user, "ttl": ttl}, ok=201)
        if status != 201:
            raise RuntimeError(f"no token for {user}: {status} {answer}")
        world.tokens[user] = answer["token"]
    for j, user in enumerate(users):
        for room, given in zip(BACKEND_ROOMS, (j % 3 == 0, j % 4 == 1)):
            if given:
                await world.give_room(user, room)
    world.clients = [Client(world, i, user, recovering, rooms) for i, (user, recovering, rooms) in enumerate(plan)]
    slots = world.fleet.slots
    for start in range(0, len(world.clients), CONNECT_BATCH):
        batch = world.clients[start:start + CONNECT_BATCH]
        await asyncio.gather(*(c.first_connect(world.rng.choice(slots)) for c in batch))
    # Nothing has been emitted yet, so no fence is needed to date these joins.
    await asyncio.gather(*(client.join(room, fence=False) for client in world.clients for room in client.wanted))
    late = await world.fence(world.clients, timeout=30.0)
    if late:
        raise RuntimeError(f"{len(late)} sockets did not get the first fence, e.g. {late[0].name()}")
    return users


async def every(seconds: float, stop: asyncio.Event, action: Any) -> None:
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), seconds)
        except TimeoutError:
            await action()


async def soak(world: World, args: argparse.Namespace, users: list[str], rng: random.Random) -> dict[str, Any]:
    stop = asyncio.Event()
    emitter = Emitter(world, args.rate, users)
    chaos = Chaos(world, emitter, random.Random(rng.random()), args.gap)
    began = time.monotonic()
    until = began + args.minutes * 60

    async def progress() -> None:
        acked = sum(1 for e in world.emits if e.acked)
        last = chaos.faults[-1].kind if chaos.faults else "-"
        log(f"chaos: {acked:,} emits acknowledged  {len(chaos.faults)} faults "
            f"(last {last})  {len(world.sessions)} sessions  {len(world.failures)} findings")

    helpers = [
        asyncio.create_task(emitter.run(stop)),
        asyncio.create_task(every(2.0, stop, lambda: world.fleet.sample(world.http))),
        asyncio.create_task(every(30.0, stop, progress)),
    ]
    try:
        await chaos.run(until)
        await asyncio.sleep(max(0.0, until - time.monotonic()))
        stop.set()
        await helpers[0]
        await chaos.settle(Fault(0, "end", time.monotonic()))
        await asyncio.sleep(QUIET)  # the schedule: a quiet period before the fence
        log("chaos: quiet; final fence")
        for client in await world.fence(world.clients, timeout=FINAL_FENCE):
            world.fail(f"{client.name()} on {client.server} did not get the final fence within {FINAL_FENCE:.0f}s")
        await world.fleet.sample(world.http)
    finally:
        stop.set()
        await asyncio.gather(*helpers, return_exceptions=True)
    world.stopping = True
    log("chaos: closing the sockets")
    await close_clients(world)
    log("chaos: judging")
    verdict = await asyncio.to_thread(judge, world.emits, world.sessions)
    settings = {
        "minutes": args.minutes, "seed": args.seed, "instances": args.instances, "sockets": args.sockets,
        "recovering": sum(c.recovering for c in world.clients), "signed_in": sum(c.user is not None for c in world.clients),
        "users": len(users), "rate": args.rate, "gap": list(args.gap), "seconds": round(time.monotonic() - began, 1),
    }
    return summarise(world, chaos.faults, verdict, settings, emitter.skipped)


async def close_clients(world: World) -> None:
    world.stopping = True
    try:
        await asyncio.wait_for(asyncio.gather(*(c.close() for c in world.clients), return_exceptions=True), 20.0)
    except TimeoutError:
        log("chaos: some clients did not close within 20 s")


async def run(args: argparse.Namespace) -> int:
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, asyncio.current_task().cancel)  # type: ignore[union-attr]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    log_dir = args.out / "logs" / f"chaos-{stamp}"
    log_dir.mkdir(parents=True, exist_ok=True)
    tag = f"chaos{uuid.uuid4().hex[:6]}"
    rng = random.Random(args.seed)
    fleet = Fleet(args.instances, tag, log_dir)
    http = aiohttp.ClientSession()
    world = World(fleet, http, random.Random(rng.random()), tag)
    try:
        log(f"chaos: seed {args.seed}; starting redis-server and {args.instances} instances (logs in {log_dir})")
        await fleet.start()
        users = await setup(world, args)
        log(f"chaos: {len(world.clients)} sockets connected; {args.minutes} minutes of faults")
        summary = await soak(world, args, users, rng)
    finally:
        await close_clients(world)
        await http.close()
        log("chaos: stopping the instances and Redis")
        fleet.close()
        log("chaos: done")
    (args.out / f"chaos-{stamp}.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2) if args.json else text(summary))
    return 0 if summary["ok"] else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return asyncio.run(run(args))
    except (KeyboardInterrupt, asyncio.CancelledError):
        log("chaos: interrupted; every process it started is stopped")
        return 130
    except Exception as exc:  # noqa: BLE001 - the soak could not run: say why, exit 2
        traceback.print_exc()
        log(f"chaos: could not run: {type(exc).__name__}: {exc}")
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
