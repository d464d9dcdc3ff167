"""Profile one loaded instance with py-spy: `python -m bench.profile [--workload w1] [--app ours]`.

Starts two instances, drives a workload long enough to sample one instance's worker (A, or B with `--instance 1`) for
`--seconds`, writes a flame graph (SVG) and the collapsed stacks, and prints the functions
where the samples sit (self time) and which they pass through (inclusive time).
"""

from __future__ import annotations

import argparse
import re
import resource
import shutil
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

from .cluster import API_KEY, APPS, SECRET_KEY, Cluster
from .loadgen import finish_job, start_job
from .params import FULL

_FRAME = re.compile(r"^(.*) \((.*?)(?::\d+)?\)$")
RESULTS = Path(__file__).resolve().parent / "results"
SET_UP = 4.0  # seconds for the load generator to connect (and settle) its sockets before sampling starts
W2_RATE = 8  # emits/s: W2's sweep becomes one step, 8,000 deliveries/s on 1,000 sockets
W4_RATE = 1500  # about the handshakes/s one instance completes


def top(collapsed: Path, limit: int) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """Self and inclusive shares of samples per function, from py-spy's raw (collapsed) output."""
    own: Counter[str] = Counter()
    through: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = [_frame(f) for f in stack.split(";")]
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            through[frame] += count
    share = 100 / max(1, total)
    return (
        [(name, n * share) for name, n in own.most_common(limit)],
        [(name, n * share) for name, n in through.most_common(limit)],
    )


def _frame(raw: str) -> str:
    """`func (/long/path/pkg/mod.py:123)` -> `func (pkg/mod.py)`: lines merged, paths short."""
    match = _FRAME.match(raw)
    if match is None:
        return raw
    name, path = match.groups()
    return f"{name} ({'/'.join(path.split('/')[-2:])})"


def _descriptors() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--workload", default="w1", choices=["w1", "w2", "w3", "w3f", "w4"])
    parser.add_argument(
        "--instance", type=int, default=0, choices=[0, 1], help="which instance to sample (W3f's receivers are on 1)"
    )
    parser.add_argument("--app", default="ours", choices=[app.name for app in APPS])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument(
        "--recover", action="store_true", help="W1/W2: every socket opts in to connection state recovery"
    )
    parser.add_argument("--rate", type=int, default=W2_RATE, help="W2: broadcasts per second (one sweep step)")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args(argv)
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    app = next(a for a in APPS if a.name == args.app)
    workload = next(w for w in FULL if w.key == args.workload)
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"profile-{app.name}-{workload.key}"
    (RESULTS / "logs").mkdir(exist_ok=True)
    cluster = Cluster(
        app, f"bench-profile-{uuid.uuid4().hex[:6]}", args.redis_url, RESULTS / "logs", pin=True
    )
    load = None
    try:
        cluster.grow(2)
        # Long enough for two sampling windows (collapsed stacks, then the flame graph); one
        # rate for W2's sweep and no half-load phase for W1 and W3: a steady load throughout.
        params = {
            **workload.params,
            "warmup": 0,
            "seconds": SET_UP + 2 * args.seconds + 2,
            "half_seconds": 0,
            "one_seconds": 0,
            **({"rates": [args.rate], "min_emits": 0} if "rates" in workload.params else {}),
            **({"recover": True} if args.recover else {}),
            # W4 is a burst of handshakes: enough sockets for it to last the sampling windows.
            # (Within the descriptors a process may open: the server holds one per socket.)
            **({"sockets": min(int(W4_RATE * (SET_UP + 2 * args.seconds + 2)), _descriptors() - 2000)}
               if workload.key == "w4" else {}),
        }
        load = start_job(
            {
                "workload": workload.key,
                "targets": cluster.targets(),
                "params": params,
                "secret_key": SECRET_KEY,
                "api_key": API_KEY,
            }
        )
        time.sleep(SET_UP)
        pid = str(cluster.servers[args.instance].worker_pid)
        for fmt, out in (("raw", stem.with_suffix(".txt")), ("flamegraph", stem.with_suffix(".svg"))):
            subprocess.run(
                [
                    py_spy,
                    "record",
                    "--pid",
                    pid,
                    "--duration",
                    str(args.seconds),
                    "--rate",
                    "200",
                    "--nonblocking",
                    "--format",
                    fmt,
                    "--output",
                    str(out),
                ],
                check=True,
                capture_output=True,
                timeout=args.seconds + 30,
            )
        result = finish_job(load, workload.timeout + 2 * args.seconds)
        load = None
    finally:
        if load is not None:
            load.kill()
            load.wait()
        cluster.stop()
    print(f"{app.name} under {workload.label}: {result.get('metrics') or result.get('error')}")
    own, through = top(stem.with_suffix(".txt"), 25)
    print("\nself time (where samples sit):")
    print("\n".join(f"  {pct:5.1f}%  {name}" for name, pct in own))
    print("\ninclusive time (what samples pass through):")
    print("\n".join(f"  {pct:5.1f}%  {name}" for name, pct in through))
    print(f"\nflame graph: {stem.with_suffix('.svg')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
