"""The suite: both apps, every workload, interleaved per repetition; a table, JSON and a chart.

.venv/bin/python -m bench              # full suite, medians of 3 runs
.venv/bin/python -m bench --quick      # CI smoke: tiny loads, exits 1 on any loss or crash
.venv/bin/python -m bench --only w1,w2 --runs 3   # W1 and W2, recovery off and on, and the baseline
.venv/bin/python -m bench --reference  # W1, W1b, W3, W3f, W6 against the Node reference too (bench/reference)
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import platform
import shutil
import signal
import sys
import time
import uuid
from importlib import metadata
from pathlib import Path
from typing import Any

import redis

from . import chart, report
from .cluster import API_KEY, BASELINE, OURS, REFERENCE, SECRET_KEY, AppSpec, Cluster
from .loadgen import run_job
from .params import FULL, QUICK, Workload

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DOCS_CHART = ROOT / "docs" / "bench.png"
# What the Node reference runs with --reference: the fan-out and gateway paths the issue compares.
REFERENCE_WORKLOADS = ("w1", "w1b", "w3", "w3f", "w6")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny loads, one run: does the suite still work?"
    )
    parser.add_argument(
        "--runs", type=int, default=None, help="repetitions; the table shows medians (default 3, quick 1)"
    )
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated workloads to run, e.g. w1,w5 (w1 and w2 include their recovery-on runs)",
    )
    parser.add_argument(
        "--no-recovery",
        dest="recovery",
        action="store_false",
        help="skip the recovery-on runs of W1 and W2",
    )
    parser.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--no-pin", dest="pin", action="store_false", help="do not pin servers to cores")
    parser.add_argument(
        "--docs", action="store_true", help=f"also save the chart as {DOCS_CHART.relative_to(ROOT)}"
    )
    parser.add_argument(
        "--reference",
        action="store_true",
        help="also run the Node reference app (bench/reference, needs node and `npm ci` there) on "
        + ", ".join(REFERENCE_WORKLOADS)
        + "; without --only, only those workloads run",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="where results go (default bench/results)")
    parser.add_argument(
        "--ours-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for our instances, e.g. REPLAY_MAX_LEN=0 (repeatable)",
    )
    return parser.parse_args(argv)


def apps_under_test(ours_env: list[str], reference: bool = False) -> tuple[AppSpec, ...]:
    """Ours (with any --ours-env overrides), the baseline, and the Node reference if asked."""
    extra = dict(item.split("=", 1) for item in ours_env if "=" in item)
    ours = OURS if not extra else dataclasses.replace(OURS, env={**OURS.env, **extra})
    return (ours, BASELINE, REFERENCE) if reference else (ours, BASELINE)


def reference_problem() -> str | None:
    """Why the Node reference cannot run here, or None."""
    if shutil.which("node") is None:
        return "--reference needs node on PATH"
    if not (ROOT / "bench" / "reference" / "node_modules" / "socket.io").is_dir():
        return "--reference needs its packages: npm ci --prefix bench/reference"
    return None


def redis_problem(url: str) -> str | None:
    client = redis.Redis.from_url(url, socket_connect_timeout=2)
    try:
        client.ping()
        return None
    except redis.RedisError as exc:
        return f"no Redis answers at {url}: {exc}"
    finally:
        client.close()


class Progress:
    """One status line, rewritten in place on a terminal, one line per step otherwise."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.started = time.monotonic()
        self._tty = sys.stderr.isatty()

    def show(self, text: str) -> None:
        elapsed = int(time.monotonic() - self.started)
        line = f"[{self.done + 1:>3}/{self.total}] {elapsed // 60}:{elapsed % 60:02d}  {text}"
        if self._tty:
            sys.stderr.write("\r" + line.ljust(100)[:100])
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def step(self) -> None:
        self.done += 1

    def close(self) -> None:
        if self._tty:
            sys.stderr.write("\n")


def machine(redis_url: str) -> dict[str, Any]:
    cpu = "unknown cpu"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kib = int(
        next(
            line.split()[1]
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal")
        )
    )
    client = redis.Redis.from_url(redis_url)
    try:
        redis_version = str(client.info("server").get("redis_version"))
    finally:
        client.close()
    packages = {
        name: metadata.version(name)
        for name in (
            "python-socketio",
            "python-engineio",
            "hypercorn",
            "quart",
            "redis",
            "aiohttp",
            "wsproto",
        )
    }
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "redis": redis_version,
        "packages": packages,
    }


class Suite:
    """Runs every (repetition, workload, app) step; owns every server process it starts."""

    def __init__(self, args: argparse.Namespace, suite: list[Workload], runs: int, stamp: str) -> None:
        self.args = args
        self.apps = apps_under_test(args.ours_env, args.reference)
        self.suite = suite
        self.runs = runs
        self.stamp = stamp
        self.records: list[report.Record] = []
        self.log_dir = args.out / "logs" / stamp
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.clusters: dict[str, Cluster] = {}
        self.progress = Progress(runs * sum(len(self._apps_of(w)) for w in suite))

    def _apps_of(self, workload: Workload) -> list[AppSpec]:
        names = workload.apps
        if not workload.recover and workload.key in REFERENCE_WORKLOADS:
            names = (*names, REFERENCE.name)
        return [app for app in self.apps if app.name in names]

    def order(self, rep: int) -> list[tuple[Workload, AppSpec]]:
        """Repetition `rep`'s steps: each group (a workload, with its recovery-on sibling if any)
        back to back, in reverse every other repetition, so drift and warm caches favour neither
        app, and neither recovery off nor on: ours off, baseline, ours on; then ours on, baseline,
        ours off."""
        steps: list[tuple[Workload, AppSpec]] = []
        for _, members in itertools.groupby(self.suite, key=lambda w: w.group):
            group = [(workload, app) for workload in members for app in self._apps_of(workload)]
            steps += reversed(group) if rep % 2 else group
        return steps

    def run(self) -> None:
        try:
            for rep in range(self.runs):
                try:
                    for workload, app in self.order(rep):
                        self._step(rep, workload, app)
                finally:
                    self._stop_all()
        finally:
            self._stop_all()
            self.progress.close()

    def _cluster(self, app: AppSpec, size: int) -> Cluster:
        cluster = self.clusters.get(app.name)
        if cluster is not None and cluster.dead():
            cluster.stop()  # a crashed instance: start a fresh cluster rather than measure a broken one
            cluster = None
        if cluster is None:
            prefix = f"bench-{self.stamp}-{app.name}-{uuid.uuid4().hex[:6]}"
            cluster = Cluster(app, prefix, self.args.redis_url, self.log_dir, self.args.pin)
            self.clusters[app.name] = cluster
        cluster.grow(size)
        return cluster

    def _step(self, rep: int, workload: Workload, app: AppSpec) -> None:
        self.progress.show(f"run {rep + 1}/{self.runs}  {workload.label:<29} {app.name}")
        record: report.Record = {"rep": rep, "app": app.name, "workload": workload.label, "key": workload.key}
        try:
            cluster = self._cluster(app, workload.instances)
            job = {
                "workload": workload.key,
                "targets": cluster.targets(),
                "params": workload.params,
                "secret_key": SECRET_KEY,
                "api_key": API_KEY,
            }
            result = run_job(job, workload.timeout)
            dead = cluster.dead()
            if dead and result.get("ok"):
                result = {"ok": False, "error": f"instances died during the run: {', '.join(dead)}"}
        except Exception as exc:  # noqa: BLE001 - a broken step is recorded; the suite fails at the end
            result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        record.update(
            ok=bool(result.get("ok")), metrics=result.get("metrics") or {}, error=result.get("error")
        )
        self.records.append(record)
        if not record["ok"]:
            sys.stderr.write(f"\n{record['workload']} {app.name} failed: {record['error']}\n")
        self.progress.step()

    def _stop_all(self) -> None:
        for cluster in self.clusters.values():
            cluster.stop()
        self.clusters = {}


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM (a CI timeout) must unwind through the finally blocks that stop the servers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    problem = redis_problem(args.redis_url)
    if problem:
        print(f"bench: {problem}", file=sys.stderr)
        return 2
    if args.reference and (problem := reference_problem()):
        print(f"bench: {problem}", file=sys.stderr)
        return 2
    suite = QUICK if args.quick else FULL
    if args.reference and not args.only:
        args.only = ",".join(REFERENCE_WORKLOADS)
        args.recovery = False
    if args.only:
        wanted = {name.strip().lower() for name in args.only.split(",")}
        suite = [w for w in suite if w.key in wanted]
    if not args.recovery:
        suite = [w for w in suite if not w.recover]
    runs = max(1, args.runs or (1 if args.quick else 3))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "runs": runs,
        "mode": "quick" if args.quick else "full",
        "pinned": args.pin,
        "ours_env": dict(apps_under_test(args.ours_env)[0].env),
        "machine": machine(args.redis_url),
        "workloads": {w.label: {"instances": w.instances, **w.params} for w in suite},
    }
    started = time.monotonic()
    runner = Suite(args, suite, runs, stamp)
    runner.run()
    meta["seconds"] = round(time.monotonic() - started, 1)

    summary = report.summarise(runner.records, suite)
    targets = report.targets(summary, runner.records, suite)
    problems = report.failures(runner.records)
    print(
        f"\nmedians of {runs} run(s), {meta['seconds']:.0f} s; ratio = ours / baseline "
        "(↑ higher is better, ↓ lower is better)\n"
    )
    print(report.table(summary, suite))
    recovery = report.recovery(runner.records, suite)
    if recovery:
        print(f"\nconnection state recovery, ours: on against off, same runs, medians of {runs} run(s)\n")
        print(report.recovery_table(recovery))
    print(f"\ntargets, judged on these medians ({meta['mode']} mode):\n")
    print(report.targets_table(targets))

    out = args.out / f"bench-{stamp}.json"
    document = {
        "meta": meta,
        "summary": summary,
        "recovery": recovery,
        "targets": targets,
        "records": runner.records,
    }
    out.write_text(json.dumps(_json_safe(document), indent=2))
    (args.out / f"bench-{stamp}.md").write_text(
        report.table(summary, suite, markdown=True)
        + "\n\n"
        + (report.recovery_table(recovery, markdown=True) + "\n\n" if recovery else "")
        + report.targets_table(targets, markdown=True)
        + "\n"
    )
    png = args.out / f"bench-{stamp}.png"
    # The chart compares the apps: the recovery-on runs (ours only) are in the tables, not in it.
    charted = [w for w in suite if not w.recover]
    w2 = next((w.label for w in charted if w.key == "w2"), None)
    sweep = report.sweep(runner.records, w2) if w2 else None
    chart.draw(summary, charted, png, chart.caption_for(meta), sweep)
    if args.docs:
        chart.draw(summary, charted, DOCS_CHART, chart.caption_for(meta), sweep)
    print(f"\nwrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out} and {png.name}")

    if problems:
        print(f"\nFAILED: {len(problems)} problem(s):", *problems, sep="\n  ")
        return 1
    print(
        f"\ncorrectness: 0 lost, 0 duplicated, 0 misdelivered, 0 offset faults in {len(runner.records)} workload runs"
    )
    return 0
