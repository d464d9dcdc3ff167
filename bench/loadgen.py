"""The load generator process: `python -m bench.loadgen` reads a job as JSON on stdin, prints metrics.

It runs apart from the orchestrator and the servers, so its CPU is its own; `run_job` is the
orchestrator's side, bounded by a timeout.
"""

from __future__ import annotations

import asyncio
import json
import math
import resource
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any

from .fleet import Fleet, Target
from .workloads import WORKLOADS, Metrics

ROOT = Path(__file__).resolve().parent.parent


async def _run(job: dict[str, Any]) -> Metrics:
    targets = [Target(**t) for t in job["targets"]]
    async with Fleet(targets, job["secret_key"], job["api_key"]) as fleet:
        return await WORKLOADS[job["workload"]](fleet, job["params"])


def _raise_fd_limit() -> None:
    # Thousands of sockets need thousands of descriptors.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main() -> int:
    job = json.load(sys.stdin)
    _raise_fd_limit()
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a hypercorn extra, not a must
        runner = asyncio.run
    try:
        result: dict[str, Any] = {"ok": True, "metrics": runner(_run(job))}
    except Exception as exc:
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
    # NaN is not JSON: None stands for "no value".
    print(json.dumps(_no_nan(result), default=str))
    return 0


def _no_nan(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def run_job(job: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run one job in a fresh load-generator process; a crash or timeout becomes an error result."""
    try:
        done = subprocess.run(
            [sys.executable, "-m", "bench.loadgen"],
            input=json.dumps(job).encode(),
            capture_output=True,
            cwd=ROOT,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:  # subprocess.run has killed it
        return {"ok": False, "error": f"load generator timed out after {timeout:.0f}s"}
    try:
        return dict(json.loads(done.stdout.decode().strip().splitlines()[-1]))
    except (ValueError, IndexError):
        tail = done.stderr.decode(errors="replace")[-2000:]
        return {"ok": False, "error": f"load generator exited {done.returncode}: {tail}"}


if __name__ == "__main__":
    raise SystemExit(main())
