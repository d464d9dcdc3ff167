"""A recovery as large as the history: everything it holds reaches a client that reads as fast
as it can, at the pace it reads, however far past SOCKET_MAX_QUEUE."""

from __future__ import annotations

import asyncio
import json
import sys
from collections import Counter
from pathlib import Path

import pytest

from .harness import ROOT, Instance, api, unique
from .test_entitlement import opted_in, resume
from .test_recovery import Wire, emit, fleet

pytestmark = pytest.mark.cluster

MISSED = 9_000


async def test_nine_thousand_missed_events_are_recovered_whole_on_the_other_instance(
    instances: list[Instance], wires: list[Wire]
) -> None:
    a, b = fleet(instances, unique("recover-large"))
    ivy = unique("ivy")
    wire, token = await opted_in(a.url, ivy, wires)
    await emit(b.url, f"/api/emit/users/{ivy}", "dm", "seen")
    _, _, offset = await wire.event()
    await wire.close()
    for start in range(0, MISSED, 100):  # MAX_BATCH events a call
        events = [{"scope": "user", "user_id": ivy, "event": "dm", "data": n} for n in range(start, start + 100)]
        status, answer = await api(b.url, "/api/emit/batch", {"events": events})
        assert status == 202, answer
    back = await resume(b.url, token, wire, offset, wires)
    replay = await back.events_until("recovered")
    assert [e[1] for e in replay[:-1]] == list(range(MISSED))
    assert replay[-1][:2] == ["recovered", {"missed": MISSED}]
    await emit(a.url, f"/api/emit/users/{ivy}", "dm", "live")
    assert (await back.event())[:2] == ["dm", "live"]
    assert b.status()[1]["slow_consumers_evicted"] == 0


async def test_a_crowd_of_recoveries_waits_its_turn_and_publishes_keep_answering(
    instances: list[Instance], wires: list[Wire], tmp_path: Path
) -> None:
    """500 anonymous sockets resume from their sessions' start at once, each a range read over
    a long history: at most RECOVERY_CONCURRENCY read at a time, the rest wait their turn or are
    told `busy`, and the fleet's REST publishes (through the other instance: Redis is what the
    reads could hog) keep answering 202 quickly all along."""
    a, b = fleet(instances, unique("recover-crowd"), RECOVERY_CONCURRENCY="8", REDIS_TIMEOUT="1")
    crowd = await asyncio.gather(*(Wire.connect(a.url, {"recover": True}) for _ in range(500)))
    wires.extend(crowd)
    for wire in crowd:
        await wire.close()
    other = unique("other")
    for start in range(0, 2_000, 100):  # a long history, none of it for the crowd
        events = [{"scope": "user", "user_id": other, "event": "dm", "data": n} for n in range(start, start + 100)]
        assert (await api(b.url, "/api/emit/batch", {"events": events}))[0] == 202
    await emit(b.url, "/api/emit/all", "news", "for everyone")

    async def comes_back(wire: Wire) -> str:
        back = await Wire.connect(b.url, {"recover": True, "pid": wire.reply["pid"]})
        wires.append(back)
        first = await back.event(timeout=30)
        if first[0] == "recovery_failed":
            assert first[1] == {"reason": "busy"}, first
            return "busy"
        assert first[:2] == ["news", "for everyone"] and (await back.event())[:2] == ["recovered", {"missed": 1}]
        return "recovered"

    # The fleet's publishes, timed by a process of their own (the crowd's clients load this one).
    stop = tmp_path / "stop"
    probe = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.latency_probe", a.url, f"/api/emit/users/{other}", str(stop),
        cwd=ROOT, stdout=asyncio.subprocess.PIPE,
    )
    try:
        outcomes = Counter(await asyncio.gather(*(comes_back(wire) for wire in crowd)))
    finally:
        stop.touch()
        out, _ = await asyncio.wait_for(probe.communicate(), 10)
    latencies = sorted(json.loads(out))
    assert outcomes["recovered"] >= 8 and sum(outcomes.values()) == len(crowd), outcomes
    p99 = latencies[int(len(latencies) * 0.99)]
    # 12 to 53 ms here with other suites running beside; a guard with room, not the figure.
    assert len(latencies) >= 20 and p99 <= 0.1, (len(latencies), p99, outcomes)
    failed = b.status()[1]["recovery"]["failed"]
    assert failed.get("busy", 0) == outcomes["busy"], failed
