"""Publishes through a REST hook in a loop until a file appears, then prints how long each call
took (JSON): a process of its own, so the load a test puts on its own loop does not count.

    python -m tests.latency_probe <base url> <path> <stop file>
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

from .harness import api


async def main(base: str, path: str, stop: Path) -> None:
    took: list[float] = []
    while not stop.exists():
        started = time.perf_counter()
        status, answer = await api(base, path, {"event": "probe", "data": len(took)})
        took.append(time.perf_counter() - started)
        if status != 202:
            raise SystemExit(f"{status}: {answer}")
    print(json.dumps(took))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], Path(sys.argv[3])))
