"""The load generator process: `python -m bench.loadgen JOB_JSON` runs one job and prints its metrics.

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
from collections.abc import Coroutine
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
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _loop_run(work: Coroutine[Any, Any, Metrics]) -> Metrics:
    """uvloop when present (less client CPU per message), else asyncio."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop comes with hypercorn's extras, not a must
        return asyncio.run(work)
    return uvloop.run(work)


def main() -> int:
    job = json.loads(sys.argv[1]) if len(sys.argv) > 1 else json.load(sys.stdin)
    _raise_fd_limit()
    try:
        result: dict[str, Any] = {"ok": True, "metrics": _loop_run(_run(job))}
    except Exception as exc:  # noqa: BLE001 - any failure becomes a result the orchestrator reports
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
    # NaN is not JSON: None stands for "no value".
    print(json.dumps(_no_nan(result), default=str))
    return 0


def _no_nan(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, list):  # W2's steps
        return [_no_nan(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def start_job(job: dict[str, Any]) -> subprocess.Popen[bytes]:
    """Start a load-generator process on `job`; its last stdout line will be the result."""
    return subprocess.Popen(
        [sys.executable, "-m", "bench.loadgen", json.dumps(job)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )


def finish_job(proc: subprocess.Popen[bytes], timeout: float) -> dict[str, Any]:
    """Wait for a load generator; a crash or timeout becomes an error result (and it is killed)."""
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return {"ok": False, "error": f"load generator timed out after {timeout:.0f}s"}
    except BaseException:  # interrupted: take the load generator down with us
        proc.kill()
        proc.wait()
        raise
    try:
        return dict(json.loads(stdout.decode().strip().splitlines()[-1]))
    except (ValueError, IndexError):
        tail = stderr.decode(errors="replace")[-2000:]
        return {"ok": False, "error": f"load generator exited {proc.returncode}: {tail}"}


def run_job(job: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run one job in a fresh load-generator process, bounded by `timeout` seconds."""
    return finish_job(start_job(job), timeout)


if __name__ == "__main__":
    raise SystemExit(main())
